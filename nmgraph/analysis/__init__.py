"""Analysis: which weights can be N:M, and which channels must be permuted together.

Read in this order: :mod:`~nmgraph.analysis.aten_ops` (the op vocabulary and the one GEMM-weight
table), :mod:`~nmgraph.analysis.nodes` (helpers over FX nodes), :mod:`~nmgraph.analysis.flow` (the
union-find solver over channel spaces), :mod:`~nmgraph.analysis.rules` (how channels flow through
each op: the rules table), :mod:`~nmgraph.analysis.eligibility` (which weights are GEMM weights),
:mod:`~nmgraph.analysis.groups` (classes to permutation groups), :mod:`~nmgraph.analysis.analyzer`
(the entry point) and :mod:`~nmgraph.analysis.plan` (what it returns).
"""

from __future__ import annotations

from nmgraph.analysis.analyzer import analyze
from nmgraph.analysis.plan import LayerInfo, Member, PermutationGroup, Skip, SparsityPlan
from nmgraph.analysis.rules import NAMED_RULES, OP_RULES, Rule

__all__ = ["NAMED_RULES", "OP_RULES", "LayerInfo", "Member", "PermutationGroup", "Rule", "Skip", "SparsityPlan",
           "analyze"]

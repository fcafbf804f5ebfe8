"""Data-aware one-shot N:M pruning: magnitude, Wanda and SparseGPT, permutation-aware, layer by layer.

:func:`sparsify` is the entry point (also ``nmgraph.sparsify``). The parts are usable on their own:
:func:`load_calibration` (calibration data), :func:`wanda_prune` and :func:`sparsegpt_prune` (one
2-D weight with its input statistics), :class:`GraphRunner` (node-major execution of a captured
graph over a calibration set).
"""

from __future__ import annotations

from nmgraph.oneshot.calibration import Calibration, CalibrationError, load_calibration
from nmgraph.oneshot.report import GroupReport, LayerReport, SparsifyReport
from nmgraph.oneshot.sequential import METHODS, GraphRunner
from nmgraph.oneshot.sparsegpt import SparseGPTResult, sparsegpt_prune
from nmgraph.oneshot.sparsify import sparsify
from nmgraph.oneshot.wanda import wanda_prune, wanda_score

__all__ = [
    "METHODS",
    "Calibration",
    "CalibrationError",
    "GraphRunner",
    "GroupReport",
    "LayerReport",
    "SparseGPTResult",
    "SparsifyReport",
    "load_calibration",
    "sparsegpt_prune",
    "sparsify",
    "wanda_prune",
    "wanda_score",
]

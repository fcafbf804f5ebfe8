"""Permutation search on score matrices (tensor math, never a graph).

:func:`search_permutation` finds a channel order that keeps more of a ``[rows, channels]`` score
matrix under N:M pruning (:mod:`~nmgraph.search.permutation`); :mod:`~nmgraph.search.kernels`
holds its batched tensor kernels. :func:`nmgraph.permute` applies the result to a graph.
"""

from __future__ import annotations

from nmgraph.search.permutation import (
    SEARCHES,
    SearchResult,
    kept_score,
    search_permutation,
    unstructured_bound,
)

__all__ = ["SEARCHES", "SearchResult", "kept_score", "search_permutation", "unstructured_bound"]

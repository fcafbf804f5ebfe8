"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning
Approach for Large Language Models", ICLR 2024, arXiv:2306.11695).

Wanda scores every weight of a layer ``Y = X W^T`` by ``|W_ij| * ||X_j||_2``, the weight's magnitude
times the L2 norm of its input feature ``j`` over all calibration tokens, and keeps the largest scores.
No weight is updated. For an N:M pattern the comparison group is every run of ``m`` consecutive
inputs of one output row (the reduction axis): the ``n`` largest scores of each group are kept.

The functions here work on one 2-D problem ``W [rows, K]`` with ``K`` the reduction axis; how a
Linear, conv or MoE expert weight becomes such problems is :mod:`nmgraph.oneshot.taps`.
"""

from __future__ import annotations

import torch

from nmgraph.errors import ShapeError
from nmgraph.pattern import nm_mask

__all__ = ["wanda_prune", "wanda_score"]


def wanda_score(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` for ``W [rows, K]`` and ``sq_norms [K]`` (``sum_t X_tj^2``), in float32.

    >>> wanda_score(torch.tensor([[1.0, -2.0]]), torch.tensor([4.0, 1.0]))
    tensor([[2., 2.]])
    """
    if weight.dim() != 2 or sq_norms.shape != (weight.shape[1],):
        raise ShapeError(
            f"wanda_score needs W [rows, K] and sq_norms [K]; got {tuple(weight.shape)} and "
            f"{tuple(sq_norms.shape)}.")
    return weight.detach().float().abs() * sq_norms.float().clamp_min(0).sqrt().unsqueeze(0)


def wanda_prune(weight: torch.Tensor, sq_norms: torch.Tensor, pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned W, kept mask)``: the ``n`` largest Wanda scores of every ``m`` inputs of each row kept.

    Ties keep the higher index (:func:`nmgraph.nm_mask`'s rule). The pruned weight has ``weight``'s dtype.

    >>> w, keep = wanda_prune(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), torch.tensor([0.0, 1.0, 9.0, 100.0]), "2:4")
    >>> keep.tolist(), w.tolist()
    ([[False, False, True, True]], [[0.0, 0.0, 2.0, 1.0]])
    """
    keep = nm_mask(weight, pattern, score=wanda_score(weight, sq_norms), axis=1)
    return weight * keep, keep

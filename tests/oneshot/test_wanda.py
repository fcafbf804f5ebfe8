"""Wanda: the score is |W| times the input feature's L2 norm; the mask keeps the n largest per group."""

from __future__ import annotations

import pytest
import torch

import nmgraph
from nmgraph.errors import ShapeError
from nmgraph.oneshot.wanda import wanda_prune, wanda_score


def test_wanda_keeps_the_largest_weight_times_input_norm_per_group():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 16, generator=g), torch.randn(100, 16, generator=g) * torch.rand(16, generator=g) * 3
    new, keep = wanda_prune(w, x.pow(2).sum(0), "2:4")
    score = w.abs() * x.norm(dim=0)
    torch.testing.assert_close(wanda_score(w, x.pow(2).sum(0)), score)
    assert torch.equal(keep, nmgraph.nm_mask(w, "2:4", score=score)) and torch.equal(new, w * keep)
    assert nmgraph.is_nm(new, "2:4") and keep.sum() == w.numel() // 2


def test_uniform_inputs_make_wanda_magnitude_pruning():
    w = torch.randn(4, 8)
    assert torch.equal(wanda_prune(w, torch.full((8,), 3.0), "1:4")[1], nmgraph.nm_mask(w, "1:4"))


def test_shape_mismatch_is_a_typed_error():
    with pytest.raises(ShapeError, match="sq_norms"):
        wanda_score(torch.randn(4, 8), torch.ones(4))

"""Taps and problems: the input matrices and weight matrices the pruning methods see reproduce the
GEMM of every supported layer kind, so statistics taken from them are exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmgraph
from nmgraph.oneshot.taps import ConvSpec, Geometry, Tap, conv_patches, find_taps, tap_features


@pytest.mark.parametrize(("nd", "stride", "padding", "dilation", "groups"), [
    (2, 1, 1, 1, 1), (2, 2, 2, 2, 2), (1, 2, 0, 1, 2), (2, 1, "same", 2, 1), (3, 1, 1, 1, 2),
])
def test_conv_patches_times_problem_weights_is_the_convolution(nd, stride, padding, dilation, groups):
    torch.manual_seed(0)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    cin, cout, k = 8, 8, 3
    x = torch.randn(2, cin, *([7] * nd))
    w = torch.randn(cout, cin // groups, *([k] * nd))
    y = conv(x, w, None, stride, padding, dilation, groups)
    total = [dilation * (k - 1)] * nd
    pads = tuple((t // 2, t - t // 2) for t in total) if padding == "same" else ((padding, padding),) * nd
    spec = ConvSpec((k,) * nd, (stride,) * nd, pads, (dilation,) * nd, groups)
    tap = Tap("w", None, None, "conv", cin // groups * k**nd, conv=spec)
    geom = Geometry.of(w.shape, 1, tap)
    problems = geom.to_problems(w)
    torch.testing.assert_close(geom.from_problems(problems), w)
    for g, xp in enumerate(conv_patches(x, spec)):
        got = xp @ problems[g].t()  # [N * positions, out per group]
        want = y[:, g * cout // groups : (g + 1) * cout // groups].movedim(1, -1).reshape(-1, cout // groups)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # N:M on the problems' columns is N:M along the weight's input channels at each kernel position
    pruned = geom.from_problems(problems * nmgraph.nm_mask(problems.flatten(0, 1), "2:4").view_as(problems))
    assert nmgraph.is_nm(pruned, "2:4", axis=1)


@pytest.mark.parametrize("axis", [1, 2])
def test_expert_weights_split_per_expert_and_inputs_by_offsets(axis):
    w = torch.randn(3, 8, 12) if axis == 2 else torch.randn(3, 12, 8)  # [E, out, in] or [E, in, out]
    tap = Tap("e", None, None, "experts", 12)
    geom = Geometry.of(w.shape, axis, tap)
    problems = geom.to_problems(w)
    assert problems.shape == (3, 8, 12) and torch.equal(geom.from_problems(problems), w)
    x, offs = torch.randn(10, 12), torch.tensor([4, 4, 10])  # expert 1 gets no rows
    feats = tap_features(tap, x, offs)
    assert [f.shape[0] for f in feats] == [4, 0, 6] and torch.equal(feats[2], x[4:])
    assert geom.expand(torch.ones(3, 12)).shape == ((3, 1, 12) if axis == 2 else (3, 12, 1))


class Mixed(nn.Module):
    """A Linear, ``x @ W.T``, a linear through a cast, and a GPT-2 style ``addmm`` with a weight stored
    [in, out]."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Parameter(torch.randn(16, 16))
        self.d = nn.Parameter(torch.randn(16, 16))
        self.c = nn.Parameter(torch.randn(16, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(h @ self.b.T)
        h = torch.relu(F.linear(h, self.d.to(h.dtype)))
        h = torch.addmm(torch.zeros(8), h.view(-1, 16), self.c)
        return self.head(h)


def test_find_taps_follows_casts_and_transposes_to_each_gemm_input():
    gm = nmgraph.capture(Mixed().eval(), (torch.randn(5, 16),))
    plan = nmgraph.analyze(gm, "2:4")
    taps = find_taps(gm, plan.layers)
    assert set(taps) == {"a.weight", "b", "c", "d"}
    assert all(len(t) == 1 and t[0].kind == "linear" and t[0].k == 16 for t in taps.values())
    assert {n: t[0].node.target for n, t in taps.items()} == {
        "a.weight": torch.ops.aten.linear.default, "b": torch.ops.aten.matmul.default,
        "d": torch.ops.aten.linear.default, "c": torch.ops.aten.addmm.default}
    assert Geometry.of((16, 8), 0, taps["c"][0]).to_problems(gm.get_parameter("c")).shape == (1, 8, 16)

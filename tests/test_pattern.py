import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nmgraph
from nmgraph import Pattern, PatternError, ShapeError, is_nm, nm_mask

PATTERNS = ["1:2", "2:4", "1:4", "2:8", "4:8", "1:8", "1:16", "1:32"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), (" 1:8 ", 1, 8), ("4:128", 4, 128)])
def test_parse_strings(text, n, m):
    assert Pattern.parse(text) == Pattern(n, m)
    assert Pattern.parse((n, m)) == Pattern(n, m)
    assert Pattern.parse(Pattern(n, m)) is not None


@pytest.mark.parametrize(
    "bad,match",
    [
        ("2:2", r"need 0 < N < M \(N=2, M=2\)"),
        ("0:4", r"need 0 < N < M \(N=0, M=4\)"),
        ("5:4", r"need 0 < N < M \(N=5, M=4\)"),
        ("a:b", r"Cannot parse pattern 'a:b'.*'N:M'"),
        ("\u00b2:4", r"Cannot parse pattern '\u00b2:4'.*two positive integers"),  # '2' superscript: isdigit()
        ("\uff12:4", r"Cannot parse pattern '\uff12:4'"),  # a full-width 2
        ("2-4", r"Cannot parse pattern '2-4'"),
        ("1:256", r"M=256 exceeds the maximum group size 128"),
        ((2.0, 4), r"Pattern.n must be an int"),
        (24, r"Cannot parse pattern 24"),
    ],
)
def test_bad_patterns(bad, match):
    with pytest.raises(PatternError, match=match):
        Pattern.parse(bad)


def test_pattern_error_is_nmgraph_error():
    assert issubclass(PatternError, nmgraph.NMGraphError)
    assert Pattern(3, 8).index_bits == 3 and Pattern(1, 2).index_bits == 1


@settings(max_examples=60, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    rows=st.integers(1, 9),
    groups=st.integers(1, 5),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_mask_keeps_exactly_n_largest(pattern, rows, groups, dtype, seed):
    p = Pattern.parse(pattern)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * p.m, generator=g).to(dtype)
    mask = nm_mask(w, p)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    grouped_mask = mask.view(rows, groups, p.m)
    assert (grouped_mask.sum(-1) == p.n).all()
    # Kept entries are the n largest magnitudes: every kept >= every dropped in the group.
    mag = w.abs().float().view(rows, groups, p.m)
    kept_min = torch.where(grouped_mask, mag, torch.inf).amin(-1)
    dropped_max = torch.where(~grouped_mask, mag, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert is_nm(w * mask, p)


def test_tie_rule_keeps_higher_index():
    w = torch.ones(1, 8)
    assert nm_mask(w, "2:4").tolist() == [[False, False, True, True] * 2]
    w = torch.tensor([[3.0, 1.0, 1.0, 1.0]])
    assert nm_mask(w, "2:4").tolist() == [[True, False, False, True]]


def test_score_overrides_magnitude():
    w = torch.tensor([[10.0, 9.0, 1.0, 2.0]])
    score = torch.tensor([[0.0, 0.0, 5.0, 6.0]])
    assert nm_mask(w, "2:4", score=score).tolist() == [[False, False, True, True]]
    with pytest.raises(ShapeError, match=r"score has shape \(1, 3\)"):
        nm_mask(w, "2:4", score=torch.ones(1, 3))


def test_linear_groups_along_input_dim():
    w = torch.zeros(2, 8)
    w[0, :4] = torch.tensor([1.0, 2, 3, 4])
    mask = nm_mask(w, "2:4")
    assert mask[0, :4].tolist() == [False, False, True, True]


@pytest.mark.parametrize(
    "conv",
    [
        torch.nn.Conv1d(8, 6, 3),
        torch.nn.Conv2d(8, 6, 3),
        torch.nn.Conv3d(8, 4, 2),
        torch.nn.Conv2d(16, 8, 3, groups=2),  # weight [8, 8, 3, 3]
    ],
)
def test_conv_masks_group_input_channels_per_kernel_position(conv):
    w = conv.weight.detach()
    mask = nm_mask(w, "2:4")
    # Reference: for every (out, *kernel) position, the 4-groups along dim 1.
    moved = mask.movedim(1, -1)
    assert (moved.reshape(*moved.shape[:-1], -1, 4).sum(-1) == 2).all()
    wm = w.abs().movedim(1, -1).reshape(-1, w.shape[1] // 4, 4)
    ref_keep = torch.zeros_like(wm, dtype=torch.bool)
    ref_keep.scatter_(-1, wm.argsort(dim=-1, stable=True)[..., 2:], True)
    assert torch.equal(moved.reshape(-1, w.shape[1] // 4, 4), ref_keep)


def test_depthwise_conv_has_no_reduction_groups():
    w = torch.nn.Conv2d(8, 8, 3, groups=8).weight
    with pytest.raises(ShapeError, match=r"size 1, not divisible by M=4"):
        nm_mask(w, "2:4")


def test_non_divisible_shape_names_shape():
    with pytest.raises(ShapeError, match=r"shape \(4, 6\) has size 6, not divisible by M=4"):
        nm_mask(torch.randn(4, 6), "2:4")
    with pytest.raises(ShapeError, match=r"at least 2 dims"):
        nm_mask(torch.randn(8), "2:4")


def test_axis_zero_for_transposed_weights():
    w = torch.randn(8, 3)  # GPT-2 Conv1D layout [in, out]
    mask = nm_mask(w, "2:4", axis=0)
    assert torch.equal(mask, nm_mask(w.t(), "2:4").t())


def test_nan_scores_rejected():
    w = torch.randn(2, 4)
    w[0, 1] = float("nan")
    with pytest.raises(ShapeError, match="NaN"):
        nm_mask(w, "2:4")


def test_is_nm_counts_nonzeros():
    assert is_nm(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), "2:4")
    assert not is_nm(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), "2:4")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_nm_mask_of_signed_integers_widens_before_abs(dtype):
    """abs(-128) is -128 in int8: the most negative value has the largest magnitude and is kept."""
    low = torch.iinfo(dtype).min
    w = torch.tensor([[low, 1, 2, 3], [5, low + 1, -7, 0]], dtype=dtype)
    mask = nm_mask(w, "2:4")
    assert mask.tolist() == [[True, False, False, True], [False, True, True, False]]
    u = torch.tensor([[255, 1, 2, 254]], dtype=torch.uint8)
    assert nm_mask(u, "2:4").tolist() == [[True, False, False, True]]


@pytest.mark.parametrize("make,match", [
    (lambda: torch.empty(4, 8, device="meta"), r"nm_mask\(weight=...\) is on the meta device.*Materialize"),
    (lambda: torch.ones(4, 8, dtype=torch.bool), r"nm_mask\(weight=...\) is a bool tensor.*score tensor"),
    (lambda: torch.ones(4, 8, dtype=torch.complex64), r"is complex"),
])
def test_nm_mask_refuses_tensors_without_values_to_rank(make, match):
    with pytest.raises(nmgraph.ArgumentError, match=match):
        nm_mask(make(), "2:4")
    with pytest.raises(nmgraph.ArgumentError, match=match.replace("weight", "score")):
        nm_mask(torch.ones(4, 8), "2:4", make())
    with pytest.raises(nmgraph.ArgumentError, match=r"score=...\) must be a tensor"):
        nm_mask(torch.ones(4, 8), "2:4", [[1.0] * 8] * 4)

import io
import math
from itertools import combinations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmgraph import CompressedNM, Pattern, SerializationError, ShapeError, compress, nm_mask
from nmgraph.compress import compressed_nbytes, index_code

# 64:128 and 30:100 have C(m, n) >= 2**63: they take the keep-mask code
PATTERNS = ["1:2", "2:4", "1:4", "2:8", "4:8", "1:8", "3:8", "1:16", "2:16", "8:16", "1:32", "5:128", "64:128",
            "30:100"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pruned(shape, pattern, dtype=torch.float32, seed=0, axis=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g).to(dtype)
    return w * nm_mask(w, pattern, axis=axis)


def _bits_per_group(pattern):
    """The fewest bits per group any chunk of 1..8 bytes gives (brute force, for the test)."""
    p = Pattern.parse(pattern)
    c = math.comb(p.m, p.n)
    best = math.inf
    for width in range(1, 9):
        g = max((g for g in range(1, 65) if c**g <= min(2 ** (8 * width), 2**63)), default=0)
        if g:
            best = min(best, 8 * width / g)
    return best if best < math.inf else 8 * math.ceil(p.m / 8)


@settings(max_examples=80, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    rows=st.integers(1, 7),
    groups=st.integers(1, 17),  # often not a multiple of the groups in a chunk: the last chunk is padded
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_round_trip_and_bytes(pattern, rows, groups, dtype, seed):
    p = Pattern.parse(pattern)
    w = _pruned((rows, groups * p.m), p, dtype, seed)
    c = compress(w, p)
    assert torch.equal(c.to_dense(), w) and c.to_dense().dtype == dtype
    kept = groups * p.n
    assert c.values.shape == (rows, kept) and c.indices.dtype == torch.uint8
    code = index_code(p)
    assert c.indices.shape == (rows, math.ceil(groups / code.groups_per_chunk) * code.chunk_bytes)
    # nbytes is what the tensors hold, and what compressed_nbytes computes from the shape alone
    stored = sum(t.numel() * t.element_size() for t in (c.values, c.indices))
    assert c.nbytes == stored == compressed_nbytes(w.shape, p, dtype)
    assert code.bits_per_group == _bits_per_group(p)
    c.check()


def test_bf16_2_4_is_13_24_of_dense():
    """2:4 in bf16: half the values at 2 bytes plus 8 bits per 3 groups of 4: (2 + 1/6) / 4 of dense."""
    w = _pruned((64, 4104), "2:4", torch.bfloat16)  # 1026 groups: 342 whole bytes
    c = compress(w, "2:4")
    assert c.nbytes / c.dense_nbytes == 13 / 24 and c.nbytes / c.dense_nbytes <= 0.5417
    assert c.indices.shape == (64, 342)


def test_2_4_packs_three_ranks_per_byte():
    w = torch.tensor([[0.0, 3.0, 0.0, -1.0, 5.0, 0.0, 0.0, 2.0]])
    c = compress(w, "2:4")
    assert c.unpack_indices().tolist() == [[1, 3, 0, 3]]
    # ranks C(p0, 1) + C(p1, 2): {1, 3} -> 1 + 3 = 4, {0, 3} -> 0 + 3 = 3; byte 4 + 3 * 6 (third group: padding)
    assert c.indices.tolist() == [[22]]


@pytest.mark.parametrize("pattern", ["1:2", "2:4", "1:4", "3:8", "4:8", "2:8", "3:6", "7:9"])
def test_every_kept_set_has_its_own_rank(pattern):
    """Every combination encodes to a distinct rank in [0, C(m, n)) and decodes back to itself."""
    p = Pattern.parse(pattern)
    code = index_code(p)
    sets = torch.tensor(list(combinations(range(p.m), p.n)))  # [C, n], ascending in each row
    enc = code.encode(sets.reshape(1, -1))
    assert torch.equal(code.decode(enc, len(sets)), sets.reshape(1, -1))
    ranks = code.ranks(enc, len(sets))
    assert sorted(ranks.flatten().tolist()) == list(range(len(sets)))


def test_every_byte_decodes_to_ascending_positions():
    """The kernels rely on ascending positions in a group; a combination code cannot hold another order."""
    code = index_code("2:4")
    pos = code.decode(torch.arange(256, dtype=torch.uint8).view(1, 256), 3 * 256).view(-1, 2)
    assert bool((pos[:, 1] > pos[:, 0]).all()) and int(pos.max()) < 4


def test_codes_are_no_wider_than_positions():
    for pattern in PATTERNS:
        p = Pattern.parse(pattern)
        assert index_code(p).bits_per_group <= p.n * p.index_bits, pattern
        if index_code(p).kind == "rank":  # within a bit of the entropy of a uniform kept set
            assert index_code(p).bits_per_group < math.log2(math.comb(p.m, p.n)) + 1, pattern
        else:
            assert index_code(p).bits_per_group == 8 * math.ceil(p.m / 8) and math.comb(p.m, p.n) >= 2**63


def test_groups_with_fewer_nonzeros_store_zeros():
    w = torch.tensor([[0.0, 0.0, 0.0, 7.0]])
    c = compress(w, "2:4")
    assert torch.equal(c.to_dense(), w)
    assert sorted(c.values.flatten().tolist()) == [0.0, 7.0]


@pytest.mark.parametrize("shape", [(6, 8, 3, 3), (4, 16, 5), (4, 8, 2, 2, 2), (5, 20, 3, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_round_trip(shape, dtype):
    w = _pruned(shape, "2:4", dtype)
    c = compress(w, "2:4")
    assert torch.equal(c.to_dense(), w)
    assert c.nbytes == compressed_nbytes(shape, "2:4", dtype)


def test_axis_zero_round_trip():
    w = _pruned((16, 5), "1:4", axis=0)
    c = compress(w, "1:4", axis=0)
    assert torch.equal(c.to_dense(), w)
    assert c.nbytes == compressed_nbytes((16, 5), "1:4", torch.float32, axis=0)


def test_dense_weight_is_rejected_with_fix():
    with pytest.raises(ShapeError, match=r"not 2:4 along axis 1.*nm_mask"):
        compress(torch.randn(4, 8) + 1.0, "2:4")


def test_state_dict_round_trip_weights_only():
    c = compress(_pruned((8, 32), "2:8", torch.bfloat16), "2:8")
    buf = io.BytesIO()
    torch.save(c.state_dict(prefix="fc."), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    c2 = CompressedNM.from_state_dict(state, prefix="fc.")
    assert torch.equal(c2.to_dense(), c.to_dense()) and c2.pattern == Pattern(2, 8)


def _bit_planes(positions, bits):
    rows, kept = positions.shape
    planes = torch.stack([(positions >> b) & 1 for b in range(bits)])
    planes = torch.nn.functional.pad(planes, (0, -kept % 8)).view(bits, rows, -1, 8)
    return (planes * (2 ** torch.arange(8))).sum(-1).to(torch.uint8)


@pytest.mark.parametrize("pattern", ["2:4", "1:8", "4:8"])
def test_bit_planes_of_format_version_2_are_re_encoded(pattern):
    p = Pattern.parse(pattern)
    w = _pruned((5, 3 * p.m), p, torch.float16)
    c = compress(w, p)
    planes = _bit_planes(c.unpack_indices(), p.index_bits)
    old = CompressedNM.from_bit_planes(c.values, planes, c.shape, p.n, p.m)
    assert torch.equal(old.indices, c.indices) and torch.equal(old.to_dense(), w)
    state = {**c.state_dict(), "indices": planes}  # a state dict written with bit planes
    assert torch.equal(CompressedNM.from_state_dict(state).to_dense(), w)
    if p.n > 1:  # every bit set: every kept entry of a group at the same position
        with pytest.raises(SerializationError, match="not ascending"):
            CompressedNM.from_bit_planes(c.values, torch.full_like(planes, 255), c.shape, p.n, p.m)


def test_torch_save_object_round_trip():
    c = compress(_pruned((4, 16), "2:4"), "2:4")
    buf = io.BytesIO()
    torch.save(c, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([CompressedNM]):
        c2 = torch.load(buf, weights_only=True)
    assert torch.equal(c2.to_dense(), c.to_dense())


def test_corrupt_state_is_typed_error():
    c = compress(_pruned((4, 16), "2:4"), "2:4")
    state = c.state_dict()
    with pytest.raises(SerializationError, match="missing tensor 'indices'"):
        CompressedNM.from_state_dict({k: v for k, v in state.items() if k != "indices"})
    with pytest.raises(SerializationError, match=r"indices is torch.uint8 \(4, 1\); a 2:4 weight .* needs torch.uint8 "
                                                 r"\(4, 2\)"):
        CompressedNM.from_state_dict({**state, "indices": state["indices"][:, :1]})
    state["values"] = state["values"][:, :3]
    with pytest.raises(SerializationError, match=r"values has shape \(4, 3\)"):
        CompressedNM.from_state_dict(state)


@pytest.mark.parametrize("pattern,bad", [("2:4", 216), ("1:2", None), ("64:128", 0)])
def test_check_refuses_codes_no_weight_has(pattern, bad):
    p = Pattern.parse(pattern)
    c = compress(_pruned((2, 4 * p.m), p), p)
    c.check()
    if bad is None:  # 1:2 uses all 256 byte values for 8 groups: only the padding can be wrong
        c = compress(_pruned((2, 3 * p.m), p), p)
        bad = int(c.indices[0, 0]) | 0x80
    indices = c.indices.clone()
    indices[0, 0] = bad
    wrong = CompressedNM(c.values, indices, c.shape, p.n, p.m)
    with pytest.raises(SerializationError, match=f"index bytes that no {p} weight encodes to"):
        wrong.check()


def test_to_dense_is_contiguous_for_conv():
    w = _pruned((6, 8, 3, 3), "2:4")
    dense = compress(w, "2:4").to_dense()
    assert dense.is_contiguous() and dense.stride() == w.stride()


def test_compressed_nbytes_names_a_shape_that_does_not_divide():
    with pytest.raises(ShapeError, match="not divisible by M=4"):
        compressed_nbytes((8, 6), "2:4", torch.float16)

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmgraph import CompressedNM, Pattern, SerializationError, ShapeError, compress, nm_mask

PATTERNS = ["1:2", "2:4", "1:4", "2:8", "4:8", "1:8", "1:16", "1:32", "3:8", "5:128"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pruned(shape, pattern, dtype=torch.float32, seed=0, axis=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g).to(dtype)
    return w * nm_mask(w, pattern, axis=axis)


@settings(max_examples=60, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    rows=st.integers(1, 7),
    groups=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_round_trip_and_bytes(pattern, rows, groups, dtype, seed):
    p = Pattern.parse(pattern)
    w = _pruned((rows, groups * p.m), p, dtype, seed)
    c = compress(w, p)
    assert torch.equal(c.to_dense(), w) and c.to_dense().dtype == dtype
    kept = groups * p.n
    bits = math.ceil(math.log2(p.m))
    assert c.values.shape == (rows, kept)
    # values + one bit plane per index bit, each padded to whole bytes per row
    assert c.nbytes == rows * kept * w.element_size() + bits * rows * math.ceil(kept / 8)


def test_fp16_2_4_is_0_5625_of_dense():
    w = _pruned((64, 4096), "2:4", torch.float16)
    c = compress(w, "2:4")
    assert c.nbytes / c.dense_nbytes == 0.5625


def test_indices_are_bit_planes():
    w = torch.tensor([[0.0, 3.0, 0.0, -1.0, 5.0, 0.0, 0.0, 2.0]])
    c = compress(w, "2:4")
    # kept positions 1, 3, 0, 3 -> bit0 = 1,1,0,1 ; bit1 = 0,1,0,1
    assert c.unpack_indices().tolist() == [[1, 3, 0, 3]]
    assert c.indices[:, 0, 0].tolist() == [0b1011, 0b1010]


def test_groups_with_fewer_nonzeros_store_zeros():
    w = torch.tensor([[0.0, 0.0, 0.0, 7.0]])
    c = compress(w, "2:4")
    assert torch.equal(c.to_dense(), w)
    assert sorted(c.values.flatten().tolist()) == [0.0, 7.0]


@pytest.mark.parametrize("shape", [(6, 8, 3, 3), (4, 16, 5), (4, 8, 2, 2, 2)])
def test_conv_round_trip(shape):
    w = _pruned(shape, "2:4")
    assert torch.equal(compress(w, "2:4").to_dense(), w)


def test_axis_zero_round_trip():
    w = _pruned((16, 5), "1:4", axis=0)
    c = compress(w, "1:4", axis=0)
    assert torch.equal(c.to_dense(), w)


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
    state["values"] = state["values"][:, :3]
    with pytest.raises(SerializationError, match=r"values has shape \(4, 3\)"):
        CompressedNM.from_state_dict(state)


def test_to_dense_is_contiguous_for_conv():
    w = _pruned((6, 8, 3, 3), "2:4")
    dense = compress(w, "2:4").to_dense()
    assert dense.is_contiguous() and dense.stride() == w.stride()

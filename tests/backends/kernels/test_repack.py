"""PackedNM: exact round trip with CompressedNM, the word layout, byte count, validation."""

import pytest
import torch

from nmgraph import compress, nm_mask
from nmgraph.backends.kernels.repack import CHUNK, PackedNM, repack
from nmgraph.errors import SerializationError, ShapeError, UnsupportedError

# Every pattern the format holds that the kernels are tested with, including non-power-of-two m.
PATTERNS = ["2:4", "1:4", "2:8", "1:8", "4:8", "3:8", "1:16", "2:6", "1:3", "1:2", "5:8"]


def _compressed(rows, k, pattern, dtype=torch.float32, seed=0, axis=1):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, k) if axis == 1 else (k, rows)
    w = torch.randn(shape, generator=g)
    w = (w * nm_mask(w, pattern, axis=axis)).to(dtype)
    return compress(w, pattern, axis=axis)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_round_trip_is_bit_exact(pattern):
    m = int(pattern.split(":")[1])
    # kept = k / m * n: a multiple of 32, and ragged (padding in the last chunk and byte).
    for i, k in enumerate((32 * m, 5 * m, 37 * m)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            c = _compressed(7, k, pattern, dtype, seed=i)
            p = repack(c)
            back = p.to_compressed()
            assert back.values.dtype == c.values.dtype
            assert torch.equal(back.values.view(torch.uint8), c.values.contiguous().view(torch.uint8))
            assert torch.equal(back.indices, c.indices)
            assert (back.shape, back.n, back.m, back.axis) == (c.shape, c.n, c.m, c.axis)
            assert torch.equal(p.to_dense(), c.to_dense())


def test_round_trip_axis0_weight():
    c = _compressed(6, 40, "2:4", seed=3, axis=0)  # stored [in, out], reduction along dim 0
    p = repack(c)
    assert p.rows == 6 and p.k == 40
    back = p.to_compressed()
    assert torch.equal(back.values, c.values) and torch.equal(back.indices, c.indices)
    assert back.axis == 0 and torch.equal(back.to_dense(), c.to_dense())


def test_word_layout():
    # One row, 2:8 (3-bit indices): entry e of chunk c has bit t at bit e of word c * 3 + t.
    idx = torch.tensor([[1, 6, 0, 7, 2, 3]])  # three groups of two kept entries, sorted per group
    values = torch.arange(1.0, 7.0).view(1, 6)
    dense = torch.zeros(1, 3, 8)
    dense.scatter_(-1, idx.view(1, 3, 2), values.view(1, 3, 2))
    c = compress(dense.view(1, 24), "2:8")
    p = repack(c)
    assert p.kept == 6 and p.kept_pad == CHUNK and p.bits == 3
    assert p.words.shape == (1, 3) and p.words.dtype == torch.int32
    expect = [sum(((int(i) >> t) & 1) << e for e, i in enumerate(idx[0])) for t in range(3)]
    assert p.words[0].tolist() == expect
    assert torch.equal(p.values[0, :6], values[0]) and not p.values[0, 6:].any()


def test_no_padding_when_rows_fill_whole_words():
    """Same value bytes; the index words hold ceil(log2 m) bits per kept entry, which the stored
    combination code never exceeds."""
    for pattern in ("2:4", "1:4", "1:8"):
        c = _compressed(8, 256, pattern, torch.float16)
        p = repack(c)
        assert c.values.shape[1] % CHUNK == 0 and p.values.shape == c.values.shape
        assert p.words.numel() * 4 == c.values.numel() * p.bits // 8
        assert c.indices.numel() <= p.words.numel() * 4


def test_bit_31_survives():
    # 1:2 has 1-bit indices: a chunk with every entry at index 1 sets all 32 bits (int32 == -1).
    w = torch.zeros(1, 64)
    w[0, 1::2] = torch.arange(1.0, 33.0)
    p = repack(compress(w, "1:2"))
    assert p.words.tolist() == [[-1]]
    assert torch.equal(p.to_dense(), w)


def test_to_moves_values_and_words():
    p = repack(_compressed(4, 64, "2:4"))
    q = p.to(torch.float16)
    assert q.values.dtype == torch.float16 and q.words.dtype == torch.int32
    assert torch.equal(q.words, p.words)


def test_repack_rejects_other_objects_and_shapes():
    with pytest.raises(UnsupportedError, match="CompressedNM"):
        repack(torch.zeros(4, 8))
    w = torch.randn(4, 2, 8)
    c3 = compress(w * nm_mask(w, "2:4", axis=2), "2:4", axis=2)
    with pytest.raises(ShapeError, match="2-D"):
        repack(c3)


def test_packed_validates_its_tensors():
    p = repack(_compressed(4, 64, "2:4"))
    with pytest.raises(SerializationError, match="values"):
        PackedNM(p.values[:, :16].contiguous(), p.words, p.shape, 2, 4)
    with pytest.raises(SerializationError, match="words"):
        PackedNM(p.values, p.words.to(torch.int64), p.shape, 2, 4)
    with pytest.raises(ShapeError, match="2-D"):
        PackedNM(p.values, p.words, (4, 8, 8), 2, 4)

"""The dense baseline: ``F.linear`` on the decompressed (pruned) weight.

It is what "auto" dispatch compares every sparse kernel against, and what it runs whenever no
sparse kernel is faster (always on a CPU: no N:M kernel speeds a CPU GEMM up). Lowered with
``backend="dense"``, a graph calls ``nmgraph::nm_linear_dense(x, values, indices, bias, n, m,
out_features, in_features)``, which decompresses on every call: exact everywhere, for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmgraph.backends.base import Backend, GraphCall
from nmgraph.backends.ops import check_x, register_frozen_linear
from nmgraph.compress import CompressedNM, index_code
from nmgraph.errors import ShapeError
from nmgraph.pattern import Pattern

__all__ = ["DenseBackend", "decompress_linear", "linear_weight", "nm_linear_dense"]


def linear_weight(weight: CompressedNM) -> torch.Tensor:
    """The dense ``[out_features, in_features]`` weight of a 2-D compressed weight, contiguous.

    A weight compressed along ``axis=0`` (an ``[in, out]`` weight as in GPT-2's ``Conv1D``) comes
    back transposed, so ``F.linear(x, linear_weight(c))`` is the layer's GEMM either way.

    >>> from nmgraph import compress
    >>> w = torch.tensor([[0.0, 2.0, 0.0, 3.0]])
    >>> torch.equal(linear_weight(compress(w, "2:4")), w)
    True
    >>> torch.equal(linear_weight(compress(w.t(), "2:4", axis=0)), w)
    True
    """
    if len(weight.shape) != 2:
        raise ShapeError(
            f"A linear layer needs a 2-D weight; this compressed weight has shape {weight.shape}."
        )
    dense = weight.to_dense()
    return dense.contiguous() if weight.axis == 1 else dense.t().contiguous()


def decompress_linear(values: torch.Tensor, indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Dense ``[rows, K]`` weight from the raw compressed tensors (values ``[rows, K*n/m]``).

    Same result as ``CompressedNM.to_dense()`` for a 2-D ``axis=1`` weight, written with tensor
    ops on its inputs only, so it also traces under fake tensors (``torch.compile`` backward).

    >>> from nmgraph import compress
    >>> w = torch.tensor([[0.0, 2.0, 0.0, 3.0, 1.0, 0.0, 0.0, 0.0]])
    >>> c = compress(w, "2:4")
    >>> torch.equal(decompress_linear(c.values, c.indices, 2, 4), w)
    True
    """
    rows, kept = values.shape
    idx = index_code(Pattern(n, m)).decode(indices, kept // n)  # [rows, kept] in-group positions
    groups = kept // n
    dense = values.new_zeros(rows, groups, m)
    dense.scatter_(-1, idx.view(rows, groups, n), values.view(rows, groups, n))
    return dense.view(rows, groups * m)


class DenseBackend(Backend):
    """``F.linear`` with the pruned dense weight (decompressed once in :meth:`prepare`)."""

    name = "dense"
    sparse = False

    def layer_reason(self, weight: CompressedNM, dtype: torch.dtype) -> str | None:
        if len(weight.shape) != 2:
            return f"weight of shape {weight.shape} is not a 2-D linear weight"
        return None

    def prepare(self, weight: CompressedNM) -> torch.Tensor:
        return linear_weight(weight)

    def run(self, x: torch.Tensor, prepared: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, prepared, bias)

    def lower(self, weight: CompressedNM, prepared: torch.Tensor) -> GraphCall:
        out_features, in_features = compressed_shape(weight)
        return GraphCall(torch.ops.nmgraph.nm_linear_dense.default,
                         (("nm_values", weight.values), ("nm_indices", weight.indices)),
                         (weight.n, weight.m, out_features, in_features))


def compressed_shape(weight: CompressedNM) -> tuple[int, int]:
    """``(out_features, in_features)`` of a 2-D compressed linear weight (either storage axis)."""
    return int(weight.values.shape[0]), int(weight.shape[weight.axis])


@torch.library.custom_op("nmgraph::nm_linear_dense", mutates_args=())
def nm_linear_dense(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ W^T + bias`` with ``W`` the ``[out_features, in_features]`` weight of a 2-D
    :class:`~nmgraph.compress.CompressedNM` (its values and combination-coded indices), decompressed per call."""
    check_x(x, in_features, "nm_linear_dense")
    return F.linear(x, decompress_linear(values, indices, n, m), bias)


register_frozen_linear(
    nm_linear_dense, n_buffers=2, shape=lambda c: (c[2], c[3]),
    dense_weight=lambda b, c: decompress_linear(b[0], b[1], c[0], c[1]),
)

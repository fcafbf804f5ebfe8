"""PyTorch's semi-structured (2:4) sparse kernels: cuSPARSELt, or CUTLASS where cuSPARSELt is missing.

Goes through ``torch.sparse.SparseSemiStructuredTensor`` (what ``to_sparse_semi_structured``
returns): the pruned dense weight is compressed once in :meth:`CuSparseLtBackend.prepare` and
``F.linear`` dispatches to the sparse kernel. These kernels take exactly 2:4 along the reduction
axis, so an N:M weight qualifies when every aligned group of 4 holds at most 2 nonzeros
(:func:`fits_2_4`: e.g. 2:4, 1:4, 1:2, 1:3, 2:8, 1:8; not 4:8 or 3:6).

Every shape and dtype constraint lives in :data:`SEMI_STRUCTURED_LIMITS` (one row per kernel and
dtype): the weight ``[out, in]`` must be a multiple of ``(weight_rows, weight_cols)`` in both dims;
activations are padded by PyTorch to ``(input_rows, input_cols)`` multiples, so they constrain
nothing here. The kernels need sparse tensor cores (compute capability >= :data:`MIN_CAPABILITY`).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nmgraph.backends.base import Backend, GraphCall
from nmgraph.backends.dense import compressed_shape, linear_weight
from nmgraph.backends.ops import check_x, register_frozen_linear
from nmgraph.compress import CompressedNM
from nmgraph.errors import BackendUnavailableError, UnsupportedError

__all__ = [
    "KERNELS",
    "MIN_CAPABILITY",
    "SEMI_STRUCTURED_LIMITS",
    "CuSparseLtBackend",
    "SemiStructuredLimits",
    "fits_2_4",
    "from_parts",
    "parts",
    "resolve_kernel",
    "semi_structured_linear",
]

log = logging.getLogger(__name__)

KERNELS = ("cusparselt", "cutlass")
#: Sparse tensor cores arrived with Ampere (sm_80).
MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class SemiStructuredLimits:
    """Shape multiples one kernel needs for one dtype (weight ``[out, in]``, input ``[M, in]``)."""

    kernel: str
    dtype: torch.dtype
    weight_rows: int
    weight_cols: int
    input_rows: int
    input_cols: int


def _limits(*rows: tuple[str, torch.dtype, int, int, int, int]) -> dict[tuple[str, torch.dtype], SemiStructuredLimits]:
    return {(r[0], r[1]): SemiStructuredLimits(*r) for r in rows}


#: The one table of semi-structured constraints (PyTorch's documented per-kernel minimum shapes).
SEMI_STRUCTURED_LIMITS = _limits(
    ("cusparselt", torch.float16, 16, 16, 8, 8),
    ("cusparselt", torch.bfloat16, 16, 16, 8, 8),
    ("cusparselt", torch.int8, 32, 32, 16, 16),
    ("cutlass", torch.float16, 32, 64, 8, 8),
    ("cutlass", torch.bfloat16, 32, 64, 8, 8),
    ("cutlass", torch.int8, 16, 128, 16, 16),
)


def fits_2_4(n: int, m: int) -> bool:
    """True if every ``n:m`` weight is also 2:4 (at most 2 nonzeros per aligned group of 4).

    Exact: for each aligned window of 4 (the pattern repeats every ``lcm(4, m)``), the most
    nonzeros an ``n:m`` weight can put there is the sum over the groups it overlaps of
    ``min(n, overlap)``.

    >>> [fits_2_4(*p) for p in ((2, 4), (1, 4), (1, 2), (2, 8), (1, 8), (1, 3), (4, 8), (3, 6))]
    [True, True, True, True, True, True, False, False]
    """
    period = math.lcm(4, m)
    for start in range(0, period, 4):
        most = 0
        for g in range(start // m, (start + 3) // m + 1):
            overlap = min(start + 4, (g + 1) * m) - max(start, g * m)
            most += min(n, overlap)
        if most > 2:
            return False
    return True


def resolve_kernel(kernel: str = "auto") -> str:
    """``"auto"`` -> ``"cusparselt"`` when PyTorch was built with it, else ``"cutlass"``."""
    if kernel not in ("auto", *KERNELS):
        raise UnsupportedError(
            f"Unknown semi-structured kernel {kernel!r}; use 'auto', 'cusparselt' or 'cutlass'."
        )
    if kernel != "auto":
        return kernel
    available = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if available is not None and available.is_available() else "cutlass"


def _tensor_class(kernel: str):
    import torch.sparse as ts

    return ts.SparseSemiStructuredTensorCUSPARSELT if kernel == "cusparselt" else ts.SparseSemiStructuredTensorCUTLASS


def parts(prepared: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The plain tensors inside a prepared weight: ``(packed, meta)`` (``meta`` is None for cuSPARSELt)."""
    return prepared.packed, prepared.meta


def from_parts(kernel: str, shape: tuple[int, int], packed: torch.Tensor, meta: torch.Tensor | None) -> Any:
    """Rebuilds the semi-structured weight (a cheap wrapper, no copy) from :func:`parts`."""
    cls = _tensor_class(resolve_kernel(kernel))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*prototype", category=UserWarning)
        return cls(torch.Size(shape), packed=packed, meta=meta, packed_t=None, meta_t=None,
                   compressed_swizzled_bitmask=None, requires_grad=False)


class CuSparseLtBackend(Backend):
    """2:4 sparse tensor-core GEMM through ``torch.sparse`` semi-structured tensors."""

    name = "cusparselt"

    def __init__(self, kernel: str = "auto") -> None:
        if kernel not in ("auto", *KERNELS):
            resolve_kernel(kernel)  # raises with the message
        self.kernel = kernel

    def device_reason(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if device.type != "cuda":
            return (f"cuSPARSELt/CUTLASS 2:4 kernels run on CUDA devices only (got {device}); "
                    "there is no semi-structured sparse GEMM for this device")
        if not torch.cuda.is_available():
            return "torch.cuda is not available in this process"
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            return (f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}; "
                    f"2:4 sparse tensor cores need >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
        return None

    def layer_reason(self, weight: CompressedNM, dtype: torch.dtype) -> str | None:
        kernel = resolve_kernel(self.kernel)
        if len(weight.shape) != 2:
            return f"weight of shape {weight.shape} is not a 2-D linear weight"
        if not fits_2_4(weight.n, weight.m):
            return (f"pattern {weight.pattern} is not 2:4-compatible (an aligned group of 4 can hold "
                    "more than 2 nonzeros); semi-structured kernels take 2:4 only")
        limits = SEMI_STRUCTURED_LIMITS.get((kernel, dtype))
        if limits is None:
            supported = ", ".join(str(d) for (k, d) in SEMI_STRUCTURED_LIMITS if k == kernel)
            return f"{kernel} 2:4 kernels take {supported}, not {dtype}"
        if weight.dtype != dtype:
            return f"weight values are {weight.dtype} but activations are {dtype}"
        rows = weight.values.shape[0]
        k = weight.shape[weight.axis]
        if rows % limits.weight_rows or k % limits.weight_cols:
            return (f"{kernel} {dtype} needs out_features a multiple of {limits.weight_rows} and "
                    f"in_features a multiple of {limits.weight_cols}; this weight is [{rows}, {k}]")
        return None

    def prepare(self, weight: CompressedNM) -> Any:
        kernel = resolve_kernel(self.kernel)
        reason = self.unavailable_reason(weight, weight.dtype, weight.device)
        if reason is not None:
            raise BackendUnavailableError(f"cuSPARSELt backend cannot take this weight: {reason}.")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*prototype", category=UserWarning)
            return _tensor_class(kernel).from_dense(linear_weight(weight))

    def run(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        y = F.linear(x.reshape(-1, x.shape[-1]), prepared, bias)
        return y.reshape(*lead, y.shape[-1])

    def lower(self, weight: CompressedNM, prepared: Any) -> GraphCall:
        packed, meta = parts(prepared)
        out_features, in_features = compressed_shape(weight)
        return GraphCall(torch.ops.nmgraph.semi_structured_linear.default,
                         (("nm_packed", packed), ("nm_meta", meta)),
                         (out_features, in_features, resolve_kernel(self.kernel)))


@torch.library.custom_op("nmgraph::semi_structured_linear", mutates_args=())
def semi_structured_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    meta: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    kernel: str,
) -> torch.Tensor:
    """The graph op of :class:`CuSparseLtBackend`: ``x @ W^T + bias`` on PyTorch's 2:4 kernels with the
    weight already packed (:func:`parts`); ``kernel`` is ``"cusparselt"`` or ``"cutlass"``."""
    check_x(x, in_features, "semi_structured_linear")
    weight = from_parts(kernel, (out_features, in_features), packed, meta)
    lead = x.shape[:-1]
    y = F.linear(x.reshape(-1, in_features), weight, bias)
    return y.reshape(*lead, out_features)


register_frozen_linear(
    semi_structured_linear, n_buffers=2, shape=lambda c: (c[0], c[1]),
    dense_weight=lambda b, c: from_parts(c[2], (c[0], c[1]), b[0], b[1]).to_dense(),
)

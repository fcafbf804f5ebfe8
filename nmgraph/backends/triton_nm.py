"""The Triton backend: nmgraph's N:M decode kernels behind one graph op that switches on the rows of x.

:meth:`TritonBackend.prepare` repacks the :class:`~nmgraph.compress.CompressedNM` once into
:class:`~nmgraph.backends.kernels.repack.PackedNM` (same bytes, 16-byte value loads, 32-bit index
words) and, where the tensor-core kernel can split K, makes the layer's semaphores. A call with
``M`` rows of activations (all leading dims) then runs exactly one kernel, chosen on the host from
``M`` (a Python int, static inside a CUDA graph):

* ``M <= 2``: :func:`~nmgraph.backends.kernels.nm_gemv.nm_gemv`, the gather GEMV (any ``n:m``);
* ``3 <= M <= 64`` where the tensor-core kernel has its fast expansion (2:4 and 1:4 in fp16/bf16,
  :func:`~nmgraph.backends.kernels.nm_mma.mma_fast_path`): :func:`~nmgraph.backends.kernels.nm_mma.nm_mma`,
  split-K reduced in the same launch;
* anything else is outside the rows these kernels serve (:func:`kernel_rows`): prefill sizes
  (``M > 64``), and ``M >= 3`` for patterns/dtypes whose tensor-core expansion is the generic one
  (estimated slower than dense, docs/benchmarks.md). :meth:`TritonBackend.rows_reason` says so, so
  the dispatcher never times or picks this backend there. If a lowered graph is called with such an
  ``M`` anyway (a graph captured with dynamic batch or sequence, or run with other shapes than it
  was lowered for), the op runs ``F.linear`` with the dense weight: the layer's own dense weight
  when the lowering passed it (it does for graphs with dynamic rows: dense speed), else decompressed
  from the packed weight (correct, but it pays a decompression per call; a graph lowered for static
  shapes is only called with other ones by mistake). See docs/deploy.md.

Nothing in a call reads device memory on the host, synchronizes or allocates outside PyTorch's
caching allocator (the output, and the split-K workspace, are ``torch.empty``), so a lowered graph
can be captured in a CUDA graph (``torch.compile(mode="reduce-overhead")``, inductor's cudagraph
trees). The semaphores are written by the kernel and left at zero after every call; calls of one
layer must not run concurrently on two streams.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slow, exact); tests use that.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nmgraph.backends.base import Backend, GraphCall
from nmgraph.backends.dense import compressed_shape
from nmgraph.backends.kernels._common import SUPPORTED_DTYPES, unavailable_reason
from nmgraph.backends.kernels.nm_gemv import nm_gemv
from nmgraph.backends.kernels.nm_mma import mma_fast_path, mma_semaphores, nm_mma
from nmgraph.backends.kernels.repack import PackedNM, repack
from nmgraph.backends.ops import check_x, register_frozen_linear
from nmgraph.compress import CompressedNM
from nmgraph.errors import UnsupportedError

__all__ = ["GEMV_ROWS", "MMA_ROWS", "SUPPORTED_DTYPES", "TritonBackend", "TritonWeight", "kernel_path",
           "kernel_rows", "nm_linear_triton", "triton_linear"]

log = logging.getLogger(__name__)

#: Rows up to which the gather GEMV runs (it reads the whole weight once per pair of rows).
GEMV_ROWS = 2
#: Rows up to which the tensor-core kernel runs (one ``BLOCK_M`` tile of 16, 32 or 64 rows).
MMA_ROWS = 64


def kernel_rows(n: int, m: int, dtype: torch.dtype) -> int:
    """The most rows of activations the Triton kernels serve for ``n:m`` weights in ``dtype``.

    >>> kernel_rows(2, 4, torch.float16), kernel_rows(2, 8, torch.float16), kernel_rows(2, 4, torch.float32)
    (64, 2, 2)
    """
    return MMA_ROWS if mma_fast_path(n, m, dtype) else GEMV_ROWS


def kernel_path(rows: int, n: int, m: int, dtype: torch.dtype) -> str:
    """Which path a call with ``rows`` rows takes: ``"gemv"``, ``"mma"`` or ``"dense"`` (outside the
    kernels' rows: ``F.linear`` on the dense weight).

    >>> [kernel_path(r, 2, 4, torch.float16) for r in (1, 2, 3, 64, 65)]
    ['gemv', 'gemv', 'mma', 'mma', 'dense']
    >>> [kernel_path(r, 2, 8, torch.float16) for r in (2, 3)]
    ['gemv', 'dense']
    """
    if rows <= GEMV_ROWS:
        return "gemv"
    if rows <= kernel_rows(n, m, dtype):
        return "mma"
    return "dense"


def rows_reason(n: int, m: int, dtype: torch.dtype, rows: int) -> str | None:
    """Why the Triton kernels do not serve ``rows`` rows of an ``n:m`` layer in ``dtype`` (``None``: they do)."""
    if kernel_path(rows, n, m, dtype) != "dense":
        return None
    if rows > MMA_ROWS:
        return (f"M={rows} rows is a prefill size: the Triton N:M kernels serve decode (M <= {MMA_ROWS}); "
                "cuSPARSELt or dense run larger M")
    dt = str(dtype).removeprefix("torch.")
    return (f"M={rows} rows: the tensor-core kernel has no fast expansion for {n}:{m} {dt} (only 2:4 and 1:4 "
            f"in float16/bfloat16; the generic one is estimated slower than dense), so the Triton kernels "
            f"serve M <= {GEMV_ROWS} here (the GEMV)")


@dataclass(frozen=True, eq=False)
class TritonWeight:
    """What :meth:`TritonBackend.prepare` makes once per layer: the repacked weight and, where the
    tensor-core kernel may split K, its semaphores (int32 zeros; every call leaves them zero)."""

    packed: PackedNM
    semaphores: torch.Tensor | None


def triton_linear(
    x: torch.Tensor,
    packed: PackedNM,
    bias: torch.Tensor | None = None,
    *,
    semaphores: torch.Tensor | None = None,
    dense: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T + bias`` with one kernel, chosen from the rows of ``x`` (:func:`kernel_path`).

    ``dense``: the layer's dense ``[out_features, in_features]`` weight, used only when the rows are
    outside what the kernels serve (else the packed weight is decompressed for that call).
    """
    rows = math.prod(x.shape[:-1])
    path = kernel_path(rows, packed.n, packed.m, x.dtype)
    if path == "gemv":
        return nm_gemv(x, packed, bias)
    if path == "mma":
        return nm_mma(x, packed, bias, semaphores=semaphores)
    if dense is None:
        log.debug("nm_linear_triton: %d rows are outside the Triton kernels' rows for %s %s; decompressing the "
                  "weight for this call", rows, packed.pattern, x.dtype)
        dense = packed.linear_dense()
    return F.linear(x, dense.to(x.dtype), bias)


class TritonBackend(Backend):
    """nmgraph's Triton N:M decode kernels (GEMV and tensor-core), switching on the rows of ``x``."""

    name = "triton"

    def device_reason(self, device: torch.device) -> str | None:
        return unavailable_reason(device)

    def layer_reason(self, weight: CompressedNM, dtype: torch.dtype) -> str | None:
        if len(weight.shape) != 2:
            return f"weight of shape {weight.shape} is not a 2-D linear weight"
        if dtype not in SUPPORTED_DTYPES:
            return f"activation dtype {dtype} is not one of {', '.join(map(str, SUPPORTED_DTYPES))}"
        if weight.dtype != dtype:
            return f"weight values are {weight.dtype} but activations are {dtype}"
        return None

    def rows_reason(self, weight: CompressedNM, dtype: torch.dtype, rows: int) -> str | None:
        return rows_reason(weight.n, weight.m, dtype, rows)

    def prepare(self, weight: CompressedNM) -> TritonWeight:
        packed = repack(weight)
        semaphores = None
        if mma_fast_path(weight.n, weight.m, weight.dtype):
            semaphores = mma_semaphores(packed.rows, packed.device)
        return TritonWeight(packed, semaphores)

    def run(self, x: torch.Tensor, prepared: TritonWeight, bias: torch.Tensor | None) -> torch.Tensor:
        return triton_linear(x, prepared.packed, bias, semaphores=prepared.semaphores)

    def lower(self, weight: CompressedNM, prepared: TritonWeight) -> GraphCall:
        out_features, in_features = compressed_shape(weight)
        packed = prepared.packed
        return GraphCall(
            torch.ops.nmgraph.nm_linear_triton.default,
            (("nm_values", packed.values), ("nm_words", packed.words), ("nm_semaphores", prepared.semaphores),
             ("nm_dense", None)),
            (weight.n, weight.m, out_features, in_features),
            dense_slot=3,
        )


def _packed(values: torch.Tensor, words: torch.Tensor, n: int, m: int, out_features: int,
            in_features: int) -> PackedNM:
    return PackedNM(values, words, (out_features, in_features), n, m, 1)


@torch.library.custom_op("nmgraph::nm_linear_triton", mutates_args=())
def nm_linear_triton(
    x: torch.Tensor,
    values: torch.Tensor,
    words: torch.Tensor,
    semaphores: torch.Tensor | None,
    dense: torch.Tensor | None,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """The graph op of :class:`TritonBackend`: :func:`triton_linear` on a :class:`PackedNM`'s tensors.

    ``semaphores``: the layer's split-K semaphores (or ``None``: no split); ``dense``: the layer's
    dense ``[out_features, in_features]`` weight for rows outside the kernels' range (or ``None``).
    """
    check_x(x, in_features, "nm_linear_triton")
    if dense is not None and tuple(dense.shape) != (out_features, in_features):
        raise UnsupportedError(
            f"nmgraph::nm_linear_triton: dense weight has shape {tuple(dense.shape)}, expected "
            f"({out_features}, {in_features})."
        )
    packed = _packed(values, words, n, m, out_features, in_features)
    return triton_linear(x, packed, bias, semaphores=semaphores, dense=dense)


def _dense_weight(buffers, constants) -> torch.Tensor:
    if buffers[3] is not None:
        return buffers[3]
    return _packed(buffers[0], buffers[1], *constants).linear_dense()


register_frozen_linear(nm_linear_triton, n_buffers=4, shape=lambda c: (c[2], c[3]), dense_weight=_dense_weight)

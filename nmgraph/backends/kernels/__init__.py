"""Decode kernels for N:M weights, and the storage they read.

* :mod:`~nmgraph.backends.kernels.repack`: :class:`PackedNM`, the kernel-friendly layout of a
  :class:`~nmgraph.compress.CompressedNM` (same bytes, exact round trip), made once per layer;
* :mod:`~nmgraph.backends.kernels.nm_gemv`: :func:`nm_gemv`, the gather GEMV on CUDA cores for
  ``M = 1 .. 2`` rows of activations;
* :mod:`~nmgraph.backends.kernels.nm_mma`: :func:`nm_mma`, the swap-AB tensor-core kernel for
  ``M = 3 .. 64``.

Each launcher validates its arguments (typed :mod:`nmgraph.errors`), allocates the output and
launches exactly one kernel. Triton is imported only when a kernel is launched, so this package
imports without it.
"""

from nmgraph.backends.kernels.nm_gemv import GemvConfig, nm_gemv
from nmgraph.backends.kernels.nm_mma import MmaConfig, mma_semaphores, nm_mma
from nmgraph.backends.kernels.repack import CHUNK, PackedNM, repack

__all__ = ["CHUNK", "GemvConfig", "MmaConfig", "PackedNM", "mma_semaphores", "nm_gemv", "nm_mma", "repack"]

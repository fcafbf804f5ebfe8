"""Execution backends for N:M linear layers, and the registry that holds them.

:mod:`~nmgraph.backends.base` defines :class:`Backend` (prepare, run, and the graph op it lowers to)
and :class:`BackendRegistry`; each backend is one file: ``"dense"`` (F.linear on the decompressed,
pruned weight; runs everywhere, :mod:`~nmgraph.backends.dense`), ``"triton"`` (nmgraph's N:M decode
kernels in :mod:`~nmgraph.backends.kernels`, one op switching on the rows of x,
:mod:`~nmgraph.backends.triton_nm`) and ``"cusparselt"`` (PyTorch's semi-structured 2:4 kernels,
:mod:`~nmgraph.backends.cusparselt`). :mod:`~nmgraph.backends.ops` holds what their graph ops share;
:mod:`~nmgraph.backends.dispatch` measures them per layer. Registries are objects, so a test or a
user can build one with their own backends; :func:`default_registry` returns a fresh one with the
built-in backends. A new backend is one file plus one line in :mod:`~nmgraph.backends.registry`.
"""

from __future__ import annotations

from nmgraph.backends.base import Backend, BackendRegistry, GraphCall
from nmgraph.backends.registry import backend_names, default_registry

__all__ = ["Backend", "BackendRegistry", "GraphCall", "backend_names", "default_registry"]

"""The built-in backends: one line each. A new backend is its own file plus one line here."""

from __future__ import annotations

from nmgraph.backends.base import BackendRegistry
from nmgraph.backends.cusparselt import CuSparseLtBackend
from nmgraph.backends.dense import DenseBackend
from nmgraph.backends.triton_nm import TritonBackend

__all__ = ["backend_names", "default_registry"]


def default_registry() -> BackendRegistry:
    """A new registry with the built-in backends, in the order dispatch measures them.

    >>> default_registry().names()
    ('dense', 'triton', 'cusparselt')
    """
    return BackendRegistry([DenseBackend(), TritonBackend(), CuSparseLtBackend()])


def backend_names() -> tuple[str, ...]:
    """Names of the built-in backends (every list of backend names in nmgraph derives from this)."""
    return default_registry().names()

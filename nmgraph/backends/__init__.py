"""Execution backends for N:M linear layers, and the registry that holds them.

A backend turns one compressed weight into something it can run (:meth:`Backend.prepare`, once per
layer) and runs ``y = x @ W^T + b`` with it (:meth:`Backend.run`). Before that it says whether it
can run at all on a device (:meth:`Backend.device_reason`) and for this layer
(:meth:`Backend.layer_reason`): ``None`` means yes, a string is the reason a user reads.

Backends: ``"dense"`` (F.linear on the decompressed, pruned weight; runs everywhere),
``"triton"`` (nmgraph's N:M kernel, :mod:`nmgraph.backends.triton_nm`) and ``"cusparselt"``
(PyTorch's semi-structured 2:4 kernels, :mod:`nmgraph.backends.cusparselt`). Registries are
objects, so a test or a user can build one with their own backends;
:func:`default_registry` returns a fresh one with the three above.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from nmgraph.compress import CompressedNM
from nmgraph.errors import UnsupportedError

__all__ = ["BACKEND_NAMES", "Backend", "BackendRegistry", "default_registry"]

#: Names of the built-in backends, in the order dispatch measures them.
BACKEND_NAMES = ("dense", "triton", "cusparselt")


class Backend:
    """Base class of an N:M linear backend (subclass and set ``name``)."""

    name: str = ""
    #: True when the backend reads the weight N:M-compressed (false for the dense baseline).
    sparse: bool = True

    def device_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` at all, or ``None``."""
        return None

    def layer_reason(self, weight: CompressedNM, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run this weight with ``dtype`` activations, or ``None``."""
        return None

    def unavailable_reason(self, weight: CompressedNM, dtype: torch.dtype, device: torch.device) -> str | None:
        return self.device_reason(device) or self.layer_reason(weight, dtype)

    def prepare(self, weight: CompressedNM) -> Any:
        """Converts the compressed weight once into what :meth:`run` consumes."""
        raise NotImplementedError

    def run(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W^T + bias`` for ``x`` of shape ``[..., in_features]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class BackendRegistry:
    """Name -> :class:`Backend`. Build a fresh one per use (no process-wide registry)."""

    def __init__(self, backends: tuple[Backend, ...] | list[Backend] = ()) -> None:
        self._backends: dict[str, Backend] = {}
        for b in backends:
            self.register(b)

    def register(self, backend: Backend) -> None:
        if not backend.name:
            raise UnsupportedError(f"{backend!r} has no name; set the class attribute `name`.")
        self._backends[backend.name] = backend

    def get(self, name: str) -> Backend:
        try:
            return self._backends[name]
        except KeyError:
            raise UnsupportedError(
                f"Unknown nmgraph backend {name!r}; registered: {', '.join(self._backends) or 'none'}."
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._backends)

    def __contains__(self, name: object) -> bool:
        return name in self._backends

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._backends.values())


def default_registry() -> BackendRegistry:
    """A new registry with the dense, Triton and cuSPARSELt backends.

    >>> default_registry().names()
    ('dense', 'triton', 'cusparselt')
    """
    from nmgraph.backends.cusparselt import CuSparseLtBackend
    from nmgraph.backends.dense import DenseBackend
    from nmgraph.backends.triton_nm import TritonBackend

    return BackendRegistry([DenseBackend(), TritonBackend(), CuSparseLtBackend()])

"""The backend interface, the registry, and what a backend tells the lowering pass.

A backend turns one compressed weight into something it can run (:meth:`Backend.prepare`, once per
layer), runs ``y = x @ W^T + b`` with it (:meth:`Backend.run`), and says how a lowered graph calls it
(:meth:`Backend.lower`: the graph op and the tensors that become buffers). Before that it says
whether it can run at all on a device (:meth:`Backend.device_reason`), for this layer
(:meth:`Backend.layer_reason`) and for this many rows of activations (:meth:`Backend.rows_reason`:
a decode kernel declines prefill sizes): ``None`` means yes, a string is the reason a user reads.

The dispatcher times ``run`` on the object the registry holds, and :func:`nmgraph.passes.lower_linears`
asks that same object for its graph op, so what runs in the graph is what was measured.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from nmgraph.compress import CompressedNM
from nmgraph.errors import UnsupportedError

__all__ = ["Backend", "BackendRegistry", "GraphCall"]


@dataclass(frozen=True)
class GraphCall:
    """How a lowered graph calls a backend for one weight: ``op(x, *buffers, bias, *args)``.

    ``buffers``: ``(suffix, tensor)`` pairs in argument order; each tensor is registered on the
    weight's owning module as ``<leaf>_<suffix>`` (a ``None`` tensor is passed as ``None``).
    ``args``: the constant arguments after the bias. ``dense_slot``: the position in ``buffers`` of
    an optional dense ``[out_features, in_features]`` weight (given as ``None``) that the op runs
    for rows outside :meth:`Backend.rows_reason`'s range; the lowering passes the layer's own dense
    weight there when the graph's rows are dynamic (docs/deploy.md).
    """

    op: Any
    buffers: tuple[tuple[str, torch.Tensor | None], ...]
    args: tuple
    dense_slot: int | None = None


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

    def rows_reason(self, weight: CompressedNM, dtype: torch.dtype, rows: int) -> str | None:
        """Why this backend should not run ``rows`` rows of activations (all leading dims) for this
        layer, or ``None``: the rows its kernels are made for (the dispatcher does not time it
        outside them, and a forced backend leaves such a layer dense)."""
        return None

    def unavailable_reason(self, weight: CompressedNM, dtype: torch.dtype, device: torch.device,
                           rows: int | None = None) -> str | None:
        reason = self.device_reason(device) or self.layer_reason(weight, dtype)
        if reason is None and rows is not None:
            reason = self.rows_reason(weight, dtype, rows)
        return reason

    def prepare(self, weight: CompressedNM) -> Any:
        """Converts the compressed weight once into what :meth:`run` consumes."""
        raise NotImplementedError

    def run(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W^T + bias`` for ``x`` of shape ``[..., in_features]``."""
        raise NotImplementedError

    def lower(self, weight: CompressedNM, prepared: Any) -> GraphCall:
        """The graph op and buffers that run ``prepared`` inside a lowered graph."""
        raise UnsupportedError(f"backend {self.name!r} has no graph op; it cannot be lowered into a graph.")

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

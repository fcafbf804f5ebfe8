"""All-or-nothing public calls: an undo log of what a call is about to change.

Every public call that changes a model (``convert``, ``prepare``, ``export``, ``nmgraph.compile``)
first checks everything it can, then records what it will write in a :class:`Rollback` and
writes. If anything raises before the call returns (a typed error, a bug, ``KeyboardInterrupt``),
the log puts back, in reverse order:

* tensor values (:meth:`Rollback.keep_tensors`): a copy of each tensor is taken before the first
  write and copied back into the *same* tensor object, so the user's Parameters keep their identity
  (an optimizer built on them still works) and their bits;
* a module's structure (:meth:`Rollback.keep_module`): for a ``GraphModule`` its graph (a copy,
  reinstalled and recompiled), ``gm.meta``, and for every submodule its child modules, parameters,
  buffers and ``training`` flag, and attributes set on the instance.

The copies live on the CPU (the device memory a call needs does not grow by the model's size); a
call keeps them only until it returns.

>>> lin = torch.nn.Linear(4, 4)
>>> before = lin.weight.detach().clone()
>>> try:
...     with Rollback() as undo:
...         undo.keep_tensors([lin.weight])
...         with torch.no_grad():
...             _ = lin.weight.zero_()
...         raise KeyboardInterrupt
... except KeyboardInterrupt:
...     pass
>>> torch.equal(lin.weight, before)
True
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from types import TracebackType

import torch
from torch import fx

__all__ = ["Rollback"]

log = logging.getLogger(__name__)


class Rollback:
    """Undo log of one call; use as a context manager (undoes on any exception, re-raises it)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._kept: set[int] = set()

    def keep_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Records the values of ``tensors`` (each once) so :meth:`undo` can copy them back in place."""
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t in tensors:
            if not isinstance(t, torch.Tensor) or id(t) in self._kept or t.device.type == "meta":
                continue
            self._kept.add(id(t))
            saved.append((t, t.detach().to("cpu", copy=True)))

        def undo() -> None:
            with torch.no_grad():
                for t, value in saved:
                    t.copy_(value)

        if saved:
            self._undo.append(undo)

    def keep_module(self, module: torch.nn.Module) -> None:
        """Records ``module``'s structure: graph (for a GraphModule), meta, submodules, parameters,
        buffers, training flags and instance attributes of every submodule."""
        mods = list(module.modules())
        saved = [(m, dict(m.__dict__), dict(m._modules), dict(m._parameters), dict(m._buffers),
                  set(m._non_persistent_buffers_set)) for m in mods]
        graph = copy.deepcopy(module.graph) if isinstance(module, fx.GraphModule) else None
        meta = dict(module.meta) if isinstance(getattr(module, "meta", None), dict) else None

        def undo() -> None:
            for m, attrs, children, params, buffers, non_persistent in saved:
                for key in [k for k in m.__dict__ if k not in attrs]:
                    del m.__dict__[key]
                for key, value in attrs.items():
                    if key not in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
                        m.__dict__[key] = value
                for live, kept in ((m._modules, children), (m._parameters, params), (m._buffers, buffers)):
                    live.clear()
                    live.update(kept)
                m._non_persistent_buffers_set.clear()
                m._non_persistent_buffers_set.update(non_persistent)
            if graph is not None:
                module.graph = graph  # reinstalls and recompiles
            if meta is not None:
                module.meta.clear()
                module.meta.update(meta)

        self._undo.append(undo)

    def undo(self) -> list[Exception]:
        """Puts everything recorded back, last recorded first; the log is then empty.

        Returns the errors of steps that failed (each is logged; the other steps still ran)."""
        steps, self._undo = self._undo, []
        self._kept.clear()
        failures = []
        for step in reversed(steps):
            try:
                step()
            except Exception as e:  # keep undoing the rest; report after
                failures.append(e)
                log.error("rollback step failed", exc_info=True)
        return failures

    def commit(self) -> None:
        """Forgets the log (the call succeeded)."""
        self._undo.clear()
        self._kept.clear()

    def __enter__(self) -> Rollback:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if typ is None:
            self.commit()
            return False
        failures = self.undo()
        if exc is not None and failures:
            exc.add_note(f"nmgraph could not undo every change after this error: {failures[0]!r}")
        elif exc is not None and isinstance(exc, Exception):
            exc.add_note("nmgraph undid the changes this call had made")
        return False

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

The copies live on the CPU (the device memory a call needs does not grow by the model's size) in a
:class:`TensorStore`: in memory up to ``memory_bytes`` (default :data:`MEMORY_BYTES`), beyond that
in files of a private temporary directory, read back memory-mapped one tensor at a time, so undoing
a call on a model larger than the memory left never needs a second copy of the model in RAM. A call
keeps them only until it returns (the directory is removed then).

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
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from types import TracebackType

import torch
from torch import fx

__all__ = ["MEMORY_BYTES", "Rollback", "TensorStore"]

log = logging.getLogger(__name__)

MEMORY_BYTES = 256 * 2**20  # tensor copies kept in memory up to this, then in a temporary directory


class TensorStore:
    """Copies of tensors' values, written back later into the *same* tensor objects, bit for bit.

    The first ``memory_bytes`` of copies stay in memory (on the CPU); the rest go to files in a
    temporary directory created on first need (``torch.save``; read back with ``mmap=True``, one
    tensor at a time). :meth:`close` (or leaving the ``with`` block) drops the copies and removes
    the directory. A tensor is saved once (by identity: tied parameters count once); saving it again
    is a no-op, so "save before the first write" needs no bookkeeping by the caller.

    >>> w = torch.arange(6.0)
    >>> with TensorStore(memory_bytes=0) as store:   # every copy on disk
    ...     _ = store.save(w)
    ...     _ = w.zero_()
    ...     store.restore()
    >>> w.tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    """

    def __init__(self, memory_bytes: int | None = None) -> None:
        self.memory_bytes = MEMORY_BYTES if memory_bytes is None else int(memory_bytes)
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0
        self.seconds = 0.0  # spent saving: a yardstick for what a restore costs
        self._entries: list[tuple[torch.Tensor, torch.Tensor | str]] = []
        self._ids: set[int] = set()
        self._dir: str | None = None

    @property
    def directory(self) -> str | None:
        """The temporary directory holding the spilled copies (``None`` while none is needed)."""
        return self._dir

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tensor: object) -> bool:
        return id(tensor) in self._ids

    def save(self, tensor: torch.Tensor) -> bool:
        """Copies ``tensor``'s current value (once per tensor object); ``True`` if it was saved now."""
        if id(tensor) in self._ids or tensor.device.type == "meta":
            return False
        start = time.perf_counter()
        t = tensor.detach()
        nbytes = t.numel() * t.element_size()
        if self.bytes_in_memory + nbytes <= self.memory_bytes:
            value: torch.Tensor | str = t.to("cpu", copy=True)
            self.bytes_in_memory += nbytes
        else:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="nmgraph-undo-")
            value = os.path.join(self._dir, f"{len(self._entries)}.pt")
            cpu = t.to("cpu").contiguous()
            if cpu.untyped_storage().nbytes() != nbytes:  # a view: torch.save would write its whole storage
                cpu = cpu.clone()
            torch.save(cpu, value)
            self.bytes_on_disk += nbytes
        self._entries.append((tensor, value))
        self._ids.add(id(tensor))
        self.seconds += time.perf_counter() - start
        return True

    def restore(self, start: int = 0, stop: int | None = None) -> None:
        """Copies the saved values back into their tensors (entries ``start:stop`` in saving order,
        latest first); the store keeps them, so a later :meth:`restore` writes the same values."""
        with torch.no_grad():
            for tensor, value in reversed(self._entries[start:stop]):
                if isinstance(value, str):
                    value = torch.load(value, mmap=True, weights_only=True)
                tensor.copy_(value)
                del value

    def close(self) -> None:
        """Drops every copy and removes the temporary directory."""
        self._entries.clear()
        self._ids.clear()
        self.bytes_in_memory = self.bytes_on_disk = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> TensorStore:
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        self.close()
        return False


class Rollback:
    """Undo log of one call; use as a context manager (undoes on any exception, re-raises it)."""

    def __init__(self, memory_bytes: int | None = None) -> None:
        """``memory_bytes``: tensor copies kept in memory up to this (default :data:`MEMORY_BYTES`),
        the rest in a temporary directory (see :class:`TensorStore`)."""
        self._undo: list[Callable[[], None]] = []
        self._store = TensorStore(memory_bytes)

    @property
    def store(self) -> TensorStore:
        """Where the tensor copies are (how many bytes in memory and on disk)."""
        return self._store

    def keep_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Records the values of ``tensors`` (each once) so :meth:`undo` can copy them back in place."""
        store = self._store
        first = len(store)
        for t in tensors:
            if isinstance(t, torch.Tensor):
                store.save(t)
        last = len(store)
        if last > first:
            self._undo.append(lambda: store.restore(first, last))

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
        failures = []
        try:
            for step in reversed(steps):
                try:
                    step()
                except Exception as e:  # keep undoing the rest; report after
                    failures.append(e)
                    log.error("rollback step failed", exc_info=True)
        finally:
            self._store.close()
        return failures

    def commit(self) -> None:
        """Forgets the log (the call succeeded)."""
        self._undo.clear()
        self._store.close()

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

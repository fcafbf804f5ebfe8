"""Sparse Architecture Divergence (SAD): how much the target N:M masks move during training.

For every masked weight the tracker compares the target hard mask ``H_t`` (the N:M mask that
evaluation uses and :func:`nmgraph.convert` folds) with

* the previous step's mask: ``flips = |H_t \\ H_{t-1}| / |H_t|``, the fraction of kept weights
  replaced in one step;
* the mask when tracking started (step 0 of a fresh run): ``dist_start = |H_t \\ H_0| / |H_t|``;
* the mask at mid-training (``total_steps // 2`` or ``mid_step=``): ``dist_mid``, ``None`` before
  that step.

Every N:M mask keeps the same number of weights, so ``|H_t \\ H_ref| = |H_ref \\ H_t|`` and each
value is in ``[0, 1]``. Global values sum counts over layers before dividing. One dict per step is
returned (and kept in ``history``); a line is logged at INFO every ``log_every`` steps.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from nmgraph.masking.state import SparsityState

__all__ = ["SADTracker"]

log = logging.getLogger(__name__)


class SADTracker:
    """Tracks SAD of the masks in ``state`` (a prepared graph's :class:`SparsityState`).

    Call :meth:`update` after every ``state.advance`` (``SparsityCallback(telemetry=True)`` does).
    """

    def __init__(
        self,
        state: SparsityState,
        *,
        mid_step: int | None = None,
        log_every: int = 0,
        keep_history: bool = True,
    ) -> None:
        self.state = state
        total = state.config.schedule.total_steps
        self.mid_step = mid_step if mid_step is not None else (total // 2 if total else None)
        self.log_every = log_every
        self.keep_history = keep_history
        self.history: list[dict[str, Any]] = []
        self.start_step = state.current_step
        self._prev = self._snapshot()
        self._start = self._snapshot()
        self._mid: dict[str, torch.Tensor] | None = (
            self._snapshot() if self.mid_step is not None and self.start_step == self.mid_step else None
        )

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {st.weight_name: st.hard.clone() for _, st in self.state.layers()}

    @torch.no_grad()
    def update(self) -> dict[str, Any]:
        """Compares the current masks with the references; returns this step's SAD dict."""
        step = self.state.current_step
        plan = self.state.current_plan()
        if self.mid_step is not None and step == self.mid_step:
            self._mid = self._snapshot()
        names, rows = [], []
        for _, st in self.state.layers():
            h = st.hard
            name = st.weight_name
            ref_mid = self._mid[name] if self._mid is not None else None
            counts = [
                h.sum(),
                (h & ~self._prev[name]).sum(),
                (h & ~self._start[name]).sum(),
                (h & ~ref_mid).sum() if ref_mid is not None else torch.zeros((), dtype=torch.int64, device=h.device),
            ]
            names.append(name)
            rows.append(torch.stack(counts).cpu())
        table = torch.stack(rows).tolist() if rows else []
        layers: dict[str, dict[str, float | None]] = {}
        totals = [0, 0, 0, 0]
        for name, (kept, flips, d0, dmid) in zip(names, table):
            layers[name] = {
                "flips": flips / kept if kept else 0.0,
                "dist_start": d0 / kept if kept else 0.0,
                "dist_mid": (dmid / kept if kept else 0.0) if self._mid is not None else None,
            }
            totals = [a + b for a, b in zip(totals, (kept, flips, d0, dmid))]
        kept = totals[0] or 1
        record: dict[str, Any] = {
            "step": step,
            "phase": plan.phase.value,
            "pattern": "dense" if plan.pattern is None else str(plan.pattern),
            "flips": totals[1] / kept,
            "dist_start": totals[2] / kept,
            "dist_mid": totals[3] / kept if self._mid is not None else None,
            "layers": layers,
        }
        for _, st in self.state.layers():
            self._prev[st.weight_name].copy_(st.hard)
        if self.keep_history:
            self.history.append(record)
        if self.log_every and step % self.log_every == 0:
            log.info(
                "SAD step %d (%s %s): flips %.5f, dist_start %.4f, dist_mid %s",
                step, record["phase"], record["pattern"], record["flips"], record["dist_start"],
                "-" if record["dist_mid"] is None else f"{record['dist_mid']:.4f}",
            )
        log.debug("SAD step %d per layer: %s", step, layers)
        return record

    def state_dict(self) -> dict[str, Any]:
        """Reference masks and history, to resume tracking after a restart."""
        return {
            "start_step": self.start_step,
            "mid_step": self.mid_step,
            "prev": {k: v.clone() for k, v in self._prev.items()},
            "start": {k: v.clone() for k, v in self._start.items()},
            "mid": None if self._mid is None else {k: v.clone() for k, v in self._mid.items()},
            "history": list(self.history),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.start_step = sd["start_step"]
        self.mid_step = sd["mid_step"]
        self._prev = {k: v.clone() for k, v in sd["prev"].items()}
        self._start = {k: v.clone() for k, v in sd["start"].items()}
        self._mid = None if sd["mid"] is None else {k: v.clone() for k, v in sd["mid"].items()}
        self.history = list(sd["history"])

"""The pass runner: explicit tuples of passes, typed results, original exceptions with a note."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from nmgraph.analysis.plan import Skip

__all__ = ["PassResult", "run_passes"]

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What one pass did. ``modified`` is derived from the nodes it changed, never set by hand."""

    gm: fx.GraphModule
    changed_nodes: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return bool(self.changed_nodes)


Pass = Callable[..., PassResult]


def run_passes(
    gm: fx.GraphModule, passes: Sequence[Pass], config: Any = None, *, lint: bool = False
) -> list[PassResult]:
    """Runs ``passes`` in order on ``gm``; cleans up once at the end if anything changed.

    On failure the original exception propagates with a note naming the pass.
    """
    results: list[PassResult] = []
    for p in passes:
        name = getattr(p, "__name__", repr(p))
        try:
            result = p(gm, config)
            if lint:
                gm.graph.lint()
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"while running nmgraph pass {name!r}")
            raise
        log.debug("pass %s changed %d nodes, skipped %d", name, len(result.changed_nodes), len(result.skipped))
        results.append(result)
        gm = result.gm
    if any(r.modified for r in results):
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return results

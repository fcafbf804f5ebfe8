"""The progress bars of :func:`nmgraph.sparsify`: one bar per stage (statistics, permutation search,
pruning), each counting the stage's units of work; off when ``progress`` is false or stderr is not a
terminal (tqdm's ``disable=None``), and absent when tqdm is not installed."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["progress_bar"]


def progress_bar(progress: bool, total: int, desc: str, unit: str = "layer") -> Any | None:
    """A tqdm bar of ``total`` ``unit``, or ``None`` when there is nothing to show."""
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        log.debug("tqdm is not installed; running without a progress bar")
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None)

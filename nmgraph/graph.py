"""What nmgraph keeps on a captured ``GraphModule``, and how it reaches tensors by qualified name.

Graph-level state is one frozen :class:`GraphRecord` under ``gm.meta["nmgraph"]``, written by
:func:`nmgraph.capture` and extended (never mutated: replaced) by ``prepare``, ``convert`` and the
permutation before training. :func:`graph_record` is its one reader.

:func:`fetch_attr` / :func:`set_attr` are the one way nmgraph walks a dotted name
(``encoder.layer.0.output.dense.weight``) to the tensor or module it names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

__all__ = [
    "GRAPH_KEY",
    "ConvertRecord",
    "GraphRecord",
    "PrepareRecord",
    "fetch_attr",
    "graph_record",
    "owner_of",
    "set_attr",
    "set_graph_record",
    "update_graph_record",
]

#: The one ``gm.meta`` key nmgraph writes.
GRAPH_KEY = "nmgraph"


@dataclass(frozen=True)
class PrepareRecord:
    """What :func:`nmgraph.prepare` did: the training config, the masked weights, those left dense."""

    config: Any
    masked: tuple[str, ...]
    skipped: tuple[Any, ...]


@dataclass(frozen=True)
class ConvertRecord:
    """What :func:`nmgraph.convert` did: the weights made N:M (folded or pruned) with their reduction
    axes, the pattern, and the weights left dense."""

    folded: tuple[str, ...]
    skipped: tuple[Any, ...]
    pattern: Any = None
    axes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class GraphRecord:
    """nmgraph's state of one captured graph.

    ``captured_by``: ``"export"`` or ``"symbolic_trace"``; ``example_args`` / ``example_kwargs``:
    the inputs it was captured with (verification reruns them); ``inputs``: each tensor input's name,
    example shape and dynamic axes (:class:`nmgraph.capture.InputAxes`); ``notes``: what capture had
    to do or give up (cache turned off while tracing, an axis kept static, the export error before a
    ``symbolic_trace`` fallback); ``permuted``: the
    :class:`~nmgraph.passes.permute_channels.PermuteReport` of the permutation ``prepare`` ran;
    ``prepared`` / ``converted``: what ``prepare`` / ``convert`` did.
    """

    captured_by: str
    example_args: tuple = ()
    example_kwargs: Mapping[str, Any] = field(default_factory=dict)
    permuted: Any = None
    inputs: tuple[Any, ...] = ()
    notes: tuple[str, ...] = ()
    prepared: PrepareRecord | None = None
    converted: ConvertRecord | None = None


def graph_record(gm: Any) -> GraphRecord | None:
    """The record of a graph captured by nmgraph, ``None`` for any other module."""
    meta = getattr(gm, "meta", None)
    if not isinstance(meta, dict):
        return None
    rec = meta.get(GRAPH_KEY)
    return rec if isinstance(rec, GraphRecord) else None


def set_graph_record(gm: torch.fx.GraphModule, record: GraphRecord) -> None:
    gm.meta[GRAPH_KEY] = record


def update_graph_record(gm: torch.fx.GraphModule, **changes: Any) -> GraphRecord:
    """Replaces fields of ``gm``'s record (a graph nmgraph did not capture gets a new record)."""
    rec = graph_record(gm) or GraphRecord(captured_by="unknown")
    rec = replace(rec, **changes)
    set_graph_record(gm, rec)
    return rec


def fetch_attr(root: Any, qualname: str) -> Any:
    """The object at dotted ``qualname`` under ``root`` (a module, parameter or buffer); ``None`` if absent.

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 3))
    >>> fetch_attr(m, "0.weight").shape
    torch.Size([3, 2])
    >>> fetch_attr(m, "0.nothing") is None
    True
    """
    obj = root
    for part in str(qualname).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def owner_of(root: torch.nn.Module, qualname: str) -> tuple[torch.nn.Module, str]:
    """``(owning module, leaf name)`` of dotted ``qualname`` (``root`` itself owns a name without dots)."""
    owner_name, _, leaf = str(qualname).rpartition(".")
    return (root.get_submodule(owner_name) if owner_name else root), leaf


def set_attr(root: torch.nn.Module, qualname: str, value: torch.Tensor, *, is_param: bool) -> None:
    """Binds ``value`` as the parameter (or buffer) at ``qualname`` without copying it."""
    owner, leaf = owner_of(root, qualname)
    if is_param:
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value

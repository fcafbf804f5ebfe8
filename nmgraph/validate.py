"""Argument checks shared by the public calls: each names the argument, what it got, and the fix.

A public call runs these before it changes anything, so a bad argument never leaves a model half
rewritten (see :mod:`nmgraph.rollback` for what happens when a later step fails).

>>> check_time_limit(-1, "permute")
Traceback (most recent call last):
    ...
nmgraph.errors.ArgumentError: permute(time_limit=-1): a time limit is a number of seconds >= 0, None for the default budget or math.inf for no limit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from nmgraph.analysis.plan import SparsityPlan
from nmgraph.errors import ArgumentError, ShapeError
from nmgraph.graph import fetch_attr

__all__ = [
    "check_finite",
    "check_perms",
    "check_permute_arguments",
    "check_plan_finite",
    "check_seed",
    "check_time_limit",
]

_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_seed(seed: Any, where: str) -> None:
    """``seed`` is an integer torch can seed a generator with."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ArgumentError(
            f"{where}(seed={seed!r}): the seed must be an int (it seeds the search's random generator); "
            "pass e.g. seed=0."
        )
    if not _SEED_RANGE[0] <= int(seed) <= _SEED_RANGE[1]:
        raise ArgumentError(f"{where}(seed={seed!r}): the seed must fit in 64 bits; pass e.g. seed=0.")


def check_time_limit(time_limit: Any, where: str) -> None:
    """``time_limit`` is ``None`` (the default budget) or a number of seconds ``>= 0`` (``math.inf``: none)."""
    if time_limit is None:
        return
    if isinstance(time_limit, bool) or not isinstance(time_limit, numbers.Real):
        raise ArgumentError(
            f"{where}(time_limit={time_limit!r}): a time limit is a number of seconds "
            f"({type(time_limit).__name__} given); pass e.g. time_limit=5.0, None for the default budget "
            "or math.inf for no limit."
        )
    if math.isnan(float(time_limit)) or float(time_limit) < 0:
        raise ArgumentError(
            f"{where}(time_limit={time_limit!r}): a time limit is a number of seconds >= 0, None for the "
            "default budget or math.inf for no limit."
        )


def check_perms(perms: Any, where: str = "permute") -> None:
    """``perms`` is ``None`` or ``{group id: 1-D integer tensor or sequence of ints}``."""
    if perms is None:
        return
    if not isinstance(perms, Mapping):
        raise ArgumentError(
            f"{where}(perms=...) takes {{group_id: LongTensor}}, got {type(perms).__name__}; e.g. "
            "perms={g.id: g.random_permutation(gen) for g in plan.groups}."
        )
    for gid, value in perms.items():
        if isinstance(value, torch.Tensor):
            t = value
        else:
            try:
                t = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ArgumentError(
                    f"{where}(perms={{{gid!r}: {type(value).__name__}}}): a permutation is a 1-D LongTensor "
                    f"(or a sequence of ints) of the group's channel indices ({e})."
                ) from None
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ArgumentError(
                f"{where}(perms={{{gid!r}: ...}}) has dtype {t.dtype}: a permutation holds channel indices, "
                "so it must be integers (a LongTensor); fractional values would be truncated silently."
            )
        if t.dim() != 1:
            raise ArgumentError(
                f"{where}(perms={{{gid!r}: ...}}) has shape {list(t.shape)}: a permutation is 1-D, one index "
                "per channel of the group."
            )


def check_permute_arguments(gm: Any, plan: Any, *, seed: Any, time_limit: Any, perms: Any,
                            where: str = "permute") -> None:
    """Every argument of :func:`nmgraph.permute` that a user can get wrong, before anything changes."""
    if not isinstance(gm, fx.GraphModule):
        raise ArgumentError(
            f"{where}() permutes a captured graph in place, got {type(gm).__name__}: pass the GraphModule "
            "returned by nmgraph.capture(model, example_inputs) (the one analyze() read); its parameters "
            "are the model's own, so the model is permuted too."
        )
    if not isinstance(plan, SparsityPlan):
        raise ArgumentError(
            f"{where}(gm, plan=...) needs the SparsityPlan returned by nmgraph.analyze(gm), got "
            f"{type(plan).__name__}."
        )
    check_seed(seed, where)
    check_time_limit(time_limit, where)
    check_perms(perms, where)


def check_finite(tensor: torch.Tensor, name: str, *, what: str = "weight", node: str | None = None,
                 fix: str = "") -> None:
    """Raises :class:`ShapeError` naming ``name`` when ``tensor`` holds NaN: N:M masks of NaN are undefined.

    ``what`` says what the tensor is (``"weight"``, ``"saliency score for"``), ``node`` the graph node
    that reads the weight.
    """
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.device.type == "meta":
        return
    bad = torch.isnan(tensor.detach())
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0]]
        label = f"{what} {name!r}" + (f" (read by node {node})" if node else "")
        layer = name.rpartition(".")[0] or name
        raise ShapeError(
            f"The {label} holds {int(bad.sum())} NaN value(s), the first at index {first}: its N:M mask is "
            "undefined, so nothing was changed. "
            + (fix or "Find where the NaN came from (a diverged training step, a bad checkpoint), or keep "
               f"this layer dense with exclude=[{layer!r}].")
        )


def check_plan_finite(gm: torch.nn.Module, plan: SparsityPlan,
                      scores: Mapping[str, torch.Tensor] | None = None) -> None:
    """Every weight of ``plan`` (and its saliency score, if given) is free of NaN."""
    for info in plan.layers:
        check_finite(fetch_attr(gm, info.name), info.name, node=info.node)
        if scores is not None and info.name in scores:
            check_finite(scores[info.name], info.name, what="saliency score for", node=info.node)

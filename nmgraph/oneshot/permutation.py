"""Channel permutation scored by the pruning method's own saliency, with bounded memory.

``nmgraph.permute`` reorders the channels of each permutation group of the plan so that N:M pruning
keeps more; which channels share a group of ``m`` is a free choice as long as every tensor of the
group is reordered alike (the function is unchanged). What "keeps more" means depends on the method
that prunes afterwards, so the score matrix of a group stacks, for every eligible weight that reads
the group's channels, that method's saliency:

* magnitude: ``|W|``;
* Wanda: ``|W_ij| * ||X_j||`` with the input norms of the dense model on the calibration set;
* SparseGPT: the OBS saliency ``w^2 / [H^-1]_jj^2`` with ``H^-1 = (X^T X + damp I)^-1`` of the dense
  model (the diagonal of ``H^-1`` itself, which moves with the channels; SparseGPT's own sweep uses the
  order-dependent Cholesky diagonal).

Memory stays bounded however many weights read a group (the residual stream of an LLM is read by
every projection of every layer): the search sees at most ``max_rows`` rows, drawn uniformly at random
(seeded) from all consumers' rows, built one consumer at a time. The kept score is a sum over rows,
so the sample estimates it without bias. The gain a permutation brings is then measured *exactly*,
streaming over every consumer again, and a permutation is adopted only when it keeps more of the full
saliency than the identity.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nmgraph.oneshot.progress import progress_bar
from nmgraph.oneshot.taps import Geometry
from nmgraph.search import kept_score, search_permutation

__all__ = ["GroupSearch", "member_columns", "saliency", "search_groups"]

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 16384


def saliency(method: str, weight: torch.Tensor, geometry: Geometry | None, stats: torch.Tensor | None) -> torch.Tensor:
    """The method's saliency of every entry of ``weight`` (its own shape, float32)."""
    w = weight.detach().float()
    if method == "magnitude" or stats is None:
        return w.abs()
    vec = geometry.expand(stats.float())
    if method == "wanda":
        return w.abs() * vec.clamp_min(0).sqrt()
    d2 = vec.pow(2)
    return torch.where(d2 > 0, w.pow(2) / torch.where(d2 > 0, d2, torch.ones_like(d2)), torch.zeros(()))


def member_columns(member: Any, size: int) -> torch.Tensor:
    """``[copies, size]``: the index along ``member.axis`` of group channel ``c`` in each copy.

    A member holds the group's channels once, or ``inner`` consecutive entries per channel (a conv
    flattened into a Linear), or each block of ``repeat_block`` channels ``repeat`` times (grouped-
    query attention), or runs of channels every ``stride`` entries (fused Q/K/V); the layout is
    :class:`nmgraph.Member`'s.
    """
    c = torch.arange(size)
    if member.stride:
        chunk = member.stop - member.start
        return (member.start + (c // chunk) * member.stride + c % chunk).unsqueeze(0)
    copies = []
    for r in range(member.repeat):
        if member.repeat > 1:
            b = member.repeat_block
            pos = ((c // b) * member.repeat + r) * b + c % b
        else:
            pos = c
        for i in range(member.inner):
            copies.append(member.start + pos * member.inner + i)
    return torch.stack(copies)


def _rows(weight_shape: tuple[int, ...], axis: int, copies: int) -> int:
    n = 1
    for i, s in enumerate(weight_shape):
        if i != axis:
            n *= s
    return n * copies


def _score(sal: torch.Tensor, axis: int, cols: torch.Tensor) -> torch.Tensor:
    moved = sal.movedim(axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    return flat[:, cols.flatten()].reshape(-1, cols.shape[0], cols.shape[1]).reshape(-1, cols.shape[1])


@dataclass
class GroupSearch:
    """One permutation group: its size, how many score rows the search saw out of how many, the kept
    share of the method's saliency (over every consumer, exact) before and after, whether the
    permutation was adopted, and the time taken."""

    id: int
    size: int
    block: int
    consumers: int
    rows_total: int
    rows_searched: int
    kept_before: float
    kept_after: float
    applied: bool
    seconds: float
    note: str = ""

    @property
    def gain(self) -> float:
        """Kept saliency gained, in points of the group's total saliency (0.0 when not applied)."""
        return (self.kept_after - self.kept_before) if self.applied else 0.0


def search_groups(
    gm: torch.nn.Module,
    plan: Any,
    method: str,
    stats: Mapping[str, torch.Tensor],
    geometry: Mapping[str, Geometry],
    *,
    search: str = "greedy",
    seed: int = 0,
    time_limit: float | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    progress: bool = False,
) -> tuple[dict[int, torch.Tensor], list[GroupSearch], dict[str, tuple[float, float]]]:
    """Searches a permutation per group of ``plan`` under ``method``'s saliency (module docstring).

    ``time_limit`` (seconds, shared by the groups in proportion to their score-matrix size, largest
    first, time a group leaves unused passing to the next) bounds the search. Returns the adopted
    permutations ``{group id: perm}`` (for ``nmgraph.permute(gm, plan, perms=...)``), one
    :class:`GroupSearch` per group with consumers, and per consumer weight its ``(kept before, kept
    after)`` saliency sums.
    """
    p = plan.pattern
    params = dict(gm.named_parameters(remove_duplicate=False))
    layers = {i.name: i for i in plan.layers}
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)

    def sal_of(name: str) -> torch.Tensor:
        return saliency(method, params[name], geometry.get(name), stats.get(name))

    todo = []
    for g in plan.groups:
        names = [n for n in g.consumers if n in layers]
        if not names:
            continue
        cols = {}
        for n in names:
            info = layers[n]
            member = next((m for m in g.members if m.name == n and m.axis == info.axis), None)
            if member is not None:
                cols[n] = member_columns(member, g.size)
        total = sum(_rows(layers[n].shape, layers[n].axis, cols[n].shape[0]) for n in cols)
        todo.append((g, cols, total))
    todo.sort(key=lambda t: -min(t[2], max_rows) * t[0].size)
    cost_left = sum(min(t[2], max_rows) * t[0].size for t in todo)
    perms: dict[int, torch.Tensor] = {}
    reports: list[GroupSearch] = []
    per_layer: dict[str, tuple[float, float]] = {}
    bar = progress_bar(progress, len(todo), f"search {p} ({method})", unit="group")
    with bar if bar is not None else contextlib.nullcontext():  # one bar over the groups, closed on any exit
        for i, (g, cols, total) in enumerate(todo):
            if bar is not None:
                bar.update(1 if i else 0)
                bar.set_postfix_str(f"group {i + 1}/{len(todo)} ({g.size} channels)")
            t0 = time.perf_counter()
            cost = min(total, max_rows) * g.size
            share = None
            if time_limit is not None:
                left = max(0.0, time_limit - (time.perf_counter() - start))
                share = left * cost / max(cost_left, 1)
            cost_left -= cost
            if g.size % p.m or not cols:
                reports.append(GroupSearch(g.id, g.size, g.block, len(cols), total, 0, 0.0, 0.0, False, 0.0,
                                           f"{g.size} channels are not a multiple of M={p.m}" if cols else
                                           "no consumer member found"))
                continue
            frac = min(1.0, max_rows / max(total, 1))
            sampled, before, grand = [], {}, 0.0
            for name, c in cols.items():
                s = _score(sal_of(name), layers[name].axis, c)
                before[name] = kept_score(s, p)
                grand += float(s.sum(dtype=torch.float64))
                if frac >= 1.0:
                    sampled.append(s)
                else:
                    take = max(1, round(frac * s.shape[0]))
                    idx = torch.randperm(s.shape[0], generator=gen)[:take].sort().values
                    sampled.append(s[idx])
                del s
            matrix = torch.cat(sampled)
            del sampled
            rows_searched = matrix.shape[0]
            budget = None
            if share is not None:  # the share also pays for building this matrix and for the exact check after
                budget = share - 2 * (time.perf_counter() - t0)
            if budget is not None and budget <= 0:
                reports.append(GroupSearch(g.id, g.size, g.block, len(cols), total, 0, _share(sum(before.values()), grand),
                                           _share(sum(before.values()), grand), False, time.perf_counter() - t0,
                                           "no time left in the budget"))
                continue
            tick = False
            if bar is not None:
                msum = float(matrix.sum(dtype=torch.float64)) or 1.0

                def tick(kept, _i=i, _g=g, _m=msum):
                    if kept is not None:
                        bar.set_postfix_str(f"group {_i + 1}/{len(todo)} ({_g.size} channels), kept {100 * kept / _m:.2f}%")
            result = search_permutation(matrix, p, method=search, block=g.block, seed=seed, time_limit=budget,
                                        threads=1, progress=tick)
            del matrix
            perm = result.perm.cpu()
            after = dict(before)
            if not torch.equal(perm, torch.arange(g.size)):
                after = {name: kept_score(_score(sal_of(name), layers[name].axis, c)[:, perm], p)
                         for name, c in cols.items()}
            kb, ka = sum(before.values()), sum(after.values())
            applied = ka > kb
            note = "" if applied else "no permutation keeps more of the full saliency"
            if applied:
                perms[g.id] = perm
                for name in cols:
                    per_layer[name] = (before[name], after[name])
            else:
                for name in cols:
                    per_layer.setdefault(name, (before[name], before[name]))
            reports.append(GroupSearch(g.id, g.size, g.block, len(cols), total, rows_searched, _share(kb, grand),
                                       _share(ka if applied else kb, grand), applied, time.perf_counter() - t0, note))
            log.info("group %d (%d channels, %d of %d score rows): kept %.4f -> %.4f of the %s saliency in %.2f s%s",
                     g.id, g.size, rows_searched, total, _share(kb, grand), _share(ka, grand), method,
                     time.perf_counter() - t0, "" if applied else " (not adopted)")
        if bar is not None and todo:
            bar.update(1)
    return perms, reports, per_layer


def _share(x: float, total: float) -> float:
    return x / total if total > 0 else 0.0

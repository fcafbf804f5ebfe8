"""Reorder the channels of every permutation group, in place, with the model's function unchanged.

Why this is valid: a :class:`~nmgraph.analysis.plan.PermutationGroup` lists every parameter and buffer axis
that carries the group's channels, found by the channel-flow analysis. Permuting the producers'
output rows (weights, biases), every per-channel parameter along the way (norm weights and biases,
BatchNorm running statistics, PReLU slopes) and the consumers' input columns by the same permutation
``P`` turns each intermediate activation ``h`` into ``h[..., P]``; every op on the path is
permutation-equivariant along that axis (the op table admits only such ops), and each consumer's
contraction ``sum_c W[:, c] h[c]`` is a sum over the same pairs in another order. So every output is
unchanged up to floating-point summation order. ``permute`` checks this on the example inputs and
undoes everything if it does not hold.

Why permute: N:M pruning keeps the N largest of every M consecutive input channels; a different
channel order puts different weights together and can keep more magnitude.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from nmgraph.analysis.plan import Member, PermutationGroup, Skip, SparsityPlan
from nmgraph.errors import PlanError, VerificationError
from nmgraph.graph import graph_record
from nmgraph.pattern import kept_magnitude
from nmgraph.search import SEARCHES, search_permutation
from nmgraph.validate import check_permute_arguments

__all__ = ["PermuteReport", "apply_permutation", "permute"]

log = logging.getLogger(__name__)

@dataclass
class PermuteReport:
    """What :func:`permute` did."""

    permuted: list[int] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    kept_before: dict[str, float] = field(default_factory=dict)
    kept_after: dict[str, float] = field(default_factory=dict)
    efficacy: dict[int, float] = field(default_factory=dict)
    perms: dict[int, torch.Tensor] = field(default_factory=dict)
    max_error: float = 0.0
    seconds: float = 0.0

    @property
    def modified(self) -> bool:
        return bool(self.permuted)

    def __str__(self) -> str:
        lines = [f"permuted {len(self.permuted)} groups in {self.seconds:.2f} s, max output error "
                 f"{self.max_error:.2e}"]
        for name, before in self.kept_before.items():
            after = self.kept_after.get(name, before)
            lines.append(f"  {name:<55} kept {100 * before:6.2f}% -> {100 * after:6.2f}%")
        for s in self.skipped:
            lines.append(f"  left alone: {s.name}: {s.reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "permuted": self.permuted, "skipped": [(s.name, s.reason) for s in self.skipped],
            "kept_before": self.kept_before, "kept_after": self.kept_after,
            "efficacy": self.efficacy, "max_error": self.max_error, "seconds": self.seconds,
        }


def _tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    return {**dict(gm.named_buffers(remove_duplicate=False)), **dict(gm.named_parameters(remove_duplicate=False))}


def _expand_repeat(m: Member, perm: torch.Tensor) -> torch.Tensor:
    """The permutation of a member that holds each block of channels ``m.repeat`` times."""
    if m.repeat == 1:
        return perm
    b = m.repeat_block
    heads = perm.numel() // b
    base = torch.arange(heads, device=perm.device) * b
    local = perm.view(heads, b) - base.unsqueeze(1)  # each head's own permutation
    copies = torch.arange(heads, device=perm.device).unsqueeze(1) * m.repeat + torch.arange(
        m.repeat, device=perm.device)
    return (copies.unsqueeze(-1) * b + local.unsqueeze(1)).flatten()


def _member_positions(m: Member, size: int, device) -> torch.Tensor:
    """Indices along ``m.axis`` of a strided member's channels, in the group's channel order."""
    chunk = m.stop - m.start
    c = torch.arange(size, device=device)
    return m.start + (c // chunk) * m.stride + c % chunk


def _member_index(m: Member, perm: torch.Tensor, dim: int) -> torch.Tensor:
    if m.stride:
        pos = _member_positions(m, perm.numel(), perm.device)
        idx = torch.arange(dim, device=perm.device)
        idx[pos] = pos[perm.to(torch.long)]
        return idx
    perm = _expand_repeat(m, perm.to(torch.long))
    seg = (perm.unsqueeze(1) * m.inner + torch.arange(m.inner, device=perm.device)).flatten() + m.start
    stop = m.start + perm.numel() * m.inner
    return torch.cat([torch.arange(0, m.start, device=perm.device), seg,
                      torch.arange(stop, dim, device=perm.device)])


def apply_permutation(gm: fx.GraphModule, group: PermutationGroup, perm: torch.Tensor) -> None:
    """Reorders ``group``'s channels in every member tensor: new channel ``i`` = old ``perm[i]``."""
    why = group.check(perm.cpu())
    if why:
        raise PlanError(f"permutation for group {group.id} is invalid: {why}.")
    tensors = _tensors(gm)
    done: set[tuple[int, int, int]] = set()
    with torch.no_grad():
        for m in group.members:
            t = tensors.get(m.name)
            if t is None:
                raise PlanError(
                    f"group {group.id} names {m.name!r}, which this graph module does not have; the plan "
                    "was made for another graph. Re-run nmgraph.analyze on this graph."
                )
            if m.stride:
                stop = int(_member_positions(m, group.size, "cpu").max()) + 1 if group.size else 0
            else:
                stop = m.start + group.size * m.inner * m.repeat
            if m.axis >= t.dim() or t.shape[m.axis] < stop or (
                    m.stop is not None and not m.stride and m.stop != stop):
                raise PlanError(
                    f"group {group.id} expects {m.name!r} to hold channels {m.start}:{stop} of axis {m.axis}, "
                    f"but it has shape {tuple(t.shape)}; the plan was made for another graph. Re-run "
                    "nmgraph.analyze on this graph."
                )
            key = (id(t), m.axis, m.start)
            if key in done:
                continue
            done.add(key)
            idx = _member_index(m, perm.to(t.device), t.shape[m.axis])
            t.copy_(t.index_select(m.axis, idx))


def _outputs(gm: fx.GraphModule, args, kwargs) -> list[torch.Tensor]:
    """The graph's floating-point outputs, leaving no trace: same RNG stream, buffers restored.

    A graph captured in training mode updates BatchNorm running statistics when it runs; the
    verification runs must not, so every buffer is put back afterwards.
    """
    buffers = [b for _, b in gm.named_buffers(remove_duplicate=True)]
    saved = [b.detach().clone() for b in buffers]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            out = gm(*args, **kwargs)
        finally:
            for b, v in zip(buffers, saved):
                b.copy_(v)
    leaves = pytree.tree_leaves(out.to_tuple() if hasattr(out, "to_tuple") else out)
    return [x.detach().clone() for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _rel_error(ref: list[torch.Tensor], new: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(ref, new):
        scale = float(a.abs().max()) if a.numel() else 0.0
        err = float((a - b).abs().max()) if a.numel() else 0.0
        worst = max(worst, err / max(scale, 1e-30))
    return worst


def _tolerance(ref: list[torch.Tensor]) -> float:
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in ref):
        return 2e-2
    return 1e-5


def _score_matrix(gm: fx.GraphModule, group: PermutationGroup, score: Mapping[str, torch.Tensor] | None):
    tensors = _tensors(gm)
    rows = []
    for name in group.consumers:
        m = next(x for x in group.members if x.name == name)
        w = score[name] if score is not None and name in score else tensors[name].detach().abs()
        w = w.float().movedim(m.axis, -1)
        if m.repeat > 1:  # every copy of a head is another set of rows under the same permutation
            heads = group.size // m.repeat_block
            w = w.reshape(-1, heads, m.repeat, m.repeat_block).movedim(2, 0)
        rows.append(w.reshape(-1, group.size))
    return torch.cat(rows) if rows else None


def _search(group: PermutationGroup, matrix, pattern, search: str, seed: int, time_limit, gen,
            progress: bool = False):
    if search == "random":
        return group.random_permutation(gen), None
    # one intra-op thread: the search is a long chain of mid-sized ops (measured 5-15x faster on a
    # small or busy CPU); search_permutation restores torch's setting afterwards
    result = search_permutation(matrix, pattern, method=search, block=group.block, seed=seed,
                                time_limit=time_limit, threads=1 if matrix.device.type == "cpu" else None,
                                progress=progress)
    log.info("group %d (%d channels, %d score rows): kept %.4f -> %.4f in %.2f s", group.id, group.size,
             matrix.shape[0], result.kept_identity / max(result.total, 1e-30), result.kept / max(result.total, 1e-30),
             result.seconds)
    return result.perm.cpu(), result


def permute(
    gm: fx.GraphModule,
    plan: SparsityPlan,
    search: str = "greedy",
    seed: int = 0,
    time_limit: float | None = None,
    perms: Mapping[int, torch.Tensor] | None = None,
    *,
    example_inputs: Any = None,
    example_kwargs: Mapping[str, Any] | None = None,
    verify: bool = True,
    score: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> PermuteReport:
    """Reorders the channels of every permutation group of ``plan`` in ``gm``, in place.

    ``search``: ``"none"`` (identity), ``"random"`` (a uniformly random valid permutation; for
    testing equivalence, it may lower kept magnitude), ``"greedy"`` or ``"exhaustive"`` (maximise
    kept magnitude, see :mod:`nmgraph.search.permutation`; a group is only changed if its consumers
    keep more). ``time_limit`` (seconds) bounds the whole search, shared among the groups;
    ``progress=True`` shows a progress bar per group (each group is also logged at INFO).
    ``perms={group_id: LongTensor}`` applies given permutations instead. ``score`` maps
    weight names to saliency tensors used instead of ``|w|``.

    With ``verify=True`` (default) the outputs on the example inputs (those given to
    :func:`nmgraph.capture`, or ``example_inputs``) must be unchanged within fp32 rounding; if not,
    every change is undone and :class:`VerificationError` names the group.
    """
    check_permute_arguments(gm, plan, seed=seed, time_limit=time_limit, perms=perms)
    if search not in SEARCHES:
        raise PlanError(f"search={search!r} is not one of {SEARCHES}.")
    start = time.perf_counter()
    report = PermuteReport()
    tensors = _tensors(gm)
    for info in plan.layers:
        if info.name not in tensors or tuple(tensors[info.name].shape) != info.shape:
            raise PlanError(f"plan layer {info.name!r} {list(info.shape)} is not a parameter of this graph module "
                            "with that shape; re-run analyze on this graph.")
        report.kept_before[info.name] = kept_magnitude(tensors[info.name], plan.pattern, info.axis)

    args, kwargs = _example(gm, example_inputs, example_kwargs, verify)
    ref = _outputs(gm, args, kwargs) if verify else []
    gen = torch.Generator().manual_seed(seed)
    valid_ids = {g.id for g in plan.groups}
    for gid in perms or {}:
        if gid not in valid_ids:
            raise PlanError(f"perms names group {gid}, but the plan has groups {sorted(valid_ids)}.")

    chosen: dict[int, torch.Tensor] = {}
    searched = [g for g in plan.groups if g.consumers]
    for g in plan.groups:
        if perms is not None:
            if g.id in perms:
                chosen[g.id] = torch.as_tensor(perms[g.id], dtype=torch.long)
            else:
                report.skipped.append(Skip(f"group {g.id}", "no permutation given for it in perms"))
            continue
        if search == "none":
            continue
        if search != "random" and not g.consumers:
            report.skipped.append(Skip(f"group {g.id}", "no eligible weight reads these channels"))
            continue
        matrix = _score_matrix(gm, g, score) if search != "random" else None
        budget = None
        if time_limit is not None:  # the total budget is shared by the groups still to search
            left = max(time_limit - (time.perf_counter() - start), 0.0)
            budget = left / max(1, len(searched) - searched.index(g)) if g in searched else left
        perm, result = _search(g, matrix, plan.pattern, search, seed, budget, gen, progress)
        if result is not None:
            report.efficacy[g.id] = result.efficacy
            if result.kept <= result.kept_identity:
                report.skipped.append(Skip(f"group {g.id}", "search found no permutation that keeps more"))
                continue
        chosen[g.id] = perm

    applied: list[tuple[PermutationGroup, torch.Tensor]] = []
    try:
        for g in plan.groups:
            if g.id in chosen:
                apply_permutation(gm, g, chosen[g.id])
                applied.append((g, chosen[g.id]))
        if verify and applied:
            err = _rel_error(ref, _outputs(gm, args, kwargs))
            report.max_error = err
            if err > _tolerance(ref):
                culprit = _find_culprit(gm, applied, ref, args, kwargs)
                raise VerificationError(
                    f"permuting group {culprit.id} ({culprit.kind}, {culprit.size} channels, members "
                    f"{[m.name for m in culprit.members][:4]}...) changed the model output (relative error "
                    f"{err:.2e} > {_tolerance(ref):.0e}). All permutations were undone. This is a coupling the "
                    "analysis missed; please report the model. Workaround: permute(..., perms={...}) "
                    "without this group."
                )
    except Exception:
        for g, perm in reversed(applied):
            apply_permutation(gm, g, torch.argsort(perm))
        raise

    for g, perm in applied:
        report.permuted.append(g.id)
        report.perms[g.id] = perm
    tensors = _tensors(gm)
    for info in plan.layers:
        report.kept_after[info.name] = kept_magnitude(tensors[info.name], plan.pattern, info.axis)
    report.seconds = time.perf_counter() - start
    log.info("permute: %d groups permuted, max error %.2e", len(report.permuted), report.max_error)
    return report


def _example(gm, example_inputs, example_kwargs, verify):
    if example_inputs is not None:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        return args, dict(example_kwargs or {})
    rec = graph_record(gm)
    if rec is not None and rec.captured_by != "unknown":
        return rec.example_args, dict(rec.example_kwargs)
    if verify:
        raise PlanError(
            "permute(verify=True) needs example inputs: capture the model with nmgraph.capture (which "
            "records them) or pass example_inputs=."
        )
    return (), {}


def _find_culprit(gm, applied, ref, args, kwargs) -> PermutationGroup:
    """Tries each applied group alone to find one whose permutation changes the outputs."""
    for g, perm in reversed(applied):
        apply_permutation(gm, g, torch.argsort(perm))
    try:
        for g, perm in applied:
            apply_permutation(gm, g, perm)
            bad = _rel_error(ref, _outputs(gm, args, kwargs)) > _tolerance(ref)
            apply_permutation(gm, g, torch.argsort(perm))
            if bad:
                return g
        return applied[-1][0]
    finally:
        for g, perm in applied:
            apply_permutation(gm, g, perm)

"""Reorder the channels of every permutation group, in place, with the model's function unchanged.

Why this is valid: a :class:`~nmgraph.analysis.plan.PermutationGroup` lists every parameter and buffer axis
that carries the group's channels, found by the channel-flow analysis. Permuting the producers'
output rows (weights, biases), every per-channel parameter along the way (norm weights and biases,
BatchNorm running statistics, PReLU slopes) and the consumers' input columns by the same permutation
``P`` turns each intermediate activation ``h`` into ``h[..., P]``; every op on the path is
permutation-equivariant along that axis (the op table admits only such ops), and each consumer's
contraction ``sum_c W[:, c] h[c]`` is a sum over the same pairs in another order. So every output is
unchanged up to floating-point summation order. ``permute`` checks this on the example inputs and
undoes everything if it does not hold (in float32 first; when the float32 outputs move by more than
the fixed tolerance, the same check runs again in float64, where a valid permutation moves them by
~1e-13 and a missed coupling by as much as in float32).

Why permute: N:M pruning keeps the N largest of every M consecutive input channels; a different
channel order puts different weights together and can keep more magnitude. More kept magnitude is
a proxy: a permutation is kept only when the *pruned* model's outputs on the example inputs (and
calibration batches) are closer to the dense model's with it than without it, by more than two
standard errors of the per-sample differences (``accept="error"``, the default), decided group by
group. On a small example set this keeps few permutations: pass ``calibration`` batches.

Cost: the search shares one time budget (``time_limit``, default :func:`default_time_limit`, which
scales with the score matrices) across the groups by expected gain, largest first; the acceptance
check costs one forward per calibration batch per group that found a permutation (plus two), and
a copy of the eligible weights; the whole call, kept-magnitude tables and verification included,
stays within the budget (the search gets what the measured fixed costs leave).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from nmgraph.analysis.aten_ops import DROPOUT_OPS
from nmgraph.analysis.plan import LayerInfo, Member, PermutationGroup, Skip, SparsityPlan
from nmgraph.errors import PlanError, VerificationError
from nmgraph.graph import graph_record
from nmgraph.pattern import Pattern, group_view, kept_magnitude, nm_mask
from nmgraph.search import SEARCHES, kept_score, search_permutation
from nmgraph.validate import check_permute_arguments

__all__ = ["GroupDecision", "PermuteReport", "apply_permutation", "default_time_limit", "kept_magnitude", "permute"]

log = logging.getLogger(__name__)

# Budget constants, in one place (measured on the 2-core CPU of docs/permutation_search.md).
SEARCH_SECONDS_PER_CELL = 2e-8  # greedy search with its escapes: seconds per rows * C * min(C, window)
SEARCH_SECONDS_PER_GROUP = 0.05  # its fixed cost per group
DEFAULT_TIME_LIMIT_MIN = 5.0  # seconds: the default budget never cuts a small model's search short
DEFAULT_TIME_LIMIT_MAX = 120.0  # seconds: nor lets a large one search for long
MAX_SCORE_ELEMENTS = 1 << 26  # most entries of one score matrix (256 MiB in float32); rows are sampled
MIN_SAMPLED_ROWS = 256  # fewest score rows a time-bounded search samples
SEARCH_WINDOW = 256  # search_permutation's default window (channels per gain table)
FLOAT64_TOLERANCE = 1e-8  # a permutation that moves the float64 outputs by less than this is exact
ERROR_SIGNIFICANCE = 2.0  # a kept permutation lowers the pruned model's error by this many standard errors


@dataclass
class GroupDecision:
    """What :func:`permute` decided for one group, with both numbers it compared.

    ``kept_before`` / ``kept_after``: the share of the consumers' summed ``|w|`` (or saliency) that
    N:M pruning keeps without and with the permutation found; ``error_before`` / ``error_after``:
    the pruned model's relative output error (``||y_pruned - y_dense|| / ||y_dense||`` over the
    example inputs and calibration batches) without and with it, the other groups as decided before
    this one (``None`` when not measured); ``applied``: whether the permutation was kept;
    ``decided_by``: ``"error"``, ``"kept magnitude"`` or ``"given"``; ``rows`` / ``rows_total``: score
    rows the search saw (a seeded sample when the budget or memory could not take them all).
    """

    id: int
    size: int
    consumers: int
    kept_before: float = 0.0
    kept_after: float = 0.0
    error_before: float | None = None
    error_after: float | None = None
    applied: bool = False
    decided_by: str = ""
    rows: int = 0
    rows_total: int = 0
    kept_on_sample: bool = False
    seconds: float = 0.0
    budget: float = 0.0
    note: str = ""

    def __str__(self) -> str:
        err = "" if self.error_after is None else (
            f", pruned-model error {self.error_before:.4g} -> {self.error_after:.4g}")
        sampled = f", {self.rows} of {self.rows_total} score rows" if self.rows < self.rows_total else ""
        if self.kept_on_sample:
            sampled += " (kept magnitude after: on those rows)"
        verdict = "kept" if self.applied else "not kept"
        note = f" ({self.note})" if self.note else ""
        return (f"group {self.id} ({self.size} channels, {self.consumers} consumers): kept magnitude "
                f"{100 * self.kept_before:.2f}% -> {100 * self.kept_after:.2f}%{err}{sampled}; {verdict}, by "
                f"{self.decided_by or '-'}{note}; {self.seconds:.2f} s")


@dataclass
class PermuteReport:
    """What :func:`permute` did.

    ``groups``: one :class:`GroupDecision` per searched group; ``kept_before`` / ``kept_after``: per
    eligible weight, the share of ``|w|`` that N:M pruning keeps; ``pruned_error``: the pruned
    model's relative output error with no permutation and with the permutations kept;
    ``verified_by``: how the unchanged function was checked (float32 tolerance, or a float64
    re-run when float32 rounding noise exceeds it); ``time_limit``: the budget the call ran under.
    """

    permuted: list[int] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    kept_before: dict[str, float] = field(default_factory=dict)
    kept_after: dict[str, float] = field(default_factory=dict)
    efficacy: dict[int, float] = field(default_factory=dict)
    perms: dict[int, torch.Tensor] = field(default_factory=dict)
    groups: dict[int, GroupDecision] = field(default_factory=dict)
    pruned_error: tuple[float, float] | None = None
    max_error: float = 0.0
    tolerance: float = 0.0
    verified_by: str = ""
    time_limit: float = math.inf
    seconds: float = 0.0

    @property
    def modified(self) -> bool:
        return bool(self.permuted)

    def __str__(self) -> str:
        limit = "no time limit" if math.isinf(self.time_limit) else f"time limit {self.time_limit:.1f} s"
        lines = [f"permuted {len(self.permuted)} groups in {self.seconds:.2f} s ({limit}), max output error "
                 f"{self.max_error:.2e}" + (f"; verified by {self.verified_by}" if self.verified_by else "")]
        if self.pruned_error is not None:
            lines.append(f"  pruned-model output error {self.pruned_error[0]:.4g} without permutation, "
                         f"{self.pruned_error[1]:.4g} with the permutations kept")
        for d in self.groups.values():
            lines.append(f"  {d}")
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
            "groups": {gid: dict(vars(d)) for gid, d in self.groups.items()},
            "pruned_error": self.pruned_error, "tolerance": self.tolerance, "verified_by": self.verified_by,
            "time_limit": None if math.isinf(self.time_limit) else self.time_limit,
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


def _check_member(group: PermutationGroup, m: Member, t: torch.Tensor | None) -> None:
    if t is None:
        raise PlanError(
            f"group {group.id} names {m.name!r}, which this graph module does not have; the plan "
            "was made for another graph. Re-run nmgraph.analyze on this graph."
        )
    if m.stride:
        stop = int(_member_positions(m, group.size, "cpu").max()) + 1 if group.size else 0
    else:
        stop = m.start + group.size * m.inner * m.repeat
    if m.axis >= t.dim() or t.shape[m.axis] < stop or (m.stop is not None and not m.stride and m.stop != stop):
        raise PlanError(
            f"group {group.id} expects {m.name!r} to hold channels {m.start}:{stop} of axis {m.axis}, "
            f"but it has shape {tuple(t.shape)}; the plan was made for another graph. Re-run "
            "nmgraph.analyze on this graph."
        )


def _permute_members(views: Mapping[str, tuple[torch.Tensor, ...]], group: PermutationGroup,
                     perm: torch.Tensor) -> None:
    """Reorders ``group``'s channels in every tensor of ``views[member name]``, all or nothing.

    On any exception, ``KeyboardInterrupt`` included, the tensors already reordered are put back
    before it propagates, so an interrupt never leaves a group half permuted.
    """
    for m in group.members:
        for t in views.get(m.name) or (None,):
            _check_member(group, m, t)
    done: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    seen: set[tuple[int, int, int]] = set()
    try:
        with torch.no_grad():
            for m in group.members:
                for t in views[m.name]:
                    key = (id(t), m.axis, m.start)
                    if key in seen:
                        continue
                    seen.add(key)
                    idx = _member_index(m, perm.to(t.device), t.shape[m.axis])
                    t.copy_(t.index_select(m.axis, idx))
                    done.append((t, m.axis, idx))
    except BaseException:
        with torch.no_grad():
            for t, axis, idx in reversed(done):
                t.copy_(t.index_select(axis, torch.argsort(idx)))
        raise


def apply_permutation(gm: fx.GraphModule, group: PermutationGroup, perm: torch.Tensor) -> None:
    """Reorders ``group``'s channels in every member tensor: new channel ``i`` = old ``perm[i]``.

    All or nothing: an exception (or Ctrl-C) between two tensors puts the moved ones back."""
    why = group.check(perm.cpu())
    if why:
        raise PlanError(f"permutation for group {group.id} is invalid: {why}.")
    tensors = _tensors(gm)
    _permute_members({m.name: (tensors[m.name],) if m.name in tensors else () for m in group.members}, group, perm)


@contextlib.contextmanager
def _dropout_off(gm: fx.GraphModule) -> Iterator[None]:
    """Runs ``gm`` with every dropout node off (``train=False``): a permutation reorders the channels a
    dropout mask falls on, so with dropout on no two runs compare. The graph is restored afterwards."""
    changed = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in DROPOUT_OPS and len(node.args) > 2 and node.args[2] is True:
            changed.append(node)
    for node in changed:
        node.update_arg(2, False)
    if changed:
        gm.recompile()
    try:
        yield
    finally:
        for node in changed:
            node.update_arg(2, True)
        if changed:
            gm.recompile()


def _outputs(gm: fx.GraphModule, args, kwargs, hooks: bool = True) -> list[torch.Tensor]:
    """The graph's floating-point outputs, leaving no trace: same RNG stream, buffers restored.

    A graph captured in training mode updates BatchNorm running statistics when it runs; the
    verification runs must not, so every buffer is put back afterwards. ``hooks=False`` calls
    ``forward`` without the module's hooks: the float64 re-run feeds float64 inputs, which the input
    checks of an exported graph (dtype and shape guards, a forward pre-hook) refuse.
    """
    buffers = [b for _, b in gm.named_buffers(remove_duplicate=True)]
    saved = [b.detach().clone() for b in buffers]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            out = gm(*args, **kwargs) if hooks else gm.forward(*args, **kwargs)
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


def _batch(item: Any) -> tuple[tuple, dict]:
    """One calibration batch: a tuple/list of positional inputs, a dict of keyword inputs, or a tensor."""
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    return (item,), {}


def _sample_errors(gm: fx.GraphModule, batches: list[tuple[tuple, dict]],
                   refs: list[list[torch.Tensor]]) -> tuple[torch.Tensor, float]:
    """Per sample (index along axis 0 of every output, over every batch), ``||y - y_ref||^2``; and
    ``sum ||y_ref||^2`` (float64)."""
    per, den = [], 0.0
    for (a, k), ref in zip(batches, refs):
        n = ref[0].shape[0] if ref and ref[0].dim() else 1
        rows = torch.zeros(n, dtype=torch.float64)
        for r, o in zip(ref, _outputs(gm, a, k)):
            diff = (o.double() - r.double()).pow(2)
            den += float(r.double().pow(2).sum())
            if r.dim() and r.shape[0] == n:
                rows += diff.reshape(n, -1).sum(1)
            else:  # an output without the batch axis: shared evenly by the samples
                rows += diff.sum() / n
        per.append(rows)
    errs = torch.cat(per) if per else torch.zeros(1, dtype=torch.float64)
    return torch.nan_to_num(errs, nan=math.inf), den


def _relative(errs: torch.Tensor, den: float) -> float:
    err = math.sqrt(float(errs.sum()) / den) if den > 0 else math.sqrt(float(errs.sum()))
    return err if math.isfinite(err) else math.inf


def _lower(new: torch.Tensor, old: torch.Tensor) -> tuple[bool, str]:
    """Whether the pruned model is closer to the dense one with ``new`` than with ``old`` (per-sample
    squared errors): lower in total, and, with 3 samples or more, lower by more than
    ``ERROR_SIGNIFICANCE`` standard errors of the per-sample differences (a paired test: a small
    example set must not decide on noise)."""
    d = (new - old)
    if not bool(torch.isfinite(d).all()):
        return bool(torch.isfinite(new).all()) and not bool(torch.isfinite(old).all()), "not finite"
    mean = float(d.mean())
    if mean >= 0:
        return False, ""
    if d.numel() < 3:
        return True, ""
    se = float(d.std()) / math.sqrt(d.numel())
    t = mean / se if se > 0 else -math.inf
    if t > -ERROR_SIGNIFICANCE:
        return False, (f"it drops by {-t:.1f} standard errors over {d.numel()} samples, fewer than "
                       f"{ERROR_SIGNIFICANCE:g}: noise, not evidence")
    return True, ""


# ---------------------------------------------------------------------------------------- scores


def _consumer_rows(t: torch.Tensor, m: Member, size: int) -> torch.Tensor:
    """A consumer's scores as ``[rows, size]`` (columns: the group's channels)."""
    w = t.detach().float().movedim(m.axis, -1)
    if m.repeat > 1:  # every copy of a head is another set of rows under the same permutation
        heads = size // m.repeat_block
        w = w.reshape(-1, heads, m.repeat, m.repeat_block).movedim(2, 0)
    return w.reshape(-1, size)


def _consumer_scores(tensors, group: PermutationGroup, score) -> list[tuple[str, Member, torch.Tensor]]:
    out = []
    for name in group.consumers:
        m = next(x for x in group.members if x.name == name and x.start == 0)
        s = score[name] if score is not None and name in score else tensors[name].detach().abs()
        out.append((name, m, s))
    return out


def _score_matrix(consumers, size: int, max_rows: int | None, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """The stacked ``[rows, size]`` score matrix of a group's consumers, at most ``max_rows`` rows
    (a seeded uniform sample, drawn per consumer in proportion to its rows); and the full row count."""
    counts = [s.numel() // size for _, _, s in consumers]
    total = sum(counts)
    rows = []
    for (_, m, s), n in zip(consumers, counts):
        r = _consumer_rows(s, m, size)
        if max_rows is not None and total > max_rows:
            k = max(1, round(n * max_rows / total))
            r = r[torch.randperm(n, generator=gen)[:k].sort().values.to(r.device)]
        rows.append(r)
    return torch.cat(rows), total


def _kept_sums(s: torch.Tensor, p: Pattern, axis: int) -> tuple[float, float]:
    """``(kept, total)``: the summed score N:M pruning along ``axis`` keeps, and the summed score."""
    a = s.detach().float().abs()
    return float(group_view(a, p.m, axis).topk(p.n, dim=-1).values.sum(dtype=torch.float64)), float(
        a.sum(dtype=torch.float64))


def _exact_kept(consumers, size: int, p: Pattern, perm: torch.Tensor) -> float:
    """The consumers' kept score with their columns in ``perm``'s order (every row)."""
    return sum(kept_score(_consumer_rows(s, m, size)[:, perm.to(s.device)], p) for _, m, s in consumers)


# ---------------------------------------------------------------------------------------- budget


def _cells(rows: int, size: int) -> float:
    return float(rows) * size * min(size, SEARCH_WINDOW)


def default_time_limit(plan: SparsityPlan, gm: fx.GraphModule | None = None, fixed_seconds: float = 0.0) -> float:
    """The time budget :func:`permute` takes when ``time_limit=None``, in seconds.

    It scales with the work: the greedy search with its escapes costs about
    ``SEARCH_SECONDS_PER_CELL * rows * C * min(C, 256)`` per group (measured,
    ``docs/permutation_search.md``); the budget is the sum over the searched groups, plus
    ``fixed_seconds`` (the forwards and kept-magnitude tables of the call), at least
    ``DEFAULT_TIME_LIMIT_MIN`` and at most ``DEFAULT_TIME_LIMIT_MAX`` plus ``fixed_seconds``. Larger
    groups then search a row sample (their gain is measured on every row before it is kept).

    >>> import torch, nmgraph
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> gm = nmgraph.capture(m, (torch.randn(2, 8),))
    >>> default_time_limit(nmgraph.analyze(gm, "2:4", include=["2"]), gm)
    5.0
    """
    shapes = {i.name: i.shape for i in plan.layers}
    est = 0.0
    for g in plan.groups:
        if not g.consumers:
            continue
        rows = sum(math.prod(shapes[c]) // g.size if c in shapes else 0 for c in g.consumers)
        est += SEARCH_SECONDS_PER_GROUP + SEARCH_SECONDS_PER_CELL * _cells(min(rows, MAX_SCORE_ELEMENTS // g.size),
                                                                            g.size)
    return min(max(DEFAULT_TIME_LIMIT_MIN, est), DEFAULT_TIME_LIMIT_MAX) + fixed_seconds


class _Progress:
    """One bar for the whole call: seconds of the budget, the group being searched, the kept magnitude."""

    def __init__(self, enabled: bool, budget: float, start: float) -> None:
        self.bar = None
        self.start = start
        self.status = ""
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            log.info("tqdm is not installed; permute reports progress in the log only")
            return
        total = None if math.isinf(budget) else round(budget, 1)
        # The bar counts seconds of the budget: the call ends by then, so the ETA is an honest bound.
        self.bar = tqdm(total=total, desc="permute", unit="s", leave=False, disable=None,  # off when not a terminal
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}, {postfix}")

    def show(self, status: str | None = None) -> None:
        if status is not None:
            self.status = status
        if self.bar is None:
            return
        now = round(time.perf_counter() - self.start, 1)
        if self.bar.total is not None:
            now = min(now, self.bar.total)
        self.bar.set_postfix_str(self.status, refresh=False)
        self.bar.update(max(now - self.bar.n, 0.0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------- permute


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
    calibration: Iterable[Any] | None = None,
    accept: str = "error",
    threads: int | str | None = "auto",
) -> PermuteReport:
    """Reorders the channels of every permutation group of ``plan`` in ``gm``, in place.

    ``search``: ``"none"`` (identity), ``"random"`` (a uniformly random valid permutation of every
    group, applied as drawn: for testing equivalence), ``"greedy"`` or ``"exhaustive"`` (maximise
    kept magnitude, see :mod:`nmgraph.search.permutation`). ``perms={group_id: LongTensor}``
    applies given permutations instead. ``score`` maps weight names to saliency tensors used instead
    of ``|w|``.

    Which found permutations are kept (``accept``): ``"error"`` (default) keeps a group's
    permutation only when the pruned model (every eligible weight N:M by ``|w|`` or ``score``) is
    closer to the dense model on the example inputs and the ``calibration`` batches (each a tuple of
    inputs, a dict of keyword inputs or a tensor) with it than without it, deciding the groups one
    by one, largest expected gain first; ``"magnitude"`` keeps every permutation that keeps more
    magnitude (no forwards, no copy of the weights). Both numbers are in ``report.groups``.

    ``time_limit`` (seconds) bounds the whole call, verification included (``None``: the default
    budget :func:`default_time_limit`, which scales with the score matrices; ``math.inf``: none); the
    search shares it across the groups by expected gain, largest first. ``progress=True`` shows one
    bar for the call (the budget's seconds, the group, the kept magnitude); each group is also logged
    at INFO. ``threads``: CPU threads of the search (``"auto"``: one on a CPU, measured fastest).

    With ``verify=True`` (default) the outputs on the example inputs (those given to
    :func:`nmgraph.capture`, or ``example_inputs``), with dropout off, must be unchanged: within
    1e-5 relative in float32, or, when float32 rounding moves them more than that, within
    ``FLOAT64_TOLERANCE`` in a float64 re-run (``report.verified_by`` says which). If not, or on any
    exception or interrupt, every change is undone; a wrong permutation raises
    :class:`VerificationError` naming the group.
    """
    start = time.perf_counter()
    check_permute_arguments(gm, plan, seed=seed, time_limit=time_limit, perms=perms)
    if search not in SEARCHES:
        raise PlanError(f"search={search!r} is not one of {SEARCHES}.")
    if accept not in ("error", "magnitude"):
        raise PlanError(f"accept={accept!r} is not one of ('error', 'magnitude').")
    report = PermuteReport()
    tensors = _tensors(gm)
    p = plan.pattern
    for info in plan.layers:
        if info.name not in tensors or tuple(tensors[info.name].shape) != info.shape:
            raise PlanError(f"plan layer {info.name!r} {list(info.shape)} is not a parameter of this graph module "
                            "with that shape; re-run analyze on this graph.")
    valid_ids = {g.id for g in plan.groups}
    for gid in perms or {}:
        if gid not in valid_ids:
            raise PlanError(f"perms names group {gid}, but the plan has groups {sorted(valid_ids)}.")
    searching = perms is None and search in ("greedy", "exhaustive")
    by_error = searching and accept == "error"
    args, kwargs = _example(gm, example_inputs, example_kwargs, verify or by_error)
    batches = [(args, kwargs)] + [_batch(item) for item in (calibration or ())] if by_error else []

    with _dropout_off(gm):
        t0 = time.perf_counter()
        ref = _outputs(gm, args, kwargs) if verify or by_error else []
        t_forward = time.perf_counter() - t0
        refs = [ref]
        for i, (a, k) in enumerate(batches[1:]):
            try:
                refs.append(_outputs(gm, a, k))
            except Exception as e:  # re-raised typed, with the batch named
                raise PlanError(
                    f"permute(calibration=...): batch {i} does not run on the captured graph ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); pass batches shaped like the example inputs, "
                    "each a tuple of inputs, a dict of keyword inputs or a tensor."
                ) from e
        t_batches = time.perf_counter() - t0

        t0 = time.perf_counter()
        sums: dict[str, tuple[float, float]] = {}
        costs: dict[str, float] = {}  # seconds of one kept table, per weight: the yardstick of fixed costs
        for info in plan.layers:
            t1 = time.perf_counter()
            sums[info.name] = _kept_sums(tensors[info.name], p, info.axis)
            costs[info.name] = time.perf_counter() - t1
            kept, total = sums[info.name]
            report.kept_before[info.name] = kept / total if total else 1.0
        t_kept = time.perf_counter() - t0

        searched = [g for g in plan.groups if g.consumers] if searching else []
        # fixed costs after the search: kept_after, verification and, for accept="error", pruning every
        # eligible weight (nm_mask and a product: about 1.5 kept tables, measured), permuting and
        # pruning each candidate's consumers again (2.5 at most) and one forward per batch per
        # candidate (plus the baseline)
        reserve = t_kept + (t_forward if verify else 0.0) + (
            (len(searched) + 1) * t_batches + 4 * t_kept if by_error else 0.0)
        if time_limit is None:
            budget = default_time_limit(plan, gm, time.perf_counter() - start + reserve)
        else:
            budget = float(time_limit)
        report.time_limit = budget
        deadline = start + budget
        bar = _Progress(progress, budget, start)
        try:
            candidates = _find_permutations(gm, plan, search, seed, perms, score, searched, sums, costs, report,
                                            deadline, reserve, threads, bar, tensors, exact=not by_error)
            applied: list[tuple[PermutationGroup, torch.Tensor]] = []
            try:
                if by_error and candidates:
                    _accept_by_error(gm, plan, candidates, score, batches, refs, report, applied, deadline,
                                     t_batches, t_forward if verify else 0.0, t_kept, bar)
                else:
                    for g, perm in candidates:
                        apply_permutation(gm, g, perm)
                        applied.append((g, perm))
                        d = report.groups.get(g.id)
                        if d is not None:
                            d.applied, d.decided_by = True, d.decided_by or "kept magnitude"
                if verify and applied:
                    bar.show("verifying the permuted model")
                    _verify(gm, applied, ref, args, kwargs, report)
            except BaseException:
                for g, perm in reversed(applied):
                    apply_permutation(gm, g, torch.argsort(perm))
                raise
        finally:
            bar.close()

    for g, perm in applied:
        report.permuted.append(g.id)
        report.perms[g.id] = perm
    moved = {(m.name, m.axis) for g, _ in applied for m in g.members}
    for info in plan.layers:
        if (info.name, info.axis) in moved:
            kept, total = _kept_sums(tensors[info.name], p, info.axis)
            report.kept_after[info.name] = kept / total if total else 1.0
        else:
            report.kept_after[info.name] = report.kept_before[info.name]
    report.seconds = time.perf_counter() - start
    log.info("permute: %d groups permuted in %.2f s (budget %.1f s), max error %.2e", len(report.permuted),
             report.seconds, budget, report.max_error)
    return report


def _find_permutations(gm, plan, search, seed, perms, score, searched, sums, costs, report, deadline, reserve,
                       threads, bar, tensors, exact: bool) -> list[tuple[PermutationGroup, torch.Tensor]]:
    """The candidate permutation of every group: given, random, or searched within the budget.

    A group searched on a row sample has its kept score measured on every row when ``exact`` (the
    permutation is then kept by magnitude); otherwise the sample's ratio estimates it and the
    pruned model's error decides."""
    p = plan.pattern
    gen = torch.Generator().manual_seed(seed)
    if perms is not None:
        out = []
        for g in plan.groups:
            if g.id in perms:
                out.append((g, torch.as_tensor(perms[g.id], dtype=torch.long)))
            else:
                report.skipped.append(Skip(f"group {g.id}", "no permutation given for it in perms"))
        return out
    if search == "none":
        return []
    if search == "random":
        return [(g, g.random_permutation(gen)) for g in plan.groups]
    for g in plan.groups:
        if not g.consumers:
            report.skipped.append(Skip(f"group {g.id}", "no eligible weight reads these channels"))
    # expected gain: the magnitude pruning removes from the group's consumers, largest first
    lost = {g.id: sum(sums[c][1] - sums[c][0] for c in g.consumers if c in sums) for g in searched}
    order = sorted(searched, key=lambda g: (-lost[g.id], g.id))
    kept_all = sum(k for k, _ in sums.values())
    total_all = sum(t for _, t in sums.values()) or 1.0
    out = []
    for i, g in enumerate(order):
        left = max(deadline - time.perf_counter() - reserve, 0.0)
        rest = order[i:]
        weight = sum(lost[x.id] for x in rest)
        share = left * lost[g.id] / weight if weight > 0 else left / len(rest)
        consumers = _consumer_scores(tensors, g, score)
        rows_total = sum(s.numel() // g.size for _, _, s in consumers)
        need = SEARCH_SECONDS_PER_GROUP + SEARCH_SECONDS_PER_CELL * _cells(rows_total, g.size)
        share = min(max(share, min(need, left / len(rest))), left)
        cap = MAX_SCORE_ELEMENTS // g.size
        search_share = share
        if not math.isinf(share):  # rows a search can converge on in its share
            per_row = SEARCH_SECONDS_PER_CELL * _cells(1, g.size)
            if need > share and exact:  # a sample, its permutation measured on every row: ~2 kept tables
                search_share = max(share - 2 * sum(costs.get(c, 0.0) for c in g.consumers), 0.0)
            cap = min(cap, max(MIN_SAMPLED_ROWS, int(max(search_share - SEARCH_SECONDS_PER_GROUP, 0.0) / per_row)))
        t0 = time.perf_counter()
        gid_kept = sum(sums[c][0] for c in g.consumers)
        gid_total = sum(sums[c][1] for c in g.consumers) or 1.0
        decision = GroupDecision(g.id, g.size, len(g.consumers), gid_kept / gid_total, gid_kept / gid_total,
                                 rows_total=rows_total, budget=share)
        report.groups[g.id] = decision
        status = f"group {i + 1}/{len(order)} ({g.size} channels)"

        def tick(kept, _status=status, _kept=gid_kept, _scale=1.0, _all=kept_all):
            if kept is not None:
                pct = 100 * (_all - _kept + kept * _scale) / total_all
                bar.show(f"{_status}, kept {pct:.2f}%")
            else:
                bar.show()

        matrix, _ = _score_matrix(consumers, g.size, cap, gen)
        decision.rows = matrix.shape[0]
        scale = rows_total / max(matrix.shape[0], 1)
        bar.show(f"{status}, kept {100 * kept_all / total_all:.2f}%")
        result = search_permutation(matrix, p, method=search, block=g.block, seed=seed,
                                    time_limit=max(search_share - (time.perf_counter() - t0), 0.0), threads=threads,
                                    progress=lambda k, _t=tick, _s=scale: _t(k, _scale=_s))
        perm = result.perm.cpu()
        report.efficacy[g.id] = result.efficacy
        if decision.rows < rows_total and exact:  # measure the sample's permutation on every row
            new_kept = _exact_kept(consumers, g.size, p, perm) if result.kept > result.kept_identity else gid_kept
        else:
            new_kept = gid_kept * result.kept / result.kept_identity if result.kept_identity > 0 else gid_kept
            decision.kept_on_sample = decision.rows < rows_total
        decision.kept_after = new_kept / gid_total
        decision.seconds = time.perf_counter() - t0
        log.info("group %d (%d channels, %d of %d score rows): kept %.4f -> %.4f in %.2f s (share %.2f s)", g.id,
                 g.size, decision.rows, rows_total, decision.kept_before, decision.kept_after, decision.seconds, share)
        if new_kept <= gid_kept or result.kept <= result.kept_identity:
            why = ("the time limit left no time for its search (the kept-magnitude tables, pruning and "
                   "forwards of the call come first)" if search_share <= 0 else
                   "the search found no permutation that keeps more")
            decision.note = why
            report.skipped.append(Skip(f"group {g.id}", why))
            continue
        kept_all += new_kept - gid_kept
        out.append((g, perm))
    return out


def _accept_by_error(gm, plan, candidates, score, batches, refs, report, applied, deadline, t_batches, t_verify,
                     t_kept, bar) -> None:
    """Keeps each candidate permutation only if the pruned model's output error drops with it.

    The eligible weights are pruned in place (N:M by ``|w|`` or ``score``) from a dense copy; each
    candidate is applied to the live weights, the dense copies and the scores at once, its group's
    eligible members are pruned again, and one forward per batch measures the error. The dense
    weights (with the kept permutations) are back in place when this returns or raises.
    """
    p = plan.pattern
    tensors = _tensors(gm)
    layers: dict[str, LayerInfo] = {i.name: i for i in plan.layers}
    dense = {name: tensors[name].detach().clone() for name in layers}
    scores = {name: score[name].detach().clone() for name in layers if score is not None and name in score}
    views = {name: tuple(x for x in (t, dense.get(name), scores.get(name)) if x is not None)
             for name, t in tensors.items()}

    def prune(names: Iterable[str]) -> None:
        with torch.no_grad():
            for name in names:
                info = layers[name]
                d = dense[name]
                tensors[name].copy_(d * nm_mask(d, p, scores.get(name), axis=info.axis))

    try:
        bar.show("pruned-model error without permutation")
        prune(layers)
        current, den = _sample_errors(gm, batches, refs)
        baseline = current
        per_check = t_batches
        for g, perm in candidates:
            d = report.groups[g.id]
            t0 = time.perf_counter()
            if t0 + per_check > deadline - t_verify - t_kept:
                d.decided_by, d.note = "error", "not checked within the time limit; left unpermuted"
                report.skipped.append(Skip(f"group {g.id}", d.note))
                continue
            bar.show(f"checking group {g.id}: pruned-model error")
            reduced = _reduced(g, layers)
            pruned_before = {name: tensors[name].detach().clone() for name in reduced}  # put back if rejected
            _permute_members(views, g, perm)
            applied.append((g, perm))
            prune(reduced)
            errs, _ = _sample_errors(gm, batches, refs)
            d.error_before, d.error_after, d.decided_by = _relative(current, den), _relative(errs, den), "error"
            better, why = _lower(errs, current)
            if better:
                d.applied = True
                current = errs
            else:
                applied.pop()
                _permute_members(views, g, torch.argsort(perm))
                with torch.no_grad():
                    for name, t in pruned_before.items():
                        tensors[name].copy_(t)
                d.note = "the pruned model's output error does not drop with it" + (f": {why}" if why else "")
                report.skipped.append(Skip(f"group {g.id}", d.note))
            per_check = time.perf_counter() - t0
            log.info("group %d: pruned-model error %.4g -> %.4g: %s", g.id, d.error_before, d.error_after,
                     "kept" if d.applied else "not kept")
        report.pruned_error = (_relative(baseline, den), _relative(current, den))
    finally:
        with torch.no_grad():
            for name, d in dense.items():
                tensors[name].copy_(d)


def _reduced(g: PermutationGroup, layers: Mapping[str, LayerInfo]) -> set[str]:
    """The eligible weights whose N:M groups a permutation of ``g`` changes: those that hold its
    channels on their reduction axis (on another axis, the mask just moves with the rows)."""
    return {m.name for m in g.members if m.name in layers and m.axis == layers[m.name].axis}


def _verify(gm, applied, ref, args, kwargs, report) -> None:
    """The permuted model must compute what it computed: float32 first, float64 when float32 noise is above tolerance."""
    err = _rel_error(ref, _outputs(gm, args, kwargs))
    tol = _tolerance(ref)
    report.max_error, report.tolerance = err, tol
    if err <= tol:
        report.verified_by = f"float32 outputs within {tol:.0e} relative ({err:.1e})"
        return
    err64, why = _float64_error(gm, applied, args, kwargs)
    if err64 is not None and err64 <= FLOAT64_TOLERANCE:
        report.verified_by = (f"a float64 re-run: {err64:.1e} relative (the float32 difference {err:.1e} is the "
                              f"model's own rounding noise, above the fixed {tol:.0e})")
        log.info("permute: float32 outputs moved by %.2e > %.0e; float64 re-run %.2e: exact", err, tol, err64)
        return
    culprit = _find_culprit(gm, applied, ref, args, kwargs)
    recheck = (f"; a float64 re-run moved them by {err64:.1e}" if err64 is not None else
               f"; the float64 re-run could not run ({why})")
    raise VerificationError(
        f"permuting group {culprit.id} ({culprit.kind}, {culprit.size} channels, members "
        f"{[m.name for m in culprit.members][:4]}...) changed the model output (relative error "
        f"{err:.2e} > {tol:.0e}{recheck}). All permutations were undone. This is a coupling the "
        "analysis missed; please report the model. Workaround: permute(..., perms={...}) "
        "without this group."
    )


def _float64_error(gm, applied, args, kwargs) -> tuple[float | None, str]:
    """Relative output change of the applied permutations with every tensor in float64; the tensors
    are converted in place and back (exactly: float32 -> float64 -> float32 is the identity)."""
    seen: dict[int, tuple[torch.Tensor, torch.dtype]] = {}
    for t in _tensors(gm).values():
        if t.is_floating_point() and t.dtype != torch.float64:
            seen.setdefault(id(t), (t, t.dtype))

    def wide(x):
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    try:
        for t, _ in seen.values():
            t.data = t.data.double()
        a64, k64 = pytree.tree_map(wide, (tuple(args), dict(kwargs)))
        try:
            new = _outputs(gm, a64, k64, hooks=False)
            for g, perm in reversed(applied):
                apply_permutation(gm, g, torch.argsort(perm))
            try:
                old = _outputs(gm, a64, k64, hooks=False)
            finally:
                for g, perm in applied:
                    apply_permutation(gm, g, perm)
        except Exception as e:  # noqa: BLE001 - e.g. a dtype baked into the graph; reported in the error
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return _rel_error(old, new), ""
    finally:
        for t, dtype in seen.values():
            t.data = t.data.to(dtype)


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

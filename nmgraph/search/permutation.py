"""Channel permutation search: reorder a group's channels so N:M pruning keeps more magnitude.

N:M pruning keeps the ``n`` largest scores of every ``m`` consecutive channels (a *stripe*) in each
row. Which channels share a stripe is arbitrary as long as every tensor of a permutation group is
reordered the same way (``nmgraph.permute`` does that), so a permutation that puts channels whose
large entries fall in *different* rows into the same stripe keeps more. This module searches for
such a permutation on a plain score matrix ``[rows, C]`` (columns are the group's channels: every
consumer's ``|w|`` or saliency stacked along rows) and never touches a graph.

Methods (``search_permutation(method=...)``):

* ``"none"``: the identity.
* ``"random"``: the best of a few seeded random permutations, never worse than the identity.
* ``"greedy"`` (default): channel swaps (Pool & Yu 2021). The gain of *every* swap of two channels
  in different stripes is computed at once (see :mod:`nmgraph.search.kernels` for the exact
  identity); each round adopts the best swap and every other swap whose stripes are disjoint from
  the swaps already taken (their gains add up exactly), then only the rows of the score tables that
  those stripes touch are recomputed. When no swap gains, up to ``max_regressions`` times a random
  swap among the least harmful ones is applied (depth one) and the greedy search continues; the best
  permutation seen is kept.
* ``"exhaustive"``: the greedy search, then stripe groups: sets of ``stripe_group_size`` stripes
  whose columns are re-split in every distinct way (order inside a stripe and order of stripes do
  not matter), adopting the best, until no group improves.

Large groups are searched in *windows* of at most ``window`` channels (whole stripes, re-drawn at
random every sweep), which bounds the ``O(rows * window^2)`` cost of a full gain table. ``block``
restricts swaps to runs of ``block`` consecutive channels (e.g. the channels of one attention head).
Results are deterministic for a given ``seed`` when no ``time_limit`` cuts the search short.
Measured quality and speed: ``docs/permutation_search.md``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nmgraph.errors import PlanError, ShapeError
from nmgraph.pattern import Pattern, PatternLike
from nmgraph.search import kernels

__all__ = ["SEARCHES", "SearchResult", "kept_score", "search_permutation", "unstructured_bound"]

log = logging.getLogger(__name__)

#: The search methods; every list of search names in nmgraph (permute, CLI) is this one.
SEARCHES = ("none", "random", "greedy", "exhaustive")

# Search constants, in one place.
DEFAULT_WINDOW = 256  # channels per window: one gain table is rows * window^2 work
DEFAULT_MAX_REGRESSIONS = 200  # most escapes from a local optimum (greedy and exhaustive)
ESCAPE_PATIENCE = 8  # by default, escapes stop after this many in a row that found nothing better
ESCAPE_WORK_SHARE = 2.0  # by default, escapes stop once they ran this share of the first descent's rounds
RANDOM_TRIALS = 16  # permutations tried by method="random"
ESCAPE_POOL = 64  # an escape picks one of this many least harmful swaps per window
DEFAULT_PARTITIONS = 6000  # default stripe groups: 3 stripes of 4 (5775 arrangements), not 2 of 8
MAX_PARTITIONS = 6435  # largest enumeration on request: 2 stripes of 8 (6435 arrangements)
MAX_GROUPS = 4096  # stripe groups per window evaluated exhaustively (else sampled)
GROUP_PATIENCE = 8  # sampled stripe-group rounds without improvement before stopping
REFRESH_FRACTION = 0.5  # recompute whole gain tables when more positions than this changed
GAIN_RTOL = 1e-5  # gains below this fraction of a slot's score are float32 noise, not progress
SWEEP_RTOL = 1e-5  # a windowed sweep that improves the kept score by less than this has converged


@dataclass(frozen=True)
class SearchResult:
    """A permutation of a score matrix's columns and how much it keeps.

    ``perm`` reorders columns (``matrix[:, perm]``); ``kept_identity`` and ``kept`` are the summed
    scores that N:M pruning keeps before and after; ``bound`` keeps the top ``C*n/m`` scores of
    every row with no structure (no permutation can beat it); ``total`` sums every score;
    ``swaps`` counts accepted moves (swaps and stripe-group re-splits), ``regressions`` the
    escapes taken. ``info`` holds ``sweeps`` (local optima reached), ``stripe_group_moves`` and,
    when the stripe-group search could not run, ``skipped`` with the reason.

    >>> r = SearchResult(torch.arange(4), 10.0, 12.0, 14.0, 20.0, "greedy", 0.1, 1)
    >>> r.efficacy
    0.5
    """

    perm: torch.Tensor
    kept_identity: float
    kept: float
    bound: float
    total: float
    method: str
    seconds: float
    swaps: int
    regressions: int = 0
    info: dict = field(default_factory=dict, compare=False)

    @property
    def efficacy(self) -> float:
        """``(kept - kept_identity) / (bound - kept_identity)``; 0.0 when the bound is the identity's."""
        span = self.bound - self.kept_identity
        if span <= 0:
            return 0.0
        return (self.kept - self.kept_identity) / span

    @property
    def gain(self) -> float:
        """Relative kept-score gain over the identity, ``kept / kept_identity - 1`` (0.0 if nothing kept)."""
        if self.kept_identity <= 0:
            return 0.0
        return self.kept / self.kept_identity - 1.0


def _check_matrix(matrix: torch.Tensor, p: Pattern) -> None:
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise ShapeError(
            f"permutation search needs a 2-D score matrix [rows, channels], got {shape}; stack the "
            "group's consumer scores along rows (conv weights as [out*kh*kw, C])."
        )
    rows, c = matrix.shape
    if c == 0 or rows == 0 or c % p.m:
        raise ShapeError(
            f"score matrix of shape {(rows, c)} has {c} channels, not a positive multiple of M={p.m} "
            f"for pattern {p}; leave this group unpermuted or pick a pattern whose M divides {c}."
        )
    if matrix.is_floating_point() and not bool(torch.isfinite(matrix).all()):
        raise ShapeError(
            f"score matrix of shape {(rows, c)} contains NaN or inf; check the weights or saliency "
            "before searching a permutation."
        )


def kept_score(matrix: torch.Tensor, pattern: PatternLike) -> float:
    """Sum of the ``n`` largest scores of every group of ``m`` consecutive columns (float64).

    >>> kept_score(torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0, 0.5, 9.0, 1.0]]), "2:4")
    17.0
    """
    p = Pattern.parse(pattern)
    _check_matrix(matrix, p)
    rows, c = matrix.shape
    groups = _exact(matrix).reshape(rows, c // p.m, p.m)
    return float(torch.topk(groups, p.n, dim=-1).values.sum(dtype=torch.float64))


def unstructured_bound(matrix: torch.Tensor, pattern: PatternLike) -> float:
    """Sum of the top ``C*n/m`` scores of every row: what pruning without structure keeps.

    >>> unstructured_bound(torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0, 0.5, 9.0, 1.0]]), "2:4")
    18.0
    """
    p = Pattern.parse(pattern)
    _check_matrix(matrix, p)
    c = matrix.shape[1]
    return float(torch.topk(_exact(matrix), c // p.m * p.n, dim=1).values.sum(dtype=torch.float64))


def _exact(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` in a dtype that holds its values exactly (sums are taken in float64 anyway)."""
    x = matrix.detach()
    return x if x.dtype in (torch.float32, torch.float64) else x.double()


class _Clock:
    """Deadline and optional progress bar of one search."""

    def __init__(self, time_limit: float | None, progress: bool | Callable[[float | None], None], desc: str) -> None:
        if time_limit is not None and not time_limit >= 0:
            raise PlanError(f"time_limit must be None or a number of seconds >= 0, got {time_limit!r}.")
        self.start = time.perf_counter()
        self.deadline = None if time_limit is None or math.isinf(time_limit) else self.start + float(time_limit)
        self.bar = None
        self.callback = progress if callable(progress) else None
        if progress is True:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                log.debug("tqdm is not installed; permutation search runs without a progress bar")
            else:
                self.bar = tqdm(desc=desc, unit="round", leave=False)

    def expired(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def tick(self, kept: float | None = None) -> None:
        if self.callback is not None:
            self.callback(kept)
        if self.bar is not None:
            self.bar.update(1)
            if kept is not None:
                self.bar.set_postfix(kept=f"{kept:.6g}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _SwapState:
    """A current arrangement ``x [R, C]`` of the scores, its thresholds and gain tables.

    ``S[w, i, j] = sum_r max(x[r, cells[w, j]], t[r, cells[w, i]])`` exists for the pairs of
    positions inside one window ``w``; windows partition the positions and never cross a block.
    ``perm[p]`` is the original column now at position ``p``.
    """

    def __init__(
        self, x: torch.Tensor, n: int, m: int, block: int, window: int, clock: _Clock | None = None
    ) -> None:
        self.x = x
        self.clock = clock
        self.r, self.c = x.shape
        self.n, self.m = n, m
        self.ns = self.c // m
        self.block = block
        self.device = x.device
        self.perm = torch.arange(self.c, device=self.device)
        self.stripe = torch.arange(self.c, device=self.device) // m
        thr, self.stripe_kept = kernels.stripe_thresholds(x.view(self.r, self.ns, m), n)
        self.thr = thr.reshape(self.r, self.c)
        self.aligned = block % m == 0
        self.windows_per_block = math.ceil(block / window)
        self.shuffled = self.windows_per_block > 1
        self.cells = torch.empty(0, dtype=torch.long)
        self.pair_ok = torch.empty(0, dtype=torch.bool)
        self.S = torch.empty(0, dtype=torch.float64)
        self.xw = self.tw = torch.empty(0)
        self.tabu: torch.Tensor | None = None
        slot = float(x.double().mean()) * self.r
        self.tol = max(GAIN_RTOL * abs(slot), 1e-30)

    # windows -------------------------------------------------------------------------------------
    def build_windows(self, gen: torch.Generator) -> None:
        """Splits every block into windows (of random whole stripes when a block has several)."""
        m = self.m
        cells: list[list[int]] = []
        for lo in range(0, self.c, self.block):
            hi = lo + self.block
            if self.aligned:
                units = [list(range(s * m, s * m + m)) for s in range(lo // m, hi // m)]
            else:
                units = [[p] for p in range(lo, hi)]
            if self.shuffled:
                units = [units[i] for i in torch.randperm(len(units), generator=gen).tolist()]
            per = math.ceil(len(units) / self.windows_per_block)
            for w in range(0, len(units), per):
                cells.append([p for u in units[w : w + per] for p in u])
        width = max(len(cell) for cell in cells)
        valid = torch.zeros(len(cells), width, dtype=torch.bool)
        idx = torch.zeros(len(cells), width, dtype=torch.long)
        for w, cell in enumerate(cells):
            idx[w, : len(cell)] = torch.tensor(cell)
            idx[w, len(cell) :] = cell[0]
            valid[w, : len(cell)] = True
        self.cells = idx.to(self.device)
        valid = valid.to(self.device)
        self.tabu = None
        stripe = self.stripe[self.cells]
        upper = torch.ones(width, width, dtype=torch.bool, device=self.device).triu(1)
        self.pair_ok = (
            valid.unsqueeze(2) & valid.unsqueeze(1) & (stripe.unsqueeze(2) != stripe.unsqueeze(1)) & upper
        )
        flat = self.cells[valid]
        w_ids = torch.arange(len(cells), device=self.device).unsqueeze(1).expand_as(self.cells)
        i_ids = torch.arange(width, device=self.device).unsqueeze(0).expand_as(self.cells)
        self.cell_of = torch.empty(self.c, dtype=torch.long, device=self.device)
        self.idx_of = torch.empty(self.c, dtype=torch.long, device=self.device)
        self.cell_of[flat] = w_ids[valid]
        self.idx_of[flat] = i_ids[valid]
        self.refresh()

    def refresh(self) -> None:
        """Lays the scores and thresholds out per window and recomputes every gain table."""
        k = self.cells.shape[1]
        self.xw = self.x[:, self.cells.flatten()].view(self.r, -1, k).permute(1, 0, 2).contiguous()
        self.tw = self.thr[:, self.cells.flatten()].view(self.r, -1, k).permute(1, 0, 2).contiguous()
        self.S = torch.zeros(len(self.cells), k, k, dtype=torch.float64, device=self.device)
        for w in range(len(self.cells)):
            if self.clock is not None and self.clock.expired():
                return  # the caller stops at its next deadline check and never reads this table
            self.S[w] = kernels.pair_max_sums(self.tw[w], self.xw[w])

    # gains ---------------------------------------------------------------------------------------
    def gains(self) -> torch.Tensor:
        """``G[w, i, j]``: exact kept-score change of swapping positions ``cells[w, i]``, ``cells[w, j]``.

        ``-inf`` where the swap is not allowed (same stripe, padding, tabu, or ``i >= j``).
        """
        d = self.S.diagonal(dim1=1, dim2=2)
        delta = self.S - d.unsqueeze(2)
        g = delta + delta.transpose(1, 2)
        ok = self.pair_ok if self.tabu is None else self.pair_ok & ~self.tabu
        return g.masked_fill_(~ok, -math.inf)

    def positive(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The swaps of ``g`` that gain more than the rounding tolerance: ``(gain, p, q)``."""
        w, i, j = (g > self.tol).nonzero(as_tuple=True)
        return g[w, i, j], self.cells[w, i], self.cells[w, j]

    def disjoint(self, gain: torch.Tensor, p: torch.Tensor, q: torch.Tensor):
        """The greedy matching of swaps ``(p, q)``: best first, no stripe used twice."""
        keep = _select_disjoint(gain, torch.stack([self.stripe[p], self.stripe[q]], dim=1), self.ns)
        return p[keep], q[keep]

    def forbid(self, p: torch.Tensor, q: torch.Tensor) -> None:
        """Makes swaps between the stripes of ``p[k]`` and ``q[k]`` tabu until the next local optimum."""
        stripe = self.stripe[self.cells]
        si, sj = stripe.unsqueeze(2), stripe.unsqueeze(1)
        tabu = torch.zeros_like(self.pair_ok) if self.tabu is None else self.tabu
        for a, b in zip(self.stripe[p].tolist(), self.stripe[q].tolist()):
            tabu |= ((si == a) & (sj == b)) | ((si == b) & (sj == a))
        self.tabu = tabu

    # moves ---------------------------------------------------------------------------------------
    def apply(self, p: torch.Tensor, q: torch.Tensor) -> None:
        """Swaps positions ``p[k] <-> q[k]`` (pairwise disjoint stripes); updates what they touch.

        Thresholds change only in the two stripes of a swap, so only the table rows of those
        stripes' positions and the table columns of the two moved positions are recomputed.
        """
        if p.numel() == 0:
            return
        moved, source = torch.cat([p, q]), torch.cat([q, p])
        self.x[:, moved] = self.x[:, source]
        self.perm[moved] = self.perm[source]
        stripes = torch.unique(self.stripe[moved])
        pos = (stripes.unsqueeze(1) * self.m + torch.arange(self.m, device=self.device)).flatten()
        thr, kept = kernels.stripe_thresholds(self.x[:, pos].view(self.r, -1, self.m), self.n)
        self.thr[:, pos] = thr.reshape(self.r, -1)
        self.stripe_kept[stripes] = kept
        if pos.numel() > REFRESH_FRACTION * self.c:
            self.refresh()
            return
        for w in torch.unique(self.cell_of[pos]).tolist():
            rows = pos[self.cell_of[pos] == w]
            cols = moved[self.cell_of[moved] == w]
            xw, tw = self.xw[w], self.tw[w]
            xw[:, self.idx_of[cols]] = self.x[:, cols]
            tw[:, self.idx_of[rows]] = self.thr[:, rows]
            self.S[w, self.idx_of[rows], :] = kernels.pair_max_sums(self.thr[:, rows], xw)
            if cols.numel():
                self.S[w, :, self.idx_of[cols]] = kernels.pair_max_sums(tw, self.x[:, cols])

    def kept(self) -> float:
        return float(self.stripe_kept.sum())


def _greedy(
    state: _SwapState, gen: torch.Generator, clock: _Clock, max_regressions: int | None
) -> tuple[torch.Tensor, float, int, int, int]:
    """Greedy swaps with bounded regressions: ``(best perm, its kept score, swaps, regressions, sweeps)``.

    A *sweep* runs greedy rounds until no swap inside the current windows gains. With several
    windows per block, new random windows follow while a sweep still improves by more than
    ``SWEEP_RTOL``. At a local optimum, an escape applies in every window one random swap among the
    ``ESCAPE_POOL`` least harmful ones and forbids undoing it until the next local optimum; the
    search then walks on from there, remembering the best. ``max_regressions`` bounds the escapes;
    ``None`` (the default) takes them only while they pay: at most ``DEFAULT_MAX_REGRESSIONS``, none
    after ``ESCAPE_PATIENCE`` in a row that found nothing better, and none once the search after the
    first local optimum ran ``ESCAPE_WORK_SHARE`` times the gain-table rounds of the descent to it
    (rounds, not seconds, so the result does not depend on the machine's speed). Measured: 200
    escapes cost 10-35x the plain greedy time for +0.1..0.25 points of kept magnitude; this rule
    keeps about half that gain for about twice the plain greedy time (``docs/permutation_search.md``).
    """
    adaptive = max_regressions is None
    limit = DEFAULT_MAX_REGRESSIONS if adaptive else max_regressions
    descent = None  # gain-table rounds of the first descent
    rounds = 0
    idle = 0  # escapes in a row without a new best
    best_perm = state.perm.clone()
    best_kept = state.kept()
    swaps = regressions = sweeps = 0
    state.build_windows(gen)
    if not bool(state.pair_ok.any()):
        log.debug("no two stripes share a block of %d channels: nothing to swap", state.block)
        return best_perm, best_kept, 0, 0, 0
    sweep_start = best_kept
    while not clock.expired():
        g = state.gains()
        rounds += 1
        gain, p, q = state.positive(g)
        if gain.numel():
            p, q = state.disjoint(gain, p, q)
            state.apply(p, q)
            swaps += p.numel()
            clock.tick()
            continue
        kept = state.kept()
        improved = kept > best_kept
        if improved:
            best_kept, best_perm = kept, state.perm.clone()
        sweeps += 1
        clock.tick(best_kept)
        log.debug("sweep %d: kept %.9g after %d swaps, %.2fs", sweeps, best_kept, swaps, clock.elapsed())
        if state.shuffled and kept - sweep_start > SWEEP_RTOL * abs(sweep_start):
            sweep_start = kept
            state.build_windows(gen)
            continue
        if descent is None:
            descent = rounds
        else:  # the local optimum an escape led to
            idle = 0 if improved else idle + 1
        if regressions >= limit or (adaptive and (
                idle >= ESCAPE_PATIENCE or rounds - descent > ESCAPE_WORK_SHARE * descent)):
            break
        regressions += 1
        state.tabu = None
        g = state.gains()
        pool = min(ESCAPE_POOL, int(state.pair_ok.flatten(1).sum(1).max()))
        top = g.flatten(1).topk(pool, dim=1)
        pick = torch.randint(pool, (g.shape[0], 1), generator=gen).to(state.device)
        flat = top.indices.gather(1, pick).squeeze(1)
        ok = torch.isfinite(top.values.gather(1, pick).squeeze(1))
        w, flat = torch.nonzero(ok).flatten(), flat[ok]
        i, j = flat // g.shape[2], flat % g.shape[2]
        p, q = state.disjoint(g[w, i, j], state.cells[w, i], state.cells[w, j])
        state.apply(p, q)
        state.forbid(p, q)
        sweep_start = state.kept()
    kept = state.kept()
    if kept > best_kept:
        best_kept, best_perm = kept, state.perm.clone()
    return best_perm, best_kept, swaps, regressions, sweeps


def search_permutation(
    matrix: torch.Tensor,
    pattern: PatternLike,
    *,
    method: str = "greedy",
    block: int | None = None,
    seed: int = 0,
    time_limit: float | None = None,
    progress: bool | Callable[[float | None], None] = False,
    max_regressions: int | None = None,
    stripe_group_size: int | None = None,
    window: int = DEFAULT_WINDOW,
    device: torch.device | str | None = None,
    threads: int | str | None = "auto",
) -> SearchResult:
    """Finds a column permutation of ``matrix`` that keeps more score under N:M pruning.

    ``matrix`` is a score matrix ``[rows, C]`` (``|w|`` or a saliency; columns are channels).
    The result's ``perm`` keeps every run of ``block`` channels in place as a set
    (``perm // block == arange(C) // block``) and never keeps less than the identity.

    ``method``: ``"none"``, ``"random"``, ``"greedy"`` or ``"exhaustive"`` (module docstring).
    ``seed`` fixes every random choice; ``time_limit`` (seconds) returns the best permutation found
    so far (``math.inf``: no limit); ``progress=True`` shows a tqdm bar when tqdm is installed, a
    callable is called with the best kept score at every round (``None`` between). ``max_regressions``
    bounds the escapes from local optima (default ``None``: only while they pay, see ``_greedy``),
    ``stripe_group_size`` the stripes re-split together by
    ``"exhaustive"`` (default: 3 when every triple of a window can be enumerated, else 2),
    ``window`` the channels whose pairwise swaps one gain table holds (cost per sweep is about
    ``rows * C * window``). ``device`` runs the search there (default: the matrix's device).
    ``threads``: intra-op CPU threads for the duration of the search (torch's setting is restored
    afterwards). The search is a long sequence of mid-sized tensor ops; ``"auto"`` (default) takes
    one thread on a CPU (measured on a 2-core machine: 8-35x faster than two threads, at every size
    from 576x64 to 768x768, ``docs/permutation_search.md``) and leaves a GPU search alone; ``None``
    leaves torch's setting alone.

    >>> g = torch.Generator().manual_seed(0)
    >>> w = torch.randn(64, 64, generator=g).abs()
    >>> r = search_permutation(w, "2:4", seed=0)
    >>> r.kept >= r.kept_identity and abs(kept_score(w[:, r.perm], "2:4") - r.kept) < 1e-6 * r.kept
    True
    """
    p = Pattern.parse(pattern)
    if method not in SEARCHES:
        raise PlanError(
            f"unknown permutation search method {method!r}; accepted values: "
            f"{', '.join(repr(m) for m in SEARCHES)}."
        )
    _check_matrix(matrix, p)
    rows, c = matrix.shape
    if block is None:
        block = c
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0 or c % block:
        raise ShapeError(
            f"block={block!r} does not split the {c} channels of score matrix {(rows, c)} into equal "
            "runs; pass a positive divisor of the channel count (e.g. head_dim) or None."
        )
    if isinstance(window, bool) or not isinstance(window, int) or window < 2 * p.m:
        raise PlanError(f"window={window!r} must be an int >= 2*M = {2 * p.m} (two stripes).")
    if max_regressions is not None and (
            isinstance(max_regressions, bool) or not isinstance(max_regressions, int) or max_regressions < 0):
        raise PlanError(f"max_regressions must be None or an int >= 0, got {max_regressions!r}.")
    if stripe_group_size is not None:
        _group_size(p, stripe_group_size, 0)  # validates it whatever the method
    if threads is not None and threads != "auto" and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PlanError(f"threads must be 'auto', None or an int >= 1, got {threads!r}.")
    dev = torch.device(device) if device is not None else matrix.device
    if threads == "auto":
        threads = 1 if dev.type == "cpu" else None
    clock = _Clock(time_limit, progress, f"permutation search {p} {tuple(matrix.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        scores = matrix.detach().to(dev)
        kept_identity = kept_score(scores, p)
        bound = unstructured_bound(scores, p)
        total = float(scores.sum(dtype=torch.float64))
        identity = torch.arange(c, device=dev)
        info: dict = {}
        swaps = regressions = 0
        if method == "none" or c == p.m:
            perm, kept = identity, kept_identity
        elif method == "random":
            perm, kept = _random_search(scores, p, block, gen, clock)
        else:
            state = _SwapState(scores.float().contiguous().clone(), p.n, p.m, block, window, clock)
            perm, kept, swaps, regressions, sweeps = _greedy(state, gen, clock, max_regressions)
            info["sweeps"] = sweeps
            if method == "exhaustive":
                perm, kept, moves, reason = _refine_stripe_groups(
                    scores, p, block, perm, kept, stripe_group_size, window, gen, clock
                )
                swaps += moves
                info["stripe_group_moves"] = moves
                if reason:
                    info["skipped"] = reason
                    log.info("exhaustive stripe-group search skipped: %s", reason)
        kept_check = kept_score(scores[:, perm], p)
        if kept_check < kept_identity:
            # Float32 gain tables can only err by rounding; the identity is the safe answer.
            perm, kept_check = identity, kept_identity
        seconds = clock.elapsed()
    finally:
        clock.close()
        if threads is not None:
            torch.set_num_threads(saved_threads)
    log.debug(
        "permutation search %s %s %s: kept %.6g -> %.6g (bound %.6g) in %.3fs, %d swaps",
        method, p, tuple(matrix.shape), kept_identity, kept_check, bound, seconds, swaps,
    )
    return SearchResult(
        perm=perm.to(dev),
        kept_identity=kept_identity,
        kept=kept_check,
        bound=bound,
        total=total,
        method=method,
        seconds=seconds,
        swaps=swaps,
        regressions=regressions,
        info=info,
    )


def _random_search(
    scores: torch.Tensor, p: Pattern, block: int, gen: torch.Generator, clock: _Clock
) -> tuple[torch.Tensor, float]:
    c = scores.shape[1]
    best = torch.arange(c, device=scores.device)
    best_kept = kept_score(scores, p)
    n_blocks = c // block
    for _ in range(RANDOM_TRIALS):
        if clock.expired():
            break
        perms = torch.argsort(torch.rand(n_blocks, block, generator=gen), dim=1)
        perm = (perms + torch.arange(n_blocks).unsqueeze(1) * block).flatten().to(scores.device)
        kept = kept_score(scores[:, perm], p)
        clock.tick(max(kept, best_kept))
        if kept > best_kept:
            best, best_kept = perm, kept
    return best, best_kept


def _group_size(p: Pattern, requested: int | None, stripes: int) -> tuple[int | None, str]:
    """The stripe-group size: ``requested`` (validated), else the default for ``stripes`` per window.

    The default enumerates whole windows: 3 stripes when every triple of a window fits in
    ``MAX_GROUPS`` and 3 stripes have at most ``DEFAULT_PARTITIONS`` arrangements, else 2 stripes
    when those have at most ``DEFAULT_PARTITIONS``; otherwise ``(None, reason)``.
    """
    if requested is None:
        if stripes >= 3 and math.comb(stripes, 3) <= MAX_GROUPS and _n_partitions(p.m, 3) <= DEFAULT_PARTITIONS:
            return 3, ""
        if _n_partitions(p.m, 2) <= DEFAULT_PARTITIONS:
            return 2, ""
        return None, (
            f"pattern {p}: 2 stripes of {p.m} channels have {_n_partitions(p.m, 2)} arrangements, above "
            f"the default limit {DEFAULT_PARTITIONS}; the greedy result is kept (pass "
            "stripe_group_size=2 to search them anyway when M=8)"
        )
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 2:
        raise PlanError(f"stripe_group_size must be an int >= 2 (or None), got {requested!r}.")
    count = _n_partitions(p.m, requested)
    if count > MAX_PARTITIONS:
        raise PlanError(
            f"stripe_group_size={requested} with pattern {p} means {count} arrangements per "
            f"group (limit {MAX_PARTITIONS}); use stripe_group_size=2 or leave it None."
        )
    return requested, ""


def _n_partitions(m: int, s: int) -> int:
    return math.factorial(s * m) // (math.factorial(m) ** s * math.factorial(s))


def _select_disjoint(score: torch.Tensor, ends: torch.Tensor, n_items: int, max_iters: int = 64) -> torch.Tensor:
    """Mask of moves with pairwise disjoint ``ends`` (stripe ids ``[E, k]``), best ``score`` first.

    The result equals the sequential greedy matching (take the best move, drop the moves sharing a
    stripe with it, repeat), computed by rounds of locally dominant moves. ``max_iters`` caps the
    rounds; moves left out are found again by the next search round.
    """
    e = score.numel()
    taken = torch.zeros(e, dtype=torch.bool, device=score.device)
    if e == 0:
        return taken
    order = torch.sort(score, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(e, device=score.device)
    alive = torch.ones(e, dtype=torch.bool, device=score.device)
    flat_ends = ends.flatten()
    for _ in range(max_iters):
        r = torch.where(alive, rank, torch.full_like(rank, e))
        best = torch.full((n_items,), e, dtype=rank.dtype, device=score.device)
        best.scatter_reduce_(0, flat_ends, r.repeat_interleave(ends.shape[1]), "amin")
        win = alive & (best[ends] == rank.unsqueeze(1)).all(dim=1)
        taken |= win
        used = torch.zeros(n_items, dtype=torch.bool, device=score.device)
        used[ends[win].flatten()] = True
        alive &= ~used[ends].any(dim=1)
        if not bool(alive.any()):
            break
    return taken


def _refine_stripe_groups(
    scores: torch.Tensor,
    p: Pattern,
    block: int,
    perm: torch.Tensor,
    kept: float,
    stripe_group_size: int | None,
    window: int,
    gen: torch.Generator,
    clock: _Clock,
) -> tuple[torch.Tensor, float, int, str]:
    """Re-splits groups of ``s`` stripes in their best distinct arrangement until none improves.

    Stripes are grouped inside windows of whole stripes within one block (a stripe that straddles
    two blocks keeps its channels). A window with at most ``MAX_GROUPS`` stripe groups evaluates them
    all and re-evaluates only the groups whose stripes changed; larger ones draw random disjoint
    groups each round and stop after ``GROUP_PATIENCE`` rounds without improvement.
    """
    m, n = p.m, p.n
    c, r = scores.shape[1], scores.shape[0]
    ns = c // m
    s, reason = _group_size(p, stripe_group_size, min(block, window, c) // m)
    if s is None:
        return perm, kept, 0, reason
    dev = scores.device
    x = scores[:, perm].float().contiguous()
    perm = perm.clone()
    subsets, parts = kernels.distinct_partitions(m, s)
    subsets, parts = subsets.to(dev), parts.to(dev)
    first = torch.arange(ns) * m
    inside = (first // block) == ((first + m - 1) // block)
    per_block: dict[int, list[int]] = {}
    for t in torch.nonzero(inside).flatten().tolist():
        per_block.setdefault(t * m // block, []).append(t)
    straddling = ns - int(inside.sum())
    if straddling:
        log.debug("%d stripes straddle blocks of %d channels; stripe groups leave them alone", straddling, block)
    per_window = max(s, window // m)
    shuffled = any(len(v) > per_window for v in per_block.values())
    offsets = torch.arange(m, device=dev)
    moves = 0
    tol = max(1e-6 * abs(kept) / ns, 1e-30)
    stripe_kept = kernels.stripe_thresholds(x.view(r, ns, m), n)[1]
    step = max(1, (1 << 24) // (r * s * m))

    def positions(groups: torch.Tensor) -> torch.Tensor:
        return (groups.unsqueeze(2) * m + offsets).reshape(groups.shape[0], s * m)

    def evaluate(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gains, args = [], []
        for chunk in groups.split(step):
            v = x[:, positions(chunk).flatten()].view(r, chunk.shape[0], s * m).transpose(0, 1)
            best, arg, now = kernels.evaluate_groups(v, n, subsets, parts)
            gains.append(best - now)
            args.append(arg)
        if not gains:
            return torch.zeros(0, dtype=torch.float64, device=dev), torch.zeros(0, dtype=torch.long, device=dev)
        return torch.cat(gains), torch.cat(args)

    def apply(groups: torch.Tensor, arg: torch.Tensor) -> None:
        pos = positions(groups)
        src = pos.gather(1, subsets[parts[arg]].reshape(groups.shape[0], s * m))
        x[:, pos.flatten()] = x[:, src.flatten()]
        perm[pos.flatten()] = perm[src.flatten()]
        stripe_kept[groups.flatten()] = kernels.stripe_thresholds(x[:, pos.flatten()].view(r, -1, m), n)[1]

    sweep_start = float(stripe_kept.sum())
    while not clock.expired():
        windows: list[torch.Tensor] = []
        for stripes in per_block.values():
            order = torch.randperm(len(stripes), generator=gen).tolist() if shuffled else range(len(stripes))
            ordered = [stripes[i] for i in order]
            for w in range(0, len(ordered), per_window):
                chunk = ordered[w : w + per_window]
                if len(chunk) >= s:
                    windows.append(torch.tensor(chunk, device=dev))
        if not windows:
            return perm, kept, moves, f"no block of {block} channels holds {s} whole stripes of {m}"
        exhaustive = all(math.comb(len(w), s) <= MAX_GROUPS for w in windows)
        if exhaustive:
            groups = torch.cat([torch.combinations(w, r=s) for w in windows])
            gain, arg = evaluate(groups)
            while not clock.expired():
                cand = torch.nonzero(gain > tol).flatten()
                if cand.numel() == 0:
                    break
                pick = cand[_select_disjoint(gain[cand], groups[cand], ns)]
                apply(groups[pick], arg[pick])
                moves += pick.numel()
                clock.tick(float(stripe_kept.sum()))
                changed = torch.zeros(ns, dtype=torch.bool, device=dev)
                changed[groups[pick].flatten()] = True
                dirty = torch.nonzero(changed[groups].any(dim=1)).flatten()
                gain[dirty], arg[dirty] = evaluate(groups[dirty])
        else:
            idle = 0
            while idle < GROUP_PATIENCE and not clock.expired():
                drawn = []
                for w in windows:
                    k = len(w) // s * s
                    drawn.append(w[torch.randperm(len(w), generator=gen)[:k].to(dev)].view(-1, s))
                groups = torch.cat(drawn)
                gain, arg = evaluate(groups)
                pick = torch.nonzero(gain > tol).flatten()
                apply(groups[pick], arg[pick])
                moves += pick.numel()
                idle = 0 if pick.numel() else idle + 1
                clock.tick(float(stripe_kept.sum()))
        now = float(stripe_kept.sum())
        if not shuffled or now - sweep_start <= SWEEP_RTOL * abs(sweep_start):
            break
        sweep_start = now
    final = kept_score(scores[:, perm], p)
    return perm, final, moves, ""

import itertools
import math
import sys

import pytest
import torch

from nmgraph.errors import PlanError, ShapeError
from nmgraph.search import kernels
from nmgraph.search.permutation import (
    SEARCHES,
    SearchResult,
    _SwapState,
    kept_score,
    search_permutation,
    unstructured_bound,
)


def _scores(rows, cols, seed=0, kind="gauss"):
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(rows, cols, generator=g).abs()
    if kind == "student":
        return torch.distributions.StudentT(3.0).sample((rows, cols)).abs()
    raise ValueError(kind)


def _kept_reference(w, n, m):
    """Kept score by explicit loops over rows and groups."""
    total = 0.0
    for row in w.double().tolist():
        for g in range(0, len(row), m):
            total += sum(sorted(row[g : g + m], reverse=True)[:n])
    return total


def _check_perm(perm, c, block=None):
    assert perm.dtype == torch.long and perm.shape == (c,)
    assert torch.equal(torch.sort(perm).values, torch.arange(c))
    if block is not None:
        assert torch.equal(perm // block, torch.arange(c) // block)


def _brute_force_best(w, n, m):
    """Best kept score over all column permutations (batched over itertools.permutations)."""
    c = w.shape[1]
    perms = torch.tensor(list(itertools.permutations(range(c))))
    best = -math.inf
    for chunk in perms.split(8192):
        x = w.double()[:, chunk].permute(1, 0, 2)  # [P, rows, C]
        kept = x.reshape(len(chunk), w.shape[0], c // m, m).topk(n, dim=-1).values.sum(dim=(1, 2, 3))
        best = max(best, float(kept.max()))
    return best


def _set_partitions(items, m):
    """All ways to split ``items`` into unordered groups of ``m`` (independent of nmgraph's enumeration)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for tail in itertools.combinations(rest, m - 1):
        left = [c for c in rest if c not in tail]
        for others in _set_partitions(left, m):
            yield [(first, *tail), *others]


# kept score, bound, efficacy -------------------------------------------------------------------


def test_kept_score_matches_hand_reference():
    w = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0, 0.5, 9.0, 1.0], [5.0, 5.0, 5.0, 1.0, 2.0, 2.0, 0.0, 7.0]])
    # row 0: (4+3) + (9+1); row 1: (5+5) + (7+2)
    assert kept_score(w, "2:4") == 17.0 + 19.0
    assert kept_score(w, "1:4") == 4.0 + 9.0 + 5.0 + 7.0
    assert kept_score(w, (1, 8)) == 9.0 + 7.0
    assert unstructured_bound(w, "2:4") == (9 + 4 + 3 + 2) + (7 + 5 + 5 + 5)


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("1:4", 1, 4), ("2:8", 2, 8), ("4:8", 4, 8)])
def test_kept_score_and_bound_match_loops(pattern, n, m):
    w = _scores(7, 24, seed=3)
    assert kept_score(w, pattern) == pytest.approx(_kept_reference(w, n, m), rel=1e-12)
    ref_bound = sum(sum(sorted(r, reverse=True)[: 24 * n // m]) for r in w.double().tolist())
    assert unstructured_bound(w, pattern) == pytest.approx(ref_bound, rel=1e-12)


def test_efficacy_formula():
    r = SearchResult(torch.arange(4), 10.0, 13.0, 16.0, 20.0, "greedy", 0.0, 2)
    assert r.efficacy == pytest.approx(0.5)
    assert r.gain == pytest.approx(0.3)
    flat = SearchResult(torch.arange(4), 10.0, 10.0, 10.0, 20.0, "greedy", 0.0, 0)
    assert flat.efficacy == 0.0


def test_result_reports_consistent_numbers():
    w = _scores(32, 64, seed=1)
    r = search_permutation(w, "2:4", seed=0)
    assert r.method == "greedy"
    assert r.kept_identity == pytest.approx(kept_score(w, "2:4"), rel=1e-12)
    assert r.kept == pytest.approx(kept_score(w[:, r.perm], "2:4"), rel=1e-12)
    assert r.bound == pytest.approx(unstructured_bound(w, "2:4"), rel=1e-12)
    assert r.total == pytest.approx(float(w.double().sum()), rel=1e-12)
    assert r.kept_identity < r.kept <= r.bound
    assert r.efficacy == pytest.approx((r.kept - r.kept_identity) / (r.bound - r.kept_identity))
    assert r.swaps > 0 and r.seconds > 0


# kernels ---------------------------------------------------------------------------------------


def test_swap_gain_table_equals_kept_differences():
    """Every entry of the batched gain table equals kept(after swap) - kept(before), computed directly."""
    for pattern, (n, m) in [("2:4", (2, 4)), ("1:4", (1, 4)), ("3:8", (3, 8))]:
        w = _scores(9, 2 * 8 if m == 8 else 12, seed=5)
        c = w.shape[1]
        state = _SwapState(w.clone(), n, m, block=c, window=c)
        state.build_windows(torch.Generator().manual_seed(0))
        g = state.gains()[0]
        base = kept_score(w, pattern)
        for i in range(c):
            for j in range(i + 1, c):
                if i // m == j // m:
                    assert g[i, j] == -math.inf
                    continue
                swapped = w.clone()
                swapped[:, [i, j]] = swapped[:, [j, i]]
                assert float(g[i, j]) == pytest.approx(kept_score(swapped, pattern) - base, abs=1e-4)


def test_gain_table_stays_exact_after_incremental_updates():
    w = _scores(11, 48, seed=2)
    state = _SwapState(w.clone(), 2, 4, block=48, window=48)
    state.build_windows(torch.Generator().manual_seed(0))
    state.apply(torch.tensor([0, 9]), torch.tensor([5, 22]))
    state.apply(torch.tensor([13]), torch.tensor([40]))
    incremental = state.S.clone()
    state.refresh()
    torch.testing.assert_close(incremental, state.S, rtol=0, atol=1e-4)
    assert state.kept() == pytest.approx(kept_score(w[:, state.perm], "2:4"), rel=1e-6)  # float32 state
    torch.testing.assert_close(state.x, w[:, state.perm])


def test_pair_max_sums_and_thresholds_match_references():
    t, x = _scores(37, 5, seed=1), _scores(37, 7, seed=2)
    ref = torch.maximum(t.double().unsqueeze(2), x.double().unsqueeze(1)).sum(0)
    # float32 sums within a chunk of rows, float64 across chunks
    torch.testing.assert_close(kernels.pair_max_sums(t, x, chunk_elems=40), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(kernels.pair_max_sums(t, x), ref, rtol=1e-6, atol=0)
    xs = _scores(6, 12, seed=4).view(6, 3, 4)
    for n in (1, 2, 3):
        thr, kept = kernels.stripe_thresholds(xs, n)
        for r, s, i in itertools.product(range(6), range(3), range(4)):
            others = [v for k, v in enumerate(xs[r, s].tolist()) if k != i]
            assert thr[r, s, i] == sorted(others, reverse=True)[n - 1]
        torch.testing.assert_close(kept, xs.double().topk(n, dim=2).values.sum(dim=(0, 2)))


@pytest.mark.parametrize("m,s", [(2, 2), (2, 3), (4, 2), (4, 3), (3, 2)])
def test_distinct_partitions_are_all_and_unique(m, s):
    subsets, parts = kernels.distinct_partitions(m, s)
    listed = {frozenset(frozenset(subsets[k].tolist()) for k in part) for part in parts.tolist()}
    expected = {frozenset(frozenset(g) for g in p) for p in _set_partitions(list(range(s * m)), m)}
    assert len(listed) == parts.shape[0] == len(expected)
    assert listed == expected
    assert parts.shape[0] == math.factorial(s * m) // (math.factorial(m) ** s * math.factorial(s))
    assert subsets[parts[0]].flatten().tolist() == list(range(s * m))  # partition 0 = current order


def test_topn_sum_matches_topk():
    for m in range(2, 18):
        parts = list(_scores(m, 50, seed=m))
        for n in range(1, m):
            ref = torch.stack(parts).topk(n, dim=0).values.sum(0)
            torch.testing.assert_close(kernels.topn_sum(parts, n), ref)


def test_evaluate_groups_matches_brute_force():
    w = _scores(5, 12, seed=9)
    subsets, parts = kernels.distinct_partitions(4, 3)
    best, arg, now = kernels.evaluate_groups(w.unsqueeze(0), 2, subsets, parts)
    scores = [kept_score(w[:, [c for g in p for c in g]], "2:4") for p in _set_partitions(list(range(12)), 4)]
    assert float(now[0]) == pytest.approx(kept_score(w, "2:4"), rel=1e-6)  # float32 scores
    assert float(best[0]) == pytest.approx(max(scores), rel=1e-6)
    chosen = w[:, subsets[parts[arg[0]]].flatten()]
    assert kept_score(chosen, "2:4") == pytest.approx(max(scores), rel=1e-12)


# search quality -------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("1:4", 1, 4), ("3:4", 3, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exhaustive_reaches_brute_force_optimum_c8(pattern, n, m, seed):
    w = _scores(6, 8, seed=seed)
    best = _brute_force_best(w, n, m)
    r = search_permutation(w, pattern, method="exhaustive", seed=seed, max_regressions=0)
    _check_perm(r.perm, 8)
    assert r.kept == pytest.approx(best, rel=1e-9)
    assert r.kept >= r.kept_identity


@pytest.mark.parametrize("seed", [0, 1])
def test_exhaustive_reaches_optimum_over_set_partitions_c12(seed):
    w = _scores(5, 12, seed=seed + 10)
    best = max(
        kept_score(w[:, [c for g in p for c in g]], "2:4") for p in _set_partitions(list(range(12)), 4)
    )
    r = search_permutation(w, "2:4", method="exhaustive", seed=seed, max_regressions=0, stripe_group_size=3)
    assert r.kept == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("pattern", ["1:2", "2:4", "1:4", "2:8", "4:8", "1:8"])
def test_single_row_reaches_unstructured_bound(pattern):
    # With one row, a stripe missing one of the row's top scores can always trade with a stripe
    # holding too many, so greedy swaps reach the bound exactly.
    w = _scores(1, 64, seed=4)
    r = search_permutation(w, pattern, seed=0, max_regressions=0)
    assert r.kept == pytest.approx(r.bound, rel=1e-9)
    assert r.efficacy == pytest.approx(1.0)


@pytest.mark.parametrize("method", SEARCHES)
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "4:8", "1:8"])
def test_never_below_identity(method, pattern):
    rows, cols = (8, 32) if method == "exhaustive" else (16, 64)
    for seed, kind in [(0, "gauss"), (1, "student")]:
        w = _scores(rows, cols, seed=seed, kind=kind)
        r = search_permutation(w, pattern, method=method, seed=seed, max_regressions=3)
        _check_perm(r.perm, cols)
        assert r.kept >= r.kept_identity
        assert r.kept == pytest.approx(kept_score(w[:, r.perm], pattern), rel=1e-12)
        if method in ("greedy", "exhaustive"):
            assert r.kept > r.kept_identity


def test_degenerate_matrices_keep_identity_score():
    for w in (torch.zeros(4, 16), torch.ones(4, 16), torch.arange(16.0).repeat(3, 1)):
        for method in SEARCHES:
            r = search_permutation(w, "2:4", method=method)
            _check_perm(r.perm, 16)
            assert r.kept == pytest.approx(kept_score(w, "2:4")) or r.kept > r.kept_identity
            assert r.kept >= r.kept_identity


def test_greedy_gains_on_gaussian_and_escapes_help():
    w = _scores(64, 64, seed=7)
    plain = search_permutation(w, "2:4", seed=0, max_regressions=0)
    escaped = search_permutation(w, "2:4", seed=0, max_regressions=30)
    assert plain.kept > plain.kept_identity
    assert escaped.kept >= plain.kept
    assert escaped.regressions == 30
    assert plain.regressions == 0


def test_exhaustive_never_below_greedy():
    w = _scores(16, 32, seed=8)
    g = search_permutation(w, "2:4", seed=3, max_regressions=3)
    e = search_permutation(w, "2:4", method="exhaustive", seed=3, max_regressions=3)
    assert e.kept >= g.kept


# determinism, blocks, windows, limits -------------------------------------------------------------


@pytest.mark.parametrize("method", ["random", "greedy", "exhaustive"])
def test_same_seed_same_permutation(method):
    w = _scores(16, 64, seed=2)
    a = search_permutation(w, "2:4", method=method, seed=11, max_regressions=3, window=32)
    b = search_permutation(w, "2:4", method=method, seed=11, max_regressions=3, window=32)
    assert torch.equal(a.perm, b.perm)
    assert a.kept == b.kept and a.swaps == b.swaps


def test_different_seeds_draw_different_random_permutations():
    w = _scores(16, 96, seed=2)
    perms = {tuple(search_permutation(w, "2:4", method="random", seed=s).perm.tolist()) for s in range(4)}
    assert len(perms) > 1


@pytest.mark.parametrize(
    "c,block,pattern",
    [(64, 16, "2:4"), (48, 6, "2:4"), (64, 32, "2:8"), (60, 10, "1:4"), (96, 48, "2:4")],
)
@pytest.mark.parametrize("method", SEARCHES)
def test_block_constraint_honoured(c, block, pattern, method):
    w = _scores(12, c, seed=c + block)
    r = search_permutation(w, pattern, method=method, block=block, seed=0, max_regressions=2, window=16)
    _check_perm(r.perm, c, block)
    assert r.kept >= r.kept_identity
    if method == "greedy" and block % int(pattern.split(":")[1]) == 0:
        assert r.kept > r.kept_identity


def test_block_of_one_stripe_cannot_move_anything():
    w = _scores(8, 32, seed=0)
    r = search_permutation(w, "2:4", block=4, method="exhaustive")
    assert torch.equal(r.perm, torch.arange(32))
    assert r.kept == r.kept_identity
    assert r.info["skipped"] == "no block of 4 channels holds 2 whole stripes of 4"


def test_exhaustive_reports_why_m8_groups_are_skipped_by_default():
    w = _scores(4, 32, seed=0)
    r = search_permutation(w, "2:8", method="exhaustive", max_regressions=0)
    assert "6435 arrangements, above the default limit 6000" in r.info["skipped"]
    forced = search_permutation(w, "2:8", method="exhaustive", max_regressions=0, stripe_group_size=2)
    assert "skipped" not in forced.info
    assert forced.kept >= r.kept


def test_windows_smaller_than_group_still_search_everything():
    w = _scores(16, 128, seed=6)
    small = search_permutation(w, "2:4", seed=0, window=16, max_regressions=0)
    _check_perm(small.perm, 128)
    assert small.kept > small.kept_identity
    assert small.info["sweeps"] >= 2  # several random window draws


def test_time_limit_returns_best_so_far():
    w = _scores(64, 256, seed=0)
    r = search_permutation(w, "2:4", time_limit=0.0)
    _check_perm(r.perm, 256)
    assert r.kept >= r.kept_identity
    assert r.seconds < 5.0


def test_progress_bar_with_and_without_tqdm(monkeypatch, capsys):
    w = _scores(8, 32, seed=0)
    with_bar = search_permutation(w, "2:4", progress=True)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    without = search_permutation(w, "2:4", progress=True)
    assert torch.equal(with_bar.perm, without.perm)


def test_threads_are_restored_and_do_not_change_the_result():
    w = _scores(16, 64, seed=3)
    before = torch.get_num_threads()
    one = search_permutation(w, "2:4", threads=1, max_regressions=5)
    assert torch.get_num_threads() == before
    default = search_permutation(w, "2:4", max_regressions=5)
    assert torch.equal(one.perm, default.perm)
    with pytest.raises(PlanError, match=r"threads must be 'auto', None or an int >= 1"):
        search_permutation(w, "2:4", threads=0)


def test_float64_input_and_explicit_device():
    w = _scores(8, 32, seed=0).double()
    r = search_permutation(w, "2:4", device="cpu")
    assert r.perm.device.type == "cpu"
    assert r.kept == pytest.approx(kept_score(w[:, r.perm], "2:4"), rel=1e-12)


@pytest.mark.gpu
def test_runs_on_cuda_tensors():
    w = _scores(32, 128, seed=0)
    cpu = search_permutation(w, "2:4", seed=0)
    gpu = search_permutation(w.cuda(), "2:4", seed=0)
    assert gpu.perm.device.type == "cuda"
    assert gpu.kept == pytest.approx(kept_score(w[:, gpu.perm.cpu()], "2:4"), rel=1e-9)
    assert gpu.kept >= cpu.kept_identity


# errors -----------------------------------------------------------------------------------------


def test_errors_name_shape_method_and_fix():
    with pytest.raises(ShapeError, match=r"shape \(4, 10\) has 10 channels, not a positive multiple of M=4"):
        search_permutation(torch.rand(4, 10), "2:4")
    with pytest.raises(ShapeError, match=r"2-D score matrix"):
        search_permutation(torch.rand(16), "2:4")
    with pytest.raises(ShapeError, match="NaN"):
        search_permutation(torch.full((2, 8), math.nan), "2:4")
    with pytest.raises(PlanError, match=r"unknown permutation search method 'fast'.*'none', 'random', 'greedy', 'exhaustive'"):
        search_permutation(torch.rand(4, 8), "2:4", method="fast")
    with pytest.raises(ShapeError, match=r"block=5 does not split the 16 channels"):
        search_permutation(torch.rand(4, 16), "2:4", block=5)
    with pytest.raises(PlanError, match="stripe_group_size=4 with pattern 2:4 means"):
        search_permutation(torch.rand(4, 16), "2:4", method="exhaustive", stripe_group_size=4)
    with pytest.raises(PlanError, match="time_limit"):
        search_permutation(torch.rand(4, 16), "2:4", time_limit=-1)
    with pytest.raises(PlanError, match="max_regressions must be None or an int >= 0"):
        search_permutation(torch.rand(4, 16), "2:4", max_regressions=-2)
    with pytest.raises(PlanError, match=r"window=4 must be an int >= 2\*M = 8"):
        search_permutation(torch.rand(4, 16), "2:4", window=4)
    with pytest.raises(ShapeError, match="not a positive multiple"):
        kept_score(torch.rand(3, 6), "2:4")

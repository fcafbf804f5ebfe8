"""Permutation search quality and speed: kept magnitude after N:M pruning, efficacy, seconds.

    python benchmarks/permutation_search.py            # full table (about 4 minutes on 2 CPU cores)
    python benchmarks/permutation_search.py --quick    # under a minute, for CI-like use
    python benchmarks/permutation_search.py --converge --log  # 4096x4096 greedy to convergence (minutes)
    python benchmarks/permutation_search.py --seeds 8  # 256x256 2:4 greedy on 8 matrix seeds
    python benchmarks/permutation_search.py --optimum  # exact optimum vs rows, 8-16 channels (minutes)

Every matrix is seeded (i.i.d. |N(0, 1)| unless marked Student-t, |t(3)|). "kept %" is the share of
the total magnitude that N:M pruning keeps, "gain %" the relative kept gain over the identity,
"efficacy %" is (kept - identity) / (unstructured bound - identity). Seconds are the median of
``--repeats`` runs of the same (deterministic) search; "CPU s" is the process CPU time of the same
runs (on a shared machine, wall-clock seconds include time spent waiting for a core). The baseline
rows of each matrix, measured in the same run, are the identity ("none") and the best of 16 random
permutations ("random"); the full table also times a plain greedy swap search (one swap per
round, whole gain table recomputed each round) to show what the batched rounds and incremental
tables buy.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time

import torch

from nmgraph.pattern import Pattern
from nmgraph.search.kernels import distinct_partitions
from nmgraph.search.permutation import kept_score, search_permutation, unstructured_bound


def make_matrix(rows: int, cols: int, seed: int, kind: str = "gauss") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(rows, cols, generator=g).abs()
    if kind == "student":
        # t(3) = N(0,1) / sqrt(chi2(3) / 3), drawn from the seeded generator
        z = torch.randn(rows, cols, generator=g)
        chi2 = torch.randn(3, rows, cols, generator=g).pow(2).sum(0)
        return (z / (chi2 / 3).sqrt()).abs()
    raise ValueError(kind)


def plain_greedy(matrix: torch.Tensor, pattern: str, time_limit: float) -> tuple[torch.Tensor, float]:
    """Reference: one best swap per round, whole gain table recomputed with cdist every round."""
    p = Pattern.parse(pattern)
    n, m = p.n, p.m
    r, c = matrix.shape
    perm = torch.arange(c)
    same = (torch.arange(c) // m).unsqueeze(0) == (torch.arange(c) // m).unsqueeze(1)
    start = time.perf_counter()
    while time.perf_counter() - start < time_limit:
        x = matrix[:, perm]
        v = x.view(r, c // m, m)
        s = v.sort(dim=2, descending=True).values
        rank = v.argsort(dim=2, descending=True).argsort(dim=2)
        thr = torch.where(rank < n, s[..., n : n + 1], s[..., n - 1 : n]).reshape(r, c)
        xt, tt = x.t().contiguous(), thr.t().contiguous()
        table = 0.5 * (xt.sum(1).unsqueeze(0) + tt.sum(1).unsqueeze(1) + torch.cdist(tt, xt, p=1))
        d = table.diagonal()
        gain = (table - d.unsqueeze(1)) + (table - d.unsqueeze(1)).t()
        gain[same] = -float("inf")
        best = int(gain.argmax())
        if float(gain.flatten()[best]) <= 1e-5 * float(d.mean()):
            break
        i, j = divmod(best, c)
        perm[[i, j]] = perm[[j, i]]
    return perm, time.perf_counter() - start


def run_case(rows, cols, pattern, method, *, kind="gauss", seed=0, repeats=1, **kwargs):
    w = make_matrix(rows, cols, seed, kind)
    times, cpu, result = [], [], None
    for _ in range(repeats):
        c0 = time.process_time()
        result = search_permutation(w, pattern, method=method, seed=0, **kwargs)
        cpu.append(time.process_time() - c0)
        times.append(result.seconds)
    assert result.kept >= result.kept_identity
    assert abs(kept_score(w[:, result.perm], pattern) - result.kept) <= 1e-9 * result.kept
    label = method
    if kwargs.get("max_regressions") == 0:
        label += " (no escapes)"
    elif kwargs.get("max_regressions") is not None:
        label += f" ({kwargs['max_regressions']} escapes)"
    if kwargs.get("time_limit") is not None:
        label += f" (limit {kwargs['time_limit']:g}s)"
    return {
        "shape": f"{rows}x{cols}" + (" t(3)" if kind == "student" else ""),
        "pattern": pattern,
        "method": label,
        "kept": 100 * result.kept / result.total,
        "gain": 100 * result.gain,
        "efficacy": 100 * result.efficacy,
        "seconds": statistics.median(times),
        "cpu": statistics.median(cpu),
    }


def run_plain(rows, cols, pattern, *, seed=0, time_limit=120.0):
    w = make_matrix(rows, cols, seed)
    c0 = time.process_time()
    perm, seconds = plain_greedy(w, pattern, time_limit)
    cpu = time.process_time() - c0
    ident, kept, bound = kept_score(w, pattern), kept_score(w[:, perm], pattern), unstructured_bound(w, pattern)
    return {
        "shape": f"{rows}x{cols}",
        "pattern": pattern,
        "method": "plain greedy (reference)",
        "kept": 100 * kept / float(w.double().sum()),
        "gain": 100 * (kept / ident - 1),
        "efficacy": 100 * (kept - ident) / (bound - ident),
        "seconds": seconds,
        "cpu": cpu,
    }


def optimum_table(cols_list=(8, 12, 16), rows_list=(16, 64, 256, 1024, 4096), seeds=5) -> None:
    """Efficacy of the exact optimum (every distinct partition of the columns into stripes of 4).

    For a fixed channel count, this is the best any permutation can do; printed against the number
    of rows it shows how the reachable efficacy itself falls as rows grow.
    """
    print(f"| {'channels':>8} | {'rows':>6} | {'optimum efficacy %':>18} | {'greedy efficacy %':>17} | {'partitions':>10} |")
    print(f"|{'-' * 10}|{'-' * 8}|{'-' * 20}|{'-' * 19}|{'-' * 12}|")
    for cols in cols_list:
        subsets, parts = distinct_partitions(4, cols // 4)
        for rows in rows_list:
            opt, greedy = [], []
            for seed in range(seeds):
                w = make_matrix(rows, cols, seed).double()
                # kept score of every 4-subset: sum over rows of its top 2
                kept_sub = w[:, subsets].topk(2, dim=2).values.sum(dim=(0, 2))
                best = float(kept_sub[parts].sum(1).max())
                ident, bound = kept_score(w, "2:4"), unstructured_bound(w, "2:4")
                opt.append((best - ident) / (bound - ident))
                greedy.append(search_permutation(w.float(), "2:4", method="greedy", seed=0).efficacy)
            print(
                f"| {cols:>8} | {rows:>6} | {100 * statistics.mean(opt):18.2f} | {100 * statistics.mean(greedy):17.2f} "
                f"| {parts.shape[0]:>10} |",
                flush=True,
            )


HEAD = (
    f"| {'shape':<16} | {'pattern':<7} | {'method':<30} | {'kept %':>8} | {'gain %':>8} | {'efficacy %':>10} "
    f"| {'seconds':>8} | {'CPU s':>8} |"
)


def format_row(r) -> str:
    return (
        f"| {r['shape']:<16} | {r['pattern']:<7} | {r['method']:<30} | {r['kept']:8.3f} | {r['gain']:+8.3f} | "
        f"{r['efficacy']:10.2f} | {r['seconds']:8.2f} | {r['cpu']:8.2f} |"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small table, under a minute")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats per case (median)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads for the run (default 1, see docs)"
    )
    ap.add_argument(
        "--converge", action="store_true", help="only 4096x4096 2:4 greedy, no escapes, no time limit"
    )
    ap.add_argument("--log", action="store_true", help="log every sweep of the search to stderr")
    ap.add_argument("--seeds", type=int, default=0, help="only 256x256 2:4 greedy on this many matrix seeds")
    ap.add_argument(
        "--optimum", action="store_true", help="exact optimum efficacy against rows for 8, 12 and 16 channels"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.log:
        logging.basicConfig(format="%(relativeCreated)8.0fms %(message)s")
        logging.getLogger("nmgraph.search.permutation").setLevel(logging.DEBUG)
    repeats = args.repeats or (1 if args.quick else 3)
    print(
        f"# nmgraph permutation search | torch {torch.__version__} | {platform.processor() or platform.machine()} "
        f"| {os.cpu_count()} CPUs | torch threads {torch.get_num_threads()} | repeats {repeats}"
    )
    start = time.perf_counter()
    if args.optimum:
        optimum_table()
        print(f"# total {time.perf_counter() - start:.1f}s")
        return 0
    cases = []
    if args.converge:
        cases += [(4096, 4096, "2:4", "greedy", {"max_regressions": 0})]
    elif args.seeds:
        cases += [(256, 256, "2:4", "greedy", {"seed": k}) for k in range(args.seeds)]
    elif args.quick:
        cases += [
            (256, 256, "2:4", "none", {}),
            (256, 256, "2:4", "random", {}),
            (256, 256, "2:4", "greedy", {"max_regressions": 0}),
            (256, 256, "2:4", "greedy", {}),
            (256, 256, "2:4", "exhaustive", {"time_limit": 5.0}),
            (128, 128, "1:4", "greedy", {}),
            (128, 128, "2:8", "greedy", {}),
            (128, 128, "2:4", "greedy", {"kind": "student"}),
            (1024, 1024, "2:4", "greedy", {"time_limit": 10.0}),
        ]
    else:
        cases += [
            (256, 256, "2:4", "none", {}),
            (256, 256, "2:4", "random", {}),
            ("plain", 256, 256, "2:4"),
            (256, 256, "2:4", "greedy", {"max_regressions": 0}),
            (256, 256, "2:4", "greedy", {}),
            (256, 256, "2:4", "greedy", {"max_regressions": 300}),
            (256, 256, "2:4", "exhaustive", {}),
        ]
        for pattern in ("1:4", "2:8", "4:8", "1:8"):
            cases += [(256, 256, pattern, "random", {}), (256, 256, pattern, "greedy", {})]
        cases += [
            (256, 256, "1:4", "exhaustive", {}),
            (256, 256, "2:4", "random", {"kind": "student"}),
            (256, 256, "2:4", "greedy", {"kind": "student"}),
            (256, 256, "2:4", "exhaustive", {"kind": "student"}),
            (1024, 256, "2:4", "greedy", {}),
            (4096, 256, "2:4", "greedy", {}),
            (256, 4096, "2:4", "greedy", {"time_limit": 55.0}),
            (4096, 4096, "2:4", "none", {}),
            (4096, 4096, "2:4", "greedy", {"time_limit": 55.0}),
        ]
    rows = []
    print(HEAD)
    print("|" + "|".join("-" * len(col) for col in HEAD.split("|")[1:-1]) + "|")
    for case in cases:
        if case[0] == "plain":
            rows.append(run_plain(*case[1:]))
        else:
            r, c, pattern, method, kw = case
            kw = dict(kw)
            kind = kw.pop("kind", "gauss")
            seed = kw.pop("seed", 0)
            big = r * c >= 1 << 20
            rows.append(run_case(r, c, pattern, method, kind=kind, seed=seed, repeats=1 if big else repeats, **kw))
            if seed:
                rows[-1]["shape"] += f" seed {seed}"
        print(format_row(rows[-1]), flush=True)
    print(f"# total {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

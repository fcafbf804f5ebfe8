"""Time budgets of ``nmgraph.permute``: does ``time_limit`` bound the whole call, and what does the
default budget come to?

Usage:

    python benchmarks/permute_budget.py            # 4096x4096 with time_limit=5, default budgets
    python benchmarks/permute_budget.py --quick    # 2048 channels, one repeat

Cases (wall time of the call itself: import, model building and capture excluded; median of
``--repeat`` runs, each on a fresh capture):

1. ``permute(gm, plan, time_limit=T)`` on an MLP whose hidden group is read by one 4096x4096 weight
   (the case of issue 13: the kept-magnitude tables, the acceptance forwards, the verification and
   the search's overshoot must all fit in ``T``);
2. the same with ``time_limit=None``: the default budget (``report.time_limit``) and the wall time;
3. ``nmgraph.compile`` and ``nmgraph.prepare`` of a 4-layer Llama built from a config (random
   weights, nothing downloaded) with their default budgets: the first call's wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nmgraph  # noqa: E402


def _mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 16)).eval()


def permute_case(width: int, time_limit: float | None, repeat: int, accept: str = "error") -> dict:
    walls, reports = [], []
    for _ in range(repeat):
        model = _mlp(width)
        gm = nmgraph.capture(model, (torch.randn(8, 64),))
        plan = nmgraph.analyze(gm, "2:4")
        start = time.perf_counter()
        rep = nmgraph.permute(gm, plan, time_limit=time_limit, accept=accept)
        walls.append(time.perf_counter() - start)
        reports.append(rep)
    rep = reports[walls.index(statistics.median_low(walls))]
    return {"case": f"permute {width}x{width} accept={accept}", "time_limit": time_limit, "budget": rep.time_limit,
            "wall_median": statistics.median(walls), "wall_max": max(walls),
            "over_budget": statistics.median(walls) / rep.time_limit - 1.0,
            "groups": {g: str(d) for g, d in rep.groups.items()}}


def llama_case(which: str) -> dict:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                                   use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 1024, (2, 64))
    start = time.perf_counter()
    if which == "compile":
        fast = nmgraph.compile(model, "2:4")
        fast(ids)
        rep = fast.report.permute
    else:
        gm = nmgraph.prepare(model, (ids,), "2:4")
        rep = nmgraph.graph_record(gm).permuted
    wall = time.perf_counter() - start
    return {"case": f"{which} llama 4x256", "budget": rep.time_limit, "permute_seconds": rep.seconds,
            "wall_first_call": wall, "groups_kept": len(rep.permuted), "groups_searched": len(rep.groups)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=5.0)
    a = ap.parse_args(argv)
    width = 2048 if a.quick else 4096
    repeat = 1 if a.quick else a.repeat
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, nmgraph {nmgraph.__version__}")
    for row in (permute_case(width, a.time_limit, repeat), permute_case(width, a.time_limit, repeat, "magnitude"),
                permute_case(width, None, 1)):
        print(row, flush=True)
    if not a.quick:
        for which in ("compile", "prepare"):
            print(llama_case(which))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-call overhead of nmgraph.compile on CPU: dense eager vs the lowered graph vs inductor.

On a CPU every layer keeps its folded dense weight (no CPU sparse speedup), so this measures only the
pipeline's own cost. With no GEMM lowered, ``nmgraph.compile`` calls the model's own forward (its
weights are the pruned ones); the lowered graph itself, which runs when some GEMM is lowered, runs its
aten nodes one by one in Python; ``inductor=True`` compiles it. Usage: python benchmarks/compile_overhead.py [--repeats 300]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

import torch
from _timing import interleaved_median_ms

import nmgraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=300)
    a = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from tests import hf_models

    torch.set_num_threads(1)
    model, args = hf_models.llama(kv_heads=2)
    dense = copy.deepcopy(model)
    fast = nmgraph.compile(copy.deepcopy(model), "2:4", permute=False)
    fast_inductor = nmgraph.compile(model, "2:4", permute=False, inductor=True)
    with torch.no_grad():
        fast(*args)
        fast_inductor(*args)
        graph = next(iter(fast.report.lowerings.values())).gm  # the lowered graph, run node by node
        cpu = torch.device("cpu")
        ms = interleaved_median_ms(
            {
                "dense": lambda: dense(*args),
                "compile": lambda: fast(*args),
                "graph": lambda: graph(*args),
                "inductor": lambda: fast_inductor(*args),
            },
            cpu,
            reps=a.repeats,
            warmup=20,
        )
    d = ms["dense"]
    print(f"tiny Llama (2 layers, 64 hidden), batch 2 x 8 tokens, 1 thread, median of {a.repeats}, calls interleaved")
    print(f"dense eager                  {d:7.3f} ms  1.00x")
    print(f"nmgraph.compile              {ms['compile']:7.3f} ms  {d / ms['compile']:.2f}x  (runs: {fast.report.runs})")
    print(f"its lowered graph, as FX     {ms['graph']:7.3f} ms  {d / ms['graph']:.2f}x")
    print(f"nmgraph.compile(inductor=1)  {ms['inductor']:7.3f} ms  {d / ms['inductor']:.2f}x")

if __name__ == "__main__":
    main()

"""Time nmgraph.analyze on a 12-layer BERT-base (768 hidden, random init from a config).

Usage: python benchmarks/analyze.py [--layers 12] [--repeats 5]
Prints the median of repeated runs of capture and of analyze (analyze alone is the goal: < 10 s).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

import nmgraph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 layers, 2 repeats (smoke run)")
    a = ap.parse_args()
    if a.quick:
        a.layers, a.repeats = 2, 2
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    cfg = transformers.BertConfig(num_hidden_layers=a.layers, hidden_size=768, num_attention_heads=12,
                                  intermediate_size=3072, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    args = (torch.randint(0, cfg.vocab_size, (1, 128)),)
    t = time.perf_counter()
    gm = nmgraph.capture(model, args)
    capture_s = time.perf_counter() - t
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        plan = nmgraph.analyze(gm, "2:4")
        times.append(time.perf_counter() - t)
    print(f"BERT-base-like ({a.layers} layers, 768 hidden): {len(gm.graph.nodes)} nodes")
    print(f"capture (torch.export, once): {capture_s:.2f} s")
    print(f"analyze median of {a.repeats}: {statistics.median(times):.3f} s "
          f"(min {min(times):.3f}, max {max(times):.3f})")
    print(f"{len(plan.layers)} eligible, {len(plan.skipped)} dense, {len(plan.groups)} groups, "
          f"{plan.permutable_fraction:.0%} permutable")


if __name__ == "__main__":
    main()

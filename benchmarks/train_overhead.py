"""Training-step overhead of nmgraph's mask nodes: SR-STE step time / dense step time.

Model: BERT-small (4 layers, hidden 512, 8 heads, FFN 2048, vocab 30522) for sequence
classification, random weights from a config, batch 8 x 128 tokens, AdamW. One step is forward,
cross-entropy, backward, optimizer step and (for the sparse graph) ``SparsityCallback.step()``, which
recomputes every 2:4 mask from the weights (``update_interval=1``, the most expensive setting).

Measured, interleaved step by step so that load on a shared machine affects every variant alike:

* ``eager``: the HF model itself;
* ``graph``: the captured graph (``nmgraph.capture``) without masks, the baseline of the ratio;
* ``sr-ste``: ``nmgraph.prepare(..., method="sr-ste")`` plus the callback;
* ``sr-ste (no update)``: the same graph with ``update_interval`` = huge, so the mask update cost
  can be read off separately.

    python benchmarks/train_overhead.py               # 20 measured steps each (2 warm-up)
    python benchmarks/train_overhead.py --quick       # 6 measured steps each, smaller batch
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import torch.nn.functional as F

import nmgraph
from nmgraph.training import SparsityCallback, prepare


def build(args):
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=30522, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
        intermediate_size=2048, max_position_embeddings=512, num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    return model, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch = 6, 4
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    model, ids = build(args)
    labels = torch.randint(0, 2, (args.batch,))
    graph = nmgraph.capture(model, (ids,))
    sparse = prepare(model, (ids,), args.pattern, method="sr-ste", permute=False)
    cb = SparsityCallback(sparse)
    # a second prepared graph of the same model whose masks are never recomputed
    frozen = prepare(model, (ids,), args.pattern, method="sr-ste", permute=False, update_interval=10**9)
    cb_frozen = SparsityCallback(frozen)
    n_masked = len(nmgraph.graph_record(sparse).prepared.masked)
    masked_params = sum(model.get_parameter(n).numel() for n in nmgraph.graph_record(sparse).prepared.masked)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def logits(out):
        return out.logits if hasattr(out, "logits") else out[0]

    def step(net, callback=None):
        t0 = time.perf_counter()
        loss = F.cross_entropy(logits(net(ids)), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if callback is not None:
            callback.step()
        return time.perf_counter() - t0

    variants = {
        "eager": lambda: step(model),
        "graph": lambda: step(graph),
        "sr-ste": lambda: step(sparse, cb),
        "sr-ste (no update)": lambda: step(frozen, cb_frozen),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.warmup + args.steps):
        for name, fn in variants.items():
            t = fn()
            if i >= args.warmup:
                times[name].append(t)
    # the callback alone (mask recomputation), measured separately
    cb_times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        cb.step()
        cb_times.append(time.perf_counter() - t0)

    base = statistics.median(times["graph"])
    print(f"BERT-small train step, batch {args.batch} x {args.seq}, {args.threads} thread(s), "
          f"{n_masked} weights ({masked_params / 1e6:.1f} M params) masked {args.pattern}, "
          f"median of {args.steps} steps")
    print(f"{'variant':<22} {'median ms':>10} {'min ms':>8} {'/ graph':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<22} {1e3 * med:>10.1f} {1e3 * min(ts):>8.1f} {med / base:>8.3f}")
    print(f"{'mask update only':<22} {1e3 * statistics.median(cb_times):>10.1f} {1e3 * min(cb_times):>8.1f} "
          f"{statistics.median(cb_times) / base:>8.3f}")
    print(f"\nSR-STE / dense graph step time: {statistics.median(times['sr-ste']) / base:.3f} (goal <= 1.15)")


if __name__ == "__main__":
    main()

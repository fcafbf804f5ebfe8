"""N:M sparse training of a small character-level transformer LM on text that ships with Python.

The corpus is the source of the Python standard library's top-level modules (``*.py`` next to
``os.py``), read in sorted order as ASCII bytes; nothing is downloaded. The first 90% is the
training text, the last 10% the validation text. Every run trains the same model for the same
number of steps; a sparse run wraps it with :func:`nmgraph.prepare`, advances the schedule with
:class:`nmgraph.training.SparsityCallback`, evaluates with the hard N:M mask and checks that
:func:`nmgraph.convert` gives exactly N:M weights with the same validation loss.

    python examples/train_tiny_lm.py --smoke                  # a few steps, one run per method
    python examples/train_tiny_lm.py --out results.json       # the table of docs/results.md

Methods: ``dense``; ``fixed`` (ASP recipe: dense first half, mask chosen once by magnitude, then
held); ``ste``, ``sr-ste``, ``mdgf-exp``, ``sdgf-step`` (sparse from the first step, last 10% of the
steps a hard-mask fine-tune). Validation loss is reported in bits per character.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import nmgraph
from nmgraph.training import SparsityCallback, convert, prepare

VOCAB = 128
METHODS = ("dense", "fixed", "ste", "sr-ste", "mdgf-exp", "sdgf-step")
PATTERNS = ("2:4", "1:4", "1:8", "1:16")


def load_corpus(max_chars: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    chunks, total = [], 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_chars:
            break
    raw = b"".join(chunks)[:max_chars]
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    ids[ids >= VOCAB] = ord("?")
    split = int(0.9 * len(ids))
    info = {"python": platform.python_version(), "files": len(chunks), "chars": len(ids),
            "first_file": os.path.basename(files[0]), "last_file": os.path.basename(chunks and files[len(chunks) - 1])}
    return ids[:split], ids[split:], info


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, ffn)
        self.down = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, ffn: int = 256, context: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def batch(data: torch.Tensor, size: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - context - 1, (size,), generator=gen)
    x = torch.stack([data[s : s + context] for s in starts])
    y = torch.stack([data[s + 1 : s + 1 + context] for s in starts])
    return x, y


@torch.no_grad()
def bits_per_char(net: nn.Module, val: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    total = 0.0
    for x, y in val:
        total += F.cross_entropy(net(x).flatten(0, 1), y.flatten()).item()
    return total / len(val) / math.log(2)


def schedule_for(method: str, steps: int) -> dict:
    if method == "fixed":
        return {"total_steps": steps, "warmup": 0.5}
    return {"total_steps": steps, "finetune": 0.1}


def run(method: str, pattern: str, seed: int, args, train, val_batches) -> dict:
    torch.manual_seed(seed)
    model = TinyLM(args.d, args.layers, args.heads, args.ffn, args.context)
    gen = torch.Generator().manual_seed(1000 + seed)
    x0, _ = batch(train, args.batch, args.context, gen)
    cb = None
    net: nn.Module = model
    if method != "dense":
        net = prepare(model, (x0,), pattern, method=method, permute=False, **schedule_for(method, args.steps))
        cb = SparsityCallback(net)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps))))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        x, y = batch(train, args.batch, args.context, gen)
        loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if cb is not None:
            cb.step()
    seconds = time.perf_counter() - t0
    net.eval()
    bpc = bits_per_char(net, val_batches)
    result = {"method": method, "pattern": pattern if method != "dense" else "-", "seed": seed,
              "val_bpc": bpc, "train_loss": loss.item(), "seconds": seconds}
    if method != "dense":
        masked = nmgraph.graph_record(net).prepared.masked
        convert(net)
        assert all(nmgraph.is_nm(model.get_parameter(n), pattern) for n in masked)
        after = bits_per_char(net, val_batches)
        if after != bpc:
            raise AssertionError(f"{method} {pattern}: converted model gives {after} bpc, hard-mask eval {bpc}")
        result["masked_weights"] = len(masked)
    return result


def table(results: list[dict]) -> str:
    groups: dict[tuple[str, str], list[float]] = {}
    for r in results:
        groups.setdefault((r["method"], r["pattern"]), []).append(r["val_bpc"])
    patterns = sorted({p for _, p in groups if p != "-"}, key=lambda p: PATTERNS.index(p) if p in PATTERNS else 99)
    lines = ["| method | " + " | ".join(patterns) + " |", "|---|" + "---|" * len(patterns)]
    for method in METHODS:
        if method == "dense" and ("dense", "-") in groups:
            v = groups[("dense", "-")]
            cell = _fmt(v)
            lines.append("| dense | " + " | ".join(cell for _ in patterns) + " |")
            continue
        if not any((method, p) in groups for p in patterns):
            continue
        lines.append(f"| {method} | " + " | ".join(_fmt(groups.get((method, p), [])) for p in patterns) + " |")
    return "\n".join(lines)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5e-2)
    ap.add_argument("--chars", type=int, default=2_000_000)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine more threads run slower)")
    ap.add_argument("--out", default=None, help="write every run's result to this JSON file")
    ap.add_argument("--smoke", action="store_true", help="a few steps, one seed, small corpus, for tests")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.chars, args.val_batches = 6, 1, 200_000, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    train, val, info = load_corpus(args.chars)
    print(f"corpus: {info['chars']} chars from {info['files']} stdlib files (Python {info['python']}); "
          f"train {len(train)}, val {len(val)}")
    vgen = torch.Generator().manual_seed(12345)
    val_batches = [batch(val, args.batch, args.context, vgen) for _ in range(args.val_batches)]
    methods = [m for m in args.methods.split(",") if m]
    patterns = [p for p in args.patterns.split(",") if p]
    results = []
    t_start = time.perf_counter()
    for seed in range(args.seeds):
        for method in methods:
            for pattern in (patterns if method != "dense" else ["-"]):
                r = run(method, pattern, seed, args, train, val_batches)
                results.append(r)
                print(f"{method:>10} {r['pattern']:>5} seed {seed}: val {r['val_bpc']:.4f} bpc "
                      f"({r['seconds']:.1f} s)", flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump({"args": vars(args), "corpus": info, "results": results}, f, indent=1)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

"""One-shot N:M pruning of a small trained byte-level LM: what each method costs in bits per byte.

A small Llama (transformers' ``LlamaForCausalLM`` from a config, vocabulary of 256 bytes) is trained on
CPU on the source of the Python standard library (the ``*.py`` files next to ``os.py``, sorted, first
90 % train, last 10 % validation; nothing is downloaded), seeded, and cached under
``out/oneshot_cache/`` (gitignored). Then every eligible weight (the decoder's Linear layers; the
embedding and the output head stay dense) is made N:M by :func:`nmgraph.sparsify` with each method,
with and without channel permutation, on 128 calibration windows of the training text (8 more held
out for the report's output change and loss, by which a permutation is kept or not; the windows carry
their labels), and the validation bits per byte are measured.

    python benchmarks/oneshot.py                       # the table of docs/results.md (2 seeds)
    python benchmarks/oneshot.py --quick               # a few training steps, every method once (a test)
    python benchmarks/oneshot.py --scale               # nmgraph.sparsify of a 1.1B Llama-shaped model
    python benchmarks/oneshot.py --scale --layers 4    # the same shape with 4 decoder layers
    python benchmarks/oneshot.py --memory              # peak activation memory against depth

``--scale`` builds the 1.1B-parameter Llama shape (hidden 2048, 22 layers, intermediate 5632, 32 heads,
4 KV heads, vocabulary 32000) with random bf16 weights on CPU and runs ``sparsify`` with
``method="magnitude"`` and ``"sparsegpt"`` (36 sequences of 128 random tokens: 32 for calibration,
4 held out), each in its own process, reporting wall time against the time limit and peak resident
memory against the weight bytes.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

import nmgraph

CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out", "oneshot_cache")
VARIANTS = (  # (name, method, permute)
    ("magnitude", "magnitude", False),
    ("magnitude+perm", "magnitude", True),
    ("wanda", "wanda", False),
    ("wanda+perm", "wanda", True),
    ("sparsegpt", "sparsegpt", False),
    ("sparsegpt+perm", "sparsegpt", True),
)
ONE_FOUR = ("magnitude", "sparsegpt")  # the two variants also measured at 1:4


# ------------------------------------------------------------------------------------------------
# data and model
# ------------------------------------------------------------------------------------------------


def load_corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    chunks, total = [], 0
    for path in files:
        with open(path, "rb") as f:
            chunks.append(f.read())
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    raw = b"".join(chunks)[:max_bytes]
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    split = int(0.9 * len(ids))
    info = {"python": platform.python_version(), "files": len(chunks), "bytes": len(ids),
            "first_file": os.path.basename(files[0]), "last_file": os.path.basename(files[len(chunks) - 1])}
    return ids[:split], ids[split:], info


def windows(data: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length - 1, (count,), generator=g)
    return torch.stack([data[s : s + length + 1] for s in starts])  # one extra byte: the next-byte target


def build(args, seed: int):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.ffn, max_position_embeddings=args.context,
        use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


@torch.no_grad()
def bits_per_byte(model, val: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val), batch):
        w = val[i : i + batch]
        logits = model(input_ids=w[:, :-1]).logits.float()
        total += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        count += w[:, 1:].numel()
    return total / count / math.log(2)


def train(args, seed: int, train_data: torch.Tensor, val: torch.Tensor):
    key = f"llama_h{args.hidden}_l{args.layers}_f{args.ffn}_c{args.context}_s{args.steps}_b{args.batch}_seed{seed}"
    path = os.path.join(CACHE, key + ".pt")
    model = build(args, seed)
    if os.path.exists(path) and not args.quick:
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        return model.eval(), state["info"]
    gen = torch.Generator().manual_seed(1000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps))))
    model.train()
    t0 = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(args.steps):
        starts = torch.randint(0, len(train_data) - args.context - 1, (args.batch,), generator=gen)
        x = torch.stack([train_data[s : s + args.context + 1] for s in starts])
        loss = F.cross_entropy(model(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    info = {"train_seconds": time.perf_counter() - t0, "train_loss": float(loss.detach()), "steps": args.steps,
            "params": sum(p.numel() for p in model.parameters())}
    model.eval()
    info["val_bpb"] = bits_per_byte(model, val)  # the fixed validation windows
    if not args.quick:
        os.makedirs(CACHE, exist_ok=True)
        torch.save({"model": model.state_dict(), "info": info}, path)
    return model, info


# ------------------------------------------------------------------------------------------------
# the quality table
# ------------------------------------------------------------------------------------------------


def run_table(args) -> dict:
    train_data, val_data, corpus = load_corpus(args.bytes)
    val = windows(val_data, args.val_windows, args.context, seed=12345)
    print(f"corpus: {corpus['bytes']} bytes from {corpus['files']} stdlib files (Python {corpus['python']})")
    patterns = args.patterns.split(",")
    results = []
    for seed in range(args.seeds):
        dense, info = train(args, seed, train_data, val)
        dense_bpb = bits_per_byte(dense, val)
        print(f"seed {seed}: dense {dense_bpb:.4f} bpb ({info['params']:,} parameters, trained in "
              f"{info['train_seconds']:.0f} s)", flush=True)
        results.append({"seed": seed, "variant": "dense", "pattern": "-", "bpb": dense_bpb, "seconds": 0.0})
        cal_windows = windows(train_data, args.calibration + args.holdout, args.context, seed=777 + seed)
        # one sample per window, with labels: the model returns its loss, which the report gives and by which
        # sparsify decides whether to keep a permutation
        calibration = [{"input_ids": w[:-1].unsqueeze(0), "labels": w[:-1].unsqueeze(0)} for w in cal_windows]
        for pattern in patterns:
            for name, method, permute in VARIANTS:
                if pattern == "1:4" and name not in ONE_FOUR:
                    continue
                if args.only and name not in args.only.split(","):
                    continue
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                report = nmgraph.sparsify(model, pattern, method=method, calibration=calibration, permute=permute,
                                          holdout=args.holdout, time_limit=args.time_limit, seed=seed,
                                          progress=False)
                seconds = time.perf_counter() - t0
                ok = all(nmgraph.is_nm(model.get_parameter(x.name), pattern, axis=x.axis) for x in report.layers)
                if not ok:
                    raise AssertionError(f"{name} {pattern}: a pruned weight is not {pattern}")
                bpb = bits_per_byte(model, val)
                row = {"seed": seed, "variant": name, "pattern": pattern, "bpb": bpb, "delta": bpb - dense_bpb,
                       "seconds": seconds, "output_rel_error": report.output_rel_error,
                       "layer_error": report.layer_error, "loss_dense": report.loss_dense,
                       "loss_sparse": report.loss_sparse, "permutation_gain": report.permutation_gain,
                       "stages": report.stages, "layers": len(report.layers),
                       "permutation_accepted": report.permutation_accepted,
                       "error_permuted": report.error_permuted, "error_unpermuted": report.error_unpermuted,
                       "notes": list(report.notes)}
                results.append(row)
                gain = "" if report.permutation_gain is None else f", saliency kept {report.permutation_gain:+.2%}"
                if report.permutation_accepted is not None:
                    gain += (f", permutation {'accepted' if report.permutation_accepted else 'rejected'} (held-out "
                             f"loss {report.error_permuted:.5f} with, {report.error_unpermuted:.5f} without)")
                print(f"  {pattern} {name:<15} {bpb:.4f} bpb ({bpb - dense_bpb:+.4f}) in {seconds:5.1f} s, "
                      f"output error {report.output_rel_error:.4f}{gain}", flush=True)
    out = {"args": vars(args), "corpus": corpus, "torch": torch.__version__, "platform": platform.platform(),
           "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    print()
    print(table(results, patterns))
    return out


def table(results: list[dict], patterns: list[str]) -> str:
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        cells.setdefault((r["variant"], r["pattern"]), []).append(r)
    lines = ["| variant | " + " | ".join(f"{p} bpb (+dense) | {p} s" for p in patterns) + " |",
             "|---|" + "---|---|" * len(patterns)]
    dense = [r["bpb"] for r in cells.get(("dense", "-"), [])]
    lines.append("| dense | " + " | ".join(f"{_fmt(dense)} | -" for _ in patterns) + " |")
    for name, _, _ in VARIANTS:
        row = []
        for p in patterns:
            rs = cells.get((name, p), [])
            if not rs:
                row.append("- | -")
                continue
            bpb = _fmt([r["bpb"] for r in rs])
            delta = statistics.mean(r["delta"] for r in rs)
            row.append(f"{bpb} ({delta:+.4f}) | {statistics.mean(r['seconds'] for r in rs):.0f}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


# ------------------------------------------------------------------------------------------------
# the scale measurement
# ------------------------------------------------------------------------------------------------


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def scale_one(args) -> dict:
    """One method on the 1.1B shape in this process; prints one JSON line."""
    import transformers

    t0 = time.perf_counter()
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=args.layers, num_attention_heads=32,
        num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.no_grad():
            model = transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    built = time.perf_counter() - t0
    rss_built = _rss_gib()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 32000, (args.scale_tokens,), generator=g) for _ in range(args.scale_samples + 4)]
    loads: list[float] = []
    done = threading.Event()

    def sample_load() -> None:  # the 1-minute load average while sparsify runs: how busy the shared CPU was
        while not done.wait(15.0):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    t1 = time.perf_counter()
    report = nmgraph.sparsify(model, "2:4", method=args.scale_one, calibration=calibration, holdout=4,
                              time_limit=args.scale_limit, progress=False)
    seconds = time.perf_counter() - t1
    done.set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    nm = all(nmgraph.is_nm(model.get_parameter(x.name), "2:4", axis=x.axis) for x in report.layers)
    out = {"method": args.scale_one, "layers": args.layers, "params": sum(p.numel() for p in model.parameters()),
           "weight_bytes": weight_bytes, "build_seconds": built, "rss_after_build_gib": rss_built,
           "seconds": seconds, "time_limit": args.scale_limit, "peak_rss_bytes": peak,
           "peak_over_weights": peak / weight_bytes, "exactly_nm": nm, "summary": report.summary(),
           "groups": [{"id": x.id, "size": x.size, "rows_total": x.rows_total, "rows_searched": x.rows_searched,
                       "kept_before": x.kept_before, "kept_after": x.kept_after, "applied": x.applied,
                       "seconds": x.seconds} for x in report.groups],
           "notes": list(report.notes), "permutation_accepted": report.permutation_accepted,
           "error_permuted": report.error_permuted, "error_unpermuted": report.error_unpermuted,
           "load_average_1min": {"mean": statistics.mean(loads) if loads else None, "max": max(loads, default=None),
                                 "samples": len(loads)}}
    print("RESULT " + json.dumps(out), flush=True)
    return out


def run_scale(args) -> dict:
    results = []
    for method, limit in (("magnitude", args.magnitude_limit), ("sparsegpt", args.sparsegpt_limit)):
        if args.only and method not in args.only.split(","):
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--scale-one", method, "--layers", str(args.layers),
               "--scale-limit", str(limit), "--scale-samples", str(args.scale_samples),
               "--scale-tokens", str(args.scale_tokens), "--threads", str(args.threads)]
        print("$ " + " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"{method}: the scale run failed (exit {proc.returncode})")
        r = json.loads(line[len("RESULT "):])
        results.append(r)
        s = r["summary"]
        print(f"{method}: {r['seconds']:.0f} s of {limit:.0f} s ({r['seconds'] / limit:.2f}), peak RSS "
              f"{r['peak_rss_bytes'] / 2**30:.2f} GiB = {r['peak_over_weights']:.2f}x the weights "
              f"({r['weight_bytes'] / 2**30:.2f} GiB); exactly 2:4: {r['exactly_nm']}; output error "
              f"{s['output_rel_error']:.4f}; stages {', '.join(f'{k} {v:.0f}' for k, v in s['stages'].items())}; "
              f"load average {r.get('load_average_1min')}; permutation accepted: {r.get('permutation_accepted')}",
              flush=True)
    return {"args": vars(args), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}


def run_memory(args) -> dict:
    """Peak activation bytes of the sequential pass against depth (same width, same calibration set)."""
    import transformers

    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 256, (args.context,), generator=g) for _ in range(args.calibration)]
    rows = []
    for depth in (2, 4, 8, 16):
        cfg = transformers.LlamaConfig(
            vocab_size=256, hidden_size=args.hidden, num_hidden_layers=depth, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, intermediate_size=args.ffn, max_position_embeddings=args.context,
            use_cache=False, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        t0 = time.perf_counter()
        report = nmgraph.sparsify(model, "2:4", method="sparsegpt", calibration=calibration, holdout=1, permute=False)
        inputs = sum(report.calibration_samples * args.context * x.shape[x.axis] * 4 for x in report.layers)
        rows.append({"layers": depth, "peak_activation_bytes": report.peak_activation_bytes,
                     "all_layer_inputs_bytes": inputs, "seconds": time.perf_counter() - t0})
        print(f"{depth:>3} layers: peak activations {report.peak_activation_bytes / 2**20:7.1f} MiB; the inputs of "
              f"every pruned layer for the whole set would be {inputs / 2**20:8.1f} MiB", flush=True)
    return {"args": vars(args), "torch": torch.__version__, "results": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, a few steps, every method once")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--patterns", default="2:4,4:8,1:4")
    ap.add_argument("--only", default="", help="comma-separated variants (or scale methods) to run")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bytes", type=int, default=3_000_000)
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--holdout", type=int, default=8)
    ap.add_argument("--val-windows", type=int, default=256)
    ap.add_argument("--time-limit", type=float, default=None, help="sparsify time_limit per run (seconds)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on the shared 2-core machine more threads run slower)")
    ap.add_argument("--out", default=None, help="write the results to this JSON file")
    ap.add_argument("--scale", action="store_true", help="the 1.1B-parameter Llama-shaped measurement")
    ap.add_argument("--memory", action="store_true", help="peak activation memory of the sequential pass vs depth")
    ap.add_argument("--scale-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scale-limit", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scale-samples", type=int, default=32)
    ap.add_argument("--scale-tokens", type=int, default=128)
    ap.add_argument("--magnitude-limit", type=float, default=1200.0)
    ap.add_argument("--sparsegpt-limit", type=float, default=2400.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.scale_one:
        args.layers = args.layers or 22
        return scale_one(args)
    if args.scale:
        args.layers = args.layers or 22
        out = run_scale(args)
    elif args.memory:
        args.calibration = 64 if args.calibration == 128 else args.calibration
        args.context = 256 if args.context == 128 else args.context
        out = run_memory(args)
    else:
        args.layers = args.layers or 4
        if args.quick:
            args.seeds, args.steps, args.bytes, args.calibration, args.holdout = 1, 3, 200_000, 6, 2
            args.hidden, args.layers, args.ffn, args.context, args.val_windows = 32, 2, 64, 16, 4
            args.patterns, args.heads, args.kv_heads, args.time_limit = "2:4", 2, 1, None
        out = run_table(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

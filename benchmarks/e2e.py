"""End-to-end decode latency of a Llama-style model: dense vs nmgraph (2:4, backend="auto").

Full run (needs a CUDA GPU; random weights from a ~1.1B-parameter Llama config, fp16):

    python benchmarks/e2e.py --json e2e.json

Reduced mode, runs on a CPU so the script cannot rot:

    python benchmarks/e2e.py --quick

What is timed: one decode step's forward, ``batch`` sequences of one new token each, without a KV
cache. That is the GEMM part of decoding (every Linear runs with M = batch rows), which is where
N:M can help; attention over the cached prefix is not included. Both models are timed in the
same run (median of repeats; CUDA events through ``triton.testing.do_bench`` on a GPU) and the
ratio is dense / nmgraph. The nmgraph model comes from ``nmgraph.compile`` when the package has
it, else from ``capture`` + magnitude pruning + ``lower_linears``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

import torch
from _timing import interleaved_median_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nmgraph
from nmgraph import capture, nm_mask
from nmgraph.passes.lower_linears import LowerLinearsConfig, lower_linears

FULL = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
QUICK = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64}


def build(cfg: dict, dtype: torch.dtype, device: torch.device):
    import transformers

    config = transformers.LlamaConfig(**cfg, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype=dtype, device=device).eval()


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def bench(fns: dict, device: torch.device, reps: int) -> dict[str, float]:
    """Median milliseconds per call of each function (calls interleaved on a CPU)."""
    return interleaved_median_ms(fns, device, reps=reps, cuda_warmup_ms=10, cuda_rep_ms=200)


def sparsify(model, ids, pattern: str, use_compile: bool, inductor: bool = False):
    """The nmgraph model and a description of what was lowered."""
    if use_compile and hasattr(nmgraph, "compile"):
        fast = nmgraph.compile(model, pattern=pattern, backend="auto", inductor=inductor)
        with torch.no_grad():
            fast(ids)  # first call captures, prunes, lowers
        lowering = next(iter(fast.report.lowerings.values()))
        return fast, "nmgraph.compile" + (" + inductor" if inductor else ""), lowering
    weights = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod.in_features % int(pattern.split(":")[1]) == 0:
                mod.weight.mul_(nm_mask(mod.weight, pattern))
                weights[f"{name}.weight"] = 1
    gm = capture(model, (ids,))
    result = lower_linears(gm, LowerLinearsConfig(weights=weights, pattern=pattern, backend="auto"))
    return gm, "capture + lower_linears", result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny config; runs on CPU")
    ap.add_argument("--cpu", action="store_true", help="force the CPU even if CUDA is present")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], help="sequences decoded together (M)")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--no-compile", action="store_true", help="use capture + lower_linears, not nmgraph.compile")
    ap.add_argument("--inductor", action="store_true",
                    help="compile both sides with inductor (dense: torch.compile; nmgraph: inductor=True), so the "
                         "ratio isolates the N:M kernels from Python overhead")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: stable on shared CPUs)")
    ap.add_argument("--reps", type=int, default=20, help="CPU repeats per measurement")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cfg = QUICK if args.quick or device.type == "cpu" else FULL
    rows = []
    print(f"{'batch':>5} {'dense ms':>10} {'nmgraph ms':>11} {'dense/nmgraph':>14}  lowered  path")
    for batch in args.batch:
        model = build(cfg, dtype, device)
        n_params = sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, cfg["vocab_size"], (batch, 1), device=device)
        dense_model = copy.deepcopy(model)  # timed beside the nmgraph model, calls interleaved
        dense_fn = torch.compile(dense_model) if args.inductor else dense_model
        with torch.no_grad():
            dense_fn(ids)  # compile outside the timed region
        fast, path, lowering = sparsify(model, ids, args.pattern, not args.no_compile, args.inductor)
        with torch.no_grad():  # the model's weights are now the pruned ones: same function
            ref, out = logits(model(ids)), logits(fast(ids))
        err = (out.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item() or 1.0
        if err > 2e-2 * scale:
            raise SystemExit(f"nmgraph output differs from the pruned dense model by {err:.3g} (scale {scale:.3g})")
        ms = bench({"dense": lambda m=dense_fn, i=ids: m(i), "nmgraph": lambda f=fast, i=ids: f(i)}, device,
                   args.reps)
        dense_ms, nm_ms = ms["dense"], ms["nmgraph"]
        del dense_model, dense_fn
        lowered = len(lowering.changed_nodes)
        rows.append({"batch": batch, "dense_ms": dense_ms, "nmgraph_ms": nm_ms, "ratio": dense_ms / nm_ms,
                     "lowered": lowered, "left_dense": len(lowering.skipped), "path": path, "params": n_params,
                     "max_abs_diff": err, "decisions": lowering.info["decisions"].to_dict()})
        print(f"{batch:>5} {dense_ms:>10.3f} {nm_ms:>11.3f} {dense_ms / nm_ms:>13.2f}x  {lowered:>7}  {path}")
    reasons = sorted({s.reason.split(": ", 1)[-1] for s in lowering.skipped})
    for r in reasons[:5]:
        print(f"left dense: {r}")
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"{torch.get_num_threads()} threads)")
    print(f"model: Llama config {cfg} ({n_params / 1e6:.1f}M params), {dtype}; device: {device_name}; "
          f"torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": device_name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "command": " ".join(sys.argv), "config": cfg, "dtype": str(dtype),
            "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

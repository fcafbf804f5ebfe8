"""GEMM benchmark: dense F.linear vs cuSPARSELt 2:4 vs nmgraph's Triton N:M kernels vs "auto".

Full table (needs a CUDA GPU):

    python benchmarks/gemm.py --json gemm.json

M in {1, 4, 16, 64, 256, 1024, 4096}, (N, K) in {(4096, 4096), (11008, 4096), (4096, 11008),
(14336, 4096)}, fp16. Every column is the median time of ``y = x @ W^T`` measured in this run
(``triton.testing.do_bench`` on CUDA), every ratio is dense time / column time from the same run.
"auto" is the backend nmgraph's dispatcher picks for the 2:4 weight at that M (after its own
measurement); its column reports that backend's time from this table. The Triton columns go through
``TritonBackend`` as lowered graphs run it (repacked once; GEMV at M <= 2, tensor-core kernel at
M = 3..64 for 2:4 and 1:4 in fp16/bf16); where the backend declines the rows
(``TritonBackend.rows_reason``: prefill sizes, or M >= 3 for 1:8) the column is n/a.

Reduced mode, runs anywhere (CPU included) so the script cannot rot:

    python benchmarks/gemm.py --quick
    TRITON_INTERPRET=1 python benchmarks/gemm.py --quick   # also runs the (interpreted) kernel

On a CPU the Triton kernel only runs under ``TRITON_INTERPRET=1``, where it is checked against
dense but not timed (the interpreter executes the kernel in numpy); cuSPARSELt needs CUDA. CPU
dense runs on ``--threads`` threads (default 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import median_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmgraph import compress, nm_mask
from nmgraph.backends.cusparselt import CuSparseLtBackend
from nmgraph.backends.dispatch import Dispatcher
from nmgraph.backends.triton_nm import TritonBackend

FULL_M = (1, 4, 16, 64, 256, 1024, 4096)
FULL_NK = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))
QUICK_M = (1, 16)
QUICK_NK = ((256, 256), (512, 256))
TRITON_PATTERNS = ("2:4", "1:4", "1:8")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def bench(fn, device: torch.device, *, quick: bool) -> float:
    """Median milliseconds per call."""
    return median_ms(fn, device, reps=5 if quick else 30)


def pruned(n: int, k: int, pattern: str, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return (w * nm_mask(w, pattern)).to(dtype).to(device)


def check(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item() or 1.0
    if err > 2e-2 * scale:
        raise SystemExit(f"{what}: result differs from dense by {err:.3g} (scale {scale:.3g}); not timing a wrong kernel")


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    ms_list = QUICK_M if args.quick else FULL_M
    nk_list = QUICK_NK if args.quick else FULL_NK
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    triton_be, cslt_be = TritonBackend(), CuSparseLtBackend()
    triton_reason = triton_be.device_reason(device)
    if device.type == "cpu" and triton_reason is None and not args.quick:
        triton_reason = "interpreter on CPU: only with --quick"
    cslt_reason = cslt_be.device_reason(device)
    dispatcher = Dispatcher(cache_path=args.dispatch_cache) if args.dispatch_cache else Dispatcher()
    rows = []
    for n, k in nk_list:
        weights = {p: pruned(n, k, p, dtype, device, seed=i) for i, p in enumerate(TRITON_PATTERNS)}
        comp = {p: compress(w, p) for p, w in weights.items()}
        triton_prepared = {p: triton_be.prepare(c) for p, c in comp.items()} if triton_reason is None else {}
        w24 = weights["2:4"]
        cslt_prepared = None
        layer_reason = cslt_reason or cslt_be.layer_reason(comp["2:4"], dtype)
        if layer_reason is None:
            cslt_prepared = cslt_be.prepare(comp["2:4"])
        for m in ms_list:
            g = torch.Generator(device="cpu").manual_seed(m)
            x = torch.randn(m, k, generator=g).to(dtype).to(device)
            ref = F.linear(x, w24)
            row = {"M": m, "N": n, "K": k, "dtype": str(dtype).removeprefix("torch.")}
            row["dense_ms"] = bench(lambda x=x, w=w24: F.linear(x, w), device, quick=args.quick)
            if cslt_prepared is not None:
                check(cslt_be.run(x, cslt_prepared, None), ref, "cusparselt")
                row["cusparselt_ms"] = bench(lambda x=x, w=cslt_prepared: cslt_be.run(x, w, None), device,
                                             quick=args.quick)
            else:
                row["cusparselt_ms"] = None
                row["cusparselt_note"] = layer_reason
            for p in TRITON_PATTERNS:
                col = f"triton_{p}_ms"
                if triton_reason is not None:
                    row[col] = None
                    row["triton_note"] = triton_reason
                    continue
                declined = triton_be.rows_reason(comp[p], dtype, m)
                if declined is not None:
                    row[col] = None
                    row[f"triton_{p}_note"] = declined
                    continue
                check(triton_be.run(x, triton_prepared[p], None), F.linear(x, weights[p]), f"triton {p}")
                if interpreted and device.type == "cpu":  # checked above; interpreter time means nothing
                    row[col] = None
                    row["triton_note"] = "checked against dense in the interpreter; not timed"
                    continue
                row[col] = bench(lambda x=x, w=triton_prepared[p]: triton_be.run(x, w, None), device,
                                 quick=args.quick)
            decision = dispatcher.decide(f"gemm_{n}x{k}", comp["2:4"], rows=m, dtype=dtype, device=device)
            row["auto_backend"] = decision.backend
            row["auto_reason"] = decision.reason
            auto_col = {"dense": "dense_ms", "cusparselt": "cusparselt_ms", "triton": "triton_2:4_ms"}[decision.backend]
            row["auto_ms"] = row[auto_col]
            for col in ("cusparselt_ms", *(f"triton_{p}_ms" for p in TRITON_PATTERNS), "auto_ms"):
                t = row[col]
                row[col.replace("_ms", "_x")] = None if t is None else row["dense_ms"] / t
            rows.append(row)
            print_row(row, first=len(rows) == 1)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "command": " ".join(sys.argv),
        "interpreted_triton": interpreted and device.type == "cpu",
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "rows": rows,
        "dispatch": dispatcher.report().to_dict(),
    }


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


COLUMNS = [("dense_ms", "dense"), ("cusparselt_ms", "cuSPARSELt"), ("triton_2:4_ms", "tri 2:4"),
           ("triton_1:4_ms", "tri 1:4"), ("triton_1:8_ms", "tri 1:8"), ("auto_ms", "auto")]


def print_row(row: dict, first: bool) -> None:
    if first:
        head = f"{'M':>5} {'N':>6} {'K':>6} " + " ".join(f"{name:>16}" for _, name in COLUMNS) + "  auto backend"
        print(head)
        print("-" * len(head))
    cells = []
    for col, _ in COLUMNS:
        t = row[col]
        ratio = row.get(col.replace("_ms", "_x"))
        if t is None:
            cells.append(f"{'n/a':>16}")
        elif col == "dense_ms" or ratio is None:
            cells.append(f"{t:>9.4f} ms     ")
        else:
            cells.append(f"{t:>8.4f} {ratio:>5.2f}x ")
    print(f"{row['M']:>5} {row['N']:>6} {row['K']:>6} " + " ".join(cells) + f"  {row['auto_backend']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes; runs on CPU")
    ap.add_argument("--cpu", action="store_true", help="force the CPU even if CUDA is present")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="CUDA only (CPU uses fp32)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for dense (default 1: stable on shared CPUs)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--dispatch-cache", type=Path, help="persistent dispatch cache file for 'auto'")
    args = ap.parse_args(argv)
    result = run(args)
    notes = {r.get(key) for r in result["rows"]
             for key in ("cusparselt_note", "triton_note", *(f"triton_{p}_note" for p in TRITON_PATTERNS))}
    for note in sorted(n for n in notes if n):
        print(f"n/a: {note}")
    print(f"device: {result['device']}; torch {result['torch']}; triton {result['triton']}; {result['date']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""One GPU check of the decode paths as lowered graphs run them: correctness first, then device time,
CUDA graphs, host cost.

On an H100 / H200 (about 3-6 minutes, most of it Triton compiling each specialisation once):

    python benchmarks/gpu_check.py --json gpu_check.json

reports, in this order,

1. the device, date, versions and the command;
2. copy bandwidth (device-to-device ``copy_`` of a 1 GiB buffer: read + write bytes / time);
3. a correctness pass over every case below before anything is timed (the script stops on a
   mismatch: a wrong kernel is never timed);
4. for (N, K) in {(4096, 4096), (11008, 4096), (4096, 11008)}, fp16, patterns 2:4 and 1:4, and
   M in {1, 4, 16, 64}: per path
   * ``graph us``: device time per call, from a CUDA graph of 20 calls replayed (no launch gaps),
   * ``eager us``: time per call launched from Python (what an unwrapped model sees),
   * ``host us``: host time to enqueue one call (Python + launcher + launch),
   * ``kernels``: CUDA kernels one call launches (from the profiler),
   and ``dense/path`` from the graph times of this run. Paths, each called the way a lowered graph
   calls it (the backend's ``prepare`` once, then its graph op from ``Backend.lower``):
   ``dense`` (``F.linear``), ``triton`` (``nmgraph::nm_linear_triton``: GEMV at M <= 2, tensor-core
   kernel at M = 3..64; the ``kernel`` field says which), ``cusparselt``
   (``nmgraph::semi_structured_linear``, 2:4 only, when available) and ``auto`` (the backend the
   ``Dispatcher`` picks for this layer and M, measured by it in this run; its times are that path's);
5. ``e2e``: a Llama-style MLP block (4096 -> 11008 -> 4096, SiLU-gated, 2:4, fp16) at M in {1, 16}:
   dense ``torch.compile(mode="reduce-overhead")`` against ``nmgraph.compile(backend="auto",
   inductor=True, inductor_mode="reduce-overhead")`` (both with CUDA graphs), outputs checked first
   (``--no-e2e`` skips it).

``--tune`` adds a small sweep of GEMV / MMA tiles per shape and reports the fastest (graph time).

Reduced mode, so the script cannot rot (CPU, Triton interpreter, tiny shapes; nothing it prints
is a speed):

    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nmgraph
from nmgraph import compress, nm_mask
from nmgraph.backends.cusparselt import CuSparseLtBackend
from nmgraph.backends.dispatch import Dispatcher
from nmgraph.backends.kernels.nm_gemv import GemvConfig, nm_gemv
from nmgraph.backends.kernels.nm_mma import MmaConfig, nm_mma
from nmgraph.backends.triton_nm import TritonBackend, kernel_path

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
MS = (1, 4, 16, 64)
PATTERNS = ("2:4", "1:4")
SMOKE_SHAPES = ((64, 128),)
SMOKE_MS = (1, 4)
GRAPH_CALLS = 20


def _pruned(n: int, k: int, pattern: str, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return (w * nm_mask(w, pattern)).to(dtype).to(device)


def _check(y: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item() or 1.0
    if not err <= 1e-2 * scale:
        raise SystemExit(f"{what}: differs from dense by {err:.3g} (scale {scale:.3g}); not timing a wrong kernel")
    return err / scale


def _kernels_per_call(fn) -> int | None:
    """CUDA kernels launched by one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _graph_us(fn, reps: int = 15) -> float:
    """Device microseconds per call: a CUDA graph of GRAPH_CALLS calls, replayed ``reps`` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(GRAPH_CALLS):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / GRAPH_CALLS)
    return statistics.median(times)


def _eager_us(fn, calls: int = 100, reps: int = 5) -> tuple[float, float]:
    """(device-observed us per call launched from Python, host us to enqueue one call)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dev, host = [], []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        b.record()
        b.synchronize()
        dev.append(a.elapsed_time(b) * 1e3 / calls)
        host.append((t1 - t0) * 1e6 / calls)
    return statistics.median(dev), statistics.median(host)


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a device-to-device copy (read + write)."""
    n = 1 << 29  # 1 GiB of fp16
    a = torch.empty(n, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    return 2 * a.numel() * a.element_size() / statistics.median(times) / 1e9


def _op_call(backend, c, prepared):
    """``x -> y`` through the backend's graph op, with the buffers and constants ``Backend.lower`` gives."""
    call = backend.lower(c, prepared)
    buffers = [t for _, t in call.buffers]

    def run(x):
        return call.op(x, *buffers, None, *call.args)

    return run


def _paths(w: torch.Tensor, pattern: str, m_rows: int, smoke: bool) -> dict:
    """name -> ``x -> y`` for every path that serves this layer and M, as a lowered graph calls it."""
    c = compress(w, pattern)
    paths = {}
    triton = TritonBackend()
    if triton.unavailable_reason(c, w.dtype, w.device, rows=m_rows) is None:
        paths["triton"] = _op_call(triton, c, triton.prepare(c))
    if not smoke:
        cslt = CuSparseLtBackend()
        if cslt.unavailable_reason(c, w.dtype, w.device, rows=m_rows) is None:
            try:
                paths["cusparselt"] = _op_call(cslt, c, cslt.prepare(c))
            except Exception as e:  # noqa: BLE001 - a build without cuSPARSELt/CUTLASS: reported as n/a
                print(f"cusparselt n/a: {type(e).__name__}: {str(e)[:120]}", flush=True)
    return paths


def _tune(w, packed, x, sem, dense_graph) -> list[dict]:
    """Times a few tiles of the new kernels on this shape (graph time); returns rows."""
    rows = []
    m_rows = x.shape[0]
    if m_rows <= 2:
        vec = 8
        for bn, c, warps in ((4, 32, 2), (8, 32, 2), (16, 32, 4), (32, 16, 4), (64, 8, 4), (8, 64, 4)):
            cfg = GemvConfig(block_n=bn, block_e=c * vec, num_warps=warps)
            try:
                t = _graph_us(lambda cfg=cfg: nm_gemv(x, packed, config=cfg))
            except Exception as e:  # noqa: BLE001 - report configs that fail to compile or launch
                rows.append({"kernel": "gemv", "config": str(cfg), "error": str(e)[:200]})
                continue
            rows.append({"kernel": "gemv", "config": str(cfg), "graph_us": t, "ratio": dense_graph / t})
    for split in (1, 2, 4, 8, 16):
        for stages in (3, 4, 5):
            cfg = MmaConfig(split_k=split, num_stages=stages)
            try:
                t = _graph_us(lambda cfg=cfg: nm_mma(x, packed, config=cfg, semaphores=sem))
            except Exception as e:  # noqa: BLE001
                rows.append({"kernel": "mma", "config": str(cfg), "error": str(e)[:200]})
                continue
            rows.append({"kernel": "mma", "config": str(cfg), "graph_us": t, "ratio": dense_graph / t})
    return rows


def run(args) -> dict:
    smoke = args.cpu_smoke
    if smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cpu-smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1.")
        device, dtype = torch.device("cpu"), torch.float16
    else:
        if not torch.cuda.is_available():
            raise SystemExit("No CUDA device: run the reduced mode with TRITON_INTERPRET=1 ... --cpu-smoke.")
        device, dtype = torch.device("cuda"), torch.float16
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if not smoke:
        p = torch.cuda.get_device_properties(device)
        info.update(device=p.name, sms=p.multi_processor_count, cuda=torch.version.cuda,
                    copy_GBps=round(copy_bandwidth(device), 1))
    else:
        info.update(device="cpu (Triton interpreter; no time below is a speed)")
    print(json.dumps(info, indent=1), flush=True)
    rows, tuning = [], []
    shapes = SMOKE_SHAPES if smoke else SHAPES
    ms = SMOKE_MS if smoke else MS
    cases = []
    for n_out, k in shapes:
        for pattern in PATTERNS:
            w = _pruned(n_out, k, pattern, dtype, device, seed=n_out + k)
            for m_rows in ms:
                g = torch.Generator().manual_seed(m_rows)
                x = torch.randn(m_rows, k, generator=g).to(dtype).to(device)
                cases.append((n_out, k, pattern, m_rows, w, x, _paths(w, pattern, m_rows, smoke)))
    # 1. correctness of every path, before anything is timed
    for n_out, k, pattern, m_rows, w, x, paths in cases:
        ref = (x.float() @ w.float().T).to(dtype)
        row = {"N": n_out, "K": k, "pattern": pattern, "M": m_rows, "paths": {}}
        for name, f in paths.items():
            t0 = time.perf_counter()
            y = f(x)
            t1 = time.perf_counter()
            row["paths"][name] = {"rel_err": _check(y, ref, f"{name} {pattern} M={m_rows} {n_out}x{k}")}
            if name == "triton":
                row["paths"][name]["kernel"] = kernel_path(m_rows, *map(int, pattern.split(":")), dtype)
            if smoke:
                row["paths"][name]["host_us_interpreted"] = (t1 - t0) * 1e6
        rows.append(row)
        print(f"checked {pattern} M={m_rows} {n_out}x{k}: " + ", ".join(
            f"{k_}: rel err {v['rel_err']:.1e}" for k_, v in row["paths"].items()), flush=True)
    if not smoke:
        # 2. time: dense and every path, with and without CUDA graphs; what auto picks
        dispatcher = Dispatcher()
        for (n_out, k, pattern, m_rows, w, x, paths), row in zip(cases, rows):
            decision = dispatcher.decide(f"{n_out}x{k}", compress(w, pattern), rows=m_rows, dtype=dtype,
                                         device=device)
            timed = {"dense": lambda x=x, w=w: F.linear(x, w),
                     **{name: (lambda f=f, x=x: f(x)) for name, f in paths.items()}}
            for name, f in timed.items():
                gus = _graph_us(f)
                eus, hus = _eager_us(f)
                rec = row["paths"].setdefault(name, {})
                rec.update(graph_us=round(gus, 2), eager_us=round(eus, 2), host_us=round(hus, 2),
                           kernels=_kernels_per_call(f))
            # auto: the chosen backend's times from this table (n/a if this script could not run it)
            row["paths"]["auto"] = dict(row["paths"].get(decision.backend, {}), backend=decision.backend,
                                        reason=decision.reason)
            base = row["paths"]["dense"]["graph_us"]
            for rec in row["paths"].values():
                if "graph_us" in rec:
                    rec["dense_over_path"] = round(base / rec["graph_us"], 3)
            print(f"{pattern} M={m_rows:3d} {n_out}x{k}: " + "  ".join(
                f"{name} {rec['graph_us']:.1f}us ({rec['dense_over_path']:.2f}x, {rec['kernels']}k, "
                f"host {rec['host_us']:.1f}us)" for name, rec in row["paths"].items() if "graph_us" in rec)
                + f"  auto -> {decision.backend}", flush=True)
            if args.tune and m_rows in (1, 16):
                packed = TritonBackend().prepare(compress(w, pattern))
                for t in _tune(w, packed.packed, x, packed.semaphores, base):
                    tuning.append({"N": n_out, "K": k, "pattern": pattern, "M": m_rows, **t})
    e2e = e2e_block(device) if not smoke and args.e2e else []
    out = {"info": info, "rows": rows, "tuning": tuning, "e2e": e2e}
    if not smoke:
        print_table(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


class _GatedMLP(torch.nn.Module):
    """A Llama MLP block: ``down(silu(gate(x)) * up(x))``, 4096 -> 11008 -> 4096."""

    def __init__(self, hidden: int = 4096, inner: int = 11008) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(hidden, inner, bias=False)
        self.up = torch.nn.Linear(hidden, inner, bias=False)
        self.down = torch.nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def e2e_block(device: torch.device, hidden: int = 4096, inner: int = 11008) -> list[dict]:
    """Dense vs nmgraph on a gated MLP block, both compiled by inductor with CUDA graphs."""
    import copy

    out = []
    torch.manual_seed(0)
    base = _GatedMLP(hidden, inner).to(device=device, dtype=torch.float16).eval()
    sparse = copy.deepcopy(base)
    fast = nmgraph.compile(sparse, "2:4", backend="auto", permute=False, inductor=True,
                           inductor_mode="reduce-overhead")
    dense = torch.compile(sparse, mode="reduce-overhead")  # the same pruned weights, dense GEMMs
    for m_rows in (1, 16):
        x = torch.randn(m_rows, hidden, device=device, dtype=torch.float16)
        with torch.no_grad():
            y_fast = fast(x).clone()  # first call: prunes `sparse` in place, lowers, compiles
            _check(y_fast, F.linear(F.silu(F.linear(x, sparse.gate.weight)) * F.linear(x, sparse.up.weight),
                                    sparse.down.weight), f"e2e nmgraph M={m_rows}")
            _check(dense(x), y_fast, f"e2e dense M={m_rows}")
            times = {}
            for name, f in (("dense", lambda x=x: dense(x)), ("nmgraph", lambda x=x: fast(x))):
                for _ in range(5):
                    f()
                torch.cuda.synchronize()
                dev, _host = _eager_us(f, calls=50)
                times[name] = dev
        lowering = list(fast.report.lowerings.values())[-1]  # this M's signature
        rec = {"M": m_rows, "dense_us": round(times["dense"], 2), "nmgraph_us": round(times["nmgraph"], 2),
               "dense_over_nmgraph": round(times["dense"] / times["nmgraph"], 3),
               "backends": sorted(set(lowering.info["backends"].values())) or ["dense"]}
        out.append(rec)
        print(f"e2e gated MLP M={m_rows}: dense {rec['dense_us']:.1f}us, nmgraph {rec['nmgraph_us']:.1f}us "
              f"({rec['dense_over_nmgraph']:.2f}x, {rec['backends']})", flush=True)
    del base
    return out


def print_table(out: dict) -> None:
    names = []
    for r in out["rows"]:
        for n in r["paths"]:
            if n not in names:
                names.append(n)
    print("\n| N x K | pattern | M | " + " | ".join(f"{n}: graph us (dense/x), eager us, host us, kernels"
                                                   for n in names) + " |")
    print("|---|---|---:|" + "---|" * len(names))
    for r in out["rows"]:
        cells = []
        for n in names:
            rec = r["paths"].get(n)
            if rec is None or "graph_us" not in rec:
                cells.append("n/a" if rec is None else f"{rec.get('backend')}: not timed")
                continue
            which = f"{rec['backend']}: " if n == "auto" else f"{rec['kernel']}: " if n == "triton" else ""
            cells.append(f"{which}{rec['graph_us']:.1f} ({rec['dense_over_path']:.2f}x), {rec['eager_us']:.1f}, "
                         f"{rec['host_us']:.1f}, {rec['kernels']}")
        print(f"| {r['N']}x{r['K']} | {r['pattern']} | {r['M']} | " + " | ".join(cells) + " |")
    if out.get("e2e"):
        print("\n| gated MLP 4096-11008-4096, 2:4, CUDA graphs | M | dense us | nmgraph us | dense/nmgraph | backends |")
        print("|---|---:|---:|---:|---:|---|")
        for e in out["e2e"]:
            print(f"| | {e['M']} | {e['dense_us']:.1f} | {e['nmgraph_us']:.1f} | {e['dense_over_nmgraph']:.2f}x | "
                  f"{', '.join(e['backends'])} |")
    if out["tuning"]:
        print("\nFastest tuned tiles (graph time):")
        best = {}
        for t in out["tuning"]:
            if "graph_us" not in t:
                continue
            key = (t["N"], t["K"], t["pattern"], t["M"], t["kernel"])
            if key not in best or t["graph_us"] < best[key]["graph_us"]:
                best[key] = t
        for key, t in sorted(best.items()):
            print(f"  {key}: {t['config']} {t['graph_us']:.1f} us ({t['ratio']:.2f}x dense)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--tune", action="store_true", help="also sweep a few tiles per shape at M = 1 and 16")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the gated-MLP block")
    run(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

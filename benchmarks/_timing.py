"""One timing rule for every benchmark: median milliseconds per call, measured on the device.

CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). CPU: ``time.perf_counter``
around each call after one warm-up call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, *, reps: int = 30, warmup: int = 1,
              cuda_warmup_ms: int = 25, cuda_rep_ms: int = 100) -> float:
    """Median milliseconds per call of ``fn`` (under ``torch.no_grad``)."""
    with torch.no_grad():
        if device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=cuda_warmup_ms, rep=cuda_rep_ms, return_mode="median"))
    return interleaved_median_ms({"fn": fn}, device, reps=reps, warmup=warmup)["fn"]


def interleaved_median_ms(fns: dict[str, Callable[[], object]], device: torch.device, *, reps: int = 30,
                          warmup: int = 1, **cuda_kwargs: int) -> dict[str, float]:
    """Median milliseconds per call of each of ``fns``, their calls interleaved on a CPU.

    On a shared CPU, load from other processes comes and goes over seconds; timing one function's
    repeats after the other's puts that drift into the ratio. Alternating the calls (A, B, A, B, ...)
    gives every function the same conditions. CUDA timings use :func:`median_ms` per function.
    """
    if device.type == "cuda":
        return {k: median_ms(f, device, reps=reps, **cuda_kwargs) for k, f in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for f in fns.values():
                f()
        for _ in range(reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}

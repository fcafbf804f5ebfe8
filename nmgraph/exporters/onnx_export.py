"""Export an N:M model to ONNX (and TensorRT), verified numerically and checked for eligibility.

:func:`export` takes a model or GraphModule whose eligible weights are already N:M (the output of
:func:`nmgraph.convert`, or a model pruned by hand); when none of them is, it runs ``convert``
first. It then

1. exports with ``torch.onnx.export(..., dynamo=True)``; if that fails, with the TorchScript
   exporter (``exporter="auto"``; the report says which one ran and why the first failed);
2. validates the file with ``onnx.checker``;
3. runs onnxruntime on the example inputs and compares every output with PyTorch
   (``|ort - torch| <= atol + rtol * |torch|``; defaults in :data:`TOLERANCES`), and with
   ``dynamic_batch=True`` also at batch size + 1;
4. reads the ONNX graph the way TensorRT does (:func:`nmgraph.exporters.onnx_check.check_onnx`) and lists
   the eligible weights and every weight whose pattern was lost in export, with the reason.

``fp16=True`` exports a float16 copy of the model (the caller's model is not touched) and compares
onnxruntime with that copy. Zeros stay zeros in float16, so the pattern survives the cast.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
import os
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nmgraph.analysis import analyze
from nmgraph.analysis.eligibility import gemm_weight_axes, module_gemm_axes
from nmgraph.analysis.plan import Skip, SparsityPlan
from nmgraph.capture import batch_dynamic_shapes, capture, set_eval
from nmgraph.compress import ModelSummary, model_summary
from nmgraph.errors import (
    BackendUnavailableError,
    CaptureError,
    PlanError,
    SerializationError,
    StrictModeError,
    UnsupportedError,
    VerificationError,
)
from nmgraph.exporters import tensorrt as trt
from nmgraph.exporters.onnx_check import OnnxSparsityReport, check_onnx, diagnose_nm, parameter_aliases
from nmgraph.graph import fetch_attr
from nmgraph.passes.prune_weights import PruneWeightsConfig, prune_weights
from nmgraph.passes.runner import run_passes
from nmgraph.pattern import Pattern, PatternLike, is_nm
from nmgraph.rollback import Rollback

__all__ = ["FORMATS", "TOLERANCES", "ExportReport", "export", "sparse_weight_axes"]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt")
EXPORTERS = ("auto", "dynamo", "torchscript")
#: (rtol, atol) of the onnxruntime-vs-PyTorch comparison, by the dtype the model is exported in.
#: float32: onnxruntime and PyTorch differ only in summation order (measured max |diff| about
#: 1e-6 on the test models); float16 exports are compared with the float16 PyTorch copy.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-3, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
_DEFAULT_TORCHSCRIPT_OPSET = 17


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export` produced and what TensorRT will be able to run sparse.

    ``check`` is the ONNX eligibility report; ``model_dense`` the candidate weights that were
    not N:M in the PyTorch model (with the reason), ``plan_violations`` those among them that the
    plan said should be; ``max_abs_diff`` the largest onnxruntime-vs-PyTorch difference per output.
    """

    path: str
    format: str
    pattern: Pattern
    exporter: str
    opset: int | None
    fp16: bool
    dynamic_batch: bool
    check: OnnxSparsityReport
    onnx_path: str
    converted: bool = False
    model_dense: tuple[Skip, ...] = ()
    plan_violations: tuple[Skip, ...] = ()
    max_abs_diff: tuple[float, ...] = ()
    tolerance: tuple[float, float] | None = None
    verified: bool = False
    exporter_fallback: str | None = None
    engine_path: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    #: the model-level line: N:M weights and share of parameters, bytes dense and compressed
    model: ModelSummary | None = None

    @property
    def eligible(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.check.eligible)

    @property
    def lost(self) -> tuple[Skip, ...]:
        """Weights meant to be N:M that TensorRT will not see as N:M, with the reason."""
        from_graph = tuple(Skip(layer.name, layer.reason) for layer in self.check.lost)
        return self.plan_violations + from_graph

    @property
    def ok(self) -> bool:
        return not self.lost

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict() if self.model is not None else None,
            "path": self.path,
            "format": self.format,
            "pattern": str(self.pattern),
            "exporter": self.exporter,
            "exporter_fallback": self.exporter_fallback,
            "opset": self.opset,
            "fp16": self.fp16,
            "dynamic_batch": self.dynamic_batch,
            "dynamic_axes": {k: dict(v) for k, v in self.dynamic_axes.items()},
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "notes": list(self.notes),
            "onnx_path": self.onnx_path,
            "engine_path": self.engine_path,
            "converted": self.converted,
            "verified": self.verified,
            "max_abs_diff": list(self.max_abs_diff),
            "tolerance": None if self.tolerance is None else {"rtol": self.tolerance[0],
                                                              "atol": self.tolerance[1]},
            "eligible": list(self.eligible),
            "lost": [{"name": s.name, "reason": s.reason} for s in self.lost],
            "model_dense": [{"name": s.name, "reason": s.reason} for s in self.model_dense],
            "check": self.check.to_dict(),
            "seconds": dict(self.seconds),
        }

    def to_json(self, **kwargs: Any) -> str:
        import json

        return json.dumps(self.to_dict(), **({"indent": 2} | kwargs))

    def __str__(self) -> str:
        diff = max(self.max_abs_diff) if self.max_abs_diff else float("nan")
        lines = [self.model.line()] if self.model is not None else []
        lines += [
            f"export {self.format} -> {self.path} ({self.exporter} exporter, opset {self.opset}, "
            f"{'fp16' if self.fp16 else 'fp32'}{', dynamic batch' if self.dynamic_batch else ''})",
            f"  onnxruntime vs torch: max |diff| {diff:.3g}"
            + (f" (rtol {self.tolerance[0]:g}, atol {self.tolerance[1]:g})" if self.tolerance else ""),
            f"  {len(self.eligible)} weights eligible for {self.pattern} sparse math, "
            f"{len(self.lost)} lost, {len(self.check.dense)} dense",
        ]
        lines.extend(f"  LOST {s.name}: {s.reason}" for s in self.lost)
        violated = {s.name for s in self.plan_violations}
        lines.extend(f"  dense in model: {s.name}: {s.reason}" for s in self.model_dense
                     if s.name not in violated)
        return "\n".join(lines)


def sparse_weight_axes(
    model: torch.nn.Module, pattern: PatternLike, plan: SparsityPlan | None = None, *,
    example_inputs: Any = None, kwargs: Mapping[str, Any] | None = None,
) -> tuple[dict[str, int], list[Skip]]:
    """The weights that can be N:M (``{name: reduction axis}``) and those that cannot, with reasons.

    With a plan: its layers and skips. Otherwise the analysis' own reading of the GEMM weights
    (:func:`nmgraph.analysis.eligibility.gemm_weight_axes`) on ``model`` when it is a captured graph,
    or on ``model`` captured with ``example_inputs``; only without either, the module types nmgraph
    can recognise (:func:`~nmgraph.analysis.eligibility.module_gemm_axes`). A weight whose reduction
    size is not divisible by M is a skip. Tied weights are listed once, under their first name.
    """
    p = Pattern.parse(pattern)
    if plan is not None:
        return {info.name: info.axis for info in plan.layers}, list(plan.skipped)
    found = module_gemm_axes(model)
    graph = model if isinstance(model, torch.fx.GraphModule) else None
    if graph is None and example_inputs is not None:
        graph = capture(model, example_inputs, kwargs)
    if graph is not None:
        try:
            found = gemm_weight_axes(graph)
        except UnsupportedError:  # a graph without shape metadata (symbolic_trace): module types only
            log.info("sparse_weight_axes: %s has no shape metadata; GEMM weights by module type",
                     type(model).__name__)
    aliases = parameter_aliases(model)
    out: dict[str, int] = {}
    skips: list[Skip] = []
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, axis in found.items():
        canon = aliases.get(name, name)
        if canon in out or name not in params:
            continue
        k = params[name].shape[axis]
        if k % p.m:
            skips.append(Skip(canon, f"reduction dim {axis} has size {k}, not divisible by M={p.m}"))
        else:
            out[canon] = axis
    return out, skips


def export(
    model_or_gm: torch.nn.Module,
    path: str | os.PathLike,
    example_inputs: Sequence[Any] | Any,
    pattern: PatternLike = "2:4",
    format: str = "onnx",
    *,
    kwargs: Mapping[str, Any] | None = None,
    plan: SparsityPlan | None = None,
    opset: int | None = None,
    fp16: bool = False,
    dynamic_batch: bool | None = None,
    exporter: str = "auto",
    convert: bool | str = "auto",
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    strict: bool = False,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    tensorrt_options: Mapping[str, Any] | None = None,
) -> ExportReport:
    """Exports ``model_or_gm`` to ``path`` and reports which weights TensorRT can run N:M.

    ``format="onnx"`` writes ``path``; ``format="tensorrt"`` writes the ONNX next to it
    (``path`` with suffix ``.onnx``) and builds a TensorRT engine at ``path`` with sparse weights
    enabled (needs ``nmgraph[tensorrt]`` and an NVIDIA GPU; checked before anything else runs).
    ``convert``: ``"auto"`` runs :func:`nmgraph.convert` only when no candidate weight is N:M yet;
    ``True`` always, ``False`` never. ``strict=True`` raises :class:`StrictModeError` when a weight
    the plan or the model holds as N:M is not eligible in the ONNX graph.

    A transformers model called with token ids (a language model or a text classifier) is exported
    as it is served: inputs ``input_ids`` and ``attention_mask`` (all ones when not given), dynamic
    batch and sequence axes (``dynamic_batch=None`` means yes for such a model, no for others), no
    KV cache, and the first output under its own name (``logits``). A bf16 model is exported in
    bf16; onnxruntime has no bf16 CPU kernels, so the numerical check runs on a float32 export of
    the same model and ``report.notes`` says so.
    Raises :class:`VerificationError` when onnxruntime's outputs differ from PyTorch's beyond
    ``rtol``/``atol`` (defaults by dtype in :data:`TOLERANCES`).
    """
    p = Pattern.parse(pattern)
    if format not in FORMATS:
        raise UnsupportedError(
            f"export(format={format!r}) is not supported; use one of {', '.join(map(repr, FORMATS))}."
        )
    if exporter not in EXPORTERS:
        raise UnsupportedError(
            f"export(exporter={exporter!r}) is not one of {', '.join(map(repr, EXPORTERS))}."
        )
    if convert not in ("auto", True, False):
        raise UnsupportedError(f"export(convert={convert!r}) must be 'auto', True or False.")
    if isinstance(model_or_gm, torch.export.ExportedProgram):
        model_or_gm = model_or_gm.module()
    if not isinstance(model_or_gm, torch.nn.Module):
        raise UnsupportedError(
            f"export() needs a torch.nn.Module or GraphModule, got {type(model_or_gm).__name__}."
        )
    if format == "tensorrt":
        trt.require_tensorrt()
    _require_onnx()
    path = Path(path)
    onnx_path = path.with_suffix(".onnx") if format == "tensorrt" else path
    if onnx_path.parent and not onnx_path.parent.exists():
        raise SerializationError(
            f"Output directory {str(onnx_path.parent)!r} does not exist; create it first."
        )
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(kwargs or {})
    notes: list[str] = []
    served = _language_model_inputs(model_or_gm, args, kwargs)
    dynamic_shapes = None
    if served is not None:
        args, kwargs, names, out_name = served
        dynamic_batch = True if dynamic_batch is None else dynamic_batch
        input_names = input_names or names
        output_names = output_names or (out_name,)
        if dynamic_batch:
            batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
            dynamic_shapes = _named_shapes(model_or_gm, {n: ({0: batch, 1: seq} if n in names else None)
                                                         for n in kwargs})
        notes.append(f"exported as served: inputs {', '.join(names)}, output {out_name!r}, no KV cache"
                     + (", dynamic batch and sequence" if dynamic_batch else ""))
    dynamic_batch = bool(dynamic_batch)
    if dynamic_batch and dynamic_shapes is None and exporter in ("auto", "dynamo"):
        batch_dynamic_shapes(model_or_gm, args, kwargs)  # refuses inputs it cannot match, before any change
    # convert prunes the model's own weights and the export sets eval mode: on any failure, undo both
    with Rollback() as undo:
        undo.keep_module(model_or_gm)
        seconds: dict[str, float] = {}
        module = model_or_gm
        axes, skips = sparse_weight_axes(module, p, plan, example_inputs=args, kwargs=kwargs)
        params = dict(module.named_parameters(remove_duplicate=False))
        nm = {name: is_nm(params[name], p, axis=axis) for name, axis in axes.items() if name in params}
        converted = False
        left_dense: dict[str, str] = {}
        if convert is True or (convert == "auto" and nm and not any(nm.values())):
            t0 = time.perf_counter()
            converted_gm, convert_plan = _run_convert(module, args, kwargs, p, plan, undo)
            seconds["convert"] = time.perf_counter() - t0
            left_dense = {s.name: s.reason for s in convert_plan.skipped}
            # convert prunes the model's own parameters in place: export the model itself (its module
            # hierarchy names the ONNX nodes) unless the graph holds tensors the model does not.
            if not _shares_parameters(converted_gm, module):
                module = converted_gm
            converted = True
            axes, skips = sparse_weight_axes(module, p, plan, example_inputs=args, kwargs=kwargs)
            params = dict(module.named_parameters(remove_duplicate=False))
            nm = {name: is_nm(params[name], p, axis=axis) for name, axis in axes.items() if name in params}
        model_dense = list(skips)
        violations: list[Skip] = []
        for name, ok in nm.items():
            if ok:
                continue
            why = (f"left dense by convert: {left_dense[name]}" if name in left_dense else
                   f"in the model, {diagnose_nm(params[name], p, axes[name]).reason}")
            skip = Skip(name, why)
            model_dense.append(skip)
            if plan is not None:
                violations.append(Skip(name, skip.reason + "; the plan lists it as eligible: run nmgraph.convert"))
        missing = [info.name for info in plan.layers if info.name not in params] if plan is not None else []
        if missing:
            raise PlanError(
                f"The plan lists weights the model does not have: {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}. Pass the plan made for this model."
            )

        export_module, export_args, export_kwargs = module, args, kwargs
        if fp16:
            export_module = copy.deepcopy(module).to(torch.float16)
            export_args, export_kwargs = _cast_floats((args, kwargs), torch.float16)
        set_eval(export_module)
        t0 = time.perf_counter()
        used, fallback = _to_onnx(export_module, export_args, export_kwargs, onnx_path, opset=opset,
                                  dynamic_batch=dynamic_batch, exporter=exporter, input_names=input_names,
                                  output_names=output_names, dynamic_shapes=dynamic_shapes)
        seconds["export"] = time.perf_counter() - t0
        if served is not None and dynamic_batch:
            _name_dims(onnx_path, "input_ids", ("batch", "seq"))
        onnx_opset = _check_model(onnx_path)

        diffs: tuple[float, ...] = ()
        tol = None
        if verify:
            t0 = time.perf_counter()
            dtype = torch.float16 if fp16 else _model_dtype(module)
            check_module, check_args, check_kwargs, check_path = export_module, export_args, export_kwargs, onnx_path
            scratch = None
            if dtype == torch.bfloat16:  # onnxruntime has no bf16 CPU kernels: check a float32 export
                import tempfile

                scratch = tempfile.TemporaryDirectory(prefix="nmgraph-onnx-check-")
                check_path = Path(scratch.name) / "float32.onnx"
                check_module = copy.deepcopy(export_module).to(torch.float32)
                check_args, check_kwargs = _cast_floats((export_args, export_kwargs), torch.float32)
                _to_onnx(check_module, check_args, check_kwargs, check_path, opset=opset, dynamic_batch=dynamic_batch,
                         exporter=used, input_names=input_names, output_names=output_names,
                         dynamic_shapes=dynamic_shapes)
                dtype = torch.float32
                notes.append("onnxruntime has no bfloat16 CPU kernels: the numerical check ran on a float32 "
                             "export of the same model; the file keeps the bfloat16 weights")
            default = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
            tol = (default[0] if rtol is None else rtol, default[1] if atol is None else atol)
            try:
                diffs = _verify(check_module, check_args, check_kwargs, check_path, tol, dynamic_batch)
            finally:
                if scratch is not None:
                    scratch.cleanup()
            seconds["verify"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        expected = {name for name, ok in nm.items() if ok}
        check = check_onnx(onnx_path, p, expected=expected, reference=export_module)
        seconds["check"] = time.perf_counter() - t0
        report = ExportReport(
            path=str(path), format=format, pattern=p, exporter=used, opset=onnx_opset, fp16=fp16,
            dynamic_batch=dynamic_batch, check=check, onnx_path=str(onnx_path), converted=converted,
            model_dense=tuple(model_dense), plan_violations=tuple(violations), max_abs_diff=diffs,
            tolerance=tol, verified=verify, exporter_fallback=fallback, seconds=seconds,
            input_names=tuple(i.name for i in _onnx_io(onnx_path)[0]),
            output_names=tuple(o.name for o in _onnx_io(onnx_path)[1]),
            dynamic_axes=_onnx_dynamic_axes(onnx_path), notes=tuple(notes),
            model=model_summary(module, p, {name: axes[name] for name, ok in nm.items() if ok}),
        )
        if strict and report.lost:
            raise StrictModeError(
                f"strict=True: {len(report.lost)} weight(s) meant to be {p} will run dense in TensorRT:\n"
                + "\n".join(f"  - {s.name}: {s.reason}" for s in report.lost)
            )
        for s in violations:
            log.warning("weight %s is in the plan but not %s in the model: %s", s.name, p, s.reason)
        if format == "tensorrt":
            t0 = time.perf_counter()
            engine = trt.build_engine(onnx_path, path, fp16=fp16, example_inputs=export_args,
                                      dynamic_batch=dynamic_batch, **dict(tensorrt_options or {}))
            seconds["tensorrt"] = time.perf_counter() - t0
            report = _replace(report, engine_path=str(engine))
        log.info("exported %s: %d eligible, %d lost, %d dense", path, len(check.eligible), len(report.lost),
                 len(check.dense))
        return report


# --- steps ---------------------------------------------------------------------------------------


def _replace(report: ExportReport, **changes: Any) -> ExportReport:
    import dataclasses

    return dataclasses.replace(report, **changes)


def _require_onnx() -> None:
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise BackendUnavailableError(
                f"ONNX export needs {mod}: pip install 'nmgraph[onnx]' (onnx, onnxruntime, onnxscript)."
            ) from e


def _run_convert(module: torch.nn.Module, args: tuple, kwargs: dict, p: Pattern,
                 plan: SparsityPlan | None, undo: Rollback) -> tuple[torch.fx.GraphModule, SparsityPlan]:
    """Prunes ``module`` (its own parameters, through a captured graph) to ``p``; returns the graph and plan.
    The pruned tensors are recorded in ``undo`` first."""
    gm = module if isinstance(module, torch.fx.GraphModule) else capture(module, args, kwargs)
    plan = plan if plan is not None else analyze(gm, p)
    config = PruneWeightsConfig(plan)
    undo.keep_tensors(t for t in (fetch_attr(gm, info.name) for info in plan.layers) if isinstance(t, torch.Tensor))
    run_passes(gm, (prune_weights,), config)
    return gm, plan


def _shares_parameters(gm: torch.nn.Module, model: torch.nn.Module) -> bool:
    """True when every parameter of ``gm`` is the model's own object under the same name."""
    if gm is model:
        return True
    own = dict(model.named_parameters(remove_duplicate=False))
    return all(own.get(name) is t for name, t in gm.named_parameters(remove_duplicate=False))


def _model_dtype(module: torch.nn.Module) -> torch.dtype:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _cast_floats(tree: Any, dtype: torch.dtype) -> Any:
    from torch.utils import _pytree

    return _pytree.tree_map(
        lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree
    )


def _flat_tensors(tree: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree

    return [x for x in _pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _to_onnx(module, args, kwargs, path: Path, *, opset, dynamic_batch, exporter, input_names,
             output_names, dynamic_shapes=None) -> tuple[str, str | None]:
    """Runs the exporter(s); returns the one used and why the dynamo exporter was not (if so)."""
    failures: list[str] = []
    if exporter in ("auto", "dynamo"):
        try:
            if dynamic_shapes is None and dynamic_batch:
                dynamic_shapes = batch_dynamic_shapes(module, args, kwargs)
            with torch.no_grad(), _quiet_exporter():
                program = torch.onnx.export(
                    module, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                    dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names,
                    optimize=True, verbose=False,
                )
            program.save(os.fspath(path))
        except UnsupportedError:
            raise
        except Exception as e:
            failures.append(f"torch.onnx.export(dynamo=True): {type(e).__name__}: {_first_line(e)}")
            log.debug("dynamo ONNX export failed", exc_info=True)
            if exporter == "dynamo":
                raise CaptureError(
                    f"ONNX export of {type(module).__name__} failed: {failures[-1]}. Try "
                    "exporter='torchscript', or pass dynamic_batch=False."
                ) from e
        else:
            return "dynamo", None
    n_inputs = len(_flat_tensors((args, kwargs)))
    names = list(input_names) if input_names else [f"input_{i}" for i in range(n_inputs)]
    dynamic_axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    if dynamic_axes is not None and isinstance(dynamic_shapes, Mapping):  # served LM: sequence axis too
        dynamic_axes = {n: {0: "batch", 1: "seq"} for n in names}
    try:
        import warnings

        with warnings.catch_warnings(), torch.no_grad(), _trainable(module):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, os.fspath(path), kwargs=kwargs or None, dynamo=False,
                opset_version=opset or _DEFAULT_TORCHSCRIPT_OPSET, input_names=names,
                output_names=list(output_names) if output_names else None, dynamic_axes=dynamic_axes,
            )
    except Exception as e:
        failures.append(f"torch.onnx.export(dynamo=False): {type(e).__name__}: {_first_line(e)}")
        log.debug("TorchScript ONNX export failed", exc_info=True)
        if any("Guard failed" in f for f in failures):
            hint = ("the graph was captured for other input shapes: pass the example inputs it was "
                    "captured with, or export the original model (convert changes its weights in place)")
        elif any("dtype mismatch" in f for f in failures):
            hint = ("the graph was captured in another dtype (a torch.export graph fixes its dtypes): "
                    "export the original model with fp16=True, or export without fp16")
        else:
            hint = ("pass example inputs exactly as the model is called, use_cache=False for HF "
                    "decoders, or a newer opset (opset=...)")
        raise CaptureError(
            f"ONNX export of {type(module).__name__} failed:\n"
            + "\n".join(f"  - {f}" for f in failures)
            + f"\nTry: {hint}."
        ) from e
    return "torchscript", (failures[0] if failures else None)


def _language_model_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """``(args, kwargs, input names, output name)`` to export a transformers model called with token
    ids as it is served (ids and attention mask, no cache, a plain tuple out); ``None`` for others."""
    if isinstance(module, torch.fx.GraphModule) or not hasattr(module, "config") or not hasattr(module, "forward"):
        return None
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    if "input_ids" not in params or "attention_mask" not in params:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return None
    extra = [k for k in kwargs if k not in ("input_ids", "attention_mask", "use_cache", "return_dict")]
    if len(args) > 1 or extra:
        return None  # other inputs: exported as given
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = module(input_ids=ids, attention_mask=mask, use_cache=False, return_dict=True) if (
            "use_cache" in params) else module(input_ids=ids, attention_mask=mask, return_dict=True)
    first = next((k for k, v in out.items() if isinstance(v, torch.Tensor)), None) if hasattr(out, "items") else None
    if first is None:
        return None
    served = {"input_ids": ids, "attention_mask": mask}
    if "use_cache" in params:
        served["use_cache"] = False
    return (), served, ("input_ids", "attention_mask"), first


def _named_shapes(module: torch.nn.Module, specs: Mapping[str, Any]) -> dict[str, Any]:
    """``dynamic_shapes`` keyed as torch.export wants them: by the forward's parameter names, with
    the inputs that land in a ``**kwargs`` parameter under that parameter's name."""
    import inspect

    bound = inspect.signature(module.forward).bind(**specs)
    return dict(bound.arguments)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx's progress lines and third-party deprecation warnings off for the export (the
    export's own errors still raise); logging levels restored after."""
    import io
    import warnings

    names = ("torch.onnx", "onnxscript", "torch._dynamo", "torch.export")
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


def _name_dims(path: Path, reference: str, names: Sequence[str]) -> None:
    """Gives the symbolic dimensions of input ``reference`` the ``names`` (``batch``, ``seq``) wherever
    they appear in the graph's inputs, outputs and value infos (the exporter numbers them ``s0``...)."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    ref = next((v for v in model.graph.input if v.name == reference), None)
    if ref is None:
        return
    rename = {d.dim_param: n for d, n in zip(ref.type.tensor_type.shape.dim, names) if d.dim_param}
    if not rename:
        return
    for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
    onnx.save(model, os.fspath(path))


def _onnx_io(path: Path) -> tuple[list, list]:
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return list(model.graph.input), list(model.graph.output)


def _onnx_dynamic_axes(path: Path) -> dict[str, dict[int, str]]:
    """``{input or output name: {axis: symbolic size}}`` of the ONNX graph."""
    inputs, outputs = _onnx_io(path)
    out: dict[str, dict[int, str]] = {}
    for v in [*inputs, *outputs]:
        dims = {i: d.dim_param for i, d in enumerate(v.type.tensor_type.shape.dim) if d.dim_param}
        if dims:
            out[v.name] = dims
    return out


@contextlib.contextmanager
def _trainable(module: torch.nn.Module) -> Iterator[None]:
    """Lets the TorchScript exporter call ``train()`` on a graph from ``torch.export`` (which
    refuses it) by setting the flags directly, for the duration of the export."""
    if not isinstance(module, torch.fx.GraphModule):
        yield
        return
    try:
        module.train(module.training)
    except NotImplementedError:
        pass
    else:
        yield
        return
    module.train = types.MethodType(lambda self, mode=True: torch.nn.Module.train(self, mode), module)
    try:
        yield
    finally:
        del module.train


def _first_line(e: BaseException) -> str:
    """The first line of the innermost cause (the exporters wrap the real error), without colors."""
    import re

    while e.__cause__ is not None and str(e.__cause__).strip():
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__


def _check_model(path: Path) -> int | None:
    import onnx

    try:
        onnx.checker.check_model(os.fspath(path))
    except onnx.checker.ValidationError as e:
        raise VerificationError(f"onnx.checker rejected {str(path)!r}: {_first_line(e)}") from e
    proto = onnx.load(os.fspath(path), load_external_data=False)
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _verify(module, args, kwargs, path: Path, tol: tuple[float, float], dynamic_batch: bool) -> tuple[float, ...]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    diffs = list(_compare(module, args, kwargs, session, tol, "the example inputs"))
    if dynamic_batch:
        bigger = _grow_batch((args, kwargs))
        diffs = [max(a, b) for a, b in zip(diffs, _compare(module, *bigger, session, tol,
                                                           "the example inputs at batch size + 1"))]
    return tuple(diffs)


def _grow_batch(tree: Any) -> Any:
    from torch.utils import _pytree

    def grow(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return torch.cat([x, x[:1]])
        return x

    return _pytree.tree_map(grow, tree)


def _compare(module, args, kwargs, session, tol, what: str) -> list[float]:
    feeds_t = _flat_tensors((args, kwargs))
    inputs = session.get_inputs()
    if len(inputs) != len(feeds_t):
        raise VerificationError(
            f"The ONNX graph takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}) but the "
            f"example inputs hold {len(feeds_t)} tensors; pass inputs exactly as the model is called."
        )
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(inputs, feeds_t)}
    try:
        with torch.no_grad():
            ref = _flat_tensors(module(*args, **kwargs))
    except Exception as e:
        raise VerificationError(
            f"The PyTorch model itself fails on {what} ({type(e).__name__}: {_first_line(e)}), so the "
            "export cannot be verified there"
            + ("; the model does not run at another batch size: export with dynamic_batch=False."
               if "batch size + 1" in what else ".")
        ) from e
    got = session.run(None, feeds)
    if len(got) != len(ref):
        raise VerificationError(
            f"onnxruntime returned {len(got)} outputs on {what}, PyTorch {len(ref)}; the export "
            "dropped or added outputs."
        )
    rtol, atol = tol
    diffs = []
    for i, (g, r) in enumerate(zip(got, ref)):
        g_t = torch.from_numpy(g)
        if tuple(g_t.shape) != tuple(r.shape):
            raise VerificationError(
                f"Output {i} has shape {tuple(g_t.shape)} in onnxruntime and {tuple(r.shape)} in "
                f"PyTorch on {what}."
            )
        if not r.is_floating_point():
            bad = int((g_t != r.cpu()).sum())
            if bad:
                raise VerificationError(f"Output {i} ({r.dtype}) differs in {bad} entries on {what}.")
            diffs.append(0.0)
            continue
        g64, r64 = g_t.double(), r.detach().cpu().double()
        err = (g64 - r64).abs()
        limit = atol + rtol * r64.abs()
        worst = float(err.max()) if err.numel() else 0.0
        if not bool((err <= limit).all()) or (math.isnan(worst) and not torch.isnan(r64).all()):
            idx = int(torch.argmax(err - limit))
            raise VerificationError(
                f"onnxruntime output {i} differs from PyTorch on {what}: max |diff| {worst:.3g} "
                f"(at flat index {idx}) exceeds atol {atol:g} + rtol {rtol:g} * |torch|. The export "
                "changed the model's numerics; try exporter='torchscript', or loosen rtol/atol if "
                "the model is numerically sensitive."
            )
        diffs.append(worst)
    return diffs

"""``nmgraph.compile`` and the ``torch.compile`` backend: the whole pipeline behind one call.

capture -> analyze -> permute -> convert (prune, or keep already-N:M weights) -> lower_linears.
Capture is lazy, like ``torch.compile``: it happens on the first call, with the real inputs. A new
input signature (shapes, dtypes) captures and lowers again; permutation and pruning happen once,
since they change the model's own parameters in place.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import fx

from nmgraph.analysis import analyze
from nmgraph.backends import backend_names
from nmgraph.backends.dispatch import Dispatcher
from nmgraph.capture import capture
from nmgraph.compress import ModelSummary, model_summary
from nmgraph.errors import BackendUnavailableError, UnsupportedError
from nmgraph.exporters.tensorrt import compile_torch_tensorrt, require_tensorrt
from nmgraph.graph import fetch_attr
from nmgraph.passes.lower_linears import LowerLinearsConfig, lower_linears
from nmgraph.passes.permute_channels import permute
from nmgraph.passes.prune_weights import PruneWeightsConfig, prune_weights
from nmgraph.passes.runner import run_passes
from nmgraph.pattern import Pattern, PatternLike, is_nm
from nmgraph.rollback import Rollback
from nmgraph.search import SEARCHES
from nmgraph.training import prepare, without_dropout
from nmgraph.validate import check_plan_finite, check_seed, check_time_limit

__all__ = ["CompileOptions", "CompileReport", "CompiledModule", "TorchCompileBackend", "compile", "nmgraph_backend"]

log = logging.getLogger(__name__)

MODES = ("inference", "train")


def compile_backends() -> tuple[str, ...]:
    """``backend`` values of :func:`compile`: ``"auto"``, every registered backend, ``"eager"`` and ``"tensorrt"``."""
    return ("auto", *backend_names(), "eager", "tensorrt")


@dataclass(frozen=True)
class CompileOptions:
    """The options of :func:`compile` (and of ``torch.compile(..., backend="nmgraph", options=...)``).

    ``permute``: reorder channels before pruning; ``search``, ``seed``, ``time_limit``, ``progress``:
    the permutation search; ``include`` / ``exclude``: name patterns for the plan; ``strict``: raise
    instead of leaving a layer dense; ``method``: the training method of ``mode="train"``;
    ``dispatcher`` or ``cache_path``: the per-layer backend measurements (a persistent JSON cache);
    ``inductor``: compile the lowered graph with inductor (positional inputs only);
    ``inductor_mode``: inductor's mode for it, as ``torch.compile(mode=...)``: ``"reduce-overhead"``
    captures CUDA graphs (inductor's cudagraph trees; docs/deploy.md), ``"max-autotune"``, ...;
    ``tensorrt_options``: keyword arguments of Torch-TensorRT.
    """

    permute: bool = True
    search: str = "greedy"
    seed: int = 0
    time_limit: float | None = None
    progress: bool = False
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    strict: bool = False
    method: Any = "sr-ste"
    dispatcher: Dispatcher | None = None
    cache_path: Any = None
    inductor: bool = False
    inductor_mode: str = "default"
    tensorrt_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise UnsupportedError(f"nmgraph.compile(search={self.search!r}) is not one of {', '.join(SEARCHES)}.")
        check_seed(self.seed, "nmgraph.compile")
        check_time_limit(self.time_limit, "nmgraph.compile")
        if self.inductor_mode != "default":
            modes = inductor_modes()
            if self.inductor_mode not in modes:
                raise UnsupportedError(
                    f"nmgraph.compile(inductor_mode={self.inductor_mode!r}) is not one of {', '.join(modes)} "
                    "(torch.compile's modes)."
                )
        if self.dispatcher is not None and not isinstance(self.dispatcher, Dispatcher):
            raise UnsupportedError(
                f"nmgraph.compile(dispatcher=...) must be an nmgraph.backends.dispatch.Dispatcher, got "
                f"{type(self.dispatcher).__name__}."
            )

    @classmethod
    def from_dict(cls, options: Mapping[str, Any], where: str = "nmgraph.compile",
                  also: Sequence[str] = ()) -> CompileOptions:
        """Builds the options; an unknown name is an error that lists the valid ones (and ``also``)."""
        valid = [*also, *(f.name for f in fields(cls))]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise UnsupportedError(
                f"{where}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(valid)}."
            )
        return cls(**options)


@dataclass
class CompileReport:
    """What the pipeline did on the first call (plan, permutation, lowering) per input signature."""

    plan: Any = None
    permute: Any = None
    #: the model-level line (N:M weights, share of parameters, bytes dense and compressed)
    model: ModelSummary | None = None
    lowerings: dict[tuple, Any] = field(default_factory=dict)
    #: per signature, what a call runs: "graph" (the lowered graph), "inductor" (it, compiled) or
    #: "model" (no GEMM was lowered, so the model's own forward runs: its weights are the pruned,
    #: permuted ones and the captured graph would only add per-node Python overhead)
    runs: dict[tuple, str] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [self.model.line()] if self.model is not None else []
        parts += [str(self.plan)] if self.plan is not None else []
        if self.permute is not None:
            parts.append(str(self.permute))
        for sig, result in self.lowerings.items():
            lowered = len(result.changed_nodes)
            runs = {"model": "runs the model's own forward with its pruned weights",
                    "inductor": "runs the lowered graph compiled by inductor"}.get(self.runs.get(sig), "runs the lowered graph")
            parts.append(f"signature {sig}: {lowered} GEMMs lowered, {len(result.skipped)} left dense; {runs}:")
            parts.extend(f"  {s.name}: {s.reason}" for s in result.skipped)
        return "\n".join(parts)


def inductor_modes() -> tuple[str, ...]:
    """The modes inductor knows (``torch.compile(mode=...)``)."""
    from torch._inductor import list_mode_options

    return tuple(list_mode_options())


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str = "default") -> Any:
    """``gm`` compiled by inductor in ``mode`` (``"reduce-overhead"``: CUDA graphs, via cudagraph trees)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches=dict(list_mode_options(mode)))


def _signature(args: Sequence[Any], kwargs: dict) -> tuple:
    def sig(x):
        return (tuple(x.shape), str(x.dtype), str(x.device)) if isinstance(x, torch.Tensor) else repr(x)

    return tuple(sig(a) for a in args) + tuple((k, sig(v)) for k, v in sorted(kwargs.items()))


class CompiledModule(torch.nn.Module):
    """The result of :func:`nmgraph.compile`: call it like the original model."""

    def __init__(self, model: torch.nn.Module, pattern: Pattern, backend: str, mode: str,
                 options: CompileOptions) -> None:
        super().__init__()
        self.model = model
        self.pattern = pattern
        self.backend = backend
        self.mode = mode
        self.options = options
        self.report = CompileReport()
        self._graphs: dict[tuple, Any] = {}  # per signature: lowered graph, inductor callable or the model
        self._sparsified = False
        self._dispatcher = None  # one per compiled model: measurements are shared across signatures

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sig = _signature(args, kwargs)
        gm = self._graphs.get(sig)
        if gm is None:
            gm = self._build(args, kwargs, sig)
            self._graphs[sig] = gm
        return gm(*args, **kwargs)

    def _build(self, args, kwargs, sig, *, lowered_only: bool = False, dynamic_shapes: Any = None) -> Any:
        """Runs the pipeline for one input signature; returns what calls with it run (or, with
        ``lowered_only``, always the lowered graph: the torch.compile backend compiles that).
        ``dynamic_shapes``: captured so (Dynamo's dynamic shapes): the graph is called with other sizes."""
        dynamic_rows = dynamic_shapes is not None
        opts = self.options
        if self.mode == "train":
            return prepare(self.model, args, self.pattern, method=opts.method, permute=opts.permute, kwargs=kwargs,
                           search=opts.search, seed=opts.seed, time_limit=opts.time_limit, progress=opts.progress)
        if self.backend == "tensorrt":  # fails fast, with what to install, before touching the weights
            require_tensorrt("torch_tensorrt")
        # one graph per input signature, lowered for it (dynamic only where Dynamo's shapes say so)
        gm = capture(self.model, args, kwargs, dynamic=False, dynamic_shapes=dynamic_shapes)
        plan = analyze(gm, self.pattern, include=opts.include, exclude=opts.exclude)
        if self._dispatcher is None and self.backend != "tensorrt":
            self._dispatcher = opts.dispatcher or Dispatcher(cache_path=opts.cache_path)
        self._check_backend(gm, plan)
        check_plan_finite(gm, plan)
        # permute, prune and lower change the model's own tensors: all of it, or none of it
        with Rollback() as undo:
            undo.keep_tensors(fetch_attr(gm, m.name) for g in plan.groups for m in g.members)
            undo.keep_tensors(fetch_attr(gm, info.name) for info in plan.layers)
            permuted = None
            if not self._sparsified and opts.permute:
                with without_dropout(gm):  # verified with dropout off
                    permuted = permute(gm, plan, search=opts.search, seed=opts.seed,
                                       time_limit=opts.time_limit, progress=opts.progress)
            run_passes(gm, (prune_weights,), PruneWeightsConfig(plan))
            # before lowering, which moves the weights into the compressed buffers of its ops
            summary = model_summary(gm, self.pattern, {i.name: i.axis for i in plan.layers
                                                       if is_nm(fetch_attr(gm, i.name), self.pattern, axis=i.axis)})
            try:
                runner = self._lower(gm, plan, args, kwargs, sig, lowered_only, dynamic_rows)
            except BaseException:
                self.report.lowerings.pop(sig, None)
                self.report.runs.pop(sig, None)
                raise
        if not self._sparsified:
            self.report.permute = permuted
            self.report.plan = plan
            self.report.model = summary
        self._sparsified = True
        return runner

    def _check_backend(self, gm: fx.GraphModule, plan: Any) -> None:
        """Refuses, before any weight changes, a backend that cannot run on the weights' device (other
        failures, ``strict=True`` included, are undone by the rollback)."""
        if self.backend in ("auto", "eager", "tensorrt"):
            return
        devices = {fetch_attr(gm, info.name).device for info in plan.layers} or {torch.device("cpu")}
        backend = self._dispatcher.registry.get(self.backend)
        for device in devices:
            reason = backend.device_reason(device) if backend.sparse else None
            if reason is not None:
                raise BackendUnavailableError(
                    f"nmgraph.compile(backend={self.backend!r}) cannot run on {device}: {reason}. Nothing "
                    "was changed. Use backend='auto' (measures and falls back to dense) or 'eager'."
                )

    def _lower(self, gm: fx.GraphModule, plan: Any, args, kwargs, sig, lowered_only: bool,
               dynamic_rows: bool = False) -> Any:
        opts = self.options
        if self.backend == "tensorrt":  # TensorRT picks sparse tactics itself from the N:M weights
            return compile_torch_tensorrt(gm, list(args), **dict(opts.tensorrt_options))
        # every eligible weight: lower_linears lowers what a sparse kernel can read and reports the rest
        weights = {i.name: i.axis for i in plan.layers}
        result = lower_linears(gm, LowerLinearsConfig(weights=weights, pattern=self.pattern, backend=self.backend,
                                                      dispatcher=self._dispatcher, strict=opts.strict,
                                                      dynamic_rows=dynamic_rows))
        self.report.lowerings[sig] = result
        log.info("nmgraph.compile: %d GEMMs lowered for %s", len(result.changed_nodes), sig)
        if lowered_only:
            return result.gm
        if opts.inductor:
            if kwargs:
                raise UnsupportedError("nmgraph.compile(inductor=True) takes positional inputs only; call the "
                                       "compiled module without keyword arguments or leave inductor off.")
            self.report.runs[sig] = "inductor"
            return compile_with_inductor(result.gm, args, opts.inductor_mode)
        if not result.changed_nodes:
            # Nothing runs a sparse kernel (always so on a CPU): the model's own parameters already hold
            # the permuted, pruned weights (capture shares them), so its eager forward computes what
            # the graph computes, without running ~10 aten nodes per layer one by one in Python.
            self.report.runs[sig] = "model"
            return self.model
        self.report.runs[sig] = "graph"
        return result.gm


def compile(
    model: torch.nn.Module,
    pattern: PatternLike = "2:4",
    backend: str = "auto",
    mode: str = "inference",
    **options: Any,
) -> CompiledModule:
    """Makes ``model`` N:M sparse and fast; lazy like ``torch.compile`` (captures on first call).

    ``backend``: ``"auto"`` (per layer the fastest of the registered backends, measured on the
    device; dense on CPU), ``"triton"``, ``"cusparselt"``, ``"eager"`` (folded dense weights),
    ``"tensorrt"`` (Torch-TensorRT with ``sparse_weights=True``; needs ``nmgraph[tensorrt]`` and an
    NVIDIA GPU, else :class:`BackendUnavailableError` says what to install).
    ``mode="train"`` returns the prepared trainable graph on first call (``method=`` option).
    ``options`` are the fields of :class:`CompileOptions` (an unknown name is an error listing the
    valid ones); ``inductor=True`` compiles the lowered graph with inductor, which removes the
    per-node Python overhead of the captured graph. ``result.report`` tells what was done after the
    first call.
    """
    p = Pattern.parse(pattern)
    if backend not in compile_backends():
        raise UnsupportedError(f"nmgraph.compile(backend={backend!r}) is not one of {', '.join(compile_backends())}.")
    if mode not in MODES:
        raise UnsupportedError(f"nmgraph.compile(mode={mode!r}) is not one of {MODES}.")
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedError(f"nmgraph.compile needs a torch.nn.Module, got {type(model).__name__}.")
    return CompiledModule(model, p, backend, mode, CompileOptions.from_dict(options))


def _model_name(node: fx.Node) -> str | None:
    """The qualified name in the user's model (``"0.weight"``) of a parameter Dynamo made a graph input,
    read from the chain of Dynamo's ``source`` objects (``x._modules['0']._parameters['weight']``):
    the keys of ``_modules`` / ``_parameters`` / ``_buffers`` lookups, outermost first. ``None`` when the
    chain holds anything else between them (an attribute that is not a module, a list of parameters)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    parts: list[str] = []
    while source is not None:
        base = getattr(source, "base", None)
        index = getattr(source, "index", None)
        if isinstance(index, str) and getattr(base, "member", None) in ("_modules", "_parameters", "_buffers"):
            parts.append(index)
            source = getattr(base, "base", None)
            continue
        if base is None or getattr(base, "base", None) is None:
            break  # the root: a local (``L['self']``), or an argument of a wrapper (``L['args'][0]``)
        if hasattr(source, "index") or getattr(source, "member", None) not in (None, "_modules"):
            return None
        source = base
    return ".".join(reversed(parts)) if parts else None


def _bind_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int]]:
    """Turns Dynamo's parameter placeholders into ``get_attr`` nodes of the same Parameter objects,
    under their names in the user's model where Dynamo's graph says them (so plans and reports name
    ``0.weight``, not a graph input), else ``nmgraph_param_<i>``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    real: list[int] = []
    taken: set[str] = set()
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.nn.Parameter):
            real.append(i)
            continue
        name = _model_name(node)
        if name is None or name in taken or not _free_path(gm, name):
            name = f"nmgraph_param_{i}"
        taken.add(name)
        owner_path, _, leaf = name.rpartition(".")
        owner: torch.nn.Module = gm
        for part in owner_path.split(".") if owner_path else ():
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, value)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, real


def _free_path(gm: fx.GraphModule, name: str) -> bool:
    """Whether ``name`` can be registered under ``gm``: each prefix is absent or a plain container
    module nmgraph made, and the leaf is absent."""
    owner: Any = gm
    *path, leaf = name.split(".")
    for part in path:
        if not part.isidentifier() and not part.isdigit():
            return False
        child = getattr(owner, part, None)
        if child is None:
            return True
        if type(child) is not torch.nn.Module:
            return False
        owner = child
    return (leaf.isidentifier() or leaf.isdigit()) and not hasattr(owner, leaf)


def _sizes_from_tensors(gm: fx.GraphModule, real: list[int], example_inputs: Sequence[Any]
                        ) -> tuple[fx.GraphModule, list[int], Any]:
    """With dynamic shapes Dynamo passes sizes (``SymInt``) beside the tensors. Each size input is
    replaced by ``aten.sym_size`` of the tensor dim it names, and the dims Dynamo made dynamic are
    given to ``torch.export`` as ``Dim.AUTO``, so the graph is captured with symbolic sizes. Returns the
    graph, the indices of the inputs it still takes, and the ``dynamic_shapes`` (``None``: static)."""
    sizes = [i for i in real if isinstance(example_inputs[i], torch.SymInt)]
    if not sizes:
        return gm, real, None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    by_position = dict(zip(real, placeholders))
    tensors = [i for i in real if isinstance(example_inputs[i], torch.Tensor)]
    where: dict[str, tuple[fx.Node, int]] = {}
    for i in tensors:
        val = by_position[i].meta.get("example_value")
        for d, size in enumerate(getattr(val, "shape", ())):
            if isinstance(size, torch.SymInt):
                where.setdefault(str(size), (by_position[i], d))
    if any(str(by_position[i].meta.get("example_value")) not in where for i in sizes):
        return gm, real, None  # a size no tensor input carries: the caller runs the graph unlowered
    for i in sizes:
        node = by_position[i]
        found = where[str(node.meta.get("example_value"))]
        if node.users:
            with gm.graph.inserting_after(found[0]):
                size = gm.graph.call_function(torch.ops.aten.sym_size.int, found)
            node.replace_all_uses_with(size)
        gm.graph.erase_node(node)
    gm.recompile()
    dynamic = {str(by_position[i].target): {d: torch.export.Dim.AUTO for d, s in
                                            enumerate(by_position[i].meta["example_value"].shape)
                                            if isinstance(s, torch.SymInt)} for i in tensors}
    specs = tuple(dynamic[str(by_position[i].target)] or None for i in tensors)
    params = list(inspect.signature(gm.forward).parameters.values())
    if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:  # forward(*args): one spec for args
        return gm, tensors, (specs,)
    return gm, tensors, specs


class TorchCompileBackend:
    """A ``torch.compile`` backend object that keeps a report of what it did to each graph.

    ``torch.compile(model, backend="nmgraph", options={...})`` runs the pipeline, but what it did
    (the plan, the permutation, which GEMMs were lowered and why the others were not) stays inside
    Dynamo. Made by the caller and passed as the backend, this object keeps it::

        backend = nmgraph.TorchCompileBackend("2:4", time_limit=30)
        opt = torch.compile(model, backend=backend)
        opt(x)
        print(backend.reports[0])

    ``pattern``, ``backend`` (the kernel backend, as in :func:`compile`) and ``inductor`` (hand the
    lowered graph to inductor, default ``True``) are those of the ``"nmgraph"`` backend's options;
    ``options`` are the fields of :class:`CompileOptions`, checked here. ``options=`` given to
    ``torch.compile`` as well are added to them (a name given twice takes torch.compile's value).
    ``reports`` holds one :class:`CompileReport` per graph Dynamo compiled, in order (a graph break
    or a recompilation for new shapes adds one); ``compiled`` the matching :class:`CompiledModule`.
    State lives in the object, so two models compiled with two objects never share it.
    """

    def __init__(self, pattern: PatternLike = "2:4", backend: str = "auto", *, inductor: bool = True,
                 **options: Any) -> None:
        self.pattern = Pattern.parse(pattern)
        if backend not in compile_backends():
            raise UnsupportedError(f"nmgraph.TorchCompileBackend(backend={backend!r}) is not one of "
                                   f"{', '.join(compile_backends())}.")
        self.backend = backend
        self.inductor = bool(inductor)
        CompileOptions.from_dict(options, where="nmgraph.TorchCompileBackend")
        self.options = dict(options)
        self.compiled: list[CompiledModule] = []

    @property
    def reports(self) -> list[CompileReport]:
        return [c.report for c in self.compiled]

    def __repr__(self) -> str:
        return (f"TorchCompileBackend(pattern='{self.pattern}', backend={self.backend!r}, inductor={self.inductor}, "
                f"graphs={len(self.compiled)})")

    def __str__(self) -> str:
        head = f"nmgraph torch.compile backend ({self.pattern}, {self.backend}): {len(self.compiled)} graphs compiled"
        return "\n".join([head, *(f"graph {i}:\n{r}" for i, r in enumerate(self.reports))])

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
        """What Dynamo calls with each graph (``kwargs``: torch.compile's ``options`` and ``mode``)."""
        options = {**self.options, **dict(kwargs.get("options") or {})}
        pattern = options.pop("pattern", self.pattern)
        backend = options.pop("backend", self.backend)
        use_inductor = options.pop("inductor", self.inductor)
        if kwargs.get("mode") is not None:
            options.setdefault("inductor_mode", kwargs["mode"])
        CompileOptions.from_dict(options, where='torch.compile(backend="nmgraph", options=...)',
                                 also=("pattern", "backend", "inductor"))
        return self._compile_graph(gm, example_inputs, pattern, backend, use_inductor, options)

    def _compile_graph(self, gm: fx.GraphModule, example_inputs: Sequence[Any], pattern: PatternLike,
                       backend: str, use_inductor: bool, options: dict[str, Any]) -> Any:
        bound, real_idx = _bind_parameters(gm, example_inputs)
        bound, real_idx, dynamic_shapes = _sizes_from_tensors(bound, real_idx, example_inputs)
        n_all = len(example_inputs)
        if any(isinstance(example_inputs[i], torch.SymInt) for i in real_idx):
            # sizes no input tensor carries: this graph cannot be captured with them symbolic
            log.warning("nmgraph backend: Dynamo passed sizes that no input tensor carries; this graph runs as "
                        "Dynamo traced it, with the model's current weights and no sparse kernel. Use "
                        "torch.compile(..., dynamic=False) (one graph per shape) or nmgraph.compile.")

            def run_unlowered(*args: Any) -> Any:
                return bound(*(tuple(args[i] for i in real_idx) if len(args) == n_all else args))

            return run_unlowered
        compiled = compile(bound, pattern, backend, **options)
        real_examples = [example_inputs[i] for i in real_idx]
        lowered = compiled._build(tuple(real_examples), {}, _signature(real_examples, {}), lowered_only=True,
                                  dynamic_shapes=dynamic_shapes)
        self.compiled.append(compiled)
        runner: Any = lowered
        if use_inductor and dynamic_shapes is not None:
            # compile_fx specialises the graph to the example shapes, and Dynamo calls this graph with any
            # size: the lowered graph runs as an FX graph, right at every shape (CUDA graphs are per shape
            # anyway: torch.compile(..., dynamic=False) keeps one inductor graph per shape).
            log.info("nmgraph backend: dynamic shapes; the lowered graph runs without inductor")
        elif use_inductor:
            compiled.report.runs[_signature(real_examples, {})] = "inductor"
            runner = compile_with_inductor(lowered, real_examples, compiled.options.inductor_mode)
        else:
            compiled.report.runs[_signature(real_examples, {})] = "graph"

        def run(*args: Any) -> Any:
            if len(args) == n_all:  # Dynamo passes parameters too: they are bound in the graph now
                args = tuple(args[i] for i in real_idx)
            return runner(*args)

        run.nmgraph_compiled = compiled  # type: ignore[attr-defined]
        return run


def nmgraph_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """``torch.compile(model, backend="nmgraph", options={"pattern": "2:4", ...})``.

    Dynamo passes the model's parameters as graph inputs; they are bound back to the Parameter
    objects so the pipeline can analyze, permute and prune them, and the returned callable drops
    them from each call. The sparsified, lowered graph then goes to inductor (the nmgraph ops have
    fake implementations, so inductor compiles the rest of the graph around them); pass
    ``options={"inductor": False}`` to run it as an FX graph instead. To read what was done, pass a
    :class:`TorchCompileBackend` object as the backend instead of the name: it keeps the reports.

    ``torch.compile(model, backend="nmgraph", mode="reduce-overhead")`` (or, since torch.compile takes
    ``mode`` or ``options`` but not both, ``options={..., "inductor_mode": "reduce-overhead"}``)
    compiles it with inductor's CUDA graphs (docs/deploy.md). When Dynamo hands over a graph with
    dynamic shapes (sizes among the inputs), it is captured with those sizes symbolic, every lowered
    op also gets its layer's dense weight, which it runs for rows outside its kernels' range (prefill
    sizes through a decode kernel), and the graph runs as an FX graph (inductor would specialise it
    to one shape); ``dynamic=False`` keeps one inductor graph per shape instead.
    """
    return TorchCompileBackend()(gm, example_inputs, **kwargs)

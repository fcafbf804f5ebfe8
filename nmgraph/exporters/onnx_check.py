"""Which weights of an ONNX graph TensorRT can run with N:M sparse math, and which lost the pattern.

TensorRT picks sparse tactics only for *constant* weights that are N:M along the axis its GEMM
reduces over. An export can lose that silently: the exporter folds a transpose into the weight,
a Linear becomes ``MatMul`` (weight ``[K, N]``) instead of ``Gemm`` (weight ``[N, K]`` with
``transB=1``), or a weight is computed at run time. This module reads the graph the way TensorRT
does and reports every weight-bearing node:

* ``Gemm``: the weight is input B; ``transB=1`` stores it ``[N, K]`` (groups along axis 1),
  ``transB=0`` stores it ``[K, N]`` (groups along axis 0).
* ``MatMul``: the weight is input B, ``[K, N]``: groups along axis 0.
* ``Conv``: the weight is ``[out, in/groups, *kernel]``: groups along axis 1 at every
  ``(out, *kernel)`` position (NHWC), the layout of :func:`nmgraph.nm_mask`.

Weights are followed back through ``Transpose``, ``Cast``, ``Identity``, ``Constant`` and
zero-point-free ``DequantizeLinear`` nodes, applying each, so the tensor checked is the one the
consuming node reads. Each weight gets a status: ``eligible`` (N:M along the reduction axis),
``lost`` (N:M in the model but not here, pruned along the wrong axis, or computed at run time) or
``dense`` (never N:M), each with the reason.

Eligible means the pattern is right; TensorRT still times sparse against dense tactics and keeps
the faster one (its build log / engine inspector says which it chose).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch

from nmgraph.errors import BackendUnavailableError, SerializationError, UnsupportedError
from nmgraph.pattern import Pattern, PatternLike, group_view

__all__ = [
    "LayerStatus",
    "NMDiagnosis",
    "OnnxLayer",
    "OnnxSparsityReport",
    "check_onnx",
    "diagnose_nm",
    "parameter_aliases",
]

log = logging.getLogger(__name__)

# Nodes a constant weight may pass through on its way to the GEMM, unchanged in its zero pattern
# up to the transform applied here. Anything else makes the weight a run-time value.
_PASS_THROUGH = ("Transpose", "Cast", "Identity", "DequantizeLinear")
# Consuming op -> how its weight input is read. (input index, reduction axis rule.)
_WEIGHT_OPS = ("Gemm", "MatMul", "Conv")
_TORCH_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_MAX_BACKTRACK = 8


class LayerStatus(str, Enum):
    """Where a weight stands for TensorRT's sparse tactics."""

    ELIGIBLE = "eligible"
    LOST = "lost"
    DENSE = "dense"


@dataclass(frozen=True)
class NMDiagnosis:
    """Whether a weight is N:M along ``axis``, and if not, why (see :func:`diagnose_nm`)."""

    ok: bool
    reason: str = ""
    divisible: bool = True
    bad_groups: int = 0
    groups: int = 0
    other_axis: int | None = None


def diagnose_nm(weight: torch.Tensor, pattern: PatternLike, axis: int) -> NMDiagnosis:
    """Checks ``weight`` for ``pattern`` along ``axis`` and explains a failure.

    The explanation counts the offending groups and says whether the weight is N:M along another
    axis instead (the signature of a weight pruned along the wrong axis or transposed in export).

    >>> w = torch.tensor([[1.0, 0.0, 2.0, 0.0], [3.0, 4.0, 0.0, 0.0]])
    >>> diagnose_nm(w, "2:4", axis=1).ok
    True
    >>> d = diagnose_nm(w.t(), "2:4", axis=1)
    >>> d.ok, d.reason
    (False, 'not 2:4 along axis 1 (size 2 is not divisible by M=4)')
    """
    p = Pattern.parse(pattern)
    axis = axis % weight.dim()
    k = weight.shape[axis]
    if k % p.m:
        return NMDiagnosis(
            False,
            f"not {p} along axis {axis} (size {k} is not divisible by M={p.m})",
            divisible=False,
        )
    nz = group_view(weight.detach() != 0, p.m, axis).sum(-1)
    bad = int((nz > p.n).sum())
    total = nz.numel()
    if not bad:
        return NMDiagnosis(True, groups=total)
    other = None
    for a in range(weight.dim()):
        if (a != axis and weight.shape[a] % p.m == 0 and weight.shape[a] > 1
                and bool((group_view(weight.detach() != 0, p.m, a).sum(-1) <= p.n).all())):
            other = a
            break
    reason = (
        f"not {p} along axis {axis}: {bad} of {total} groups of {p.m} have more than {p.n} "
        "nonzeros"
    )
    if other is not None:
        reason += f"; the weight is {p} along axis {other} instead (pruned or transposed on the wrong axis)"
    return NMDiagnosis(False, reason, bad_groups=bad, groups=total, other_axis=other)


@dataclass(frozen=True)
class OnnxLayer:
    """One weight read by a Gemm / MatMul / Conv node of an ONNX graph.

    ``name`` is the PyTorch parameter name when it could be recovered (see ``name_source``),
    ``shape`` and ``axis`` describe the tensor *as the node reads it* (after any Transpose it went
    through, listed in ``path``), ``onnx_shape`` the stored initializer. A weight read by several
    nodes (a loop unrolled in export reads one weight at every step) is one entry: ``reads`` counts
    the nodes, ``node`` is the first of those with the entry's status (the worst of the reads:
    lost, then dense, then eligible).
    """

    name: str
    status: LayerStatus
    reason: str
    node: str = ""
    op: str = ""
    initializer: str = ""
    shape: tuple[int, ...] = ()
    onnx_shape: tuple[int, ...] = ()
    axis: int | None = None
    path: tuple[str, ...] = ()
    name_source: str = ""
    reads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "reason": self.reason,
            "node": self.node,
            "op": self.op,
            "initializer": self.initializer,
            "shape": list(self.shape),
            "onnx_shape": list(self.onnx_shape),
            "axis": self.axis,
            "path": list(self.path),
            "name_source": self.name_source,
            "reads": self.reads,
        }


@dataclass(frozen=True)
class OnnxSparsityReport:
    """Every weight-bearing node of an ONNX graph and its N:M status (see :func:`check_onnx`)."""

    pattern: Pattern
    layers: tuple[OnnxLayer, ...]
    notes: tuple[str, ...] = field(default=())

    def _with(self, status: LayerStatus) -> tuple[OnnxLayer, ...]:
        return tuple(layer for layer in self.layers if layer.status is status)

    @property
    def eligible(self) -> tuple[OnnxLayer, ...]:
        return self._with(LayerStatus.ELIGIBLE)

    @property
    def lost(self) -> tuple[OnnxLayer, ...]:
        return self._with(LayerStatus.LOST)

    @property
    def dense(self) -> tuple[OnnxLayer, ...]:
        return self._with(LayerStatus.DENSE)

    @property
    def ok(self) -> bool:
        """True when no weight lost its pattern."""
        return not self.lost

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": str(self.pattern),
            "eligible": len(self.eligible),
            "lost": len(self.lost),
            "dense": len(self.dense),
            "layers": [layer.to_dict() for layer in self.layers],
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kwargs))

    def __str__(self) -> str:
        lines = [
            f"ONNX sparsity check {self.pattern}: {len(self.eligible)} eligible, "
            f"{len(self.lost)} lost, {len(self.dense)} dense"
        ]
        width = max([len(x.name) for x in self.layers] + [6])
        for layer in self.layers:
            shape = "x".join(map(str, layer.shape)) or "-"
            reads = f" (read by {layer.reads} nodes)" if layer.reads > 1 else ""
            lines.append(
                f"  {layer.status.value:<8}  {layer.name:<{width}}  {layer.op or '-':<6} {shape:<14} "
                f"{layer.reason}{reads}"
            )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def parameter_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Maps every parameter name (tied ones included) to the first name of the same tensor.

    >>> lin = torch.nn.Linear(2, 2)
    >>> m = torch.nn.ModuleDict({"a": lin, "b": lin})
    >>> parameter_aliases(m)["b.weight"]
    'a.weight'
    """
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


def check_onnx(
    model: Any,
    pattern: PatternLike = "2:4",
    *,
    expected: Collection[str] | None = None,
    reference: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
) -> OnnxSparsityReport:
    """Inspects an ONNX model (path or ``onnx.ModelProto``) for N:M weights TensorRT can use.

    ``expected``: names of the weights that are N:M in the PyTorch model; one that is not N:M
    along the reduction axis in the graph, or that no node reads as a constant, is ``lost``.
    Without it, only weights that are N:M along another axis are flagged ``lost``.
    ``reference``: the PyTorch model (or its ``{name: tensor}``) used to name ONNX weights whose
    initializer names the exporter generated; tied parameters are reported under their first name.
    """
    onnx = _import_onnx()
    from onnx import numpy_helper

    p = Pattern.parse(pattern)
    proto = _load_proto(model, onnx)
    base_dir = os.path.dirname(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else ""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    resolver = _Namer(reference)
    expected_set = {resolver.canonical(n) for n in expected} if expected is not None else None

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name], base_dir)
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    layers: list[OnnxLayer] = []
    notes: list[str] = []
    for node in graph.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        traced = _trace(node.input[1], producers, const)
        if traced is None:
            if node.op_type == "Gemm" and _trace(node.input[0], producers, const) is not None:
                layers.append(_a_side_layer(node, resolver, inits, producers, const))
            continue  # activation x activation product (attention scores): not a weight
        if traced.blocker is not None:
            layer = _runtime_layer(node, traced, resolver, expected_set, producers, const)
            if layer is not None:
                layers.append(layer)
            continue
        layers.append(_classify(node, attrs, traced, p, resolver, expected_set))

    if expected_set is not None:
        found = {layer.name for layer in layers}
        for name in sorted(expected_set - found):
            layers.append(OnnxLayer(
                name, LayerStatus.LOST,
                f"{name} is {p} in the model, but no Gemm/MatMul/Conv of the ONNX graph reads it as a "
                "constant weight (fused into another op, computed at run time, or exported under a "
                "name nmgraph could not match); TensorRT will run it dense",
            ))
    layers = _one_per_weight(layers)
    if any(n.op_type in ("If", "Loop", "Scan") for n in graph.node):
        notes.append("the graph has If/Loop/Scan subgraphs; weights inside them were not inspected")
    for layer in layers:
        if layer.status is LayerStatus.LOST:
            log.warning("N:M pattern lost in ONNX export: %s (%s): %s", layer.name, layer.node, layer.reason)
    return OnnxSparsityReport(p, tuple(layers), tuple(notes))


_SEVERITY = {LayerStatus.LOST: 0, LayerStatus.DENSE: 1, LayerStatus.ELIGIBLE: 2}


def _one_per_weight(layers: list[OnnxLayer]) -> list[OnnxLayer]:
    """One entry per weight, in order of first read: the worst status of its reads, with ``reads``."""
    by_name: dict[str, list[OnnxLayer]] = {}
    for layer in layers:
        by_name.setdefault(layer.name, []).append(layer)
    out = []
    for reads in by_name.values():
        worst = min(reads, key=lambda x: _SEVERITY[x.status])
        if len(reads) > 1:
            same = sum(x.status is worst.status for x in reads)
            note = "" if same == len(reads) else f" ({same} of its {len(reads)} reads)"
            worst = dataclasses.replace(worst, reason=worst.reason + note, reads=len(reads))
        out.append(worst)
    return out


# --- graph walking -----------------------------------------------------------------------------


@dataclass
class _Traced:
    value: np.ndarray | None  # the tensor as the consuming node reads it
    stored: np.ndarray | None  # the initializer as stored
    initializer: str
    path: tuple[str, ...]
    blocker: Any = None  # the first node that is not a pass-through, when the weight is computed


def _trace(name: str, producers: Mapping[str, Any], const) -> _Traced | None:
    """Follows ``name`` back to a constant through pass-through nodes and applies them.

    Returns ``None`` when it reaches a graph input (no weight), a ``_Traced`` with ``blocker`` set
    when it reaches a computing node that has a constant tensor of rank >= 2 among its inputs.
    """
    chain: list[Any] = []
    cur = name
    for _ in range(64):
        arr = const(cur)
        if arr is not None:
            value = arr
            for node in reversed(chain):
                value = _apply(node, value)
            return _Traced(value, arr, cur, tuple(n.op_type for n in chain))
        node = producers.get(cur)
        if node is None or not node.input:
            return None
        if node.op_type in _PASS_THROUGH and _is_pass_through(node, const):
            chain.append(node)
            cur = node.input[0]
            continue
        source = _find_weight_behind(node, producers, const, depth=0)
        if source is None:
            return None
        return _Traced(None, source[1], source[0], tuple(n.op_type for n in chain), blocker=node)
    return None


def _is_pass_through(node: Any, const) -> bool:
    if node.op_type != "DequantizeLinear":
        return True
    if len(node.input) < 3 or not node.input[2]:
        return True
    zp = const(node.input[2])
    return zp is not None and not np.any(zp)


def _apply(node: Any, value: np.ndarray) -> np.ndarray:
    import onnx

    if node.op_type == "Transpose":
        perm = None
        for attr in node.attribute:
            if attr.name == "perm":
                perm = list(attr.ints)
        return np.transpose(value, perm)
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        try:
            return value.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        except (TypeError, KeyError, ValueError):
            return value  # a dtype numpy lacks (e.g. float8): the zero pattern is unchanged
    if node.op_type == "DequantizeLinear":
        return value.astype(np.float32)
    return value


def _find_weight_behind(node: Any, producers, const, depth: int) -> tuple[str, np.ndarray] | None:
    """The largest constant of rank >= 2 feeding ``node``, if everything upstream is constant.

    Returns ``None`` when any path reaches a graph input: then ``node`` computes an activation
    (e.g. attention's ``probs @ V``), not a weight.
    """
    best: tuple[str, np.ndarray] | None = None
    stack = [(node, 0)]
    seen: set[int] = set()
    while stack:
        cur, d = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if d > _MAX_BACKTRACK:
            return None  # too deep to tell: do not guess it is a weight
        for inp in cur.input:
            if not inp:
                continue
            arr = const(inp)
            if arr is not None:
                if arr.ndim >= 2 and (best is None or arr.size > best[1].size):
                    best = (inp, arr)
                continue
            parent = producers.get(inp)
            if parent is None:
                return None  # a graph input: this is an activation
            stack.append((parent, d + 1))
    return best


def _node_label(node: Any) -> str:
    return node.name or f"{node.op_type}({', '.join(node.input)})"


def _reduction_axis(node: Any, attrs: Mapping[str, Any], rank: int) -> tuple[int | None, str]:
    """The axis of the (traced) weight a node reduces over, or ``None`` with the reason."""
    if node.op_type == "Gemm":
        return (1 if attrs.get("transB", 0) else 0), ""
    if node.op_type == "MatMul":
        if rank != 2:
            return None, (
                f"MatMul weight has rank {rank}; TensorRT's sparse tactics take 2-D [K, N] weights"
            )
        return 0, ""
    # Conv
    if rank < 3:
        return None, f"Conv weight has rank {rank}"
    return 1, ""


def _classify(node, attrs, traced: _Traced, p: Pattern, resolver: _Namer, expected) -> OnnxLayer:
    value = traced.value
    name, source = resolver.name(node, traced)
    shape = tuple(int(s) for s in value.shape)
    common = {
        "node": _node_label(node), "op": node.op_type, "initializer": traced.initializer,
        "shape": shape, "onnx_shape": tuple(int(s) for s in traced.stored.shape),
        "path": traced.path, "name_source": source,
    }
    axis, why = _reduction_axis(node, attrs, value.ndim)
    if axis is None:
        return OnnxLayer(name, LayerStatus.DENSE, why, axis=None, **common)
    if node.op_type == "Conv" and shape[1] == 1:
        return OnnxLayer(name, LayerStatus.DENSE,
                         f"depthwise Conv (group={attrs.get('group', 1)}): one input channel per group, "
                         "nothing to group along", axis=axis, **common)
    diag = diagnose_nm(_as_tensor(value), p, axis)
    if diag.ok:
        return OnnxLayer(name, LayerStatus.ELIGIBLE, "", axis=axis, **common)
    layout = _layout(node, attrs)
    if expected is not None and name in expected:
        return OnnxLayer(
            name, LayerStatus.LOST,
            f"{p} in the model, but as {layout} the node reads it {diag.reason}",
            axis=axis, **common)
    if diag.other_axis is not None:
        return OnnxLayer(name, LayerStatus.LOST, f"as {layout}: {diag.reason}", axis=axis, **common)
    return OnnxLayer(name, LayerStatus.DENSE, diag.reason, axis=axis, **common)


def _layout(node: Any, attrs: Mapping[str, Any]) -> str:
    if node.op_type == "Gemm":
        return ("a Gemm weight [N, K] (transB=1)" if attrs.get("transB", 0)
                else "a Gemm weight [K, N] (transB=0)")
    if node.op_type == "MatMul":
        return "a MatMul weight [K, N]"
    return "a Conv weight [out, in/group, *kernel]"


def _runtime_layer(node, traced: _Traced, resolver: _Namer, expected, producers, const) -> OnnxLayer | None:
    name, source = resolver.name(node, traced)
    blocker = traced.blocker
    reason = (
        f"the weight reaches {node.op_type} through {blocker.op_type} node '{_node_label(blocker)}', "
        "so it is computed at run time; TensorRT applies sparse tactics only to constant weights. "
        "Export with constant folding (torch.onnx.export optimize=True) or remove the op"
    )
    status = LayerStatus.LOST if expected is None or name in expected else LayerStatus.DENSE
    if expected is None and not _looks_sparse(traced.stored):
        status = LayerStatus.DENSE
    return OnnxLayer(
        name, status, reason, node=_node_label(node), op=node.op_type, initializer=traced.initializer,
        onnx_shape=tuple(int(s) for s in traced.stored.shape), path=(*traced.path, blocker.op_type),
        name_source=source,
    )


def _a_side_layer(node, resolver: _Namer, inits, producers, const) -> OnnxLayer:
    traced = _trace(node.input[0], producers, const)
    name, source = resolver.name(node, traced)
    return OnnxLayer(
        name, LayerStatus.DENSE,
        "the constant is Gemm input A (left operand); nmgraph checks weights on input B, the layout "
        "the PyTorch exporters produce for Linear layers",
        node=_node_label(node), op=node.op_type, initializer=traced.initializer,
        onnx_shape=tuple(int(s) for s in traced.stored.shape), path=traced.path, name_source=source,
    )


def _looks_sparse(arr: np.ndarray) -> bool:
    return arr.size > 0 and float(np.count_nonzero(arr)) / arr.size <= 0.5


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype.kind not in "fiub":
        arr = arr.astype(np.float32)  # bfloat16 / float8 via ml_dtypes
    return torch.from_numpy(np.array(arr, copy=True, order="C"))


# --- naming -------------------------------------------------------------------------------------


class _Namer:
    """Recovers PyTorch parameter names for ONNX weights.

    In order: the initializer's own name (``Gemm`` and ``Conv`` keep it); the module scope the
    dynamo exporter records in ``pkg.torch.onnx.name_scopes`` or the TorchScript exporter encodes in
    node names (``/bert/encoder/layer.0/.../MatMul``) plus ``.weight``; an exact value match with a
    reference parameter (possibly transposed); finally the initializer name.
    """

    def __init__(self, reference: torch.nn.Module | Mapping[str, torch.Tensor] | None) -> None:
        self.aliases: dict[str, str] = {}
        self.params: dict[str, torch.Tensor] = {}
        if isinstance(reference, torch.nn.Module):
            self.aliases = parameter_aliases(reference)
            self.params = {n: p for n, p in reference.named_parameters(remove_duplicate=False)}
        elif reference is not None:
            self.params = dict(reference)
            self.aliases = {n: n for n in self.params}
        self._by_numel: dict[int, list[str]] | None = None

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def name(self, node: Any, traced: _Traced) -> tuple[str, str]:
        init = traced.initializer
        scoped = _scope_name(node)
        if self.params:
            if init in self.params:
                return self.canonical(init), "initializer"
            if scoped is not None and scoped in self.params:
                return self.canonical(scoped), "scope"
            matched = self._match_value(traced.stored)
            if matched is not None:
                return self.canonical(matched), "value"
            return init, "initializer (no PyTorch match)"
        if scoped is not None:
            return scoped, "scope"
        return init, "initializer"

    def _match_value(self, arr: np.ndarray | None) -> str | None:
        if arr is None or arr.ndim < 2:
            return None
        if self._by_numel is None:
            self._by_numel = {}
            for n, t in self.params.items():
                if t.dim() >= 2 and self.aliases.get(n, n) == n:
                    self._by_numel.setdefault(t.numel(), []).append(n)
        cand = self._by_numel.get(int(arr.size), [])
        target = _as_tensor(arr)
        for n in cand:
            t = self.params[n].detach()
            views = [t] + ([t.t()] if t.dim() == 2 else [])
            for v in views:
                if tuple(v.shape) == tuple(target.shape) and torch.equal(v.to(target.dtype).cpu(), target):
                    return n
        return None


def _scope_name(node: Any) -> str | None:
    """``module.weight`` from the exporter's scope information on ``node``, if any."""
    for prop in node.metadata_props:
        if prop.key == _TORCH_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
                return f"{scopes[-2]}.weight"
            return None
    if node.name.startswith("/") and node.name.count("/") >= 2:
        # TorchScript scopes: "/resnet/encoder/stages.0/layer/layer.0/conv/Conv": a child of a
        # Sequential / ModuleList repeats its parent's name ("layer" then "layer.0").
        path: list[str] = []
        for seg in node.name.strip("/").split("/")[:-1]:
            if path and seg.startswith(path[-1] + "."):
                path[-1] = seg
            else:
                path.append(seg)
        return ".".join(path) + ".weight"
    return None


def _import_onnx():
    try:
        import onnx
    except ImportError as e:

        raise BackendUnavailableError(
            "Checking ONNX graphs needs the onnx package: pip install 'nmgraph[onnx]'."
        ) from e
    return onnx


def _load_proto(model: Any, onnx) -> Any:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise SerializationError(f"ONNX file {path!r} does not exist; check the path.")
        return onnx.load(path)
    raise UnsupportedError(
        f"check_onnx() takes a path or an onnx.ModelProto, got {type(model).__name__}."
    )

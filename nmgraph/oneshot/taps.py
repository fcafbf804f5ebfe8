"""Where an eligible weight meets its input: the GEMM nodes ("taps") that read it and its 2-D problems.

Data-aware pruning needs, per weight, the inputs ``X`` of the GEMM that reads it, as a matrix whose
columns line up with the weight's reduction axis. This module finds those GEMM nodes in the captured
graph (following the parameter through casts and transposes, as :func:`nmgraph.analyze` does) and
turns both sides into *problems* ``(W_p [rows, K_p], X_p [tokens, K_p])`` with ``Y_p = X_p W_p^T``:

* ``linear`` (``aten.linear``, ``addmm``/``mm``/``matmul`` with a 2-D weight, GPT-2's ``Conv1D``
  ``[in, out]``, ``x @ W.T``): one problem, ``X = x.reshape(-1, K)``;
* ``conv`` (``aten.convolution``, ``conv1d/2d/3d``, with stride, padding, dilation and groups): one
  problem per conv group; ``X_p`` holds the input patches with columns in ``(*kernel, channel)``
  order (the channel fastest) and ``W_p = W[group].permute(0, *kernel, 1)``, so every run of ``m``
  columns is ``m`` consecutive input channels at one kernel position: N:M in the NHWC convention;
* ``experts`` (a grouped GEMM of MoE experts, ``aten._grouped_mm`` or transformers'
  ``grouped_mm_fallback``, weights ``[E, out, in]`` read transposed or ``[E, in, out]``): one problem
  per expert, ``X_e`` the rows routed to expert ``e`` (between the ``offs`` boundaries).

Pruning a problem's ``W_p`` N:M along its columns is pruning the weight N:M along its reduction axis.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from nmgraph.errors import UnsupportedError

__all__ = ["ConvSpec", "Geometry", "Tap", "find_taps", "tap_features"]

aten = torch.ops.aten

# ops that pass a weight through unchanged in value (looked through, as the analysis does)
_CASTS = frozenset({aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.clone.default,
                    aten.contiguous.default, aten.alias.default, aten.detach.default})
_TRANSPOSES = frozenset({aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default})
_DENSE = frozenset({aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default})
_CONVS = frozenset({aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                    aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding})
# weight operand index per op
_WEIGHT_ARG = {aten.linear.default: 1, aten.addmm.default: 2, aten.mm.default: 1, aten.matmul.default: 1}


def _grouped_ops() -> frozenset:
    ops = {aten._grouped_mm.default}
    # registered by transformers when its MoE integration is imported; absent otherwise
    with contextlib.suppress(AttributeError, RuntimeError):
        ops.add(torch.ops.transformers.grouped_mm_fallback.default)
    return frozenset(ops)


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of one convolution: ``kernel``, ``stride``, ``padding`` (pairs per spatial dim: before,
    after), ``dilation``, ``groups``."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class Tap:
    """A GEMM node ``node`` that reads eligible weight ``layer``; ``act`` is its input operand,
    ``kind`` one of ``"linear"``, ``"conv"``, ``"experts"``; ``k`` the reduction size (per group);
    ``offs`` the expert boundaries (experts); ``conv`` the convolution's geometry."""

    layer: str
    node: fx.Node
    act: fx.Node
    kind: str
    k: int
    offs: fx.Node | None = None
    conv: ConvSpec | None = None

    @property
    def key(self) -> tuple:
        """Taps with equal keys see the same input matrices (q, k and v projections of one block)."""
        return (self.act, self.kind, self.k, self.offs, self.conv)


@dataclass(frozen=True)
class Geometry:
    """How weight ``shape`` (reduction ``axis``) splits into ``problems`` matrices ``[rows, k]``."""

    shape: tuple[int, ...]
    axis: int
    kind: str
    problems: int
    k: int
    conv: ConvSpec | None = None

    @classmethod
    def of(cls, shape: Sequence[int], axis: int, tap: Tap) -> Geometry:
        shape = tuple(int(s) for s in shape)
        if tap.kind == "linear":
            if len(shape) != 2:
                raise UnsupportedError(f"{tap.layer}: linear weight of shape {list(shape)}; expected 2-D.")
            return cls(shape, axis, "linear", 1, shape[axis])
        if tap.kind == "experts":
            if len(shape) != 3 or axis not in (1, 2):
                raise UnsupportedError(f"{tap.layer}: expert weight of shape {list(shape)} with reduction axis "
                                       f"{axis}; expected [E, out, in] (axis 2) or [E, in, out] (axis 1).")
            return cls(shape, axis, "experts", shape[0], shape[axis])
        spec = tap.conv
        if axis != 1 or spec is None or shape[0] % spec.groups:
            raise UnsupportedError(f"{tap.layer}: convolution weight of shape {list(shape)} (axis {axis}) does not "
                                   "fit its convolution's groups.")
        return cls(shape, axis, "conv", spec.groups, shape[1] * math.prod(shape[2:]), spec)

    def to_problems(self, w: torch.Tensor) -> torch.Tensor:
        """``[problems, rows, k]`` float32 copy of ``w``."""
        w = w.detach()
        if self.kind == "linear":
            out = w if self.axis == 1 else w.t()
            return out.float().unsqueeze(0).clone()
        if self.kind == "experts":
            out = w if self.axis == 2 else w.transpose(1, 2)
            return out.float().clone()
        g = self.problems
        nd = len(self.shape) - 2
        v = w.reshape(g, self.shape[0] // g, *self.shape[1:])  # [g, og, cg, *kernel]
        v = v.permute(0, 1, *range(3, 3 + nd), 2)  # [g, og, *kernel, cg]
        return v.reshape(g, self.shape[0] // g, self.k).float().clone()

    def from_problems(self, p: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_problems`: a tensor of the weight's shape (same dtype as ``p``)."""
        if self.kind == "linear":
            out = p[0]
            return (out if self.axis == 1 else out.t()).contiguous()
        if self.kind == "experts":
            return (p if self.axis == 2 else p.transpose(1, 2)).contiguous()
        g = self.problems
        nd = len(self.shape) - 2
        kernel = self.shape[2:]
        v = p.reshape(g, self.shape[0] // g, *kernel, self.shape[1])
        v = v.permute(0, 1, 2 + nd, *range(2, 2 + nd))  # [g, og, cg, *kernel]
        return v.reshape(self.shape).contiguous()

    def expand(self, vec: torch.Tensor) -> torch.Tensor:
        """Per-input statistics ``[problems, k]`` laid out to broadcast against the weight's shape."""
        if self.kind == "linear":
            return vec[0].unsqueeze(0) if self.axis == 1 else vec[0].unsqueeze(1)
        if self.kind == "experts":
            return vec.unsqueeze(1) if self.axis == 2 else vec.unsqueeze(2)
        rows = vec.unsqueeze(1).expand(self.problems, self.shape[0] // self.problems, self.k)
        return self.from_problems(rows.contiguous())


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _tuple(v: Any, nd: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(x) for x in v)
    return v * nd if len(v) == 1 else v


def _conv_spec(node: fx.Node, w_shape: tuple[int, ...]) -> ConvSpec:
    a = _bind(node)
    nd = len(w_shape) - 2
    kernel = tuple(w_shape[2:])
    stride, dilation = _tuple(a.get("stride", 1), nd), _tuple(a.get("dilation", 1), nd)
    groups = int(a.get("groups", 1))
    padding = a.get("padding", 0)
    if isinstance(padding, str):
        if padding == "valid":
            pads = tuple((0, 0) for _ in range(nd))
        elif padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = tuple((t // 2, t - t // 2) for t in total)
        else:
            raise UnsupportedError(f"{node.format_node()}: convolution padding {padding!r} is not 'same' or 'valid'.")
    else:
        pads = tuple((p, p) for p in _tuple(padding, nd))
    if node.target is aten.convolution.default and bool(a.get("transposed", False)):
        raise UnsupportedError(f"{node.format_node()}: transposed convolution weights reduce along dim 0; "
                               "one-shot pruning does not support them.")
    return ConvSpec(kernel, stride, pads, dilation, groups)


def find_taps(gm: fx.GraphModule, layers: Sequence[Any]) -> dict[str, list[Tap]]:
    """Every GEMM node that reads each eligible weight of ``layers`` (the plan's :class:`LayerInfo`\\ s),
    in graph order. Raises :class:`UnsupportedError` for a layer with no tap (the plan does not fit
    this graph)."""
    grouped = _grouped_ops()
    params = dict(gm.named_parameters(remove_duplicate=False))
    wanted = {id(params[i.name]): i for i in layers if i.name in params}
    taps: dict[str, list[Tap]] = {i.name: [] for i in layers}

    def visit(node: fx.Node, src: fx.Node, info: Any) -> None:
        for user in node.users:
            if user.op != "call_function":
                continue
            if user.target in _CASTS and user.args[0] is node:
                visit(user, src, info)
                continue
            if user.target in _TRANSPOSES and user.args[0] is node:
                visit(user, src, info)
                continue
            tap = _make_tap(user, node, info, grouped)
            if tap is not None:
                taps[info.name].append(tap)

    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            t = _fetch(gm, node.target)
        except AttributeError:
            continue
        info = wanted.get(id(t))
        if info is not None:
            visit(node, node, info)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for info in layers:
        found = sorted(taps[info.name], key=lambda t: order[t.node])
        if not found:
            raise UnsupportedError(
                f"{info.name}: no matmul or convolution of the captured graph reads this weight (the plan names "
                f"{info.node}); the plan was made for another graph. Re-run nmgraph.analyze on this graph.")
        taps[info.name] = found
    return taps


def _make_tap(user: fx.Node, w: fx.Node, info: Any, grouped: frozenset) -> Tap | None:
    shape = tuple(info.shape)
    if user.target in _DENSE:
        idx = _WEIGHT_ARG[user.target]
        if len(user.args) <= idx or user.args[idx] is not w:
            return None
        act = user.args[idx - 1]
        k = shape[info.axis]
        act_shape = _shape(act)
        if not isinstance(act, fx.Node) or (act_shape is not None and act_shape[-1] != k):
            raise UnsupportedError(f"{info.name}: {user.format_node()} reads the weight but its input does not "
                                   f"end in the reduction size {k}.")
        return Tap(info.name, user, act, "linear", k)
    if user.target in _CONVS:
        if len(user.args) < 2 or user.args[1] is not w:
            return None
        spec = _conv_spec(user, shape)
        return Tap(info.name, user, user.args[0], "conv", shape[1] * math.prod(shape[2:]), conv=spec)
    if user.target in grouped:
        if len(user.args) < 2 or user.args[1] is not w:
            return None
        offs = user.args[2] if len(user.args) > 2 else user.kwargs.get("offs")
        if not isinstance(offs, fx.Node):
            raise UnsupportedError(f"{info.name}: grouped matmul {user.format_node()} has no expert offsets.")
        return Tap(info.name, user, user.args[0], "experts", shape[info.axis], offs=offs)
    return None


def tap_features(tap: Tap, act: torch.Tensor, offs: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The input matrices ``X_p [tokens_p, k]`` (one per problem) of one sample's activation ``act``."""
    if tap.kind == "linear":
        return [act.reshape(-1, tap.k)]
    if tap.kind == "experts":
        if offs is None or act.dim() != 2:
            raise UnsupportedError(f"{tap.layer}: grouped matmul input of shape {tuple(act.shape)} without offsets.")
        ends = [int(e) for e in offs.tolist()]
        starts = [0, *ends[:-1]]
        return [act[s:e] for s, e in zip(starts, ends)]
    return conv_patches(act, tap.conv)


def conv_patches(x: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
    """Input patches of a convolution, one matrix per group: ``[N * positions, prod(kernel) * cg]`` with
    columns in ``(*kernel, channel)`` order, so ``conv(x, W)`` per group is ``patches @ W_p^T``."""
    nd = len(spec.kernel)
    if x.dim() == nd + 1:  # unbatched input
        x = x.unsqueeze(0)
    pads = []
    for before, after in reversed(spec.padding):
        pads += [before, after]
    if any(pads):
        x = F.pad(x, pads)
    for i, (k, s, d) in enumerate(zip(spec.kernel, spec.stride, spec.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
    if any(d > 1 for d in spec.dilation):
        x = x[(..., *(slice(None, None, d) for d in spec.dilation))]
    # x: [N, C, *out, *kernel] -> [N, *out, *kernel, C]
    x = x.permute(0, *range(2, 2 + 2 * nd), 1)
    c = x.shape[-1]
    cg = c // spec.groups
    x = x.reshape(-1, math.prod(spec.kernel), spec.groups, cg)
    return [x[:, :, g, :].reshape(-1, math.prod(spec.kernel) * cg) for g in range(spec.groups)]

"""Sparsity analysis: which weights can be N:M, and which channels must be permuted together.

:func:`analyze` is pure: it reads a captured graph and returns a :class:`~nmgraph.plan.SparsityPlan`.

Eligibility. A weight is eligible when every use of it is the weight operand of a matmul-like op
(``aten.linear``, ``addmm``/``mm``/``matmul`` with a parameter operand, ``convolution``) and all uses
agree on the reduction axis. Everything else is reported in ``plan.skipped`` with its reason.

Coupling. Channels are tracked as *spaces*: ``(node, axes)`` pairs, where ``axes`` lists the tensor
axes (major to minor) whose flattened index is the channel index, and ``inner`` consecutive flattened
indices form one channel (a conv's channels flattened into a Linear's input). A union-find joins spaces
that must be permuted identically; the rule for each op comes from one table keyed by ``OpOverload``
(:data:`OP_RULES`). An op missing from the table is a barrier with the op named as the reason. Concat
and split along a channel axis *segment* a space into the spaces of their parts. A class is a
:class:`~nmgraph.plan.PermutationGroup` when no barrier touches it; its members are the parameters and
buffers (and their axes) in it.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx

from nmgraph.errors import UnsupportedError
from nmgraph.pattern import Pattern, PatternLike
from nmgraph.plan import LayerInfo, Member, PermutationGroup, Skip, SparsityPlan

__all__ = ["OP_RULES", "analyze"]

log = logging.getLogger(__name__)
aten = torch.ops.aten

Axes = tuple[int, ...]


# --------------------------------------------------------------------------------------------------
# Union-find over channel spaces
# --------------------------------------------------------------------------------------------------


@dataclass
class _Space:
    """A channel space: ``node``'s tensor viewed along ``axes`` (see module docstring)."""

    node: fx.Node
    axes: Axes
    inner: int
    channels: int
    index: int  # position in the union-find arrays


@dataclass
class _Class:
    """Annotations of a union-find root."""

    barriers: list[str] = field(default_factory=list)
    block: int = 0  # 0 = unconstrained
    # (start, stop, space index, period): period 0 = one contiguous range; else the range repeats
    # every `period` channels (a part of interleaved per-head channels)
    segments: list[tuple[int, int, int, int]] = field(default_factory=list)
    repeat_of: tuple[int, int, int] | None = None  # (source space, repeats, block): repeated heads


class _Flow:
    """Union-find of channel spaces plus barriers, block constraints and segmentations."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.info: dict[int, _Class] = {}
        self.of_node: dict[fx.Node, list[int]] = {}
        self.slices: dict[int, list[tuple[int, int, int]]] = {}  # space -> [(start, stop, part space)]

    # -- union-find
    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def cls(self, i: int) -> _Class:
        return self.info[self.find(i)]

    def new(self, node: fx.Node, axes: Axes, inner: int = 1, size: int | None = None) -> int:
        shape = _shape(node)
        size = math.prod(shape[a] for a in axes) if size is None else size
        idx = len(self.spaces)
        self.spaces.append(_Space(node, tuple(axes), inner, size // inner, idx))
        self.parent.append(idx)
        self.info[idx] = _Class()
        self.of_node.setdefault(node, []).append(idx)
        return idx

    def union(self, a: int, b: int, why: str = "") -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        sa, sb = self.spaces[a], self.spaces[b]
        if sa.channels != sb.channels:
            # Different channel counts cannot move together: both sides become barriers.
            reason = (f"channel count mismatch at {why or 'an op'}: {sa.node.name}{list(sa.axes)} has "
                      f"{sa.channels}, {sb.node.name}{list(sb.axes)} has {sb.channels}")
            self.barrier(a, reason)
            self.barrier(b, reason)
            return ra
        ca, cb = self.info.pop(rb), self.info[ra]
        self.parent[rb] = ra
        cb.barriers.extend(r for r in ca.barriers if r not in cb.barriers)
        cb.block = _gcd_block(cb.block, ca.block)
        if ca.repeat_of and cb.repeat_of and ca.repeat_of[1:] == cb.repeat_of[1:]:
            self.union(ca.repeat_of[0], cb.repeat_of[0], "repeated heads of the same shape")
        elif ca.repeat_of and cb.repeat_of:
            self.barrier(ra, "channels repeated in two different ways")
        elif ca.repeat_of:
            cb.repeat_of = ca.repeat_of
        if ca.segments and cb.segments:
            self._merge_segments(ra, ca.segments, cb.segments)
        elif ca.segments:
            cb.segments = ca.segments
        return ra

    def _merge_segments(self, root: int, a: list, b: list) -> None:
        if [(s, e, p) for s, e, _, p in a] != [(s, e, p) for s, e, _, p in b]:
            self.barrier(root, "channels are split or concatenated at two different offsets")
            return
        for (_, _, x, _), (_, _, y, _) in zip(a, b):
            self.union(x, y, "matching concat/split segments")

    def finish_slices(self) -> None:
        """Turns the slices taken of a channel space into a segmentation (fused QKV read by slicing)."""
        for src, parts in self.slices.items():
            space = self.spaces[src]
            periods = {period for *_, period in parts}
            if len(periods) > 1:
                self.barrier(src, f"slices of the channels of {space.node.name} along different axes")
                continue
            period = periods.pop()
            outer = space.channels // period
            by_range: dict[tuple[int, int], int] = {}
            for start, stop, idx, _ in parts:
                if (start, stop) in by_range:
                    self.union(by_range[(start, stop)], idx, "identical slices")
                else:
                    by_range[(start, stop)] = idx
            ranges = sorted(by_range)
            if any(a[1] > b[0] for a, b in itertools.pairwise(ranges)):
                self.barrier(src, f"overlapping slices of the channels of {space.node.name}")
                continue
            seg_period = 0 if outer == 1 else period
            segs, pos = [], 0
            for start, stop in ranges:
                if start > pos:  # channels no slice reads: their own (unused) segment
                    segs.append((pos, start, self.new(space.node, space.axes, 1, outer * (start - pos)), seg_period))
                segs.append((start, stop, by_range[(start, stop)], seg_period))
                pos = stop
            if pos < period:
                segs.append((pos, period, self.new(space.node, space.axes, 1, outer * (period - pos)), seg_period))
            self.segment(src, segs)

    def slice_part(self, s: _Space, dim: int, start: int, stop: int, part: int) -> bool:
        """Records that ``part`` holds indices ``start:stop`` of axis ``dim`` of space ``s``.

        In the flattened channel order of ``s`` that is a run of channels repeating every
        ``period`` channels (one run when ``dim`` is the space's major axis). False if unsupported.
        """
        if s.inner != 1 or dim not in s.axes:
            return False
        shape = _shape(s.node)
        pos = s.axes.index(dim)
        after = math.prod(shape[a] for a in s.axes[pos + 1 :])
        period = shape[dim] * after
        self.slices.setdefault(s.index, []).append((start * after, stop * after, part, period))
        return True

    def barrier(self, i: int, reason: str) -> None:
        c = self.cls(i)
        if reason not in c.barriers:
            c.barriers.append(reason)

    def constrain_block(self, i: int, block: int) -> None:
        c = self.cls(i)
        c.block = _gcd_block(c.block, block)

    def segment(self, whole: int, parts: Sequence[tuple[int, int, int]]) -> None:
        c = self.cls(whole)
        if self.spaces[whole].inner != 1:
            self.barrier(whole, "concat/split of flattened channels")
            return
        if c.segments:
            self._merge_segments(self.find(whole), c.segments, list(parts))
        else:
            c.segments = list(parts)

    # -- spaces of a node
    def spaces_of(self, node: fx.Node) -> list[_Space]:
        return [self.spaces[i] for i in self.of_node.get(node, ())]

    def at(self, node: fx.Node, axes: Axes, inner: int | None = None) -> int:
        """The space of ``node`` on exactly ``axes``; created (and explained) if no rule made it.

        ``inner=None`` accepts an existing space with any ``inner`` (and creates one with 1).
        """
        for s in self.spaces_of(node):
            if s.axes == tuple(axes) and (inner is None or s.inner == inner):
                return s.index
        inner = 1 if inner is None else inner
        idx = self.new(node, axes, inner)
        if node.op == "get_attr":
            return idx  # a parameter or buffer: it simply becomes a member
        if _constant_along(node, tuple(axes)):
            return idx  # equal values along these axes (broadcast from size 1, a fill): any order is the same
        src = _backward_source(node, tuple(axes))
        if src is not None:  # e.g. an expanded or cast parameter (ViT's cls_token)
            self.union(idx, self.at(src[0], src[1], inner), _op_name(node))
            return idx
        # Overlapping spaces of the same tensor must both stay put.
        for s in self.spaces_of(node):
            if s.index != idx and set(s.axes) & set(axes):
                reason = f"{node.name} is used along channel axes {list(axes)} and {list(s.axes)}"
                self.barrier(s.index, reason)
                self.barrier(idx, reason)
        if node.op == "placeholder":
            self.barrier(idx, f"channels of graph input {node.name!r} are fixed by the caller")
        elif node.op != "get_attr":
            self.barrier(idx, f"channels of {node.name} come from {_op_name(node)}, which does not carry channels")
        return idx


def _backward_source(node: fx.Node, axes: Axes) -> tuple[fx.Node, Axes] | None:
    """For a shape-preserving op on a single tensor, the input axes that ``axes`` come from."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if _val(src) is None and src.op != "get_attr":
        return None
    rule = OP_RULES.get(node.target)
    in_shape, out_shape = _shape(src), _shape(node)
    single = rule is _broadcast and len([a for a in node.args if isinstance(a, fx.Node)]) == 1
    if (rule is _pass_through or single) and in_shape == out_shape:  # e.g. Gemma's (1 + weight)
        return src, axes
    if node.target in (aten.slice.Tensor, aten.index_select.default):  # rows of a position table
        if _norm(node.args[1] if len(node.args) > 1 else 0, len(in_shape)) not in axes:
            return src, axes
        return None
    if node.target is aten.select.int:
        d = _norm(node.args[1], len(in_shape))
        return src, tuple(a + (a >= d) for a in axes)
    if node.target is aten.index.Tensor:  # rows picked by index tensors (a per-expert bias [E, out])
        used = [i for i, t in enumerate(node.args[1]) if t is not None]
        if used and used == list(range(used[0], used[-1] + 1)):
            index_nd = len(out_shape) - (len(in_shape) - len(used))
            first = used[0]
            if all(a < first or a >= first + index_nd for a in axes):
                return src, tuple(a if a < first else a - index_nd + len(used) for a in axes)
        return None
    if rule in (_expand, _unsqueeze):
        if rule is _expand:
            mapped = tuple(a - (len(out_shape) - len(in_shape)) for a in axes)
        else:
            d = _norm(node.args[1], len(out_shape))
            mapped = tuple(a - (a > d) for a in axes) if d not in axes else None
        if mapped and all(0 <= a < len(in_shape) and in_shape[a] == out_shape[b] for a, b in zip(mapped, axes)):
            return src, mapped
    return None


_EXPAND_OPS = (aten.expand.default, aten.expand_as.default, aten.broadcast_to.default)
_FILL_OPS = (aten.full.default, aten.ones.default, aten.zeros.default, aten.full_like.default,
             aten.ones_like.default, aten.zeros_like.default, aten.scalar_tensor.default)


def _constant_along(node: fx.Node, axes: Axes) -> bool:
    """Whether ``node``'s values do not change along ``axes``: an ``expand`` / ``expand_as`` of
    size-1 (or new) axes, or a tensor filled with one value."""
    if node.op != "call_function":
        return False
    if node.target in _FILL_OPS:
        return True
    if node.target not in _EXPAND_OPS or not isinstance(node.args[0], fx.Node):
        return False
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    shift = len(out_shape) - len(in_shape)
    return all(a - shift < 0 or in_shape[a - shift] == 1 for a in axes)


def _gcd_block(a: int, b: int) -> int:
    if not a:
        return b
    if not b:
        return a
    return math.gcd(a, b)


# --------------------------------------------------------------------------------------------------
# Helpers over node metadata
# --------------------------------------------------------------------------------------------------


def _val(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return v
    v = node.meta.get("tensor_meta")
    return v if v is not None and hasattr(v, "shape") else None


def _shape(node: fx.Node) -> tuple[int, ...]:
    v = _val(node)
    if v is None and node.op == "get_attr":
        v = _get_attr(node)
    if v is None:
        raise UnsupportedError(
            f"node {node.format_node()} has no tensor metadata ('val'); capture the model with "
            "nmgraph.capture (torch.export) so shapes are recorded."
        )
    return tuple(int(s) for s in v.shape)


def _get_attr(node: fx.Node) -> torch.Tensor | None:
    obj = node.graph.owning_module
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def _mutates(node: fx.Node) -> bool:
    """Whether ``node`` may write into one of its inputs (in-place ops, ``copy_``) or is opaque."""
    if node.op != "call_function":
        return True  # call_module / call_method: not analyzable, keep their barriers
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.target is not operator.getitem
    return bool(schema.is_mutable)


def _op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return str(getattr(node.target, "__name__", node.target)) if not isinstance(
            node.target, torch._ops.OpOverload) else str(node.target)
    return f"{node.op} {node.target}"


def _norm(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


# --------------------------------------------------------------------------------------------------
# Op rules. Each rule(flow, node) registers the output spaces of ``node`` and the unions it implies.
# --------------------------------------------------------------------------------------------------

Rule = Callable[[_Flow, fx.Node], None]


def _pass_through(flow: _Flow, node: fx.Node, src: fx.Node | None = None) -> None:
    """Same shape in, same shape out, channels unchanged (elementwise unary ops, dropout, casts)."""
    src = src if src is not None else node.args[0]
    if not isinstance(src, fx.Node):
        return
    for s in flow.spaces_of(src):
        flow.union(s.index, flow.new(node, s.axes, s.inner), _op_name(node))


def _broadcast(flow: _Flow, node: fx.Node) -> None:
    """Elementwise ops with broadcasting: aligned axes of every operand move together."""
    out_shape = _shape(node)
    ndim = len(out_shape)
    operands = [a for a in node.args if isinstance(a, fx.Node) and (_val(a) is not None or a.op == "get_attr")]
    out_spaces: dict[tuple[Axes, int], int] = {}
    for a in operands:
        shift = ndim - len(_shape(a))
        for s in flow.spaces_of(a):
            key = (tuple(x + shift for x in s.axes), s.inner)
            if s.channels == 1 and any(out_shape[x] != 1 for x in key[0]):
                continue  # one channel broadcast over the output's channels (a scalar gate): nothing to move
            if key not in out_spaces:
                out_spaces[key] = flow.new(node, *key)
            flow.union(s.index, out_spaces[key], _op_name(node))
    # Every operand that is not broadcast along a channel space moves with it too.
    for (axes, inner), out_idx in out_spaces.items():
        for a in operands:
            a_shape = _shape(a)
            shift = ndim - len(a_shape)
            local = tuple(x - shift for x in axes)
            if any(x < 0 for x in local) or all(a_shape[x] == 1 for x in local):
                continue
            if any(a_shape[x] != out_shape[x + shift] for x in local):
                flow.barrier(out_idx, f"{a.name} is partially broadcast along channels at {node.name}")
                continue
            flow.union(flow.at(a, local, inner), out_idx, _op_name(node))


def _arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of an aten call, positional or keyword, found through the op's schema
    (``linalg_vector_norm(x, ord, dim, keepdim)`` and ``std.dim(x, dim, unbiased, keepdim)`` put
    ``dim`` and ``keepdim`` at different positions)."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for i, a in enumerate(schema.arguments):
            if a.name == name:
                if not a.kwarg_only and i < len(node.args):
                    return node.args[i]
                break
    return node.kwargs.get(name, default)


def _reduce_dims(node: fx.Node) -> tuple[list[int], bool]:
    shape = _shape(node.args[0])
    dims = _arg(node, "dim")
    if dims is None or dims == []:
        dims = list(range(len(shape)))
    if isinstance(dims, int):
        dims = [dims]
    keep = bool(_arg(node, "keepdim", False))
    return [_norm(d, len(shape)) for d in dims], keep


def _reduce(flow: _Flow, node: fx.Node) -> None:
    """Permutation-invariant reductions (sum, mean, var, amax...): a reduced channel axis is consumed."""
    src = node.args[0]
    dims, keep = _reduce_dims(node)
    for s in flow.spaces_of(src):
        if set(s.axes) & set(dims):
            if not set(s.axes) <= set(dims):
                flow.barrier(s.index, f"{node.name} ({_op_name(node)}) reduces part of a channel space")
            continue
        axes = s.axes if keep else tuple(a - sum(d < a for d in dims) for a in s.axes)
        flow.union(s.index, flow.new(node, axes, s.inner), _op_name(node))


def _softmax(flow: _Flow, node: fx.Node) -> None:
    """Softmax over any axis is permutation-equivariant along that axis."""
    _pass_through(flow, node)


def _linear_like(flow: _Flow, node: fx.Node, x: fx.Node, w: fx.Node, b, w_in_axis: int, w_out_axis: int) -> None:
    xs = flow.at(x, (len(_shape(x)) - 1,))
    flow.union(xs, flow.at(w, (w_in_axis,), flow.spaces[xs].inner), _op_name(node))
    out = flow.new(node, (len(_shape(node)) - 1,))
    flow.union(out, flow.at(w, (w_out_axis,)), _op_name(node))
    if isinstance(b, fx.Node):
        flow.union(out, flow.at(b, (len(_shape(b)) - 1,)), _op_name(node))


def _is_weight(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


_CAST_OPS = (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.clone.default,
             aten.contiguous.default, aten.alias.default, aten.detach.default)


def weight_source(node: Any) -> Any:
    """``W`` for ``W.to(dtype)`` / ``W.float()`` / ``W.contiguous()`` (chains too); else ``node``."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CAST_OPS and \
            isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _linear(flow: _Flow, node: fx.Node) -> None:
    x, w = node.args[0], weight_source(node.args[1])
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not _is_weight(w):
        reason = f"{node.name}: linear with a computed weight"
        flow.barrier(flow.at(x, (len(_shape(x)) - 1,)), reason)
        flow.barrier(flow.new(node, (len(_shape(node)) - 1,)), reason)
        return
    _linear_like(flow, node, x, w, b, 1, 0)


def _addmm(flow: _Flow, node: fx.Node) -> None:
    b, x, w = node.args[:3]
    if not _is_weight(w):
        return _matmul_activations(flow, node, x, w, bias=b)
    _linear_like(flow, node, x, w, b, 0, 1)


def transposed_weight(node: Any, batched: bool = False) -> fx.Node | None:
    """The 2-D parameter ``W`` when ``node`` is ``W.T`` (``t``, ``numpy_T``, ``transpose(0, 1)``,
    ``permute([1, 0])``): ``x @ W.T`` is a Linear with ``W`` stored ``[out, in]`` (Falcon).
    ``batched``: instead a 3-D ``W [experts, out, in]`` read as ``W.transpose(-2, -1)``."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _TRANSPOSE_OPS:
        return None
    w = node.args[0]
    nd = 3 if batched else 2
    if not _is_weight(w) or len(_shape(w)) != nd:
        return None
    if node.target is aten.transpose.int and {_norm(d, nd) for d in node.args[1:3]} != {nd - 2, nd - 1}:
        return None
    if node.target is aten.permute.default and [_norm(d, nd) for d in node.args[1]] != [*range(nd - 2), nd - 1,
                                                                                          nd - 2]:
        return None
    if node.target in (aten.t.default, aten.numpy_T.default) and batched:
        return None
    return w


def linear_of_transposed(node: fx.Node) -> fx.Node | None:
    """``W`` when ``node`` computes ``x @ W.T`` (``mm``/``matmul`` of a transposed 2-D parameter),
    which is ``aten.linear(x, W)``."""
    if node.op != "call_function" or node.target not in (aten.mm.default, aten.matmul.default) or \
            len(node.args) != 2 or node.args[0] is node.args[1]:
        return None
    return transposed_weight(node.args[1])


def _mm(flow: _Flow, node: fx.Node) -> None:
    x, w = node.args[:2]
    if _is_weight(w) and len(_shape(w)) == 2:
        return _linear_like(flow, node, x, w, None, 0, 1)
    wt = linear_of_transposed(node)
    if wt is not None:
        return _linear_like(flow, node, x, wt, None, 1, 0)
    _matmul_activations(flow, node, x, w)


def _matmul_activations(flow: _Flow, node: fx.Node, a, b, bias=None) -> None:
    """``a @ b`` of two activations (attention scores, attention-weighted values).

    The contraction axis of ``a`` and ``b`` moves together; ``b``'s column space passes to the
    output. Batch axes inside a channel space force a block (heads are computed separately).
    """
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return
    sa, sb, so = _shape(a), _shape(b), _shape(node)
    if len(sa) < 2 or len(sb) < 2:
        for s in flow.spaces_of(a) + flow.spaces_of(b):
            flow.barrier(s.index, f"{node.name}: matmul with a 1-D operand")
        return
    na, nb, no = len(sa), len(sb), len(so)
    for s in flow.spaces_of(a):
        batch = [x for x in s.axes if x < na - 2]
        if na - 2 in s.axes:  # rows of a: the output's rows
            flow.barrier(s.index, f"{node.name}: channels on the row axis of a matmul")
            continue
        if na - 1 not in s.axes:
            continue
        if s.inner != 1:
            flow.barrier(s.index, f"{node.name}: flattened channels in a matmul")
            continue
        # contraction: a's last axis with b's second-to-last axis, batch axes aligned from the right
        b_axes = tuple(x - (na - nb) if x < na - 2 else nb - 2 for x in s.axes)
        if any(x < 0 or sb[x] != sa[y] for x, y in zip(b_axes, s.axes)):
            flow.barrier(s.index, f"{node.name}: broadcast batch axes in a matmul")
            continue
        flow.union(s.index, flow.at(b, b_axes), _op_name(node))
        if batch:
            flow.constrain_block(s.index, sa[na - 1])
    for s in flow.spaces_of(b):
        if nb - 2 in s.axes or nb - 1 not in s.axes:
            continue
        batch = [x for x in s.axes if x < nb - 2]
        out_axes = tuple(x + (no - nb) for x in s.axes)
        flow.union(s.index, flow.new(node, out_axes, s.inner), _op_name(node))
        if batch:
            flow.constrain_block(s.index, sb[nb - 1])
    if isinstance(bias, fx.Node):
        for s in flow.spaces_of(node):
            flow.union(s.index, flow.at(bias, (len(_shape(bias)) - 1,)), _op_name(node))


def _conv_groups(node: fx.Node) -> int:
    return int(_arg(node, "groups", 1))


def _conv(flow: _Flow, node: fx.Node) -> None:
    x, w = node.args[0], node.args[1]
    b = _arg(node, "bias")
    transposed = bool(_arg(node, "transposed", False))
    groups = _conv_groups(node)
    out = flow.new(node, (1,))
    if transposed or not _is_weight(w):
        why = "transposed convolution" if transposed else "convolution with a computed weight"
        flow.barrier(flow.at(x, (1,)), f"{node.name}: {why}")
        flow.barrier(out, f"{node.name}: {why}")
        return
    c_in, c_out = _shape(x)[1], _shape(node)[1]
    flow.union(out, flow.at(w, (0,)), _op_name(node))
    if isinstance(b, fx.Node):
        flow.union(out, flow.at(b, (0,)), _op_name(node))
    if groups == 1:
        flow.union(flow.at(x, (1,)), flow.at(w, (1,)), _op_name(node))
    elif groups == c_in and c_out == c_in:  # depthwise: channel c in -> channel c out
        flow.union(flow.at(x, (1,)), out, _op_name(node))
    else:
        flow.constrain_block(out, c_out // groups)
        flow.barrier(flow.at(x, (1,)), f"{node.name}: grouped convolution (groups={groups}) shares "
                     "weight columns across groups")


def _layer_norm(flow: _Flow, node: fx.Node) -> None:
    x, normalized = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else None
    b = node.args[3] if len(node.args) > 3 else None
    nd = len(_shape(x))
    k = len(normalized)
    normed = set(range(nd - k, nd))
    for s in flow.spaces_of(x):
        out = flow.new(node, s.axes, s.inner)
        flow.union(s.index, out, _op_name(node))
        if set(s.axes) & normed and not set(s.axes) <= normed:
            flow.barrier(s.index, f"{node.name}: layer_norm over part of a channel space")
    _norm_params(flow, node, (w, b), nd, k)


def _norm_params(flow: _Flow, node: fx.Node, params: Sequence[Any], nd: int, k: int) -> None:
    """Elementwise affine parameters of a norm over the last ``k`` axes (shape ``x.shape[-k:]``)
    move with every channel space inside those axes (``LayerNorm([C, H, W])`` after a conv: the
    weight's axis 0 follows the conv's channels)."""
    if k == 1:
        spaces = [flow.at(node, (nd - 1,))]
    else:
        spaces = [s.index for s in flow.spaces_of(node) if set(s.axes) <= set(range(nd - k, nd))]
    for p in params:
        if not isinstance(p, fx.Node):
            continue
        for idx in spaces:
            sp = flow.spaces[idx]
            flow.union(idx, flow.at(p, tuple(a - (nd - k) for a in sp.axes), sp.inner), _op_name(node))


def _rms_norm(flow: _Flow, node: fx.Node) -> None:
    x, normalized = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else None
    nd = len(_shape(x))
    k = len(normalized)
    _pass_through(flow, node)
    for s in flow.spaces_of(x):
        if set(s.axes) & set(range(nd - k, nd)) and not set(s.axes) <= set(range(nd - k, nd)):
            flow.barrier(s.index, f"{node.name}: rms_norm over part of a channel space")
    _norm_params(flow, node, (w,), nd, k)


def _batch_norm(flow: _Flow, node: fx.Node) -> None:
    """batch_norm(x, w, b, running_mean, running_var, ...): per-channel params and running stats."""
    _native_batch_norm(flow, node)


def _native_batch_norm(flow: _Flow, node: fx.Node) -> None:
    x = node.args[0]
    out = flow.new(node, (1,))
    flow.union(flow.at(x, (1,)), out, _op_name(node))
    for p in node.args[1:5]:
        if isinstance(p, fx.Node):
            flow.union(out, flow.at(p, (0,)), _op_name(node))


def _group_norm(flow: _Flow, node: fx.Node) -> None:
    x, groups = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else None
    b = node.args[3] if len(node.args) > 3 else None
    c = _shape(x)[1]
    out = flow.new(node, (1,))
    flow.union(flow.at(x, (1,)), out, _op_name(node))
    flow.constrain_block(out, c // groups)  # statistics are per group of c/groups channels
    for p in (w, b):
        if isinstance(p, fx.Node):
            flow.union(out, flow.at(p, (0,)), _op_name(node))


def _prelu(flow: _Flow, node: fx.Node) -> None:
    w = node.args[1]
    _pass_through(flow, node)
    if _shape(w) and _shape(w)[0] > 1:
        flow.union(flow.at(node, (1,)), flow.at(w, (0,)), _op_name(node))


def _embedding(flow: _Flow, node: fx.Node) -> None:
    w = node.args[0]
    flow.union(flow.new(node, (len(_shape(node)) - 1,)), flow.at(w, (1,)), _op_name(node))


def _spatial(k: int | None) -> Rule:
    """Pooling, padding and upsampling act on the last ``k`` axes; channels elsewhere pass through."""

    def rule(flow: _Flow, node: fx.Node) -> None:
        src = node.args[0]
        nd = len(_shape(src))
        if k is None:  # pad: the padded axes are the last len(pad) // 2
            pad = list(node.args[1])
            touched = {nd - 1 - i // 2 for i, v in enumerate(pad) if v}
        else:
            touched = set(range(nd - k, nd))
        for s in flow.spaces_of(src):
            if touched & set(s.axes):
                flow.barrier(s.index, f"{node.name}: {_op_name(node)} acts along channel axes")
                continue
            flow.union(s.index, flow.new(node, s.axes, s.inner), _op_name(node))

    return rule


def _permute(flow: _Flow, node: fx.Node) -> None:
    nd = len(_shape(node))
    if node.target in (aten.t.default, aten.numpy_T.default):
        order = list(range(nd))[::-1]
    elif node.target is aten.transpose.int:
        d0, d1 = _norm(node.args[1], nd), _norm(node.args[2], nd)
        order = list(range(nd))
        order[d0], order[d1] = order[d1], order[d0]
    else:
        order = [_norm(d, nd) for d in node.args[1]]
    inverse = {src: dst for dst, src in enumerate(order)}
    for s in flow.spaces_of(node.args[0]):
        flow.union(s.index, flow.new(node, tuple(inverse[a] for a in s.axes), s.inner), _op_name(node))


def _reshape_chunks(ins: Sequence[int], outs: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Minimal runs of input and output axes with equal products (the view algorithm)."""
    dims = (ins, outs)
    pos = [0, 0]
    chunks: list[tuple[list[int], list[int]]] = []

    def take(side: int, chunk: tuple[list[int], list[int]]) -> int:
        """Moves the next axis of ``side`` (0: input, 1: output) into ``chunk``; returns its size."""
        chunk[side].append(pos[side])
        pos[side] += 1
        return dims[side][pos[side] - 1]

    def left(side: int) -> bool:
        return pos[side] < len(dims[side])

    while left(0) or left(1):
        chunk: tuple[list[int], list[int]] = ([], [])
        prod = [take(side, chunk) if left(side) else 1 for side in (0, 1)]
        while prod[0] != prod[1]:
            side = 0 if prod[0] < prod[1] and left(0) else 1
            if not left(side):
                return None
            prod[side] *= take(side, chunk)
        for side in (0, 1):  # fold trailing size-1 axes into this chunk
            other = 1 - side
            while left(side) and dims[side][pos[side]] == 1 and (not left(other) or dims[other][pos[other]] != 1):
                take(side, chunk)
        chunks.append(chunk)
    return chunks


def _reshape(flow: _Flow, node: fx.Node) -> None:
    src = node.args[0]
    ins, outs = _shape(src), _shape(node)
    chunks = _reshape_chunks(ins, outs)
    for s in flow.spaces_of(src):
        if chunks is None:
            flow.barrier(s.index, f"{node.name}: reshape {list(ins)} -> {list(outs)} mixes channels")
            continue
        if list(s.axes) != sorted(s.axes) and any(
            any(a in s.axes for a in ci)
            and (sum(ins[a] != 1 for a in ci) > 1 or sum(outs[a] != 1 for a in cj) > 1)
            for ci, cj in chunks
        ):
            # e.g. ShuffleNet's view-transpose-view: the flattened channel order changes
            flow.barrier(s.index, f"{node.name}: reshape after a transpose of channel axes reorders channels "
                         "(channel shuffle)")
            continue
        out_axes: list[int] = []
        inner = s.inner
        ok = True
        repeat_of: tuple[int, int] | None = None
        for ci, cj in chunks:
            big_ci = [a for a in ci if ins[a] != 1]
            hit = [a for a in big_ci if a in s.axes]
            if not hit:
                continue
            if hit == big_ci:
                out_axes.extend(a for a in cj if outs[a] != 1)
            elif (len(hit) == 1 and hit == big_ci[:1] and len(s.axes) > 1 and s.inner == 1
                  and _broadcast_axes(src, big_ci[1:])):
                # expand + reshape repeating heads (grouped-query attention's K/V): each head of the
                # source serves `repeat` consecutive heads of the output
                repeat = math.prod(ins[a] for a in big_ci[1:])
                out_axes.extend(a for a in cj if outs[a] != 1)
                repeat_of = (repeat, s.channels // ins[hit[0]])  # (copies, channels per head)
            elif (len(hit) == 1 and hit == big_ci[-1:] and s.inner == 1 and repeat_of is None
                  and len(s.axes) == 1 and sum(outs[a] != 1 for a in cj) == 1):
                # channels are the minor part of the merged axis (multi-query attention's one K/V head
                # merged with the query heads): every major index holds a copy of the block, each
                # permuted like the source
                repeat = math.prod(ins[a] for a in big_ci[:-1])
                out_axes.extend(a for a in cj if outs[a] != 1)
                repeat_of = (repeat, s.channels)
            elif inner == 1 and hit == big_ci[: len(hit)]:
                # channels are the major part of the merged axis: flattened conv channels
                inner = math.prod(ins[a] for a in big_ci[len(hit):])
                out_axes.extend(a for a in cj if outs[a] != 1)
            else:
                ok = False
        if not ok or not out_axes:
            flow.barrier(s.index, f"{node.name}: reshape {list(ins)} -> {list(outs)} mixes channels with "
                         "other axes")
            continue
        if inner != s.inner and len(out_axes) > 1:
            repeated = isinstance(src, fx.Node) and src.target in _EXPAND_OPS
            flow.barrier(s.index, f"{node.name}: " + (
                "channels repeated by expand + reshape (grouped-query attention shares key/value heads; "
                "their channels stay in place)" if repeated else "reshape splits flattened channels"))
            continue
        if repeat_of is not None:
            repeat, block = repeat_of
            out = flow.new(node, tuple(out_axes), inner)
            flow.constrain_block(s.index, block)
            flow.constrain_block(out, block)
            flow.cls(out).repeat_of = (s.index, repeat, block)
            continue
        flow.union(s.index, flow.new(node, tuple(out_axes), inner), _op_name(node))


def _broadcast_axes(node: fx.Node, axes: Sequence[int]) -> bool:
    """True if ``node`` is an expand whose ``axes`` were size 1 before it (pure repetition)."""
    if not axes or not isinstance(node, fx.Node) or node.target not in _EXPAND_OPS:
        return False
    src_shape = _shape(node.args[0])
    shift = len(_shape(node)) - len(src_shape)
    return all(a - shift < 0 or src_shape[a - shift] == 1 for a in axes)


def _unsqueeze(flow: _Flow, node: fx.Node) -> None:
    nd = len(_shape(node))
    d = _norm(node.args[1], nd)
    for s in flow.spaces_of(node.args[0]):
        flow.union(s.index, flow.new(node, tuple(a + (a >= d) for a in s.axes), s.inner), _op_name(node))


def _expand(flow: _Flow, node: fx.Node) -> None:
    ins, outs = _shape(node.args[0]), _shape(node)
    shift = len(outs) - len(ins)
    for s in flow.spaces_of(node.args[0]):
        # a size-1 axis of the space that expand repeats becomes a repetition axis, not a channel axis
        axes = tuple(a + shift for a in s.axes if not (ins[a] == 1 and outs[a + shift] != 1))
        if axes:
            flow.union(s.index, flow.new(node, axes, s.inner), _op_name(node))


def _squeeze(flow: _Flow, node: fx.Node) -> None:
    src = node.args[0]
    ins = _shape(src)
    dims = node.args[1] if len(node.args) > 1 else [i for i, s in enumerate(ins) if s == 1]
    if isinstance(dims, int):
        dims = [dims]
    dims = [_norm(d, len(ins)) for d in dims if ins[_norm(d, len(ins))] == 1]
    for s in flow.spaces_of(src):
        axes = tuple(a - sum(d < a for d in dims) for a in s.axes)
        flow.union(s.index, flow.new(node, axes, s.inner), _op_name(node))


def _slice(flow: _Flow, node: fx.Node) -> None:
    src = node.args[0]
    nd = len(_shape(src))
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, nd)
    size = _shape(src)[dim]
    full = _shape(node)[dim] == size
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    step = node.args[4] if len(node.args) > 4 else 1
    for s in flow.spaces_of(src):
        if dim in s.axes and not full:
            if step == 1 and isinstance(start, int):
                begin = start + size if start < 0 else min(start, size)
                if flow.slice_part(s, dim, begin, begin + _shape(node)[dim], flow.new(node, s.axes)):
                    continue
            flow.barrier(s.index, f"{node.name}: slices channel axis {dim}")
            continue
        flow.union(s.index, flow.new(node, s.axes, s.inner), _op_name(node))


def _select(flow: _Flow, node: fx.Node) -> None:
    src = node.args[0]
    dim = _norm(node.args[1], len(_shape(src)))
    index = _norm(node.args[2], _shape(src)[dim])
    for s in flow.spaces_of(src):
        if dim in s.axes:
            rest = tuple(a - (a > dim) for a in s.axes if a != dim)
            if rest and flow.slice_part(s, dim, index, index + 1, flow.new(node, rest)):
                continue  # e.g. BLOOM's fused [.., heads, 3, head_dim] QKV
            flow.barrier(s.index, f"{node.name}: selects along channel axis {dim}")
            continue
        flow.union(s.index, flow.new(node, tuple(a - (a > dim) for a in s.axes), s.inner), _op_name(node))


def _index_select(flow: _Flow, node: fx.Node) -> None:
    src = node.args[0]
    dim = _norm(node.args[1], len(_shape(src)))
    for s in flow.spaces_of(src):
        if dim in s.axes:
            flow.barrier(s.index, f"{node.name}: gathers along channel axis {dim}")
            continue
        flow.union(s.index, flow.new(node, s.axes, s.inner), _op_name(node))


def _index(flow: _Flow, node: fx.Node) -> None:
    """``x[idx]`` (``aten.index.Tensor``) with index tensors on non-channel axes: rows are gathered
    (MoE token routing), channels pass through. Adjacent index tensors replace their axes by the
    index shape at the same place; indexing a channel axis is a barrier."""
    src, indices = node.args[0], list(node.args[1])
    nd = len(_shape(src))
    used = [i for i, t in enumerate(indices) if t is not None]
    if not used or used != list(range(used[0], used[-1] + 1)):
        for sp in flow.spaces_of(src):
            flow.barrier(sp.index, f"{node.name}: advanced indexing with separated index tensors")
        return
    first, last = used[0], used[-1]
    index_nd = len(_shape(node)) - (nd - len(used))
    run = _constant_run(indices[first], _shape(src)[first]) if len(used) == 1 else None
    for sp in flow.spaces_of(src):
        if any(first <= a <= last for a in sp.axes):
            # a constant run of channels (Falcon's fused multi-query QKV reads its K/V head as x[:, :, [-1]])
            if run is not None and flow.slice_part(sp, first, run[0], run[1], flow.new(node, sp.axes)):
                continue
            flow.barrier(sp.index, f"{node.name}: indexes along a channel axis")
            continue
        axes = tuple(a if a < first else a - len(used) + index_nd for a in sp.axes)
        flow.union(sp.index, flow.new(node, axes, sp.inner), _op_name(node))


def _constant_run(index: Any, size: int) -> tuple[int, int] | None:
    """``(begin, end)`` when ``index`` is a constant 1-D index tensor holding ``begin, ..., end - 1``."""
    while isinstance(index, fx.Node) and index.op == "call_function" and index.target in (
        aten.lift_fresh_copy.default, aten._to_copy.default, aten.clone.default, aten.detach.default
    ):
        index = index.args[0]
    if not (isinstance(index, fx.Node) and index.op == "get_attr"):
        return None
    t = _get_attr(index)
    if t is None or t.dim() != 1 or not t.numel() or t.dtype.is_floating_point or t.dtype == torch.bool:
        return None
    values = [int(v) % size for v in t.tolist()]
    if values != list(range(values[0], values[0] + len(values))):
        return None
    return values[0], values[0] + len(values)


def _grouped_mm(flow: _Flow, node: fx.Node) -> None:
    """Grouped GEMM of MoE experts: ``x [T, K]`` rows split by ``offs`` over experts, times
    ``W_e^T`` for ``W [E, N, K]`` read through ``transpose(-2, -1)``. Every expert shares the input
    channel order (``K``) and the output channel order (``N``)."""
    x, w = node.args[0], node.args[1]
    if _is_weight(w) and len(_shape(w)) == 3 and len(_shape(x)) == 2:  # W [E, in, out] read directly (GPT-OSS)
        return _linear_like(flow, node, x, w, None, 1, 2)
    p = transposed_weight(w, batched=True)
    if p is None or len(_shape(x)) != 2:
        for sp in flow.spaces_of(x):
            flow.barrier(sp.index, f"{node.name}: grouped matmul without an expert weight parameter")
        flow.barrier(flow.new(node, (len(_shape(node)) - 1,)), f"{node.name}: grouped matmul without an "
                     "expert weight parameter")
        return
    _linear_like(flow, node, x, p, None, 2, 1)


def _cat(flow: _Flow, node: fx.Node) -> None:
    parts = [p for p in node.args[0] if isinstance(p, fx.Node)]
    nd = len(_shape(node))
    dim = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), nd)
    # spaces not involving the concat axis: every part moves together
    keys = {(s.axes, s.inner) for p in parts for s in flow.spaces_of(p) if dim not in s.axes}
    for axes, inner in keys:
        out = flow.new(node, axes, inner)
        for p in parts:
            flow.union(flow.at(p, axes, inner), out, _op_name(node))
    # spaces on the concat axis: the output's channels are segmented into the parts' channels
    if any(dim in s.axes for p in parts for s in flow.spaces_of(p)):
        whole = flow.new(node, (dim,))
        segs, start = [], 0
        for p in parts:
            size = _shape(p)[dim]
            segs.append((start, start + size, flow.at(p, (dim,)), 0))
            start += size
        flow.segment(whole, segs)


def _split(flow: _Flow, node: fx.Node) -> None:
    """split / split_with_sizes / chunk / unbind: the outputs are read through getitem."""
    src = node.args[0]
    nd = len(_shape(src))
    if node.target is aten.unbind.int:
        dim = _norm(node.args[1] if len(node.args) > 1 else 0, nd)
    else:
        dim = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), nd)
    outs = sorted((u for u in node.users if u.target is operator.getitem), key=lambda u: u.args[1])
    vals = node.meta.get("val")
    sizes = [int(v.shape[dim]) for v in vals] if isinstance(vals, (list, tuple)) else []
    for s in flow.spaces_of(src):
        if dim not in s.axes:
            for u in outs:
                axes = s.axes if node.target is not aten.unbind.int else tuple(a - (a > dim) for a in s.axes)
                flow.union(s.index, flow.new(u, axes, s.inner), _op_name(node))
            continue
        if node.target is aten.unbind.int or s.inner != 1 or not sizes:
            flow.barrier(s.index, f"{node.name}: splits a channel space it cannot follow")
            continue
        by_index = {u.args[1]: u for u in outs}
        start = 0
        for i, size in enumerate(sizes):
            u = by_index.get(i)
            if u is not None:  # parts nobody reads become filler segments
                flow.slice_part(s, dim, start, start + size, flow.new(u, s.axes))
            start += size


def _getitem(flow: _Flow, node: fx.Node) -> None:
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return
    if src.target in _SPLIT_OPS:
        return  # handled by the split rule
    if node.args[1] == 0 and src.target in _NORM_TUPLE_OPS:
        for s in flow.spaces_of(src):
            flow.union(s.index, flow.new(node, s.axes, s.inner), "getitem")
        return
    if node.args[1] != 0 and src.target in _NORM_TUPLE_OPS:
        return  # saved statistics; not channels of an activation used later
    for s in flow.spaces_of(src):
        flow.barrier(s.index, f"{node.name}: getitem of {_op_name(src)}")


def _sdpa(flow: _Flow, node: fx.Node) -> None:
    """scaled_dot_product_attention(q, k, v, mask): per head, q.k over head_dim; v's head_dim passes."""
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):  # a per-head bias (T5, ALiBi) pins heads and positions
        for s in flow.spaces_of(mask):
            flow.barrier(s.index, f"{node.name}: attention mask/bias channels are tied to fixed heads")
    d = _shape(q)[-1]
    nd = len(_shape(q))
    head_axis = nd - 3
    for s in flow.spaces_of(q) + flow.spaces_of(k):
        if nd - 2 in s.axes or nd - 1 not in s.axes:
            flow.barrier(s.index, f"{node.name}: attention over channels on the sequence axis")
    # Q and K: the head_dim of matching heads is contracted together.
    if _shape(q)[head_axis] != _shape(k)[head_axis]:
        for x in (q, k):
            for s in flow.spaces_of(x):
                flow.barrier(s.index, f"{node.name}: grouped-query attention (q and k head counts differ)")
    else:
        for a, b in ((q, k), (k, q)):
            for s in flow.spaces_of(a):
                if nd - 1 in s.axes and nd - 2 not in s.axes:
                    flow.union(s.index, flow.at(b, s.axes, s.inner), "scaled_dot_product_attention q/k")
                    flow.constrain_block(s.index, d)
    for s in flow.spaces_of(v):
        if nd - 2 in s.axes or nd - 1 not in s.axes:
            flow.barrier(s.index, f"{node.name}: value channels on the sequence axis")
            continue
        out = flow.new(node, s.axes, s.inner)
        flow.union(s.index, out, "scaled_dot_product_attention v")
        flow.constrain_block(out, d)  # heads stay in place: q/k decide each head's weights


def _output_barrier(flow: _Flow, node: fx.Node) -> None:
    for a in node.all_input_nodes:
        for s in flow.spaces_of(a):
            flow.barrier(s.index, f"reaches the model output through {a.name}")


def _ignore(flow: _Flow, node: fx.Node) -> None:
    """Ops that read only metadata (shape asserts, sizes)."""


def _copy_(flow: _Flow, node: fx.Node) -> None:
    """In-place copy into a buffer: destination and source move together."""
    dst, src = node.args[:2]
    _broadcast_pair(flow, node, dst, src)


def _broadcast_pair(flow: _Flow, node: fx.Node, dst: fx.Node, src: fx.Node) -> None:
    for s in flow.spaces_of(src):
        flow.union(s.index, flow.at(dst, s.axes, s.inner), _op_name(node))
    _pass_through(flow, node, dst)


_UNARY = [
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.silu_.default,
    aten.tanh.default, aten.sigmoid.default, aten.neg.default, aten.abs.default, aten.exp.default,
    aten.log.default, aten.sqrt.default, aten.rsqrt.default, aten.erf.default, aten.square.default,
    aten.pow.Tensor_Scalar, aten.dropout.default, aten.native_dropout.default, aten.clone.default,
    aten.contiguous.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
    aten.alias.default, aten.detach.default, aten.hardtanh.default, aten.hardtanh_.default,
    aten.leaky_relu.default, aten.elu.default, aten.softplus.default, aten.hardswish.default,
    aten.hardsigmoid.default, aten.mish.default,
    aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.clamp.default,
    aten.clamp_min.default, aten.clamp_max.default, aten.type_as.default, aten.lift_fresh_copy.default,
    aten.gelu_.default, aten.sigmoid_.default, aten.tanh_.default, aten.dropout_.default,
    aten.feature_dropout.default, aten.alpha_dropout.default,
]
_BINARY = [
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.mul.Tensor,
    aten.mul_.Tensor, aten.div.Tensor, aten.div_.Tensor, aten.where.self, aten.maximum.default,
    aten.minimum.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.pow.Tensor_Tensor,
    aten.where.ScalarOther, aten.where.ScalarSelf,
]
_REDUCE = [
    aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default, aten.amax.default,
    aten.amin.default, aten.var.correction, aten.var.dim, aten.std.correction, aten.std.dim,
    aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default, aten.logsumexp.default,
]
_TRANSPOSE_OPS = (aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default)
_SPLIT_OPS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
              aten.tensor_split.indices, aten.split.sizes)
# ops returning a tuple whose first element carries the input's channels (the rest: statistics, masks)
_NORM_TUPLE_OPS = (aten.native_dropout.default, aten._native_batch_norm_legit_no_training.default,
                   aten.native_batch_norm.default,
                   aten._native_batch_norm_legit.default, aten.native_layer_norm.default,
                   aten.native_group_norm.default, aten._native_batch_norm_legit_functional.default)

OP_RULES: dict[object, Rule] = {
    **{op: _pass_through for op in _UNARY},
    **{op: _broadcast for op in _BINARY},
    **{op: _reduce for op in _REDUCE},
    aten.adaptive_avg_pool1d.default: _spatial(1), aten.avg_pool1d.default: _spatial(1),
    aten.max_pool1d.default: _spatial(1), aten.adaptive_avg_pool2d.default: _spatial(2),
    aten.avg_pool2d.default: _spatial(2), aten.max_pool2d.default: _spatial(2),
    aten.adaptive_avg_pool3d.default: _spatial(3), aten.avg_pool3d.default: _spatial(3),
    aten.max_pool3d.default: _spatial(3), aten.upsample_nearest2d.vec: _spatial(2),
    aten.upsample_bilinear2d.vec: _spatial(2), aten.pad.default: _spatial(None),
    aten.constant_pad_nd.default: _spatial(None),
    aten.softmax.int: _softmax, aten._softmax.default: _softmax, aten.log_softmax.int: _softmax,
    aten._log_softmax.default: _softmax,
    aten.linear.default: _linear, aten.addmm.default: _addmm, aten.mm.default: _mm,
    aten.matmul.default: _mm, aten.bmm.default: _mm,
    aten.conv1d.default: _conv, aten.conv2d.default: _conv, aten.conv3d.default: _conv,
    aten.conv1d.padding: _conv, aten.conv2d.padding: _conv, aten.conv3d.padding: _conv,
    aten.convolution.default: _conv,
    aten.layer_norm.default: _layer_norm, aten.native_layer_norm.default: _layer_norm,
    aten.rms_norm.default: _rms_norm,
    aten.batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _native_batch_norm,
    aten.native_batch_norm.default: _native_batch_norm,
    aten._native_batch_norm_legit.default: _native_batch_norm,
    aten._native_batch_norm_legit_functional.default: _native_batch_norm,
    aten.group_norm.default: _group_norm, aten.native_group_norm.default: _group_norm,
    aten._prelu_kernel.default: _prelu, aten.prelu.default: _prelu,
    aten.embedding.default: _embedding,
    aten.permute.default: _permute, aten.transpose.int: _permute, aten.t.default: _permute,
    aten.numpy_T.default: _permute,
    aten.view.default: _reshape, aten.reshape.default: _reshape, aten._unsafe_view.default: _reshape,
    aten.flatten.using_ints: _reshape, aten.unflatten.int: _reshape,
    aten.unsqueeze.default: _unsqueeze, aten.expand.default: _expand, aten.expand_as.default: _expand,
    aten.broadcast_to.default: _expand,
    aten.squeeze.dim: _squeeze, aten.squeeze.default: _squeeze, aten.squeeze.dims: _squeeze,
    aten.slice.Tensor: _slice, aten.select.int: _select, aten.index_select.default: _index_select,
    aten.index.Tensor: _index, aten._grouped_mm.default: _grouped_mm,
    aten.cat.default: _cat, aten.concat.default: _cat,
    **{op: _split for op in _SPLIT_OPS},
    operator.getitem: _getitem,
    aten.scaled_dot_product_attention.default: _sdpa,
    aten._assert_tensor_metadata.default: _ignore, aten.sym_size.int: _ignore,
    aten._assert_scalar.default: _ignore, aten.copy_.default: _copy_,
}
"""How channels flow through each aten op. Ops not listed are barriers (the op is named)."""

#: Ops of other libraries' ``torch.library`` namespaces, by qualified name (importing them here
#: would import the library): transformers' grouped GEMM for MoE experts.
NAMED_RULES: dict[str, Rule] = {
    "transformers.grouped_mm_fallback.default": _grouped_mm,
}


def _rule_of(node: fx.Node) -> Rule | None:
    if node.op != "call_function":
        return None
    rule = OP_RULES.get(node.target)
    if rule is None and isinstance(node.target, torch._ops.OpOverload):
        rule = NAMED_RULES.get(f"{node.target.namespace}.{node.target._opname}.{node.target._overloadname}")
    return rule


# --------------------------------------------------------------------------------------------------
# Eligibility
# --------------------------------------------------------------------------------------------------

# op -> (index of the weight operand, reduction axis of the weight, display name)
_MATMUL_WEIGHT: dict[object, tuple[int, int, str]] = {
    aten.linear.default: (1, 1, "linear"),
    aten.addmm.default: (2, 0, "addmm"),
    aten.mm.default: (1, 0, "mm"),
    aten.matmul.default: (1, 0, "matmul"),
    aten.conv1d.default: (1, 1, "conv"),
    aten.conv2d.default: (1, 1, "conv"),
    aten.conv3d.default: (1, 1, "conv"),
    aten.conv1d.padding: (1, 1, "conv"),  # padding="same" / "valid"
    aten.conv2d.padding: (1, 1, "conv"),
    aten.conv3d.padding: (1, 1, "conv"),
    aten.convolution.default: (1, 1, "conv"),
}


@dataclass(frozen=True)
class _Use:
    node: fx.Node
    axis: int | None
    op: str
    why_not: str | None = None


def _weight_use(node: fx.Node, w: fx.Node) -> _Use:
    """How ``node`` uses parameter ``w``: as a GEMM weight with a reduction axis, or not."""
    if transposed_weight(node, batched=True) is w:  # MoE experts W [E, out, in] in a grouped GEMM
        users = list(node.users)
        if len(users) == 1 and _rule_of(users[0]) is _grouped_mm and users[0].args[1] is node:
            return _Use(users[0], 2, "grouped_mm")
    if _rule_of(node) is _grouped_mm and node.args[1] is w and len(_shape(w)) == 3 and node.args[0] is not w:
        return _Use(node, 1, "grouped_mm")  # experts stored [E, in, out]
    if transposed_weight(node) is w and len(node.users) == 1:  # x @ W.T: W [out, in] reduces along axis 1
        user = next(iter(node.users))
        if linear_of_transposed(user) is w:
            return _Use(user, 1, _MATMUL_WEIGHT[user.target][2])
    spec = _MATMUL_WEIGHT.get(node.target)
    if spec is None:
        return _Use(node, None, _op_name(node), f"used by {_op_name(node)} ({node.name}), not a matmul or conv")
    idx, axis, name = spec
    if len(node.args) <= idx or node.args[idx] is not w or any(
        a is w for i, a in enumerate(node.args) if i != idx
    ):
        return _Use(node, None, name, f"used as an activation operand of {node.name} ({_op_name(node)})")
    shape = _shape(w)
    if len(shape) < 2:
        return _Use(node, None, name, f"1-D operand of {node.name}")
    if name == "conv":
        transposed = node.target is aten.convolution.default and bool(node.args[6])
        if transposed:
            return _Use(node, None, name, f"transposed convolution ({node.name}); reduction runs along dim 0")
    if name in ("mm", "matmul") and len(shape) != 2:
        return _Use(node, None, name, f"batched matmul weight of shape {list(shape)} ({node.name})")
    return _Use(node, axis, name)


def _gemm_uses(w: fx.Node) -> list[_Use]:
    """Every use of parameter node ``w``, looking through casts (``W.to(x.dtype)``) and skipping
    metadata-only reads (``_assert_tensor_metadata``, ``sym_size``)."""
    uses: list[_Use] = []
    for u in w.users:
        if _rule_of(u) is _ignore:
            continue
        if u.op == "call_function" and u.target in _CAST_OPS and u.args[0] is w and \
                _shape(u) == _shape(w):
            uses.extend(_gemm_uses(u))
            continue
        uses.append(_weight_use(u, w))
    return uses


def _module_of(node: fx.Node, pname: str) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path).replace("L['self'].", "").replace("L__self___", "")
    return pname.rsplit(".", 1)[0] if "." in pname else ""


def _head_paths(graph: fx.Graph, gemms: set[fx.Node]) -> tuple[nx.DiGraph, fx.Node]:
    """Dataflow edges that pass through single-input ops (and never into another GEMM or conv).

    A GEMM with a path to the output in this graph is an output head: its result *is* the model
    output up to unary ops (lm_head, classifier).
    """
    g = nx.DiGraph()
    out = next(n for n in graph.nodes if n.op == "output")
    for n in graph.nodes:
        for u in n.users:
            if u.op == "output":
                g.add_edge(n, u)
                continue
            if u in gemms:
                continue
            tensor_inputs = [a for a in u.all_input_nodes if _val(a) is not None and a.op != "get_attr"]
            if len(tensor_inputs) <= 1:
                g.add_edge(n, u)
    return g, out


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"{p}.*") or name == p:
            return p
    return None


# --------------------------------------------------------------------------------------------------
# analyze
# --------------------------------------------------------------------------------------------------


def analyze(
    gm: fx.GraphModule,
    pattern: PatternLike = "2:4",
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dense_head: bool = True,
) -> SparsityPlan:
    """Finds the N:M-eligible weights and the permutation groups of a captured graph.

    ``exclude``: name patterns (fnmatch, matched against parameter and module names) kept dense.
    ``include``: patterns that override the default of leaving the output head dense.
    ``dense_head``: keep GEMMs whose result reaches the model output through single-input ops
    only (lm_head, classifier) dense, as N:M training recipes do. Pure: ``gm`` is not modified.

    >>> import torch, nmgraph
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> gm = nmgraph.capture(m, (torch.randn(2, 8),))
    >>> plan = analyze(gm, "2:4")
    >>> [(layer.name, layer.group is not None) for layer in plan.layers]
    [('0.weight', False)]
    >>> plan.skipped[0].reason.startswith("output head")
    True
    >>> [(g.size, sorted(m.name for m in g.members)) for g in plan.groups]
    [(16, ['0.bias', '0.weight', '2.weight'])]
    """
    p = Pattern.parse(pattern)
    graph = gm.graph
    params = dict(gm.named_parameters(remove_duplicate=False))
    canonical: dict[int, str] = {}
    for name, t in params.items():
        canonical.setdefault(id(t), name)

    # ---- eligibility
    attr_nodes = [n for n in graph.nodes if n.op == "get_attr" and n.target in params]
    gemm_nodes = {n for n in graph.nodes if n.op == "call_function" and n.target in _MATMUL_WEIGHT}
    layers: list[LayerInfo] = []
    skipped: list[Skip] = []
    seen_tensors: dict[str, list[fx.Node]] = {}
    for n in attr_nodes:
        seen_tensors.setdefault(canonical[id(params[n.target])], []).append(n)
    eligible_node_of: dict[str, tuple[fx.Node, fx.Node]] = {}
    head_graph, output_node = _head_paths(graph, gemm_nodes)
    for pname, nodes in seen_tensors.items():
        w = params[pname]
        if w.dim() < 2:
            continue  # biases and norm parameters: never N:M candidates, not reported as skipped
        uses = [use for n in nodes for use in _gemm_uses(n)]
        bad = [u for u in uses if u.axis is None]
        if not uses:
            skipped.append(Skip(pname, "not used by the graph"))
            continue
        if bad:
            skipped.append(Skip(pname, bad[0].why_not + (" (tied weight)" if len(uses) > 1 else "")))
            continue
        if len({u.axis for u in uses}) > 1:
            skipped.append(Skip(pname, "used with different reduction axes: " +
                                ", ".join(f"{u.node.name}: axis {u.axis}" for u in uses)))
            continue
        use = uses[0]
        k = w.shape[use.axis]
        if use.op == "conv" and k == 1:
            kind = "depthwise convolution" if _conv_groups(use.node) > 1 else "convolution with one input channel"
            skipped.append(Skip(pname, f"{kind}: reduction dim has size 1 (shape {list(w.shape)})"))
            continue
        module = _module_of(use.node, pname)
        excluded = _matches(pname, exclude) or _matches(module, exclude)
        if excluded:
            skipped.append(Skip(pname, f"excluded by pattern {excluded!r}"))
            continue
        if k % p.m:
            skipped.append(Skip(pname, f"reduction dim {use.axis} of shape {list(w.shape)} is {k}, not divisible "
                                       f"by M={p.m}"))
            continue
        if dense_head and not (_matches(pname, include) or _matches(module, include)) and any(
            u.node in head_graph and nx.has_path(head_graph, u.node, output_node) for u in uses
        ):
            skipped.append(Skip(pname, "output head kept dense (its result is the model output); "
                                       f"pass include=[{module or pname!r}] to prune it"))
            continue
        layers.append(LayerInfo(pname, tuple(w.shape), use.axis, use.op, use.node.name, module))
        eligible_node_of[pname] = (nodes[0], use.node)

    # ---- channel flow
    flow = _Flow(gm)
    unknown: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            _output_barrier(flow, node)
            continue
        if not node.users and not _mutates(node):
            continue  # dead code (a value nothing reads) constrains no channel
        rule = _rule_of(node)
        if rule is None:
            what = _op_name(node)
            unknown[what] = unknown.get(what, 0) + 1
            for a in node.all_input_nodes:
                for s in flow.spaces_of(a):
                    flow.barrier(s.index, f"{node.name}: {what} is not in nmgraph's op table")
                if a.op == "get_attr" and _get_attr(a) is not None:
                    for ax in range(len(_shape(a))):
                        flow.barrier(flow.at(a, (ax,)), f"{node.name}: {what} is not in nmgraph's op table")
            continue
        rule(flow, node)
    flow.finish_slices()
    if unknown:
        log.info("ops outside the table (barriers): %s", unknown)

    # ---- parameters that appear under several get_attr nodes (tied) join on each axis
    by_tensor: dict[tuple[str, int], int] = {}
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    tensors = {**buffers, **params}
    for s in list(flow.spaces):
        if s.node.op != "get_attr" or len(s.axes) != 1:
            continue
        t = tensors.get(s.node.target)
        if t is None:
            continue
        key = (canonical.get(id(t), s.node.target), s.axes[0])
        if key in by_tensor:
            flow.union(by_tensor[key], s.index, "tied parameter")
        else:
            by_tensor[key] = s.index

    groups, barriers, layer_group = _collect_groups(flow, tensors, canonical, eligible_node_of, layers)
    layers = [LayerInfo(i.name, i.shape, i.axis, i.op, i.node, i.module, layer_group.get(i.name)) for i in layers]
    plan = SparsityPlan(p, tuple(layers), tuple(skipped), tuple(groups), tuple(barriers))
    log.info("analyze: %d eligible, %d dense, %d groups", len(layers), len(skipped), len(groups))
    return plan


def _collect_groups(flow: _Flow, tensors, canonical, eligible_node_of, layers):
    """Turns union-find classes into PermutationGroups (resolving segments) and barrier reports."""
    # Expand segmented classes: a member of a segmented class belongs to each segment's class with
    # an offset. Barriers of a segmented class propagate into its segments.
    roots = sorted({flow.find(i) for i in range(len(flow.spaces))})
    # root -> [(space, offset, width, repeat, repeat_block, stride)]
    members_of: dict[int, list[tuple[_Space, int, int, int, int, int]]] = {}
    for i, s in enumerate(flow.spaces):
        members_of.setdefault(flow.find(i), []).append((s, 0, s.channels, 1, 0, 0))

    def resolve(root: int, depth: int = 0) -> None:
        c = flow.info[root]
        if not c.segments or depth > 32:
            return
        for start, _stop, seg, period in c.segments:
            sroot = flow.find(seg)
            if sroot == root:
                flow.barrier(root, "a channel space is concatenated with itself")
                continue
            for r in c.barriers:
                flow.barrier(sroot, f"part of a concatenation that {r}")
            # members of this class restricted to the segment
            for s, off, _width, rep, rblock, stride in members_of.get(root, []):
                if s.node.op != "get_attr":
                    continue
                if (period or stride) and (rep != 1 or stride or off or s.inner != 1):
                    flow.barrier(sroot, "interleaved channels that are also repeated, offset or flattened")
                members_of.setdefault(sroot, []).append((s, off + start, _stop - start, rep, rblock, period))
            if c.block and (start % c.block or (_stop - start) % c.block):
                flow.barrier(sroot, "concat/split offsets cut through a block")
            resolve(sroot, depth + 1)
        members_of[root] = [x for x in members_of.get(root, []) if x[0].node.op != "get_attr"]

    for r in roots:
        resolve(r)

    # Repeated heads: members of a repeated class follow the permutation of its source class.
    owner: dict[int, int] = {}
    for r in sorted({flow.find(i) for i in range(len(flow.spaces))}):
        c = flow.info[r]
        if c.repeat_of is None:
            continue
        src_idx, repeat, block = c.repeat_of
        sroot = flow.find(src_idx)
        if sroot == r:
            flow.barrier(r, "repeated heads feed back into their source")
            continue
        owner[r] = sroot
        for reason in c.barriers:
            flow.barrier(sroot, f"its repeated heads: {reason}")
        if c.block and c.block % block:  # a finer block on the copies (heads) binds the source too
            flow.constrain_block(sroot, math.gcd(c.block, block))
        for s, off, width, rep, _, stride in members_of.get(r, []):
            if s.node.op == "get_attr":
                if rep != 1 or off or stride:
                    flow.barrier(sroot, "repeated heads that are also concatenated or repeated again")
                members_of.setdefault(sroot, []).append((s, 0, width // repeat, repeat, block, 0))
        members_of[r] = [x for x in members_of.get(r, []) if x[0].node.op != "get_attr"]
        c.barriers = c.barriers or ["channels are repeated heads (listed with their source group)"]

    groups: list[PermutationGroup] = []
    barriers: list[Skip] = []
    layer_group: dict[str, int] = {}
    param_names = set(canonical.values())
    consumer_space = {}
    for info in layers:
        attr_node, _ = eligible_node_of[info.name]
        for s in flow.spaces_of(attr_node):
            if s.axes == (info.axis,):
                consumer_space[info.name] = s.index
    roots = sorted({flow.find(i) for i in range(len(flow.spaces))})
    for r in roots:
        c = flow.info[r]
        if c.segments:
            continue
        mems: dict[tuple, Member] = {}
        size = flow.spaces[r].channels
        for s, off, width, rep, rblock, stride in members_of.get(r, []):
            if s.node.op != "get_attr":
                continue
            if s.node.target not in tensors:  # moving channels must move this tensor too: it cannot
                if _get_attr(s.node) is not None:
                    flow.barrier(r, f"{s.node.target} is a constant tensor, not a parameter or buffer; "
                                    "register it with register_buffer() so its channels can move")
                continue
            if len(s.axes) != 1:
                flow.barrier(r, f"{s.node.target} carries the channels on {len(s.axes)} axes {list(s.axes)} "
                                f"jointly (shape {list(_shape(s.node))}); nmgraph permutes one axis per tensor")
                continue
            t = tensors[s.node.target]
            name = canonical.get(id(t), s.node.target)
            if stride:  # a run of `width` channels at `off` in every period of `stride`
                m = Member(name, s.axes[0], off, off + width, 1, 1, 0, stride)
            else:
                m = Member(name, s.axes[0], off * s.inner, (off + width * rep) * s.inner, s.inner, rep, rblock)
            mems[(name, m.axis, off)] = m
        if not mems:
            continue
        label = ", ".join(sorted({m.name for m in mems.values()})[:3])
        if c.barriers:
            if any(m.name in param_names for m in mems.values()):  # buffers alone (rotary tables) are noise
                barriers.append(Skip(f"channels of {label}{' ...' if len(mems) > 3 else ''}", c.barriers[0]))
            continue
        gid = len(groups)
        consumers = []
        for info in layers:
            idx = consumer_space.get(info.name)
            if idx is not None and owner.get(flow.find(idx), flow.find(idx)) == r:
                t = tensors[info.name]
                full = any(m.name == info.name and m.axis == info.axis and m.start == 0 and
                           m.stop == t.shape[info.axis] and m.inner == 1 for m in mems.values())
                if full:
                    consumers.append(info.name)
                    layer_group[info.name] = gid
        block = c.block if c.block and c.block < size else size
        groups.append(PermutationGroup(gid, size, tuple(sorted(mems.values(), key=lambda m: (m.name, m.axis, m.start))),
                                       block, tuple(consumers), _kind(mems.values(), block, size)))
    return groups, barriers, layer_group


def _kind(members: Iterable[Member], block: int, size: int) -> str:
    if block < size:
        return "heads"
    if any(m.inner > 1 for m in members):
        return "flatten"
    return "channels"

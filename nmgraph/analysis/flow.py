"""The channel-flow solver: a union-find over channel spaces, with barriers, blocks and segments.

Channels are tracked as *spaces*: ``(node, axes)`` pairs, where ``axes`` lists the tensor axes (major
to minor) whose flattened index is the channel index, and ``inner`` consecutive flattened indices form
one channel (a conv's channels flattened into a Linear's input). The op rules
(:mod:`nmgraph.analysis.rules`) create spaces and join those that must be permuted identically. A
class may carry *barriers* (reasons it cannot move), a *block* (runs of channels that must stay
together, e.g. attention heads), *segments* (concat/split: the class is the concatenation of other
classes) and a *repeat* (its channels are copies of another class's heads).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import fx

from nmgraph.analysis.aten_ops import BINARY_OPS, EXPAND_OPS, FILL_OPS, UNARY_OPS
from nmgraph.analysis.nodes import data_dependent, norm_dim, op_name, shape_of, val_of

__all__ = ["Axes", "ChannelClass", "Flow", "Repeat", "Segment", "Space", "backward_source", "constant_along",
           "gcd_block"]

aten = torch.ops.aten

Axes = tuple[int, ...]


class Segment(NamedTuple):
    """Channels ``start:stop`` of a class are the channels of class ``space``; ``period`` 0 means one
    contiguous range, else the range repeats every ``period`` channels (interleaved per-head channels)."""

    start: int
    stop: int
    space: int
    period: int


class Repeat(NamedTuple):
    """A class whose channels are ``repeats`` copies of each ``block``-channel head of class ``source``."""

    source: int
    repeats: int
    block: int


@dataclass
class Space:
    """A channel space: ``node``'s tensor viewed along ``axes`` (see module docstring)."""

    node: fx.Node
    axes: Axes
    inner: int
    channels: int
    index: int  # position in the union-find arrays


@dataclass
class ChannelClass:
    """Annotations of a union-find root."""

    barriers: list[str] = field(default_factory=list)
    block: int = 0  # 0 = unconstrained
    segments: list[Segment] = field(default_factory=list)
    repeat_of: Repeat | None = None  # repeated heads


class Flow:
    """Union-find of channel spaces plus barriers, block constraints and segmentations."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.info: dict[int, ChannelClass] = {}
        self.of_node: dict[fx.Node, list[int]] = {}
        self.slices: dict[int, list[Segment]] = {}  # space -> the parts sliced out of it

    # -- union-find
    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def cls(self, i: int) -> ChannelClass:
        return self.info[self.find(i)]

    def new(self, node: fx.Node, axes: Axes, inner: int = 1, size: int | None = None) -> int:
        shape = shape_of(node)
        size = math.prod(shape[a] for a in axes) if size is None else size
        idx = len(self.spaces)
        self.spaces.append(Space(node, tuple(axes), inner, size // inner, idx))
        self.parent.append(idx)
        self.info[idx] = ChannelClass()
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
        cb.block = gcd_block(cb.block, ca.block)
        if ca.repeat_of and cb.repeat_of and ca.repeat_of[1:] == cb.repeat_of[1:]:
            self.union(ca.repeat_of.source, cb.repeat_of.source, "repeated heads of the same shape")
        elif ca.repeat_of and cb.repeat_of:
            self.barrier(ra, "channels repeated in two different ways")
        elif ca.repeat_of:
            cb.repeat_of = ca.repeat_of
        if ca.segments and cb.segments:
            self._merge_segments(ra, ca.segments, cb.segments)
        elif ca.segments:
            cb.segments = ca.segments
        return ra

    def _merge_segments(self, root: int, a: list[Segment], b: list[Segment]) -> None:
        if [(s.start, s.stop, s.period) for s in a] != [(s.start, s.stop, s.period) for s in b]:
            self.barrier(root, "channels are split or concatenated at two different offsets")
            return
        for x, y in zip(a, b):
            self.union(x.space, y.space, "matching concat/split segments")

    def finish_slices(self) -> None:
        """Turns the slices taken of a channel space into a segmentation (fused QKV read by slicing)."""
        for src, parts in self.slices.items():
            space = self.spaces[src]
            periods = {part.period for part in parts}
            if len(periods) > 1:
                self.barrier(src, f"slices of the channels of {space.node.name} along different axes")
                continue
            period = periods.pop()
            outer = space.channels // period
            by_range: dict[tuple[int, int], int] = {}
            for start, stop, idx, _ in parts:  # Segment fields
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
                    segs.append(Segment(pos, start, self.new(space.node, space.axes, 1, outer * (start - pos)),
                                        seg_period))
                segs.append(Segment(start, stop, by_range[(start, stop)], seg_period))
                pos = stop
            if pos < period:
                segs.append(Segment(pos, period, self.new(space.node, space.axes, 1, outer * (period - pos)),
                                    seg_period))
            self.segment(src, segs)

    def slice_part(self, s: Space, dim: int, start: int, stop: int, part: int) -> bool:
        """Records that ``part`` holds indices ``start:stop`` of axis ``dim`` of space ``s``.

        In the flattened channel order of ``s`` that is a run of channels repeating every
        ``period`` channels (one run when ``dim`` is the space's major axis). False if unsupported.
        """
        if s.inner != 1 or dim not in s.axes:
            return False
        shape = shape_of(s.node)
        pos = s.axes.index(dim)
        after = math.prod(shape[a] for a in s.axes[pos + 1 :])
        period = shape[dim] * after
        self.slices.setdefault(s.index, []).append(Segment(start * after, stop * after, part, period))
        return True

    def barrier(self, i: int, reason: str) -> None:
        c = self.cls(i)
        if reason not in c.barriers:
            c.barriers.append(reason)

    def constrain_block(self, i: int, block: int) -> None:
        c = self.cls(i)
        c.block = gcd_block(c.block, block)

    def segment(self, whole: int, parts: Sequence[Segment]) -> None:
        c = self.cls(whole)
        if self.spaces[whole].inner != 1:
            self.barrier(whole, "concat/split of flattened channels")
            return
        if c.segments:
            self._merge_segments(self.find(whole), c.segments, list(parts))
        else:
            c.segments = list(parts)

    def alias(self, node: fx.Node, src: fx.Node) -> None:
        """``node`` is ``src`` (a no-op such as a full slice): it shares ``src``'s spaces, so slices
        taken of either are parts of one space."""
        self.of_node[node] = list(self.of_node.get(src, ()))

    # -- spaces of a node
    def spaces_of(self, node: fx.Node) -> list[Space]:
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
        if constant_along(node, tuple(axes)):
            return idx  # equal values along these axes (broadcast from size 1, a fill): any order is the same
        src = backward_source(node, tuple(axes))
        if src is not None:  # e.g. an expanded or cast parameter (ViT's cls_token)
            self.union(idx, self.at(src[0], src[1], inner), op_name(node))
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
            self.barrier(idx, f"channels of {node.name} come from {op_name(node)}, which does not carry channels")
        return idx


def backward_source(node: fx.Node, axes: Axes) -> tuple[fx.Node, Axes] | None:
    """For a shape-preserving op on a single tensor, the input axes that ``axes`` come from."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if (val_of(src) is None and src.op != "get_attr") or data_dependent(src) or data_dependent(node):
        return None
    in_shape, out_shape = shape_of(src), shape_of(node)
    single = node.target in BINARY_OPS and len([a for a in node.args if isinstance(a, fx.Node)]) == 1
    if (node.target in UNARY_OPS or single) and in_shape == out_shape:  # e.g. Gemma's (1 + weight)
        return src, axes
    if node.target in (aten.slice.Tensor, aten.index_select.default):  # rows of a position table
        if norm_dim(node.args[1] if len(node.args) > 1 else 0, len(in_shape)) not in axes:
            return src, axes
        return None
    if node.target is aten.select.int:
        d = norm_dim(node.args[1], len(in_shape))
        return src, tuple(a + (a >= d) for a in axes)
    if node.target is aten.index.Tensor:  # rows picked by index tensors (a per-expert bias [E, out])
        used = [i for i, t in enumerate(node.args[1]) if t is not None]
        if used and used == list(range(used[0], used[-1] + 1)):
            index_nd = len(out_shape) - (len(in_shape) - len(used))
            first = used[0]
            if all(a < first or a >= first + index_nd for a in axes):
                return src, tuple(a if a < first else a - index_nd + len(used) for a in axes)
        return None
    if node.target in EXPAND_OPS or node.target is aten.unsqueeze.default:
        if node.target in EXPAND_OPS:
            mapped = tuple(a - (len(out_shape) - len(in_shape)) for a in axes)
        else:
            d = norm_dim(node.args[1], len(out_shape))
            mapped = tuple(a - (a > d) for a in axes) if d not in axes else None
        if mapped and all(0 <= a < len(in_shape) and in_shape[a] == out_shape[b] for a, b in zip(mapped, axes)):
            return src, mapped
    return None




def constant_along(node: fx.Node, axes: Axes) -> bool:
    """Whether ``node``'s values do not change along ``axes``: an ``expand`` / ``expand_as`` of
    size-1 (or new) axes, or a tensor filled with one value."""
    if node.op != "call_function":
        return False
    if node.target in FILL_OPS:
        return True
    if node.target not in EXPAND_OPS or not isinstance(node.args[0], fx.Node) or data_dependent(node.args[0]):
        return False
    in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
    shift = len(out_shape) - len(in_shape)
    return all(a - shift < 0 or in_shape[a - shift] == 1 for a in axes)


def gcd_block(a: int, b: int) -> int:
    """The block that satisfies two block constraints (0 = unconstrained)."""
    if not a:
        return b
    if not b:
        return a
    return math.gcd(a, b)

"""From union-find classes to permutation groups: resolve segments and repeated heads, name members.

A class becomes a :class:`~nmgraph.analysis.plan.PermutationGroup` when no barrier touches it; its
members are the parameters and buffers (and their axes) in it, with offsets for concatenated parts,
strides for interleaved per-head channels and repeats for heads shared by grouped-query attention.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import fx

from nmgraph.analysis.flow import Flow, Space
from nmgraph.analysis.nodes import attr_value, shape_of
from nmgraph.analysis.plan import LayerInfo, Member, PermutationGroup, Skip

__all__ = ["Placement", "collect_groups", "group_kind"]


class Placement(NamedTuple):
    """Where a space's channels sit in a class: from ``offset``, ``width`` channels, each block of
    ``repeat_block`` repeated ``repeat`` times, in runs repeating every ``stride`` channels (0: one run)."""

    space: Space
    offset: int
    width: int
    repeat: int
    repeat_block: int
    stride: int


def collect_groups(flow: Flow, tensors: Mapping[str, torch.Tensor], canonical: Mapping[int, str],
                   eligible_nodes: Mapping[str, tuple[fx.Node, fx.Node]], layers: Sequence[LayerInfo]
                   ) -> tuple[list[PermutationGroup], list[Skip], dict[str, int]]:
    """Turns union-find classes into PermutationGroups (resolving segments) and barrier reports."""
    # Expand segmented classes: a member of a segmented class belongs to each segment's class with
    # an offset. Barriers of a segmented class propagate into its segments.
    roots = sorted({flow.find(i) for i in range(len(flow.spaces))})
    members_of: dict[int, list[Placement]] = {}
    for i, s in enumerate(flow.spaces):
        members_of.setdefault(flow.find(i), []).append(Placement(s, 0, s.channels, 1, 0, 0))

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
                members_of.setdefault(sroot, []).append(Placement(s, off + start, _stop - start, rep, rblock, period))
            if c.block and (start % c.block or (_stop - start) % c.block):
                flow.barrier(sroot, "concat/split offsets cut through a block")
            resolve(sroot, depth + 1)
        members_of[root] = [x for x in members_of.get(root, []) if x.space.node.op != "get_attr"]

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
                members_of.setdefault(sroot, []).append(Placement(s, 0, width // repeat, repeat, block, 0))
        members_of[r] = [x for x in members_of.get(r, []) if x.space.node.op != "get_attr"]
        c.barriers = c.barriers or ["channels are repeated heads (listed with their source group)"]

    groups: list[PermutationGroup] = []
    barriers: list[Skip] = []
    layer_group: dict[str, int] = {}
    param_names = set(canonical.values())
    consumer_space = {}
    for info in layers:
        attr_node, _ = eligible_nodes[info.name]
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
                if attr_value(s.node) is not None:
                    flow.barrier(r, f"{s.node.target} is a constant tensor, not a parameter or buffer; "
                                    "register it with register_buffer() so its channels can move")
                continue
            if len(s.axes) != 1:
                flow.barrier(r, f"{s.node.target} carries the channels on {len(s.axes)} axes {list(s.axes)} "
                                f"jointly (shape {list(shape_of(s.node))}); nmgraph permutes one axis per tensor")
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
                                       block, tuple(consumers), group_kind(mems.values(), block, size)))
    return groups, barriers, layer_group


def group_kind(members: Iterable[Member], block: int, size: int) -> str:
    """``heads`` (a block constraint), ``flatten`` (conv channels flattened into a Linear) or ``channels``."""
    if block < size:
        return "heads"
    if any(m.inner > 1 for m in members):
        return "flatten"
    return "channels"

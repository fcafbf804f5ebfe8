"""How channels flow through each op: the rules table.

Each rule ``rule(flow, node)`` registers the channel spaces of ``node``'s output on the
:class:`~nmgraph.analysis.flow.Flow` and the unions (or barriers) its semantics imply. :data:`OP_RULES`
maps each ``OpOverload`` to its rule; :data:`NAMED_RULES` does the same, by qualified name, for ops of
other libraries' ``torch.library`` namespaces. An op in neither is a barrier named in the plan.

A rule for another op is one entry: ``OP_RULES`` for an aten op, or, without editing nmgraph,
``nmgraph.analyze(gm, rules={torch.ops.mylib.scale.default: pass_through})`` with one of the public
rules below (:func:`pass_through`, :func:`broadcast`, :func:`reduce`, :func:`ignore`,
:func:`barrier`) or a function of your own with the same signature.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from nmgraph.analysis.aten_ops import (
    BINARY_OPS,
    CAST_OPS,
    EXPAND_OPS,
    FILL_OPS,
    GROUPED_MM_NAMES,
    GROUPED_MM_OPS,
    METADATA_OPS,
    NORM_TUPLE_OPS,
    REDUCE_OPS,
    RNN_WEIGHTS,
    SPLIT_OPS,
    UNARY_OPS,
    WEIGHT_NORM_OPS,
    qualified_name,
)
from nmgraph.analysis.flow import Axes, Flow, Repeat, Segment
from nmgraph.analysis.nodes import (
    arg_of,
    attr_value,
    conv_groups,
    is_weight,
    linear_of_transposed,
    norm_dim,
    op_name,
    rnn_call,
    shape_of,
    transposed_weight,
    val_of,
    weight_source,
)
from nmgraph.errors import UnsupportedError

__all__ = [
    "NAMED_RULES",
    "OP_RULES",
    "Rule",
    "barrier",
    "broadcast",
    "ignore",
    "output_barrier",
    "pass_through",
    "reduce",
    "rule_of",
    "rule_table",
]

aten = torch.ops.aten

#: A rule: registers the output spaces of ``node`` on ``flow`` and the unions they imply.
Rule = Callable[[Flow, fx.Node], None]


def pass_through(flow: Flow, node: fx.Node, src: fx.Node | None = None) -> None:
    """Same shape in, same shape out, channels unchanged (elementwise unary ops, dropout, casts)."""
    src = src if src is not None else node.args[0]
    if not isinstance(src, fx.Node):
        return
    for s in flow.spaces_of(src):
        flow.union(s.index, flow.new(node, s.axes, s.inner), op_name(node))


def broadcast(flow: Flow, node: fx.Node) -> None:
    """Elementwise ops with broadcasting: aligned axes of every operand move together."""
    out_shape = shape_of(node)
    ndim = len(out_shape)
    operands = [a for a in node.args if isinstance(a, fx.Node) and (val_of(a) is not None or a.op == "get_attr")]
    out_spaces: dict[tuple[Axes, int], int] = {}
    for a in operands:
        shift = ndim - len(shape_of(a))
        for s in flow.spaces_of(a):
            key = (tuple(x + shift for x in s.axes), s.inner)
            if s.channels == 1 and any(out_shape[x] != 1 for x in key[0]):
                continue  # one channel broadcast over the output's channels (a scalar gate): nothing to move
            if key not in out_spaces:
                out_spaces[key] = flow.new(node, *key)
            flow.union(s.index, out_spaces[key], op_name(node))
    # Every operand that is not broadcast along a channel space moves with it too.
    for (axes, inner), out_idx in out_spaces.items():
        for a in operands:
            a_shape = shape_of(a)
            shift = ndim - len(a_shape)
            local = tuple(x - shift for x in axes)
            if any(x < 0 for x in local) or all(a_shape[x] == 1 for x in local):
                continue
            if any(a_shape[x] != out_shape[x + shift] for x in local):
                flow.barrier(out_idx, f"{a.name} is partially broadcast along channels at {node.name}")
                continue
            flow.union(flow.at(a, local, inner), out_idx, op_name(node))


def _reduce_dims(node: fx.Node) -> tuple[list[int], bool]:
    shape = shape_of(node.args[0])
    dims = arg_of(node, "dim")
    if dims is None or dims == []:
        dims = list(range(len(shape)))
    if isinstance(dims, int):
        dims = [dims]
    keep = bool(arg_of(node, "keepdim", False))
    return [norm_dim(d, len(shape)) for d in dims], keep


def reduce(flow: Flow, node: fx.Node) -> None:
    """Permutation-invariant reductions (sum, mean, var, amax...): a reduced channel axis is consumed."""
    src = node.args[0]
    dims, keep = _reduce_dims(node)
    for s in flow.spaces_of(src):
        if set(s.axes) & set(dims):
            if not set(s.axes) <= set(dims):
                flow.barrier(s.index, f"{node.name} ({op_name(node)}) reduces part of a channel space")
            continue
        axes = s.axes if keep else tuple(a - sum(d < a for d in dims) for a in s.axes)
        flow.union(s.index, flow.new(node, axes, s.inner), op_name(node))


def _softmax(flow: Flow, node: fx.Node) -> None:
    """Softmax over any axis is permutation-equivariant along that axis."""
    pass_through(flow, node)


def _linear_like(flow: Flow, node: fx.Node, x: fx.Node, w: fx.Node, b, w_in_axis: int, w_out_axis: int) -> None:
    xs = flow.at(x, (len(shape_of(x)) - 1,))
    flow.union(xs, flow.at(w, (w_in_axis,), flow.spaces[xs].inner), op_name(node))
    out = flow.new(node, (len(shape_of(node)) - 1,))
    flow.union(out, flow.at(w, (w_out_axis,)), op_name(node))
    if isinstance(b, fx.Node):
        flow.union(out, flow.at(b, (len(shape_of(b)) - 1,)), op_name(node))


def _tracked_weight(flow: Flow, w: Any) -> bool:
    """A parameter, or a weight computed by an op whose rule tracks its rows and columns
    (``weight_norm``'s ``g * v / ||v||``: its columns are ``v``'s)."""
    if is_weight(w):
        return True
    axes = {s.axes for s in flow.spaces_of(w)} if isinstance(w, fx.Node) else set()
    return {(0,), (1,)} <= axes and isinstance(w, fx.Node) and w.target in WEIGHT_NORM_OPS


def _weight_norm(flow: Flow, node: fx.Node) -> None:
    """``_weight_norm(v, g, dim)`` = ``g * v / ||v||``, the norm over every axis but ``dim`` (all axes
    when ``dim == -1``). Permuting any axis other than ``dim`` leaves each norm unchanged; permuting
    ``dim`` permutes the norms and ``g`` with it. So the weight's rows and columns are ``v``'s (and
    ``g`` moves with axis ``dim``). Only axes 0 and 1 get spaces: a GEMM reads no other axis as channels."""
    v, g = node.args[0], node.args[1]
    dim = arg_of(node, "dim", 0)
    nd = len(shape_of(v))
    for a in range(min(nd, 2)):
        out = flow.new(node, (a,))
        flow.union(out, flow.at(v, (a,)), op_name(node))
        if dim != -1 and norm_dim(dim, nd) == a and isinstance(g, fx.Node) and \
                len(shape_of(g)) == nd and shape_of(g)[a] == shape_of(v)[a] > 1:
            flow.union(out, flow.at(g, (a,)), op_name(node))


def _glu(flow: Flow, node: fx.Node) -> None:
    """``glu(x, dim)`` = ``a * sigmoid(b)`` for the two halves ``a, b`` of ``x`` along ``dim``: channel ``c``
    of the output reads channels ``c`` and ``c + C/2``, so both halves carry the output's permutation."""
    src = node.args[0]
    nd = len(shape_of(src))
    dim = norm_dim(arg_of(node, "dim", -1), nd)
    size = shape_of(src)[dim]
    for s in flow.spaces_of(src):
        if dim not in s.axes:
            flow.union(s.index, flow.new(node, s.axes, s.inner), op_name(node))
            continue
        out = flow.new(node, s.axes)
        if not (flow.slice_part(s, dim, 0, size // 2, out) and flow.slice_part(s, dim, size // 2, size, out)):
            reason = f"{node.name}: glu halves flattened channels"
            flow.barrier(s.index, reason)
            flow.barrier(out, reason)


def _rnn(flow: Flow, node: fx.Node) -> None:
    """LSTM / GRU / RNN, one step (``lstm_cell``) or fused over a sequence (``lstm.input``).

    ``gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh`` holds ``gates`` chunks of ``H`` rows, and
    everything after is elementwise per hidden unit. Permuting the hidden units by ``P`` (each gate
    chunk of ``w_ih``, ``w_hh``, the biases, the columns of ``w_hh``, the states) gives the same
    function with ``h`` permuted by ``P``; the columns of ``w_ih`` carry the input's channels. Layer
    ``l > 0`` of a fused op reads layer ``l - 1``'s hidden units (both directions, concatenated).
    The states ``[layers * directions, B, H]`` of a fused op share one channel axis, so every layer
    takes one permutation.
    """
    call = rnn_call(node)
    outs = sorted((u for u in node.users if u.target is operator.getitem), key=lambda u: u.args[1])
    tuple_out = isinstance(node.meta.get("val"), (list, tuple))
    computed = [op for op, _ in call.weights() if not is_weight(op)]
    if call.problem or computed:
        why = call.problem or f"weight {computed[0].name} is computed at run time"
        for a in node.all_input_nodes:
            for sp in flow.spaces_of(a):
                flow.barrier(sp.index, f"{node.name}: {why}")
        for u in outs if tuple_out else [node]:
            nd = len(shape_of(u))
            flow.barrier(flow.new(u, (nd - 1,)), f"{node.name}: {why}")
        return
    spec, name = call.spec, op_name(node)
    hidden_of = [[flow.at(cell[1], (1,)) for cell in layer] for layer in call.cells]
    hidden = shape_of(call.cells[0][0][1])[1]

    def join(whole: int, parts: list[int]) -> None:
        """Channels of ``whole`` are the ``parts`` (classes of ``hidden`` channels) one after another."""
        if len(parts) == 1:
            flow.union(whole, parts[0], name)
        else:
            flow.segment(whole, [Segment(k * hidden, (k + 1) * hidden, p, 0) for k, p in enumerate(parts)])

    for layer, cells in enumerate(call.cells):
        for d, (w_ih, w_hh, b_ih, b_hh) in enumerate(cells):
            rows = flow.at(w_ih, (0,))
            for t in (w_hh, b_ih, b_hh):
                if t is not None:
                    flow.union(rows, flow.at(t, (0,)), name)
            join(rows, [hidden_of[layer][d]] * spec.gates)
            cols = flow.at(w_ih, (1,))
            if layer == 0:
                flow.union(flow.at(call.x, (len(shape_of(call.x)) - 1,)), cols, name)
            else:
                join(cols, hidden_of[layer - 1])
    every = [h for layer in hidden_of for h in layer]
    for st in call.states:
        if isinstance(st, fx.Node):
            for h in every:
                flow.union(flow.at(st, (len(shape_of(st)) - 1,)), h, name)
    if not tuple_out:  # gru_cell, rnn cells: the new hidden state
        flow.union(flow.new(node, (len(shape_of(node)) - 1,)), hidden_of[0][0], name)
        return
    for u in outs:
        out = flow.new(u, (len(shape_of(u)) - 1,))
        if spec.cell or u.args[1] != 0:  # a cell's (h, c); a fused op's final states [L * D, B, H]
            for h in every:
                flow.union(out, h, name)
        else:  # the fused op's output sequence: the last layer's directions, concatenated
            join(out, hidden_of[-1])


def _linear(flow: Flow, node: fx.Node) -> None:
    x, w = node.args[0], weight_source(node.args[1])
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not _tracked_weight(flow, w):
        reason = f"{node.name}: linear with a computed weight"
        flow.barrier(flow.at(x, (len(shape_of(x)) - 1,)), reason)
        flow.barrier(flow.new(node, (len(shape_of(node)) - 1,)), reason)
        return
    _linear_like(flow, node, x, w, b, 1, 0)


def _addmm(flow: Flow, node: fx.Node) -> None:
    b, x, w = node.args[:3]
    if not is_weight(w):
        return _matmul_activations(flow, node, x, w, bias=b)
    _linear_like(flow, node, x, w, b, 0, 1)


def _mm(flow: Flow, node: fx.Node) -> None:
    x, w = node.args[:2]
    if is_weight(w) and len(shape_of(w)) == 2:
        return _linear_like(flow, node, x, w, None, 0, 1)
    wt = linear_of_transposed(node)
    if wt is not None:
        return _linear_like(flow, node, x, wt, None, 1, 0)
    _matmul_activations(flow, node, x, w)


def _matmul_activations(flow: Flow, node: fx.Node, a, b, bias=None) -> None:
    """``a @ b`` of two activations (attention scores, attention-weighted values).

    The contraction axis of ``a`` and ``b`` moves together; ``b``'s column space passes to the
    output. Batch axes inside a channel space force a block (heads are computed separately).
    """
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return
    sa, sb, so = shape_of(a), shape_of(b), shape_of(node)
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
        flow.union(s.index, flow.at(b, b_axes), op_name(node))
        if batch:
            flow.constrain_block(s.index, sa[na - 1])
    for s in flow.spaces_of(b):
        if nb - 2 in s.axes or nb - 1 not in s.axes:
            continue
        batch = [x for x in s.axes if x < nb - 2]
        out_axes = tuple(x + (no - nb) for x in s.axes)
        flow.union(s.index, flow.new(node, out_axes, s.inner), op_name(node))
        if batch:
            flow.constrain_block(s.index, sb[nb - 1])
    if isinstance(bias, fx.Node):
        for s in flow.spaces_of(node):
            flow.union(s.index, flow.at(bias, (len(shape_of(bias)) - 1,)), op_name(node))


def _conv(flow: Flow, node: fx.Node) -> None:
    x, w = node.args[0], node.args[1]
    b = arg_of(node, "bias")
    transposed = bool(arg_of(node, "transposed", False))
    groups = conv_groups(node)
    out = flow.new(node, (1,))
    if transposed or not _tracked_weight(flow, w):
        why = "transposed convolution" if transposed else "convolution with a computed weight"
        flow.barrier(flow.at(x, (1,)), f"{node.name}: {why}")
        flow.barrier(out, f"{node.name}: {why}")
        for s in flow.spaces_of(w):  # a computed weight whose axes are tracked (weight_norm's v)
            flow.barrier(s.index, f"{node.name}: {why}")
        return
    c_in, c_out = shape_of(x)[1], shape_of(node)[1]
    flow.union(out, flow.at(w, (0,)), op_name(node))
    if isinstance(b, fx.Node):
        flow.union(out, flow.at(b, (0,)), op_name(node))
    if groups == 1:
        flow.union(flow.at(x, (1,)), flow.at(w, (1,)), op_name(node))
    elif groups == c_in and c_out == c_in:  # depthwise: channel c in -> channel c out
        flow.union(flow.at(x, (1,)), out, op_name(node))
    else:
        flow.constrain_block(out, c_out // groups)
        reason = f"{node.name}: grouped convolution (groups={groups}) shares weight columns across groups"
        flow.barrier(flow.at(x, (1,)), reason)
        flow.barrier(flow.at(w, (1,)), reason)  # column j of every group reads a different input channel


def _layer_norm(flow: Flow, node: fx.Node) -> None:
    x, normalized = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else None
    b = node.args[3] if len(node.args) > 3 else None
    nd = len(shape_of(x))
    k = len(normalized)
    normed = set(range(nd - k, nd))
    for s in flow.spaces_of(x):
        out = flow.new(node, s.axes, s.inner)
        flow.union(s.index, out, op_name(node))
        if set(s.axes) & normed and not set(s.axes) <= normed:
            flow.barrier(s.index, f"{node.name}: layer_norm over part of a channel space")
    _norm_params(flow, node, (w, b), nd, k)


def _norm_params(flow: Flow, node: fx.Node, params: Sequence[Any], nd: int, k: int) -> None:
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
            flow.union(idx, flow.at(p, tuple(a - (nd - k) for a in sp.axes), sp.inner), op_name(node))


def _rms_norm(flow: Flow, node: fx.Node) -> None:
    x, normalized = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else None
    nd = len(shape_of(x))
    k = len(normalized)
    pass_through(flow, node)
    for s in flow.spaces_of(x):
        if set(s.axes) & set(range(nd - k, nd)) and not set(s.axes) <= set(range(nd - k, nd)):
            flow.barrier(s.index, f"{node.name}: rms_norm over part of a channel space")
    _norm_params(flow, node, (w,), nd, k)


def _batch_norm(flow: Flow, node: fx.Node) -> None:
    """batch_norm(x, w, b, running_mean, running_var, ...): per-channel params and running stats."""
    _native_batch_norm(flow, node)


def _native_batch_norm(flow: Flow, node: fx.Node) -> None:
    x = node.args[0]
    out = flow.new(node, (1,))
    flow.union(flow.at(x, (1,)), out, op_name(node))
    for p in node.args[1:5]:
        if isinstance(p, fx.Node):
            flow.union(out, flow.at(p, (0,)), op_name(node))


def _group_norm(flow: Flow, node: fx.Node) -> None:
    x, groups = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else None
    b = node.args[3] if len(node.args) > 3 else None
    c = shape_of(x)[1]
    out = flow.new(node, (1,))
    flow.union(flow.at(x, (1,)), out, op_name(node))
    flow.constrain_block(out, c // groups)  # statistics are per group of c/groups channels
    for p in (w, b):
        if isinstance(p, fx.Node):
            flow.union(out, flow.at(p, (0,)), op_name(node))


def _prelu(flow: Flow, node: fx.Node) -> None:
    w = node.args[1]
    pass_through(flow, node)
    if shape_of(w) and shape_of(w)[0] > 1:
        flow.union(flow.at(node, (1,)), flow.at(w, (0,)), op_name(node))


def _embedding(flow: Flow, node: fx.Node) -> None:
    w = node.args[0]
    flow.union(flow.new(node, (len(shape_of(node)) - 1,)), flow.at(w, (1,)), op_name(node))


def _spatial(k: int | None) -> Rule:
    """Pooling, padding and upsampling act on the last ``k`` axes; channels elsewhere pass through."""

    def rule(flow: Flow, node: fx.Node) -> None:
        src = node.args[0]
        nd = len(shape_of(src))
        if k is None:  # pad: the padded axes are the last len(pad) // 2
            pad = list(node.args[1])
            touched = {nd - 1 - i // 2 for i, v in enumerate(pad) if v}
        else:
            touched = set(range(nd - k, nd))
        for s in flow.spaces_of(src):
            if touched & set(s.axes):
                flow.barrier(s.index, f"{node.name}: {op_name(node)} acts along channel axes")
                continue
            flow.union(s.index, flow.new(node, s.axes, s.inner), op_name(node))

    return rule


def _permute(flow: Flow, node: fx.Node) -> None:
    nd = len(shape_of(node))
    if node.target in (aten.t.default, aten.numpy_T.default):
        order = list(range(nd))[::-1]
    elif node.target is aten.transpose.int:
        d0, d1 = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
        order = list(range(nd))
        order[d0], order[d1] = order[d1], order[d0]
    else:
        order = [norm_dim(d, nd) for d in node.args[1]]
    inverse = {src: dst for dst, src in enumerate(order)}
    for s in flow.spaces_of(node.args[0]):
        flow.union(s.index, flow.new(node, tuple(inverse[a] for a in s.axes), s.inner), op_name(node))


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


def _reshape(flow: Flow, node: fx.Node) -> None:
    src = node.args[0]
    ins, outs = shape_of(src), shape_of(node)
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
            repeated = isinstance(src, fx.Node) and src.target in EXPAND_OPS
            flow.barrier(s.index, f"{node.name}: " + (
                "channels repeated by expand + reshape (grouped-query attention shares key/value heads; "
                "their channels stay in place)" if repeated else "reshape splits flattened channels"))
            continue
        if repeat_of is not None:
            repeat, block = repeat_of
            out = flow.new(node, tuple(out_axes), inner)
            flow.constrain_block(s.index, block)
            flow.constrain_block(out, block)
            flow.cls(out).repeat_of = Repeat(s.index, repeat, block)
            continue
        flow.union(s.index, flow.new(node, tuple(out_axes), inner), op_name(node))


def _broadcast_axes(node: fx.Node, axes: Sequence[int]) -> bool:
    """True if ``node`` is an expand whose ``axes`` were size 1 before it (pure repetition)."""
    if not axes or not isinstance(node, fx.Node) or node.target not in EXPAND_OPS:
        return False
    src_shape = shape_of(node.args[0])
    shift = len(shape_of(node)) - len(src_shape)
    return all(a - shift < 0 or src_shape[a - shift] == 1 for a in axes)


def _unsqueeze(flow: Flow, node: fx.Node) -> None:
    nd = len(shape_of(node))
    d = norm_dim(node.args[1], nd)
    for s in flow.spaces_of(node.args[0]):
        flow.union(s.index, flow.new(node, tuple(a + (a >= d) for a in s.axes), s.inner), op_name(node))


def _expand(flow: Flow, node: fx.Node) -> None:
    ins, outs = shape_of(node.args[0]), shape_of(node)
    shift = len(outs) - len(ins)
    for s in flow.spaces_of(node.args[0]):
        # a size-1 axis of the space that expand repeats becomes a repetition axis, not a channel axis
        axes = tuple(a + shift for a in s.axes if not (ins[a] == 1 and outs[a + shift] != 1))
        if axes:
            flow.union(s.index, flow.new(node, axes, s.inner), op_name(node))


def _squeeze(flow: Flow, node: fx.Node) -> None:
    src = node.args[0]
    ins = shape_of(src)
    dims = node.args[1] if len(node.args) > 1 else [i for i, s in enumerate(ins) if s == 1]
    if isinstance(dims, int):
        dims = [dims]
    dims = [norm_dim(d, len(ins)) for d in dims if ins[norm_dim(d, len(ins))] == 1]
    for s in flow.spaces_of(src):
        axes = tuple(a - sum(d < a for d in dims) for a in s.axes)
        flow.union(s.index, flow.new(node, axes, s.inner), op_name(node))


def _slice(flow: Flow, node: fx.Node) -> None:
    src = node.args[0]
    nd = len(shape_of(src))
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
    size = shape_of(src)[dim]
    full = shape_of(node)[dim] == size
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    step = node.args[4] if len(node.args) > 4 else 1
    if full and start == 0 and step == 1:
        # x[:, 0:] keeps every index: the same tensor (graphs captured with dynamic shapes keep these,
        # torch cannot prove them no-ops); slices of it are slices of its source
        flow.alias(node, src)
        return
    for s in flow.spaces_of(src):
        if dim in s.axes and not full:
            if step == 1 and isinstance(start, int):
                begin = start + size if start < 0 else min(start, size)
                if flow.slice_part(s, dim, begin, begin + shape_of(node)[dim], flow.new(node, s.axes)):
                    continue
            flow.barrier(s.index, f"{node.name}: slices channel axis {dim}")
            continue
        flow.union(s.index, flow.new(node, s.axes, s.inner), op_name(node))


def _select(flow: Flow, node: fx.Node) -> None:
    src = node.args[0]
    dim = norm_dim(node.args[1], len(shape_of(src)))
    index = norm_dim(node.args[2], shape_of(src)[dim])
    for s in flow.spaces_of(src):
        if dim in s.axes:
            rest = tuple(a - (a > dim) for a in s.axes if a != dim)
            if rest and flow.slice_part(s, dim, index, index + 1, flow.new(node, rest)):
                continue  # e.g. BLOOM's fused [.., heads, 3, head_dim] QKV
            flow.barrier(s.index, f"{node.name}: selects along channel axis {dim}")
            continue
        flow.union(s.index, flow.new(node, tuple(a - (a > dim) for a in s.axes), s.inner), op_name(node))


def _index_select(flow: Flow, node: fx.Node) -> None:
    src = node.args[0]
    dim = norm_dim(node.args[1], len(shape_of(src)))
    for s in flow.spaces_of(src):
        if dim in s.axes:
            flow.barrier(s.index, f"{node.name}: gathers along channel axis {dim}")
            continue
        flow.union(s.index, flow.new(node, s.axes, s.inner), op_name(node))


def _index(flow: Flow, node: fx.Node) -> None:
    """``x[idx]`` (``aten.index.Tensor``) with index tensors on non-channel axes: rows are gathered
    (MoE token routing), channels pass through. Adjacent index tensors replace their axes by the
    index shape at the same place; indexing a channel axis is a barrier."""
    src, indices = node.args[0], list(node.args[1])
    nd = len(shape_of(src))
    used = [i for i, t in enumerate(indices) if t is not None]
    if not used or used != list(range(used[0], used[-1] + 1)):
        for sp in flow.spaces_of(src):
            flow.barrier(sp.index, f"{node.name}: advanced indexing with separated index tensors")
        return
    first, last = used[0], used[-1]
    index_nd = len(shape_of(node)) - (nd - len(used))
    run = _constant_run(indices[first], shape_of(src)[first]) if len(used) == 1 else None
    for sp in flow.spaces_of(src):
        if any(first <= a <= last for a in sp.axes):
            # a constant run of channels (Falcon's fused multi-query QKV reads its K/V head as x[:, :, [-1]])
            if run is not None and flow.slice_part(sp, first, run[0], run[1], flow.new(node, sp.axes)):
                continue
            flow.barrier(sp.index, f"{node.name}: indexes along a channel axis")
            continue
        axes = tuple(a if a < first else a - len(used) + index_nd for a in sp.axes)
        flow.union(sp.index, flow.new(node, axes, sp.inner), op_name(node))


def _constant_run(index: Any, size: int) -> tuple[int, int] | None:
    """``(begin, end)`` when ``index`` is a constant 1-D index tensor holding ``begin, ..., end - 1``."""
    while isinstance(index, fx.Node) and index.op == "call_function" and (
            index.target in CAST_OPS or index.target is aten.lift_fresh_copy.default):
        index = index.args[0]
    if not (isinstance(index, fx.Node) and index.op == "get_attr"):
        return None
    t = attr_value(index)
    if t is None or t.dim() != 1 or not t.numel() or t.dtype.is_floating_point or t.dtype == torch.bool:
        return None
    values = [int(v) % size for v in t.tolist()]
    if values != list(range(values[0], values[0] + len(values))):
        return None
    return values[0], values[0] + len(values)


def _grouped_mm(flow: Flow, node: fx.Node) -> None:
    """Grouped GEMM of MoE experts: ``x [T, K]`` rows split by ``offs`` over experts, times
    ``W_e^T`` for ``W [E, N, K]`` read through ``transpose(-2, -1)``. Every expert shares the input
    channel order (``K``) and the output channel order (``N``)."""
    x, w = node.args[0], node.args[1]
    if is_weight(w) and len(shape_of(w)) == 3 and len(shape_of(x)) == 2:  # W [E, in, out] read directly (GPT-OSS)
        return _linear_like(flow, node, x, w, None, 1, 2)
    p = transposed_weight(w, batched=True)
    if p is None or len(shape_of(x)) != 2:
        for sp in flow.spaces_of(x):
            flow.barrier(sp.index, f"{node.name}: grouped matmul without an expert weight parameter")
        flow.barrier(flow.new(node, (len(shape_of(node)) - 1,)), f"{node.name}: grouped matmul without an "
                     "expert weight parameter")
        return
    _linear_like(flow, node, x, p, None, 2, 1)


def _cat(flow: Flow, node: fx.Node) -> None:
    parts = [p for p in node.args[0] if isinstance(p, fx.Node)]
    nd = len(shape_of(node))
    dim = norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), nd)
    # spaces not involving the concat axis: every part moves together
    keys = {(s.axes, s.inner) for p in parts for s in flow.spaces_of(p) if dim not in s.axes}
    for axes, inner in keys:
        out = flow.new(node, axes, inner)
        for p in parts:
            flow.union(flow.at(p, axes, inner), out, op_name(node))
    # spaces on the concat axis: the output's channels are segmented into the parts' channels
    if any(dim in s.axes for p in parts for s in flow.spaces_of(p)):
        whole = flow.new(node, (dim,))
        segs, start = [], 0
        for p in parts:
            size = shape_of(p)[dim]
            segs.append(Segment(start, start + size, flow.at(p, (dim,)), 0))
            start += size
        flow.segment(whole, segs)


def _split(flow: Flow, node: fx.Node) -> None:
    """split / split_with_sizes / chunk / unbind: the outputs are read through getitem."""
    src = node.args[0]
    nd = len(shape_of(src))
    if node.target is aten.unbind.int:
        dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
    else:
        dim = norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), nd)
    outs = sorted((u for u in node.users if u.target is operator.getitem), key=lambda u: u.args[1])
    vals = node.meta.get("val")
    sizes = [int(v.shape[dim]) for v in vals] if isinstance(vals, (list, tuple)) else []
    for s in flow.spaces_of(src):
        if dim not in s.axes:
            for u in outs:
                axes = s.axes if node.target is not aten.unbind.int else tuple(a - (a > dim) for a in s.axes)
                flow.union(s.index, flow.new(u, axes, s.inner), op_name(node))
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


def _getitem(flow: Flow, node: fx.Node) -> None:
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return
    if src.target in SPLIT_OPS or src.target in RNN_WEIGHTS:
        return  # handled by the split or recurrent rule
    if node.args[1] == 0 and src.target in NORM_TUPLE_OPS:
        for s in flow.spaces_of(src):
            flow.union(s.index, flow.new(node, s.axes, s.inner), "getitem")
        return
    if node.args[1] != 0 and src.target in NORM_TUPLE_OPS:
        return  # saved statistics; not channels of an activation used later
    for s in flow.spaces_of(src):
        flow.barrier(s.index, f"{node.name}: getitem of {op_name(src)}")


def _sdpa(flow: Flow, node: fx.Node) -> None:
    """scaled_dot_product_attention(q, k, v, mask): per head, q.k over head_dim; v's head_dim passes."""
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):  # a per-head bias (T5, ALiBi) pins heads and positions
        for s in flow.spaces_of(mask):
            flow.barrier(s.index, f"{node.name}: attention mask/bias channels are tied to fixed heads")
    d = shape_of(q)[-1]
    nd = len(shape_of(q))
    head_axis = nd - 3
    for s in flow.spaces_of(q) + flow.spaces_of(k):
        if nd - 2 in s.axes or nd - 1 not in s.axes:
            flow.barrier(s.index, f"{node.name}: attention over channels on the sequence axis")
    # Q and K: the head_dim of matching heads is contracted together.
    if shape_of(q)[head_axis] != shape_of(k)[head_axis]:
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


def output_barrier(flow: Flow, node: fx.Node) -> None:
    for a in node.all_input_nodes:
        for s in flow.spaces_of(a):
            flow.barrier(s.index, f"reaches the model output through {a.name}")


def ignore(flow: Flow, node: fx.Node) -> None:
    """Ops that read only metadata (shape asserts, sizes)."""


def _copy_(flow: Flow, node: fx.Node) -> None:
    """In-place copy into a buffer: destination and source move together."""
    dst, src = node.args[:2]
    _broadcast_pair(flow, node, dst, src)


def _broadcast_pair(flow: Flow, node: fx.Node, dst: fx.Node, src: fx.Node) -> None:
    for s in flow.spaces_of(src):
        flow.union(s.index, flow.at(dst, s.axes, s.inner), op_name(node))
    pass_through(flow, node, dst)


OP_RULES: dict[object, Rule] = {
    **{op: pass_through for op in UNARY_OPS},
    **{op: broadcast for op in BINARY_OPS},
    **{op: reduce for op in REDUCE_OPS},
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
    aten.index.Tensor: _index, **{op: _grouped_mm for op in GROUPED_MM_OPS},
    aten.cat.default: _cat, aten.concat.default: _cat,
    **{op: _split for op in SPLIT_OPS},
    operator.getitem: _getitem,
    aten.scaled_dot_product_attention.default: _sdpa,
    **{op: ignore for op in METADATA_OPS},
    **{op: ignore for op in FILL_OPS},  # x.new_zeros(...), zeros_like(x): read only x's shape and dtype
    aten.copy_.default: _copy_,
    aten.glu.default: _glu,
    **{op: _weight_norm for op in WEIGHT_NORM_OPS},
    **{op: _rnn for op in RNN_WEIGHTS},
}
"""How channels flow through each aten op. Ops not listed are barriers (the op is named)."""

#: Ops of other libraries' ``torch.library`` namespaces, by qualified name (importing them here
#: would import the library): transformers' grouped GEMM for MoE experts.
NAMED_RULES: dict[str, Rule] = {name: _grouped_mm for name in GROUPED_MM_NAMES}


def barrier(reason: str) -> Rule:
    """A rule that stops every channel space reaching the op (``reason`` is what the plan reports)."""

    def rule(flow: Flow, node: fx.Node) -> None:
        for a in node.all_input_nodes:
            for s in flow.spaces_of(a):
                flow.barrier(s.index, f"{node.name}: {reason}")

    return rule


def rule_table(extra: Mapping[Any, Rule] | None = None) -> dict[Any, Rule]:
    """The rules :func:`nmgraph.analyze` uses: :data:`OP_RULES`, :data:`NAMED_RULES`, then ``extra``.

    Keys of ``extra`` are ``OpOverload`` objects (``torch.ops.mylib.op.default``; an
    ``OpOverloadPacket`` stands for its ``.default``) or qualified names ``"namespace.op.overload"``.
    """
    table: dict[Any, Rule] = {**OP_RULES, **NAMED_RULES}
    for key, rule in (extra or {}).items():
        if isinstance(key, torch._ops.OpOverloadPacket):
            key = key.default
        if not (isinstance(key, (torch._ops.OpOverload, str)) or callable(key)) or not callable(rule):
            raise UnsupportedError(
                f"analyze(rules={{{key!r}: {rule!r}}}): keys are ops (torch.ops.ns.op.overload, or the "
                "qualified name 'ns.op.overload') and values rule functions rule(flow, node), e.g. "
                "nmgraph.analysis.rules.pass_through."
            )
        table[key] = rule
    return table


def rule_of(node: fx.Node, table: Mapping[Any, Rule] | None = None) -> Rule | None:
    """The rule for ``node`` in ``table`` (default: the built-in rules); ``None`` if it has none."""
    if node.op != "call_function":
        return None
    table = rule_table() if table is None else table
    rule = table.get(node.target)
    if rule is None:
        name = qualified_name(node.target)
        rule = table.get(name) if name is not None else None
    return rule

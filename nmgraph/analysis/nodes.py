"""Helpers over FX nodes: tensor metadata, arguments by schema name, and how a node reads a weight."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from nmgraph.analysis.aten_ops import CAST_OPS, TRANSPOSE_OPS, RnnWeights, rnn_weights
from nmgraph.errors import UnsupportedError
from nmgraph.graph import fetch_attr

__all__ = [
    "RnnCall",
    "arg_of",
    "attr_value",
    "conv_groups",
    "data_dependent",
    "is_weight",
    "linear_of_transposed",
    "module_of",
    "mutates",
    "norm_dim",
    "op_name",
    "pointwise_conv_reason",
    "rnn_call",
    "shape_of",
    "transposed_weight",
    "val_of",
    "weight_source",
]

aten = torch.ops.aten


def val_of(node: Any) -> torch.Tensor | None:
    """The tensor metadata (fake tensor or ``tensor_meta``) of ``node``; ``None`` if it has none."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return v
    v = node.meta.get("tensor_meta")
    return v if v is not None and hasattr(v, "shape") else None


def data_dependent(node: Any) -> bool:
    """Whether the shape of what ``node`` computes depends on tensor values (an unbacked symbol, e.g. a
    slice whose bounds come from ``.item()``): no channel axis of such a tensor can be read statically."""
    if not isinstance(node, fx.Node):
        return False
    vals = node.meta.get("val")
    for v in vals if isinstance(vals, (tuple, list)) else (vals,):
        if isinstance(v, torch.Tensor) and free_unbacked_symbols(v.shape):
            return True
    return False


def shape_of(node: fx.Node) -> tuple[int, ...]:
    """The static shape of the tensor ``node`` computes; :class:`UnsupportedError` when it is not recorded."""
    v = val_of(node)
    if v is None and node.op == "get_attr":
        v = attr_value(node)
    if v is None:
        raise UnsupportedError(
            f"node {node.format_node()} has no tensor metadata ('val'); capture the model with "
            "nmgraph.capture (torch.export) so shapes are recorded."
        )
    return tuple(int(s) for s in v.shape)


def attr_value(node: fx.Node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (``None`` if it names no tensor)."""
    obj = fetch_attr(node.graph.owning_module, str(node.target))
    return obj if isinstance(obj, torch.Tensor) else None


def mutates(node: fx.Node) -> bool:
    """Whether ``node`` may write into one of its inputs (in-place ops, ``copy_``) or is opaque."""
    if node.op != "call_function":
        return True  # call_module / call_method: not analyzable, keep their barriers
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.target is not operator.getitem
    return bool(schema.is_mutable)


def op_name(node: fx.Node) -> str:
    """What ``node`` runs, as users read it (``aten.linear.default``)."""
    if node.op == "call_function":
        return str(getattr(node.target, "__name__", node.target)) if not isinstance(
            node.target, torch._ops.OpOverload) else str(node.target)
    return f"{node.op} {node.target}"


def norm_dim(dim: int, ndim: int) -> int:
    """``dim`` as a non-negative axis of an ``ndim``-D tensor."""
    return dim % ndim if ndim else 0


def arg_of(node: fx.Node, name: str, default: Any = None) -> Any:
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


def is_weight(node: Any) -> bool:
    """Whether ``node`` reads a parameter or buffer of the graph module (``get_attr``)."""
    return isinstance(node, fx.Node) and node.op == "get_attr"


def weight_source(node: Any) -> Any:
    """``W`` for ``W.to(dtype)`` / ``W.float()`` / ``W.contiguous()`` (chains too); else ``node``."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in CAST_OPS and \
            isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def transposed_weight(node: Any, batched: bool = False) -> fx.Node | None:
    """The 2-D parameter ``W`` when ``node`` is ``W.T`` (``t``, ``numpy_T``, ``transpose(0, 1)``,
    ``permute([1, 0])``): ``x @ W.T`` is a Linear with ``W`` stored ``[out, in]`` (Falcon).
    ``batched``: instead a 3-D ``W [experts, out, in]`` read as ``W.transpose(-2, -1)``."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in TRANSPOSE_OPS:
        return None
    w = node.args[0]
    nd = 3 if batched else 2
    if not is_weight(w) or len(shape_of(w)) != nd:
        return None
    if node.target is aten.transpose.int and {norm_dim(d, nd) for d in node.args[1:3]} != {nd - 2, nd - 1}:
        return None
    if node.target is aten.permute.default and [norm_dim(d, nd) for d in node.args[1]] != [*range(nd - 2), nd - 1,
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


def conv_groups(node: fx.Node) -> int:
    """``groups`` of a convolution node."""
    return int(arg_of(node, "groups", 1))


def _ints(v: Any) -> tuple[int, ...]:
    return tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else (int(v),)


def pointwise_conv_reason(node: fx.Node) -> str | None:
    """``None`` when the convolution ``node`` is a GEMM over channels at every position (1x1 kernel,
    ``groups=1``, stride 1, no padding, not transposed; dilation does nothing to a 1x1 kernel), else
    what makes it more than that.

    Such a convolution of ``x [B, C, *S]`` with ``W [O, C, 1, ...]`` computes, at each of the
    ``B * prod(S)`` positions, ``W.view(O, C) @ x[b, :, s] + bias``: exactly ``linear`` on ``x``
    moved channel-last, moved back.
    """
    kernel = shape_of(node.args[1])[2:]
    if any(k != 1 for k in kernel):
        return f"a {'x'.join(map(str, kernel))} kernel"
    groups = int(arg_of(node, "groups", 1))
    if groups != 1:
        return f"groups={groups}"
    if bool(arg_of(node, "transposed", False)):
        return "a transposed convolution"
    stride = _ints(arg_of(node, "stride", 1))
    if any(s != 1 for s in stride):
        return f"stride {list(stride)}"
    padding = arg_of(node, "padding", 0)
    if not isinstance(padding, str) and any(p != 0 for p in _ints(padding)):
        return f"padding {list(_ints(padding))}"
    return None


def module_of(node: fx.Node, pname: str) -> str:
    """Qualified name of the module whose forward ran ``node`` (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path).replace("L['self'].", "").replace("L__self___", "")
    return pname.rsplit(".", 1)[0] if "." in pname else ""


@dataclass(frozen=True)
class RnnCall:
    """The operands of a recurrent op (see :class:`~nmgraph.analysis.aten_ops.RnnWeights`).

    ``x``: the input sequence (or step); ``states``: the recurrent state tensors passed in (``None``
    where absent); ``cells[layer][direction] = (w_ih, w_hh, b_ih, b_hh)`` (biases ``None`` when the
    op has none); ``seq_axis`` / ``batch_first`` / ``bidirectional`` for the fused op; ``problem``:
    why nmgraph cannot follow its channels (``""`` when it can).
    """

    spec: RnnWeights
    x: Any
    states: tuple[Any, ...]
    cells: tuple[tuple[tuple[Any, Any, Any, Any], ...], ...]
    bidirectional: bool = False
    problem: str = ""

    def weights(self) -> list[tuple[Any, str]]:
        """Every weight operand with its role (``"w_ih"``, ``"w_hh"``, ``"b_ih"``, ``"b_hh"``)."""
        return [(op, role) for layer in self.cells for cell in layer
                for op, role in zip(cell, ("w_ih", "w_hh", "b_ih", "b_hh")) if op is not None]


def rnn_call(node: fx.Node) -> RnnCall | None:
    """The operands of ``node`` when it runs a recurrent op of ``RNN_WEIGHTS``; else ``None``."""
    spec = rnn_weights(node.target) if node.op == "call_function" else None
    if spec is None:
        return None
    args = list(node.args)
    hx = args[1] if len(args) > 1 else None
    states = tuple(hx) if isinstance(hx, (list, tuple)) else (hx,)
    if spec.cell:
        w_ih, w_hh = args[2], args[3]
        b_ih = args[4] if len(args) > 4 else node.kwargs.get("b_ih")
        b_hh = args[5] if len(args) > 5 else node.kwargs.get("b_hh")
        return RnnCall(spec, args[0], states, (((w_ih, w_hh, b_ih, b_hh),),))
    params = list(args[2])
    has_biases, layers, bidirectional = bool(args[3]), int(args[4]), bool(args[7])
    dirs = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    if len(params) != layers * dirs * per:
        return RnnCall(spec, args[0], states, (), bidirectional,
                       f"{len(params)} weights for {layers} layer(s) x {dirs} direction(s): an LSTM with "
                       "projections (proj_size > 0), whose hidden state is projected before it recurs")
    cells = []
    for layer in range(layers):
        row = []
        for d in range(dirs):
            chunk = params[(layer * dirs + d) * per:(layer * dirs + d + 1) * per]
            row.append((chunk[0], chunk[1], chunk[2] if has_biases else None, chunk[3] if has_biases else None))
        cells.append(tuple(row))
    return RnnCall(spec, args[0], states, tuple(cells), bidirectional)

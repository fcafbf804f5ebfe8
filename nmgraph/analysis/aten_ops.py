"""The op vocabulary of the analysis: named sets of aten ops, and the one GEMM-weight table.

Everything in nmgraph that asks "is this op a GEMM, which argument is its weight, along which axis
does it reduce" asks :data:`GEMM_WEIGHTS` (eligibility, lowering, export, deployment). Rules and
helpers that need to know what kind of op a node runs test membership in the sets here, never the
identity of a rule function, so the rules table can be split and extended without import circles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BINARY_OPS",
    "CAST_OPS",
    "DROPOUT_OPS",
    "EXPAND_OPS",
    "FILL_OPS",
    "GEMM_WEIGHTS",
    "GROUPED_MM_OPS",
    "METADATA_OPS",
    "NORM_TUPLE_OPS",
    "REDUCE_OPS",
    "RNN_WEIGHTS",
    "SPLIT_OPS",
    "TRANSPOSE_OPS",
    "UNARY_OPS",
    "WEIGHT_NORM_OPS",
    "GemmWeight",
    "RnnWeights",
    "gemm_weight",
    "is_grouped_mm",
    "lowers_to_linear",
    "qualified_name",
    "rnn_weights",
]

aten = torch.ops.aten

#: Same shape in, same shape out, channels unchanged (elementwise unary ops, dropout, casts).
UNARY_OPS = frozenset([
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
    aten.clip.default, aten.clip_.default, aten.clamp_.default, aten.clamp_min_.default, aten.clamp_max_.default,
])
#: Dropout ops, ``(input, p, train)``: random masks, which a channel permutation reorders.
DROPOUT_OPS = frozenset([aten.dropout.default, aten.dropout_.default, aten.native_dropout.default,
                         aten.feature_dropout.default, aten.alpha_dropout.default])
#: Elementwise ops of several operands, with broadcasting.
BINARY_OPS = frozenset([
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.mul.Tensor,
    aten.mul_.Tensor, aten.div.Tensor, aten.div_.Tensor, aten.where.self, aten.maximum.default,
    aten.minimum.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.pow.Tensor_Tensor,
    aten.where.ScalarOther, aten.where.ScalarSelf,
])
#: Permutation-invariant reductions over their ``dim`` argument.
REDUCE_OPS = frozenset([
    aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default, aten.amax.default,
    aten.amin.default, aten.var.correction, aten.var.dim, aten.std.correction, aten.std.dim,
    aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default, aten.logsumexp.default,
])
TRANSPOSE_OPS = frozenset([aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default])
#: Ops whose outputs are read through ``getitem``: one part of the input each.
SPLIT_OPS = frozenset([aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
                       aten.tensor_split.indices, aten.split.sizes])
#: Ops returning a tuple whose first element carries the input's channels (the rest: statistics, masks).
NORM_TUPLE_OPS = frozenset([
    aten.native_dropout.default, aten._native_batch_norm_legit_no_training.default,
    aten.native_batch_norm.default, aten._native_batch_norm_legit.default, aten.native_layer_norm.default,
    aten.native_group_norm.default, aten._native_batch_norm_legit_functional.default,
])
#: Reads of a weight that change neither its values' order nor its shape (``W.to(x.dtype)``, ``W.float()``).
CAST_OPS = frozenset([aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
                      aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default])
#: Repetition of size-1 axes.
EXPAND_OPS = frozenset([aten.expand.default, aten.expand_as.default, aten.broadcast_to.default])
#: Tensors filled with one value.
FILL_OPS = frozenset([aten.full.default, aten.ones.default, aten.zeros.default, aten.full_like.default,
                      aten.ones_like.default, aten.zeros_like.default, aten.scalar_tensor.default,
                      aten.new_zeros.default, aten.new_ones.default, aten.new_full.default])
#: Ops that read only metadata (shape asserts, sizes): no use of a tensor's values.
METADATA_OPS = frozenset([aten._assert_tensor_metadata.default, aten.sym_size.int, aten._assert_scalar.default])
#: ``_weight_norm(v, g, dim)``: ``g * v / ||v||`` with the norm over every axis but ``dim``.
WEIGHT_NORM_OPS = frozenset([aten._weight_norm.default])
#: Grouped GEMMs of MoE experts, by ``OpOverload`` and, for ops of other libraries' ``torch.library``
#: namespaces (importing them here would import the library), by qualified name.
GROUPED_MM_OPS = frozenset([aten._grouped_mm.default])
GROUPED_MM_NAMES = frozenset(["transformers.grouped_mm_fallback.default"])


def qualified_name(target: Any) -> str | None:
    """``namespace.op.overload`` of an ``OpOverload`` (``None`` for anything else)."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    return f"{target.namespace}.{target._opname}.{target._overloadname}"


def is_grouped_mm(target: Any) -> bool:
    return target in GROUPED_MM_OPS or qualified_name(target) in GROUPED_MM_NAMES


@dataclass(frozen=True)
class GemmWeight:
    """How one GEMM-like op reads its weight.

    ``weight_arg``: position of the weight operand; ``axis``: the weight's reduction axis;
    ``kind``: the name reports use (``"linear"``, ``"addmm"``, ``"mm"``, ``"matmul"``, ``"conv"``);
    ``x_arg`` / ``bias_arg``: positions of the activation and bias (``None``: none);
    ``lowers``: nmgraph's sparse linear kernels can run it (2-D ``x @ W^T + b``);
    ``pointwise``: a convolution that the linear kernels run as a GEMM over channels when it is
    pointwise (1x1 kernel, ``groups=1``, stride 1, no padding, not transposed:
    :func:`nmgraph.analysis.nodes.pointwise_conv_reason`), its input moved channel-last and the
    result moved back.
    """

    weight_arg: int
    axis: int
    kind: str
    x_arg: int = 0
    bias_arg: int | None = None
    lowers: bool = False
    pointwise: bool = False


_CONV = GemmWeight(1, 1, "conv", 0, 2, pointwise=True)

#: op -> how it reads its weight. The one table of GEMM-like ops.
GEMM_WEIGHTS: dict[Any, GemmWeight] = {
    aten.linear.default: GemmWeight(1, 1, "linear", 0, 2, lowers=True),
    aten.addmm.default: GemmWeight(2, 0, "addmm", 1, 0, lowers=True),
    aten.mm.default: GemmWeight(1, 0, "mm"),
    aten.matmul.default: GemmWeight(1, 0, "matmul"),
    aten.conv1d.default: _CONV,
    aten.conv2d.default: _CONV,
    aten.conv3d.default: _CONV,
    aten.conv1d.padding: _CONV,  # padding="same" / "valid"
    aten.conv2d.padding: _CONV,
    aten.conv3d.padding: _CONV,
    aten.convolution.default: _CONV,
}


def gemm_weight(target: Any) -> GemmWeight | None:
    return GEMM_WEIGHTS.get(target)


def lowers_to_linear(kind: str, axis: int) -> bool:
    """Whether an eligible weight used by a GEMM of ``kind`` along ``axis`` runs on the sparse
    linear kernels: ``linear``/``addmm``, and ``x @ W.T`` (``mm``/``matmul`` along axis 1, which
    lowering rewrites to ``linear``). A convolution lowers only when it is pointwise, a property of
    the node, not of its kind (:func:`nmgraph.analysis.nodes.pointwise_conv_reason`)."""
    specs = [s for s in GEMM_WEIGHTS.values() if s.kind == kind]
    return any(s.lowers for s in specs) or (kind in ("mm", "matmul") and axis == 1)


@dataclass(frozen=True)
class RnnWeights:
    """How a recurrent op reads its weights: every ``w_ih`` / ``w_hh`` is a GEMM weight along axis 1
    (``gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh``), with ``gates`` chunks of hidden rows
    (LSTM: i, f, g, o; GRU: r, z, n), elementwise after that.

    ``cell``: one step (``lstm_cell(x, [h, c], w_ih, w_hh, b_ih, b_hh)``, ``gru_cell(x, h, ...)``),
    weights at positions 2..5; otherwise the fused sequence op (``lstm.input(x, [h0, c0], params,
    has_biases, num_layers, dropout, train, bidirectional, batch_first)``), weights in the list at
    position 2, per layer and direction ``w_ih, w_hh[, b_ih, b_hh]``. ``states``: recurrent state
    tensors (LSTM: h and c; GRU: h). ``why_dense``: why an N:M pattern of these weights would be of
    no use (``""``: eligible). A cell is eligible: its two GEMMs export as ONNX Gemm/MatMul nodes,
    which TensorRT's sparse tactics read (nmgraph's own kernels run it densely). The fused op runs,
    and exports as, one recurrent kernel (ONNX LSTM/GRU/RNN, TensorRT's RNN layer) that has no sparse
    form.
    """

    kind: str
    gates: int
    states: int
    cell: bool
    why_dense: str = ""


_FUSED_RNN = (
    "a GEMM along its input axis, but the fused recurrent op (aten.{kind}.input) runs as one "
    "dense kernel, exported as an ONNX {onnx} node, and neither nmgraph's sparse kernels nor TensorRT's "
    "RNN layer has an N:M form; step through nn.{cell} (one cell call per step) to make it eligible"
)

#: Recurrent ops whose weights are GEMMs along their input axis (see :class:`RnnWeights`).
RNN_WEIGHTS: dict[Any, RnnWeights] = {
    aten.lstm_cell.default: RnnWeights("lstm_cell", 4, 2, cell=True),
    aten.gru_cell.default: RnnWeights("gru_cell", 3, 1, cell=True),
    aten.rnn_tanh_cell.default: RnnWeights("rnn_cell", 1, 1, cell=True),
    aten.rnn_relu_cell.default: RnnWeights("rnn_cell", 1, 1, cell=True),
    aten.lstm.input: RnnWeights("lstm", 4, 2, cell=False, why_dense=_FUSED_RNN.format(
        kind="lstm", onnx="LSTM", cell="LSTMCell")),
    aten.gru.input: RnnWeights("gru", 3, 1, cell=False, why_dense=_FUSED_RNN.format(
        kind="gru", onnx="GRU", cell="GRUCell")),
    aten.rnn_tanh.input: RnnWeights("rnn", 1, 1, cell=False, why_dense=_FUSED_RNN.format(
        kind="rnn_tanh", onnx="RNN", cell="RNNCell")),
    aten.rnn_relu.input: RnnWeights("rnn", 1, 1, cell=False, why_dense=_FUSED_RNN.format(
        kind="rnn_relu", onnx="RNN", cell="RNNCell")),
}


def rnn_weights(target: Any) -> RnnWeights | None:
    return RNN_WEIGHTS.get(target)

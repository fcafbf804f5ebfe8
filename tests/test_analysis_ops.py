"""Op-table cases found by sweeping real architectures: each checks the plan and that a random
permutation of every group leaves the outputs equal to an untouched copy."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmgraph
from nmgraph.passes.lower_linears import LowerLinearsConfig, lower_linears

from . import hf_models
from .hf_models import first_tensor
from .test_analysis import _barrier_reasons, _check, _group_with


class Normalized(nn.Module):
    """A Linear, a norm along ``dim`` (F.normalize, Tensor.norm or std), another Linear."""

    def __init__(self, how, dim):
        super().__init__()
        self.how, self.dim = how, dim
        self.l1, self.l2 = nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.l1(x)
        if self.how == "normalize":
            h = F.normalize(h, dim=self.dim)
        elif self.how == "norm":
            h = h / h.norm(p=2, dim=self.dim, keepdim=True)
        else:
            h = h / h.std(dim=self.dim, keepdim=True, unbiased=False)
        return self.l2(h)


@pytest.mark.parametrize("how", ["normalize", "norm", "std"])
@pytest.mark.parametrize(("shape", "dim"), [((3, 16), -1), ((2, 5, 16), 1), ((2, 5, 16), -1)])
def test_vector_norms_read_dim_and_keepdim_by_name(how, shape, dim):
    # linalg_vector_norm(x, ord, dim, keepdim) and std.correction put dim/keepdim elsewhere than sum
    torch.manual_seed(0)
    plan = _check(Normalized(how, dim), torch.randn(*shape), include=["l2"])
    g = _group_with(plan, "l2.weight", 1)
    assert g is not None and any(m.name == "l1.weight" and m.axis == 0 for m in g.members)


class ConvLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.ln, self.c2 = nn.Conv2d(4, 8, 3, padding=1), nn.LayerNorm([8, 6, 6]), nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            self.ln.weight.normal_()
            self.ln.bias.normal_()

    def forward(self, x):
        return self.c2(self.ln(self.c1(x)))


def test_layer_norm_over_channels_and_space_moves_its_weight():
    torch.manual_seed(0)
    plan = _check(ConvLayerNorm(), torch.randn(2, 4, 6, 6), include=["c2"])
    g = _group_with(plan, "c2.weight", 1)
    names = {(m.name, m.axis) for m in g.members}
    assert {("c1.weight", 0), ("ln.weight", 0), ("ln.bias", 0)} <= names


class HeadRMSNorm(nn.Module):
    """RMSNorm([heads, head_dim]): its weight holds the channels on two axes at once."""

    def __init__(self):
        super().__init__()
        self.l1, self.n, self.l2 = nn.Linear(16, 16), nn.RMSNorm([2, 8]), nn.Linear(16, 8)
        with torch.no_grad():
            self.n.weight.normal_()

    def forward(self, x):
        return self.l2(self.n(self.l1(x).view(2, 5, 2, 8)).view(2, 5, 16))


def test_parameter_carrying_channels_on_two_axes_is_a_barrier():
    torch.manual_seed(0)
    plan = _check(HeadRMSNorm(), torch.randn(2, 5, 16), include=["l2"])
    assert _group_with(plan, "l2.weight", 1) is None
    assert "n.weight carries the channels on 2 axes" in _barrier_reasons(plan)


class Scaled(nn.Module):
    def __init__(self, as_buffer):
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, 16), nn.Linear(16, 8)
        if as_buffer:
            self.register_buffer("scale", torch.randn(16))
        else:
            self.scale = torch.randn(16)  # a plain attribute: export lifts it as a constant

    def forward(self, x):
        return self.l2(self.l1(x) * self.scale)


def test_constant_tensor_attribute_is_a_barrier_and_a_buffer_moves():
    torch.manual_seed(0)
    plan = _check(Scaled(as_buffer=False), torch.randn(3, 16), include=["l2"])
    assert _group_with(plan, "l2.weight", 1) is None
    assert "is a constant tensor, not a parameter or buffer; register it with register_buffer()" in \
        _barrier_reasons(plan)
    plan = _check(Scaled(as_buffer=True), torch.randn(3, 16), include=["l2"])
    assert any(m.name == "scale" for m in _group_with(plan, "l2.weight", 1).members)


class PerHeadWeights(nn.Module):
    """Per-head weights [heads, d_in, d_out] applied with matmul/bmm (batched experts look the same)."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.l1, self.l2 = nn.Linear(16, 16), nn.Linear(16, 8)
        self.w = nn.Parameter(torch.randn(4, 4, 4))

    def forward(self, x):
        h = self.l1(x).view(3, 4, 4).transpose(0, 1)
        return self.l2(self.op(h, self.w).transpose(0, 1).reshape(3, 16))


@pytest.mark.parametrize("op", [torch.matmul, torch.bmm])
def test_batched_parameter_operand_is_a_barrier(op):
    torch.manual_seed(0)
    plan = _check(PerHeadWeights(op), torch.randn(3, 16), include=["l2"])
    assert _group_with(plan, "l1.weight", 0) is None
    assert "w carries the channels on 2 axes" in _barrier_reasons(plan)


@pytest.mark.parametrize("padding", [1, "same"])
def test_convolution_with_string_padding(padding):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=padding), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=padding),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
    plan = _check(model, torch.randn(2, 4, 8, 8), include=["5"])
    assert {i.name for i in plan.layers} == {"0.weight", "2.weight", "5.weight"}
    assert _group_with(plan, "2.weight", 1) is not None and _group_with(plan, "5.weight", 1) is not None


class TransposedWeights(nn.Module):
    """``x @ W.T`` with W stored [out, in] (Falcon's Linear), through t, .T and transpose."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(16, 32))
        self.w3 = nn.Parameter(torch.randn(8, 16))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(x @ self.w1.T)
        h = torch.relu(torch.matmul(h, self.w2.t()))
        return self.head(torch.mm(h.reshape(-1, 16), self.w3.transpose(0, 1)))


def test_matmul_with_transposed_weight_is_a_linear():
    torch.manual_seed(0)
    model = TransposedWeights()
    x = torch.randn(2, 1, 16)  # 2 rows: the Triton GEMV serves them in fp32
    plan = _check(model, x)
    assert {(i.name, i.axis) for i in plan.layers} == {("w1", 1), ("w2", 1), ("w3", 1)}
    g = _group_with(plan, "w2", 1)
    assert {(m.name, m.axis) for m in g.members} == {("w1", 0), ("w2", 1)}
    # lowering rewrites x @ W.T to aten.linear(x, W) and lowers it; outputs equal the pruned model
    gm = nmgraph.convert(nmgraph.capture(model, (x,)), "2:4", plan=plan)
    with torch.no_grad():
        ref = model(x)
    result = lower_linears(gm, LowerLinearsConfig(weights={"w1": 1, "w2": 1, "w3": 1}, backend="triton"))
    assert len(result.changed_nodes) == 3
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("aten.t." in t or "numpy_T" in t or "transpose" in t for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", [
    dict(multi_query=False, parallel_attn=False),  # separate heads, sequential blocks
    dict(),  # multi-query: K/V read from the fused projection as x[:, :, [-1]] (a constant index)
    dict(new_decoder_architecture=True, num_kv_heads=2),  # grouped-query through broadcast_to
])
def test_falcon_linears_are_eligible_and_permutable(variant):
    t = hf_models.transformers
    torch.manual_seed(0)
    cfg = t.FalconConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         use_cache=False, bos_token_id=1, eos_token_id=2, **variant)
    model = hf_models.randomized(t.FalconForCausalLM(cfg).eval())
    ids = torch.randint(3, 96, (2, 8))
    reference = copy.deepcopy(model)
    plan = _check(model, ids)
    assert len(plan.layers) == 8 and all(i.op == "matmul" and i.axis == 1 for i in plan.layers)
    assert plan.permutable_fraction == 1.0
    fast = nmgraph.compile(reference, "2:4", time_limit=1.0)
    out = first_tensor(fast(ids))
    lowering = next(iter(fast.report.lowerings.values()))
    assert len(lowering.skipped) == 8 and all("CPU" in s.reason for s in lowering.skipped)  # dense on a CPU
    torch.testing.assert_close(first_tensor(lowering.gm(ids)), out, rtol=1e-5, atol=1e-5)


class DeadSelect(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        _unused = h[:, :, -1]  # nothing reads it (BART's decoder leaves such a node in the graph)
        return self.head(torch.relu(self.b(h)))


def test_dead_nodes_constrain_nothing():
    torch.manual_seed(0)
    plan = _check(DeadSelect(), torch.randn(2, 5, 16))
    assert _group_with(plan, "b.weight", 1) is not None
    assert "select" not in _barrier_reasons(plan)


def test_single_input_channel_conv_is_not_called_depthwise():
    model = nn.Sequential(nn.Conv1d(1, 32, 10, stride=5), nn.GELU(), nn.Conv1d(32, 32, 3))
    plan = nmgraph.analyze(nmgraph.capture(model.eval(), (torch.randn(2, 1, 320),)), "2:4")
    reasons = dict(plan.skipped)
    assert reasons["0.weight"].startswith("convolution with one input channel: reduction dim has size 1")
    dw = nn.Sequential(nn.Conv1d(8, 8, 3, groups=8), nn.GELU(), nn.Conv1d(8, 8, 1))
    plan = nmgraph.analyze(nmgraph.capture(dw.eval(), (torch.randn(2, 8, 32),)), "2:4")
    assert dict(plan.skipped)["0.weight"].startswith("depthwise convolution")


def _moe(kind):
    t = hf_models.transformers
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if kind == "mixtral":
        cfg = t.MixtralConfig(**common, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)
        return t.MixtralForCausalLM(cfg)
    cfg = t.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                           num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    return t.Qwen2MoeForCausalLM(cfg)


@pytest.mark.parametrize(("kind", "eligible"), [("mixtral", 14), ("qwen2-moe", 22)])
def test_moe_experts_are_eligible_and_permutable(kind, eligible):
    torch.manual_seed(0)
    model = hf_models.randomized(_moe(kind).eval())
    ids = torch.randint(1, 96, (2, 8))
    pruned_ref = copy.deepcopy(model)
    plan = _check(model, ids)  # random permutations of every group keep the logits
    assert len(plan.layers) == eligible and plan.permutable_fraction == 1.0
    experts = [i for i in plan.layers if i.op == "grouped_mm"]
    assert len(experts) == 4 and all(i.axis == 2 and len(i.shape) == 3 for i in experts)
    gate_up = next(i for i in experts if i.name.endswith("0.mlp.experts.gate_up_proj"))
    g = _group_with(plan, gate_up.name, 2)  # experts share the residual stream's channel order
    assert any(m.name.endswith("0.self_attn.o_proj.weight") and m.axis == 0 for m in g.members)
    down = next(i for i in experts if i.name.endswith("0.mlp.experts.down_proj"))
    g = _group_with(plan, down.name, 2)  # and the intermediate order, across gate_up's two halves
    assert {m.name for m in g.members} >= {gate_up.name, down.name}
    # convert prunes every expert of every layer to 2:4 along its input axis
    gm = nmgraph.capture(pruned_ref, (ids,))
    nmgraph.convert(gm, "2:4", plan=nmgraph.analyze(gm, "2:4"))
    for info in experts:
        w = pruned_ref.get_parameter(info.name)
        assert nmgraph.is_nm(w, "2:4", axis=2) and (w == 0).float().mean() == 0.5
    with torch.no_grad():
        torch.testing.assert_close(first_tensor(gm(ids)), first_tensor(pruned_ref(ids)), rtol=1e-5, atol=1e-5)


class RoutedRows(nn.Module):
    """Rows gathered by an index tensor (token routing) and a one-channel gate broadcast over channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.gate, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 1), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)  # [T, 16]
        order = torch.argsort(h[:, 0])
        routed = self.b(h[order]) * torch.sigmoid(self.gate(h[order]))
        return self.head(torch.relu(routed))


def test_index_rows_and_single_channel_gate_pass_channels():
    torch.manual_seed(0)
    plan = _check(RoutedRows(), torch.randn(6, 16))
    g = _group_with(plan, "head.weight", 1)
    assert g is not None and any(m.name == "b.weight" and m.axis == 0 for m in g.members)
    assert _group_with(plan, "b.weight", 1) is None  # h[:, 0] selects a channel of a's output: a barrier


def test_moe_experts_train_with_masks_and_fold_exactly():
    torch.manual_seed(0)
    model = hf_models.randomized(_moe("mixtral").train())
    ids = torch.randint(1, 96, (2, 8))
    gm = nmgraph.prepare(model, (ids,), "2:4", method="sr-ste", permute=False)
    gm(ids).logits.float().pow(2).mean().backward()
    w = model.model.layers[0].mlp.experts.gate_up_proj
    assert w.grad is not None and w.grad.abs().sum() > 0
    gm.eval()
    with torch.no_grad():
        hard = gm(ids).logits
        ref = (w * nmgraph.nm_mask(w, "2:4", axis=2)).detach()  # the hard mask per expert row
    folded = nmgraph.convert(gm)
    assert torch.equal(w.detach(), ref) and nmgraph.is_nm(w, "2:4", axis=2)
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, hard, rtol=0, atol=0)


class SlicedPositions(nn.Module):
    """A position table sliced to the sequence length, added to the stream."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(8, 16))
        self.l1, self.l2, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.l1(x) + self.pos[: x.shape[1]] + self.pos[1]
        return self.head(h + self.l2(torch.relu(h)))


def test_rows_sliced_from_a_parameter_move_with_its_channels():
    torch.manual_seed(0)
    plan = _check(SlicedPositions(), torch.randn(2, 5, 16))
    g = _group_with(plan, "l2.weight", 1)
    assert g is not None and ("pos", 1) in {(m.name, m.axis) for m in g.members}


class CastWeights(nn.Module):
    """F.linear(x, W.float()) / W.to(x.dtype): a dtype-safety idiom (DeepSeek-V3's router)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(F.linear(x, self.l1.weight.float(), self.l1.bias))
        return self.head(torch.relu(F.linear(h, self.l2.weight.to(h.dtype))))


def test_weights_read_through_a_cast_are_eligible_and_permutable():
    torch.manual_seed(0)
    model = CastWeights()
    x = torch.randn(3, 16)
    plan = _check(model, x)
    assert [i.name for i in plan.layers] == ["l1.weight", "l2.weight"]
    assert _group_with(plan, "l2.weight", 1) is not None
    gm = nmgraph.convert(nmgraph.capture(model, (x,)), "2:4")
    assert nmgraph.is_nm(model.l2.weight, "2:4")
    result = lower_linears(gm, LowerLinearsConfig(weights={"l1.weight": 1, "l2.weight": 1}, backend="triton"))
    reasons = dict(result.skipped)
    assert "read through" in reasons["l2.weight"] and "runs densely" in reasons["l2.weight"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def _bigcode_mqa():
    t = hf_models.transformers
    cfg = t.GPTBigCodeConfig(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, multi_query=True,
                             use_cache=False)
    return t.GPTBigCodeForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["llama-mqa", "gpt-bigcode-mqa"])
def test_multi_query_attention_output_projection_follows_the_shared_head(kind):
    # one K/V head merged with the query heads: o_proj's columns hold one copy of the head per query head
    torch.manual_seed(0)
    if kind == "llama-mqa":
        model, (ids,) = hf_models.llama(kv_heads=1)
        o_proj = "model.layers.0.self_attn.o_proj.weight"
    else:
        model, ids = hf_models.randomized(_bigcode_mqa().eval()), torch.randint(0, 96, (2, 8))
        o_proj = "transformer.h.0.attn.c_proj.weight"
    plan = _check(model, ids)
    assert plan.permutable_fraction == 1.0
    g = _group_with(plan, o_proj, 1)
    assert any(m.name == o_proj and m.repeat == 4 for m in g.members)


def _xglm():
    t = hf_models.transformers
    return t.XGLMForCausalLM(t.XGLMConfig(vocab_size=96, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
                                          max_position_embeddings=64, pad_token_id=1, bos_token_id=0, use_cache=False,
                                          eos_token_id=2))


def _convbert():
    t = hf_models.transformers
    return t.ConvBertForSequenceClassification(t.ConvBertConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, embedding_size=64, head_ratio=2, conv_kernel_size=3, num_groups=1,
        num_labels=3))


@pytest.mark.parametrize("factory", [_xglm, _convbert], ids=["xglm", "convbert"])
def test_merges_of_heads_into_batch_keep_head_blocks(factory):
    # XGLM reshapes [b, heads, s, d] -> [b * heads, s, d] before bmm; ConvBERT reshapes its [b, s, 6]
    # kernel logits into [b * s * 2, 3, 1]: neither may let channels cross a head (both once did)
    torch.manual_seed(0)
    model = hf_models.randomized(factory().eval())
    _check(model, torch.randint(3, 96, (2, 8)), seeds=(0, 1, 2))


def test_experts_stored_in_out_with_per_expert_bias():
    # GPT-OSS keeps experts as [E, in, out] (read directly by the grouped GEMM) with a bias [E, out]
    # picked per token by expert id, and interleaves gate/up columns (strided slices)
    t = hf_models.transformers
    torch.manual_seed(0)
    cfg = t.GptOssConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                         num_experts_per_tok=2, sliding_window=4, use_cache=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    model = hf_models.randomized(t.GptOssForCausalLM(cfg).eval())
    plan = _check(model, torch.randint(3, 96, (2, 8)))
    experts = [i for i in plan.layers if i.op == "grouped_mm"]
    assert len(experts) == 4 and all(i.axis == 1 for i in experts)
    g = _group_with(plan, "model.layers.0.mlp.experts.gate_up_proj", 1)  # the residual stream
    names = {(m.name, m.axis) for m in g.members}
    assert ("model.layers.0.self_attn.o_proj.weight", 0) in names
    assert ("model.layers.0.mlp.experts.down_proj_bias", 1) in names


# ---------------------------------------------------------------- ops found on trained models (issue 16)


class ClipGlu(nn.Module):
    """Linear -> GLU (halves along the channel axis) -> clip -> Linear; clip_ in place on a conv path."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 32), nn.Linear(16, 8)
        self.c1, self.c2 = nn.Conv1d(4, 16, 3, padding=1), nn.Conv1d(8, 8, 1)

    def forward(self, x, s):
        h = F.glu(self.l1(x), dim=-1).clip(-1.0, 1.0)
        c = F.glu(self.c1(s), dim=1)
        c = c.clip_(min=-0.5)
        return self.l2(h).sum() + self.c2(c).sum()


def test_clip_passes_channels_and_glu_halves_share_one_permutation():
    torch.manual_seed(0)
    plan = _check(ClipGlu(), torch.randn(3, 8), torch.randn(2, 4, 6), include=["l2", "c2"])
    g = _group_with(plan, "l2.weight", 1)
    assert g is not None and g.size == 16
    halves = sorted((m.start, m.stop) for m in g.members if m.name == "l1.weight")
    assert halves == [(0, 16), (16, 32)]  # both halves of the GLU input move with one permutation
    g = _group_with(plan, "c2.weight", 1)
    assert g is not None and sorted(m.start for m in g.members if m.name == "c1.weight") == [0, 8]
    assert "clip" not in _barrier_reasons(plan)


class WeightNormed(nn.Module):
    """A stream read by plain Linears and by weight_norm'ed consumers (both weight_norm APIs)."""

    def __init__(self, dim=0):
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.wn = torch.nn.utils.parametrizations.weight_norm(nn.Linear(16, 8), dim=dim)
        self.conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 8, 3, padding=1))
        self.out = nn.Linear(16, 8)
        with torch.no_grad():  # a trained g, not the norm it starts from
            for m in (self.wn, self.conv):
                m.parametrizations.weight.original0.uniform_(0.5, 2.0)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        y = self.l2(h) + self.wn(h) + self.conv(h.unsqueeze(-1).expand(-1, -1, 4)).mean(-1)
        return self.out(torch.cat([y, y], dim=-1))


@pytest.mark.parametrize("dim", [0, -1])
def test_weight_normed_consumer_joins_the_stream_it_reads(dim):
    # g * v / ||v|| with the norm over the input axis: permuting v's columns leaves the norm as it is
    torch.manual_seed(0)
    plan = _check(WeightNormed(dim), torch.randn(3, 8))
    g = _group_with(plan, "l2.weight", 1)
    names = {(m.name, m.axis) for m in g.members}
    assert {("wn.parametrizations.weight.original1", 1), ("conv.parametrizations.weight.original1", 1),
            ("l1.weight", 0)} <= names
    reasons = {s.name: s.reason for s in plan.skipped}
    assert "remove the weight norm" in reasons["wn.parametrizations.weight.original1"]


class GroupedWeightNormConv(nn.Module):
    """wav2vec2's positional convolution: a grouped Conv1d weight_norm'ed over its kernel axis (dim=2)."""

    def __init__(self):
        super().__init__()
        self.l1, self.out = nn.Linear(8, 16), nn.Linear(16, 8)
        self.conv = torch.nn.utils.parametrizations.weight_norm(
            nn.Conv1d(16, 16, 3, padding=1, groups=4), name="weight", dim=2)
        with torch.no_grad():
            self.conv.parametrizations.weight.original0.uniform_(0.5, 2.0)

    def forward(self, x):  # [B, T, 8]
        h = self.l1(x)
        return self.out(h + self.conv(h.transpose(1, 2)).transpose(1, 2))


def test_grouped_conv_with_a_weight_normed_weight_keeps_its_columns():
    # column j of each group of a grouped conv reads a different input channel: v's columns may not
    # move on their own (they did, and wav2vec2 / HuBERT failed permute's verification)
    torch.manual_seed(0)
    plan = _check(GroupedWeightNormConv(), torch.randn(2, 5, 8), include=["out"])
    assert _group_with(plan, "conv.parametrizations.weight.original1", 1) is None
    assert "grouped convolution (groups=4) shares weight columns" in _barrier_reasons(plan)


class DataDependentSlice(nn.Module):
    """DeBERTa's relative positions: a table sliced with bounds read from a tensor (``.item()``), so
    the captured slice has a data-dependent size; a plain MLP beside it."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(16, 8))
        self.q, self.l1, self.l2 = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, n):
        rel = self.q(self.table[: n.item()])
        return self.l2(torch.relu(self.l1(x))) + rel.sum(0)


def test_a_data_dependent_shape_is_a_barrier_not_a_crash():
    torch.manual_seed(0)
    plan = _check(DataDependentSlice(), torch.randn(3, 8), torch.tensor(5), include=["l2"])
    assert "shape depends on tensor values" in _barrier_reasons(plan)
    assert _group_with(plan, "q.weight") is None  # read on a data-dependent tensor: stays put
    g = _group_with(plan, "l2.weight", 1)  # the rest of the model is analyzed as before
    assert g is not None and any(m.name == "l1.weight" and m.axis == 0 for m in g.members)


class Recurrent(nn.Module):
    """An LSTMCell unrolled over the steps (Silero VAD's decoder), a GRUCell, and fused LSTM/GRU."""

    def __init__(self, fused="lstm", bidirectional=False, layers=1):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.cell, self.gcell = nn.LSTMCell(16, 16), nn.GRUCell(16, 16)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[fused]
        self.rnn = rnn(16, 16, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.o1, self.o2 = nn.Linear(16, 8), nn.Linear(16, 8)
        self.o3 = nn.Linear(16 * (2 if bidirectional else 1), 8)

    def forward(self, x):
        x = self.inp(x)  # [B, T, 16]
        h = c = torch.zeros(x.shape[0], 16)
        g = x.new_zeros(x.shape[0], 16)  # new_zeros: a fill, any channel order
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            g = self.gcell(h, g)
        seq, _ = self.rnn(x)
        return self.o1(h) + self.o2(g) + self.o3(seq[:, -1])


@pytest.mark.parametrize(("fused", "bidirectional", "layers"), [("lstm", False, 1), ("gru", True, 2), ("rnn", False, 2)])
def test_recurrent_cells_are_gemms_and_their_hidden_units_permute(fused, bidirectional, layers):
    torch.manual_seed(0)
    plan = _check(Recurrent(fused, bidirectional, layers), torch.randn(2, 5, 8), include=["o1", "o2", "o3"])
    eligible = {i.name: i for i in plan.layers}
    for name in ("cell.weight_ih", "cell.weight_hh", "gcell.weight_ih", "gcell.weight_hh"):
        assert eligible[name].axis == 1 and eligible[name].group is not None
    # the LSTMCell's hidden units: 4 gate chunks of w_ih/w_hh rows, w_hh columns, the next consumers
    g = _group_with(plan, "cell.weight_hh", 1)
    assert sorted(m.start for m in g.members if m.name == "cell.weight_ih" and m.axis == 0) == [0, 16, 32, 48]
    assert {"gcell.weight_ih", "o1.weight"} <= set(g.consumers)
    # fused ops run one dense recurrent kernel: left dense, and the reason says what would help
    reasons = {s.name: s.reason for s in plan.skipped}
    assert f"aten.{fused if fused != 'rnn' else 'rnn_tanh'}.input" in reasons["rnn.weight_ih_l0"]
    assert f"weight_hh_l{layers - 1}" in " ".join(reasons)
    # their input channels still move with the stream that feeds them (not a barrier)
    g = _group_with(plan, "rnn.weight_ih_l0", 1)
    assert g is not None and ("inp.weight", 0) in {(m.name, m.axis) for m in g.members}


def test_unrolled_cell_prunes_and_exports_each_weight_once(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Recurrent("lstm").eval()
    x = torch.randn(2, 3, 8)
    gm = nmgraph.capture(model, (x,))
    nmgraph.permute(gm, nmgraph.analyze(gm, "2:4"))
    nmgraph.convert(gm, "2:4")
    assert nmgraph.is_nm(model.cell.weight_ih, "2:4") and nmgraph.is_nm(model.cell.weight_hh, "2:4")
    report = nmgraph.export(model, tmp_path / "m.onnx", (x,), pattern="2:4")
    names = [layer.name for layer in report.check.layers]
    assert len(names) == len(set(names))  # the 3 steps read each weight 3 times: counted once
    by_name = {layer.name: layer for layer in report.check.layers}
    assert by_name["cell.weight_ih"].reads == 3 and by_name["cell.weight_ih"].status.value == "eligible"
    assert "read by 3 nodes" in str(report.check)

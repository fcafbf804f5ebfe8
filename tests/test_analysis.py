"""Coupling analysis: every op-table entry, the known failure shapes of channel permutation, and
real architectures. Every case permutes all groups randomly and checks outputs are unchanged."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmgraph
from nmgraph.analysis import OP_RULES

from . import hf_models
from .hf_models import first_tensor

log = logging.getLogger(__name__)


def _check(model, *args, seeds=(0, 1), **analyze_kwargs):
    """Captures, analyzes, permutes every group randomly; outputs must equal the untouched copy."""
    model = model.eval()
    reference = copy.deepcopy(model)
    gm = nmgraph.capture(model, args)
    plan = nmgraph.analyze(gm, "2:4", **analyze_kwargs)
    with torch.no_grad():
        ref = first_tensor(reference(*args))
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    for seed in seeds:
        report = nmgraph.permute(gm, plan, search="random", seed=seed)
        assert sorted(report.permuted) == sorted(g.id for g in plan.groups)
    with torch.no_grad():
        out = first_tensor(gm(*args))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if plan.groups:  # the permutation really moved weights
        assert any(not torch.equal(before[n], p) for n, p in gm.named_parameters())
    return plan


def _group_with(plan, name, axis=None):
    for g in plan.groups:
        if any(m.name == name and (axis is None or m.axis == axis) for m in g.members):
            return g
    return None


def _barrier_reasons(plan):
    return " | ".join(b.reason for b in plan.barriers)


# ---------------------------------------------------------------- op-table entries (small modules)


class MLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(8, 16), nn.Linear(16, 8), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize(
    "act",
    [nn.ReLU(), nn.GELU(), nn.SiLU(), nn.Tanh(), nn.Sigmoid(), nn.Dropout(0.0), nn.Hardtanh(), nn.LeakyReLU(),
     nn.ELU(), nn.Softplus(), nn.Hardswish(), nn.Softmax(dim=-1)],
    ids=lambda a: type(a).__name__,
)
def test_pointwise_pass_through(act):
    plan = _check(MLP(act), torch.randn(3, 8))
    g = _group_with(plan, "fc2.weight", 1)
    assert g is not None and g.size == 16
    assert {(m.name, m.axis) for m in g.members} == {("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}


class ScaledMLP(nn.Module):
    """Per-channel parameter multiply and in-place add: both must move with the channels."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.randn(16))
        self.register_buffer("shift", torch.randn(16))

    def forward(self, x):
        h = self.fc1(x) * self.scale
        h = h.clone()
        h += self.shift  # channel-dependent in-place add
        return self.fc2(h.relu())


def test_broadcast_params_and_inplace_add_move_with_channels():
    plan = _check(ScaledMLP(), torch.randn(3, 8))
    g = _group_with(plan, "fc2.weight", 1)
    assert {m.name for m in g.members} == {"fc1.weight", "fc1.bias", "fc2.weight", "scale", "shift"}


class Norms(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), norm, nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


@pytest.mark.parametrize("norm", [nn.LayerNorm(16), nn.RMSNorm(16)], ids=["layer_norm", "rms_norm"])
def test_norm_parameters_join(norm):
    plan = _check(Norms(norm), torch.randn(3, 8))
    g = _group_with(plan, "fc2.weight", 1)
    assert ("norm.weight", 0) in {(m.name, m.axis) for m in g.members}


class DecomposedRMSNorm(nn.Module):
    """Llama's RMSNorm as pow/mean/rsqrt/mul: mean over channels is permutation invariant."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.weight = nn.Linear(8, 16), nn.Linear(16, 8), nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        h = self.fc1(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.fc2(self.weight * h)


def test_decomposed_rms_norm():
    plan = _check(DecomposedRMSNorm(), torch.randn(3, 8))
    assert ("weight", 0) in {(m.name, m.axis) for m in _group_with(plan, "fc2.weight", 1).members}


class ConvNet(nn.Module):
    def __init__(self, norm="bn", act=None, pool=True):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = {"bn": nn.BatchNorm2d(8), "gn1": nn.GroupNorm(1, 8), "gn8": nn.GroupNorm(8, 8),
                     "gn2": nn.GroupNorm(2, 8), "sync": nn.SyncBatchNorm(8)}[norm]
        self.act = act or nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.c2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        h = self.pool(self.act(self.norm(self.c1(x))))
        h = F.relu(self.c2(h))
        return self.fc(torch.flatten(h, 1))


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("norm", ["bn", "sync", "gn1", "gn8"])
def test_conv_norm_chain_and_flatten(norm):
    plan = _check(_randomize_bn(ConvNet(norm)), torch.randn(2, 4, 8, 8))
    g = _group_with(plan, "c2.weight", 1)
    names = {m.name for m in g.members}
    assert {"c1.weight", "c1.bias", "norm.weight", "norm.bias", "c2.weight"} <= names
    if norm in ("bn", "sync"):  # running statistics move too (SyncBatchNorm included)
        assert {"norm.running_mean", "norm.running_var"} <= names
    flat = _group_with(plan, "fc.weight", 1)  # conv channels flattened into the Linear: 16 columns each
    assert flat is not None and flat.size == 8 and flat.kind == "flatten"
    assert next(m for m in flat.members if m.name == "fc.weight").inner == 16


def test_group_norm_blocks_permutations_to_groups():
    plan = _check(ConvNet("gn2"), torch.randn(2, 4, 8, 8))
    assert _group_with(plan, "c2.weight", 1).block == 4


def test_prelu_per_channel_weights_move():
    plan = _check(ConvNet("bn", act=nn.PReLU(8)), torch.randn(2, 4, 8, 8))
    assert ("act.weight", 0) in {(m.name, m.axis) for m in _group_with(plan, "c2.weight", 1).members}


class DepthwiseGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c3(self.grouped(self.c2(self.dw(self.c1(x)).relu())).relu())


def test_depthwise_passes_channels_grouped_conv_blocks():
    plan = _check(DepthwiseGrouped(), torch.randn(2, 4, 6, 6))
    g = _group_with(plan, "c2.weight", 1)
    assert {"c1.weight", "dw.weight", "dw.bias", "c2.weight"} <= {m.name for m in g.members}
    assert _group_with(plan, "grouped.weight", 1) is None  # grouped conv input channels stay in place
    assert "grouped convolution (groups=2)" in _barrier_reasons(plan)
    assert _group_with(plan, "c3.weight", 1).block == 4  # grouped conv outputs permute within groups
    assert any(s.name == "dw.weight" and "depthwise" in s.reason for s in plan.skipped)


class ConcatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fused = nn.Linear(8, 8), nn.Linear(8, 12), nn.Linear(8, 24)
        self.after_cat, self.p, self.q = nn.Linear(20, 8), nn.Linear(8, 4), nn.Linear(16, 4)

    def forward(self, x):
        h = self.after_cat(torch.cat([self.a(x).relu(), self.b(x).relu()], dim=-1))
        p, q = self.fused(x).split([8, 16], dim=-1)
        return h + self.p(p.relu()).sum(-1, keepdim=True) + self.q(q.relu()).sum(-1, keepdim=True)


def test_concat_and_split_segments():
    plan = _check(ConcatSplit(), torch.randn(3, 8))
    ga = _group_with(plan, "a.weight", 0)
    gb = _group_with(plan, "b.weight", 0)
    assert ga.size == 8 and gb.size == 12 and ga.id != gb.id
    cat_cols = {m.name: (m.start, m.stop) for m in ga.members + gb.members if m.name == "after_cat.weight"}
    assert sorted(m.start for m in ga.members + gb.members if m.name == "after_cat.weight") == [0, 8]
    assert cat_cols
    gp, gq = _group_with(plan, "p.weight", 1), _group_with(plan, "q.weight", 1)
    fused_p = next(m for m in gp.members if m.name == "fused.weight")
    fused_q = next(m for m in gq.members if m.name == "fused.weight")
    assert (fused_p.start, fused_p.stop, fused_q.start, fused_q.stop) == (0, 8, 8, 24)


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def test_gate_up_down_coupled():
    plan = _check(SwiGLU(), torch.randn(3, 8))
    g = _group_with(plan, "down.weight", 1)
    assert {(m.name, m.axis) for m in g.members} == {("gate.weight", 0), ("up.weight", 0), ("down.weight", 1)}


class HandWrittenMHA(nn.Module):
    """Attention written by hand (view/transpose/matmul/softmax), a failure shape of name-based tools."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h, self.d = h, d
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        split = lambda t: t.view(b, s, self.h, self.d // self.h).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-2, -1) / (self.d // self.h) ** 0.5).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, s, self.d))


class SDPAttention(HandWrittenMHA):
    def forward(self, x):
        b, s, _ = x.shape
        split = lambda t: t.view(b, s, self.h, self.d // self.h).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(out.transpose(1, 2).reshape(b, s, self.d))


@pytest.mark.parametrize("cls", [HandWrittenMHA, SDPAttention])
def test_attention_heads(cls):
    plan = _check(cls(), torch.randn(2, 5, 32))
    vo = _group_with(plan, "o.weight", 1)
    assert {(m.name, m.axis) for m in vo.members} == {("v.weight", 0), ("v.bias", 0), ("o.weight", 1)}
    assert vo.block == 8 and vo.kind == "heads"
    qk = _group_with(plan, "q.weight", 0)
    assert {m.name for m in qk.members} == {"q.weight", "q.bias", "k.weight", "k.bias"} and qk.block == 8


class ChannelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = self.c1(x)
        b, c, hh, ww = h.shape
        h = h.view(b, 2, c // 2, hh, ww).transpose(1, 2).reshape(b, c, hh, ww)
        return self.c2(h)


def test_channel_shuffle_is_a_barrier():
    plan = _check(ChannelShuffle(), torch.randn(2, 4, 3, 3))
    assert _group_with(plan, "c1.weight", 0) is None and _group_with(plan, "c2.weight", 1) is None
    assert "channel shuffle" in _barrier_reasons(plan)


class NameCollision(nn.Module):
    """``blk1.0`` and ``blk10``: identical once punctuation is stripped."""

    def __init__(self):
        super().__init__()
        self.blk1 = nn.Sequential(nn.Linear(8, 16))
        self.blk10 = nn.Linear(16, 8)
        self.blk100 = nn.Linear(8, 8)

    def forward(self, x):
        return self.blk100(self.blk10(self.blk1(x).relu()).relu())


def test_name_collisions_are_distinct():
    plan = _check(NameCollision(), torch.randn(3, 8))
    g = _group_with(plan, "blk10.weight", 1)
    assert {(m.name, m.axis) for m in g.members} == {("blk1.0.weight", 0), ("blk1.0.bias", 0), ("blk10.weight", 1)}


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.cumsum(self.fc1(x), dim=-1))


def test_op_outside_table_is_barrier_naming_op():
    plan = _check(Unknown(), torch.randn(3, 8))
    assert _group_with(plan, "fc2.weight", 1) is None
    assert "aten.cumsum.default is not in nmgraph's op table" in _barrier_reasons(plan)
    assert plan.layer("fc2.weight").group is None if any(i.name == "fc2.weight" for i in plan.layers) else True


class Misc(nn.Module):
    """Transpose, unsqueeze/expand, mean over channels, pad, embedding feeding a Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + h.mean(-1, keepdim=True)  # channel-invariant statistic broadcast back
        h = self.fc1(h).transpose(0, 1).transpose(0, 1)
        h = F.pad(h, (0, 0, 1, 1))  # pads the sequence axis only
        return self.fc2(h.relu())


def test_misc_ops_and_embedding_source():
    plan = _check(Misc(), torch.randint(0, 10, (2, 5)))
    g = _group_with(plan, "fc1.weight", 1)
    assert ("emb.weight", 1) in {(m.name, m.axis) for m in g.members}
    assert _group_with(plan, "fc2.weight", 1) is not None


def test_table_is_keyed_by_op_overloads():
    assert all(isinstance(k, torch._ops.OpOverload) or callable(k) for k in OP_RULES)
    assert torch.ops.aten.linear.default in OP_RULES


def test_analyze_is_pure_and_reports_skips():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    gm = nmgraph.capture(model, (torch.randn(2, 8),))
    code = gm.code
    plan = nmgraph.analyze(gm, "2:4", exclude=["0"])
    assert gm.code == code
    reasons = dict(plan.skipped)
    assert reasons["0.weight"] == "excluded by pattern '0'"
    assert "not divisible by M=4" in reasons["2.weight"]
    assert reasons["4.weight"].startswith("output head kept dense")
    plan2 = nmgraph.analyze(gm, "2:4", include=["4"])
    assert [i.name for i in plan2.layers] == ["0.weight", "4.weight"]
    assert '"pattern": "2:4"' in plan.to_json() and "left dense" in str(plan)


class _BufferWeights(nn.Module):
    """A frozen projection registered as a buffer, and one kept as a plain tensor attribute."""

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(16, 8))
        self.const = torch.randn(16, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = F.linear(x, self.proj)
        return self.head(torch.relu(self.fc(F.linear(h, self.const))))


def test_a_buffer_or_constant_used_as_a_gemm_weight_is_reported():
    gm = nmgraph.capture(_BufferWeights(), (torch.randn(2, 8),))
    plan = nmgraph.analyze(gm, "2:4")
    assert [i.name for i in plan.layers] == ["fc.weight"]
    reasons = dict(plan.skipped)
    assert reasons["proj"].startswith("a buffer used as the weight of linear at the model's top level: nmgraph "
                                      "prunes parameters only; register it with nn.Parameter(..., requires_grad=False)")
    const = [name for name in reasons if name not in ("proj", "head.weight")]
    assert len(const) == 1 and reasons[const[0]].startswith("a constant tensor (neither parameter nor buffer)")


# ---------------------------------------------------------------- real architectures


def _count(plan, kind=None, size=None):
    return sum((kind is None or g.kind == kind) and (size is None or g.size == size) for g in plan.groups)


@pytest.mark.parametrize(
    "name,kwargs,expect",
    [
        # residual stream: one group; per layer: FFN (128), V/O heads (64, block 16), Q/K heads
        ("bert", {}, {"residual": 64, "ffn": (128, 2), "heads": 4, "eligible": 13}),
        ("gpt2", {}, {"residual": 64, "ffn": (256, 2), "heads": 4, "eligible": 8}),
        ("llama", {"kv_heads": 4}, {"residual": 64, "ffn": (128, 2), "heads": 2, "eligible": 14}),
        ("llama", {"kv_heads": 2}, {"residual": 64, "ffn": (128, 2), "heads": 2, "eligible": 14}),
        ("vit", {}, {"residual": 64, "ffn": (128, 2), "heads": 4, "eligible": 12}),
    ],
    ids=["bert", "gpt2", "llama", "llama-gqa", "vit"],
)
def test_transformers(name, kwargs, expect):
    model, args = hf_models.FACTORIES[name](**kwargs)
    plan = _check(model, *args)
    assert len(plan.layers) == expect["eligible"]
    residual = [g for g in plan.groups if g.size == expect["residual"] and g.kind == "channels"
                and len(g.consumers) >= 4]
    assert len(residual) == 1, "the residual stream is one group spanning all layers"
    assert len(residual[0].consumers) >= 2 * 2
    assert _count(plan, "channels", expect["ffn"][0]) == expect["ffn"][1]
    assert _count(plan, "heads") == expect["heads"]
    log.info("%s: %.0f%% of eligible weights have permutable input channels", name, 100 * plan.permutable_fraction)
    print(f"{name}{kwargs}: permutable fraction {plan.permutable_fraction:.2f}")
    assert plan.permutable_fraction == 1.0
    if name == "llama" and kwargs["kv_heads"] == 2:  # o_proj columns follow their shared K/V head
        vo = [g for g in plan.groups if g.kind == "heads"]
        assert all(g.size == 32 and g.block == 16 for g in vo)
        o = [m for g in vo for m in g.members if m.name.endswith("o_proj.weight")]
        assert len(o) == 2 and all(m.repeat == 2 and m.repeat_block == 16 and m.stop == 64 for m in o)


@pytest.mark.parametrize("name,groups,fraction", [("resnet", 6, 1.0), ("convnext", 4, 1.0), ("mobilenet_v2", 25, 1.0)])
def test_cnns(name, groups, fraction):
    model, args = hf_models.FACTORIES[name]()
    _randomize_bn(model)
    plan = _check(model, *args)
    assert len(plan.groups) == groups
    assert plan.permutable_fraction == fraction
    print(f"{name}: permutable fraction {plan.permutable_fraction:.2f}")


class GroupedQueryAttention(nn.Module):
    """GQA without RoPE, K/V heads repeated by expand + reshape: Q heads follow their K head."""

    def __init__(self, d=32, h=4, kv=2):
        super().__init__()
        self.h, self.kv, self.hd = h, kv, d // h
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.k, self.v = nn.Linear(d, kv * self.hd), nn.Linear(d, kv * self.hd)

    def _repeat(self, t):
        b, kv, s, hd = t.shape
        return t[:, :, None].expand(b, kv, self.h // kv, s, hd).reshape(b, self.h, s, hd)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.hd).transpose(1, 2)
        k = self._repeat(self.k(x).view(b, s, self.kv, self.hd).transpose(1, 2))
        v = self._repeat(self.v(x).view(b, s, self.kv, self.hd).transpose(1, 2))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


def test_grouped_query_attention_repeats_heads():
    plan = _check(GroupedQueryAttention(), torch.randn(2, 5, 32), seeds=(0, 1, 2), include=["o"])
    vo = _group_with(plan, "v.weight", 0)
    assert vo.size == 16 and vo.block == 8 and vo.consumers == ("o.weight",)
    o = next(m for m in vo.members if m.name == "o.weight")
    assert (o.repeat, o.repeat_block, o.stop) == (2, 8, 32)
    qk = _group_with(plan, "k.weight", 0)
    q = next(m for m in qk.members if m.name == "q.weight")
    assert qk.size == 16 and (q.repeat, q.axis) == (2, 0)


class PerHeadBias(nn.Module):
    """A learned per-head attention bias passed to SDPA as attn_mask (T5-style): heads stay put."""

    def __init__(self):
        super().__init__()
        self.attn = SDPAttention()
        self.bias = nn.Embedding(9, 4)

    def forward(self, x):
        b, s, d = x.shape
        a = self.attn
        split = lambda t: t.view(b, s, a.h, a.d // a.h).transpose(1, 2)  # noqa: E731
        pos = torch.arange(s)
        mask = self.bias((pos[:, None] - pos[None, :]).clamp(-4, 4) + 4).permute(2, 0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(split(a.q(x)), split(a.k(x)), split(a.v(x)), attn_mask=mask)
        return a.o(out.transpose(1, 2).reshape(b, s, d))


def test_per_head_attention_bias_is_a_barrier():
    plan = _check(PerHeadBias(), torch.randn(2, 5, 32))
    assert _group_with(plan, "bias.weight", 1) is None
    assert "attention mask/bias channels are tied to fixed heads" in _barrier_reasons(plan)
    assert _group_with(plan, "attn.o.weight", 1) is not None  # V/O within heads is still fine


class OnePlusWeightNorm(nn.Module):
    """Gemma's RMSNorm scales by (1 + weight): the parameter reaches the channels through an add."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.weight = nn.Linear(8, 16), nn.Linear(16, 8), nn.Parameter(torch.randn(16))

    def forward(self, x):
        h = self.fc1(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.fc2(h * (1.0 + self.weight))


def test_one_plus_weight_norm():
    plan = _check(OnePlusWeightNorm(), torch.randn(3, 8))
    assert ("weight", 0) in {(m.name, m.axis) for m in _group_with(plan, "fc2.weight", 1).members}


def _lm_kwargs():
    return dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=64)


def _more_architectures():
    t = hf_models.transformers
    ids = hf_models._ids()
    special = dict(use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return {
        "mistral": (lambda: t.MistralForCausalLM(t.MistralConfig(**_lm_kwargs(), num_key_value_heads=2, **special)), ids, 1.0),
        "qwen2": (lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**_lm_kwargs(), num_key_value_heads=2, **special)), ids, 1.0),
        "gemma": (lambda: t.GemmaForCausalLM(t.GemmaConfig(**_lm_kwargs(), num_key_value_heads=2, head_dim=16,
                                                           **special)), ids, 1.0),
        "phi3": (lambda: t.Phi3ForCausalLM(t.Phi3Config(**_lm_kwargs(), num_key_value_heads=2, **special)), ids, 1.0),
        "gpt-neox": (lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**_lm_kwargs(), use_cache=False, bos_token_id=0,
                                                                  eos_token_id=0)), ids, 1.0),
        "distilbert": (lambda: t.DistilBertForSequenceClassification(t.DistilBertConfig(
            vocab_size=96, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64, pad_token_id=0)),
            ids, 1.0),
        "opt": (lambda: t.OPTForCausalLM(t.OPTConfig(
            vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
            max_position_embeddings=64, word_embed_proj_dim=64, use_cache=False, pad_token_id=1, bos_token_id=0,
            eos_token_id=0)), ids, 1.0),
        "t5-encoder": (lambda: t.T5EncoderModel(t.T5Config(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                           num_heads=4)), ids, 0.33),
    }


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma", "phi3", "gpt-neox", "distilbert", "opt", "t5-encoder"])
def test_more_architectures(name):
    factory, ids, fraction = _more_architectures()[name]
    torch.manual_seed(0)
    plan = _check(hf_models.randomized(factory().eval()), ids)
    assert plan.permutable_fraction == pytest.approx(fraction, abs=0.01)
    print(f"{name}: permutable fraction {plan.permutable_fraction:.2f}")


class SlicedFusedQKV(nn.Module):
    """A fused projection read by slicing (Phi-3's qkv_proj), with a 4-channel gap nobody reads."""

    def __init__(self):
        super().__init__()
        self.fused, self.p, self.q = nn.Linear(8, 28), nn.Linear(8, 4), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fused(x)
        a, b = h[..., :8], h[..., 12:]
        return self.p(a.relu()) + self.q(b.relu()) + self.p(h[..., :8].sigmoid())


def test_slices_of_channels_are_segments():
    plan = _check(SlicedFusedQKV(), torch.randn(3, 8), include=["p", "q"])
    gp, gq = _group_with(plan, "p.weight", 1), _group_with(plan, "q.weight", 1)
    fused_p = next(m for m in gp.members if m.name == "fused.weight")
    fused_q = next(m for m in gq.members if m.name == "fused.weight")
    assert (fused_p.start, fused_p.stop, fused_q.start, fused_q.stop) == (0, 8, 12, 28)
    assert gp.consumers == ("p.weight",) and gq.consumers == ("q.weight",)


class InterleavedQKV(nn.Module):
    """One projection holding Q, K and V interleaved per head ([.., heads, 3 * head_dim]), GPT-NeoX style."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h, self.hd = h, d // h
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        qkv = self.qkv(x).view(b, s, self.h, 3 * self.hd).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, s, d))


def test_interleaved_per_head_qkv():
    plan = _check(InterleavedQKV(), torch.randn(2, 5, 32), seeds=(0, 1, 2), include=["o"])
    vo = _group_with(plan, "o.weight", 1)
    assert vo.size == 32 and vo.block == 8 and vo.consumers == ("o.weight",)
    fused = next(m for m in vo.members if m.name == "qkv.weight")
    assert (fused.start, fused.stop, fused.stride) == (16, 24, 24)  # V: 8 channels of every 24 per head
    qk = _group_with(plan, "qkv.weight", 0)
    assert {(m.start, m.stride) for m in qk.members if m.name == "qkv.weight"} == {(0, 24), (8, 24)}


@torch.library.custom_op("nmgraph_test::scale", mutates_args=())
def _scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


@_scale.register_fake
def _(x):
    return torch.empty_like(x)


class _CustomOpMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.ops.nmgraph_test.scale(self.fc1(x))).sum(-1)


def test_a_rule_for_a_custom_op_needs_no_edit_of_nmgraph():
    from nmgraph.analysis.rules import pass_through

    gm = nmgraph.capture(_CustomOpMLP(), (torch.randn(2, 8),))
    plan = nmgraph.analyze(gm, "2:4", include=["fc2"])
    assert plan.layer("fc2.weight").group is None
    assert any("nmgraph_test.scale.default is not in nmgraph's op table" in b.reason for b in plan.barriers)
    plan = nmgraph.analyze(gm, "2:4", include=["fc2"], rules={torch.ops.nmgraph_test.scale.default: pass_through})
    g = plan.group(plan.layer("fc2.weight").group)
    assert sorted(m.name for m in g.members) == ["fc1.bias", "fc1.weight", "fc2.weight"]
    report = nmgraph.permute(gm, plan, search="random", seed=1)  # verification reruns the model: unchanged
    assert g.id in report.permuted and report.max_error < 1e-5
    # the qualified name works too (ops of libraries nmgraph must not import)
    plan2 = nmgraph.analyze(gm, "2:4", include=["fc2"], rules={"nmgraph_test.scale.default": pass_through})
    assert plan2.layer("fc2.weight").group is not None
    with pytest.raises(nmgraph.UnsupportedError, match="keys are ops"):
        nmgraph.analyze(gm, "2:4", include=["fc2"], rules={42: pass_through})


class _LoopedDense(nn.Module):
    """One weight read by several nodes of one op, as a GEMM and as an activation (no second name)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        for _ in range(3):
            x = x @ self.w.T
        return x * self.w.sum()


def test_a_weight_read_by_several_nodes_is_not_called_tied():
    gm = nmgraph.capture(_LoopedDense(), (torch.randn(2, 8),))
    (skip,) = nmgraph.analyze(gm, "2:4").skipped
    assert "tied" not in skip.reason and "read by 4 nodes, 3 of them as a GEMM weight" in skip.reason


def test_a_tied_weight_names_its_other_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    gm = nmgraph.capture(Tied(), (torch.randint(0, 16, (2, 4)),))
    (skip,) = nmgraph.analyze(gm, "2:4").skipped
    assert "tied weight, also head.weight" in skip.reason

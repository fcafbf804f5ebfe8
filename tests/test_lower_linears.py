"""lower_linears: linear/addmm -> the chosen backend's op, equivalence, node counts, metadata, skips, export.

Graphs are captured static (``dynamic=False``), as ``nmgraph.compile`` captures one graph per input
signature; the dynamic-rows path has its own test (``dynamic_shapes=``)."""

import os

import pytest
import torch
from torch import nn

from nmgraph import capture, compress, nm_mask
from nmgraph.backends import BackendRegistry
from nmgraph.backends.dense import DenseBackend
from nmgraph.backends.dispatch import CPU_REASON, Dispatcher
from nmgraph.backends.kernels.repack import repack
from nmgraph.backends.triton_nm import TritonBackend
from nmgraph.errors import (
    BackendUnavailableError,
    PatternError,
    ShapeError,
    StrictModeError,
    UnsupportedError,
)
from nmgraph.passes.lower_linears import LinearLowering, LowerLinearsConfig, lower_linears
from nmgraph.passes.runner import run_passes

from . import hf_models

aten = torch.ops.aten
DENSE_OP = torch.ops.nmgraph.nm_linear_dense.default
TRITON_OP = torch.ops.nmgraph.nm_linear_triton.default
NM_LINEAR = (DENSE_OP, TRITON_OP)  # the N:M linear ops lowered graphs call
CUDA = torch.cuda.is_available()
KERNEL = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(not KERNEL, reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 40)
        self.head = nn.Linear(40, 24, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _prune(model, pattern="2:4"):
    """Prunes every Linear (axis 1) and GPT-2 Conv1D (axis 0) weight whose K divides by M."""
    m = int(pattern.split(":")[1])
    weights = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mod.in_features % m == 0:
                mod.weight.mul_(nm_mask(mod.weight, pattern))
                weights[f"{name}.weight"] = 1
            elif type(mod).__name__ == "Conv1D" and mod.weight.shape[0] % m == 0:
                mod.weight.mul_(nm_mask(mod.weight, pattern, axis=0))
                weights[f"{name}.weight"] = 0
    return weights


def _count(gm, target):
    targets = target if isinstance(target, tuple) else (target,)
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def _mlp(dtype=torch.float32):
    """The pruned MLP and an input of 6 rows (fp16: the Triton tensor-core kernel serves 6 rows; in
    fp32 only its GEMV exists, for <= 2 rows)."""
    model = MLP().eval()
    weights = _prune(model)
    x = torch.randn(2, 3, 64)
    return model.to(dtype), weights, x.to(dtype)


def _run(gm, *args):
    with torch.no_grad():
        return gm(*args)


# ------------------------------------------------------------------ small MLP


@pytest.mark.parametrize("backend", ["dense", pytest.param("triton", marks=needs_kernel)])
def test_mlp_equivalence_counts_and_buffers(backend):
    dtype = torch.float16 if backend == "triton" else torch.float32
    model, weights, x = _mlp(dtype)
    ref = _run(model, x)
    gm = capture(model, (x,), dynamic=False)
    before = {n.name: dict(n.meta) for n in gm.graph.nodes if n.target is aten.linear.default}
    assert len(before) == 3
    result = lower_linears(gm, LowerLinearsConfig(weights=weights, backend=backend))
    gm.graph.lint()
    assert _count(gm, aten.linear.default) == 0 and _count(gm, NM_LINEAR) == 3
    assert len(result.changed_nodes) == 3 and result.modified and result.skipped == []
    assert result.info["backends"] == dict.fromkeys(result.changed_nodes, backend)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(_run(gm, x), ref, rtol=tol, atol=tol)
    # compressed tensors are buffers of the owning module; the dense weights left the graph module
    for name in weights:
        owner, leaf = name.rsplit(".", 1)
        c = compress(model.get_parameter(name), "2:4")
        if backend == "dense":
            assert torch.equal(gm.get_buffer(f"{owner}.{leaf}_nm_values"), c.values)
            assert torch.equal(gm.get_buffer(f"{owner}.{leaf}_nm_indices"), c.indices)
        else:  # the Triton kernels' repacked layout, made once at lowering time
            p = repack(c)
            assert torch.equal(gm.get_buffer(f"{owner}.{leaf}_nm_values"), p.values)
            assert torch.equal(gm.get_buffer(f"{owner}.{leaf}_nm_words"), p.words)
            assert not gm.get_buffer(f"{owner}.{leaf}_nm_semaphores").any()
    assert sorted(result.info["dropped"]) == sorted(weights)
    assert not any(n.endswith(".weight") for n, _ in gm.named_parameters())
    assert all(n.endswith(".weight") for n in weights) and len(list(model.parameters())) == 5


def test_node_metadata_is_carried_over():
    model, weights, x = _mlp()
    gm = capture(model, (x,), dynamic=False)
    old = {n.args[1].target: dict(n.meta) for n in gm.graph.nodes if n.target is aten.linear.default}
    lower_linears(gm, LowerLinearsConfig(weights=weights, backend="dense"))
    new = [n for n in gm.graph.nodes if n.target in NM_LINEAR]
    assert len(new) == 3
    for node in new:
        tag = node.meta["nmgraph"]
        assert isinstance(tag, LinearLowering) and tag.backend == "dense" and tag.pattern == "2:4"
        src = old[tag.weight]
        assert node.meta["val"].shape == src["val"].shape and node.meta["val"].dtype == src["val"].dtype
        assert node.meta["nn_module_stack"] == src["nn_module_stack"]
        assert node.meta["stack_trace"] == src["stack_trace"]
        values_node, indices_node = node.args[1], node.args[2]
        assert values_node.op == "get_attr" and values_node.meta["val"].shape == gm.get_buffer(values_node.target).shape
        assert indices_node.meta["tensor_meta"].dtype == torch.uint8


def test_lowered_graph_exports_and_compiles():
    model, weights, x = _mlp()
    ref = _run(model, x)
    gm = capture(model, (x,), dynamic=False)
    lower_linears(gm, LowerLinearsConfig(weights=weights, backend="dense"))
    ep = torch.export.export(gm, (x,))
    assert sum(1 for n in ep.graph.nodes if n.target in NM_LINEAR) == 3
    torch.testing.assert_close(_run(ep.module(), x), ref, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(_run(compiled, x), ref, rtol=1e-5, atol=1e-5)
    # biases still require grad: backward through the op gives the dense model's x and bias grads
    x_ref, x_low = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    model(x_ref).square().sum().backward()
    ref_bias_grad = model.fc1.bias.grad.clone()
    model.zero_grad()
    gm(x_low).square().sum().backward()
    torch.testing.assert_close(x_low.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gm.get_parameter("fc1.bias").grad, ref_bias_grad, rtol=1e-5, atol=1e-5)


def test_op_checks_its_arguments():
    c = compress(torch.tensor([[0.0, 2.0, 0.0, 3.0]] * 8), "2:4")
    x = torch.randn(3, 4)
    y = torch.ops.nmgraph.nm_linear_dense(x, c.values, c.indices, None, 2, 4, 8, 4)
    torch.testing.assert_close(y, x @ c.to_dense().t())
    p = repack(c)
    calls = ((torch.ops.nmgraph.nm_linear_dense, (c.values, c.indices, None)),
             (torch.ops.nmgraph.nm_linear_triton, (p.values, p.words, None, None, None)))
    for op, tensors in calls:
        with pytest.raises(ShapeError, match=r"x must be \[\.\.\., 4\]"):
            op(torch.randn(3, 8), *tensors, 2, 4, 8, 4)
        with torch._subclasses.FakeTensorMode() as mode:  # the fake impl gives the output's shape
            fx_ = mode.from_tensor(torch.randn(2, 5, 4))
            out = op(fx_, *(None if t is None else mode.from_tensor(t) for t in tensors), 2, 4, 8, 4)
            assert out.shape == (2, 5, 8)


@needs_kernel
def test_lowered_triton_graph_exports_and_traces_whole():
    model, weights, x = _mlp(torch.float16)
    ref = _run(model, x)
    gm = capture(model, (x,), dynamic=False)
    lower_linears(gm, LowerLinearsConfig(weights=weights, backend="triton"))
    ep = torch.export.export(gm, (x,))
    ops = [n.target for n in ep.graph.nodes if n.target in NM_LINEAR]
    assert ops == [TRITON_OP] * 3
    torch.testing.assert_close(_run(ep.module(), x), ref, rtol=2e-3, atol=2e-3)
    # one graph, no break, around the op (what inductor and its CUDA graphs compile)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(_run(compiled, x), ref, rtol=2e-3, atol=2e-3)


def test_runs_in_the_pass_runner_with_lint():
    model, weights, x = _mlp()
    gm = capture(model, (x,), dynamic=False)
    cfg = LowerLinearsConfig(weights=weights, backend="dense")
    (result,) = run_passes(gm, [lower_linears], cfg, lint=True)
    assert len(result.changed_nodes) == 3
    torch.testing.assert_close(_run(gm, x), _run(model, x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ auto


def test_auto_on_cpu_keeps_dense_and_says_why():
    model, weights, x = _mlp()
    gm = capture(model, (x,), dynamic=False)
    result = lower_linears(gm, LowerLinearsConfig(weights=weights, backend="auto"))
    assert not result.modified and _count(gm, aten.linear.default) == 3 and _count(gm, NM_LINEAR) == 0
    assert len(result.skipped) == 3 and all(CPU_REASON in s.reason for s in result.skipped)
    decisions = result.info["decisions"].decisions
    assert [d.backend for d in decisions] == ["dense"] * 3
    assert [d.key.m_bucket for d in decisions] == [8, 8, 8]  # x is [2, 3, 64]: 6 rows -> bucket 8
    torch.testing.assert_close(_run(gm, x), _run(model, x))


@needs_kernel
def test_auto_lowers_where_measured_faster():
    model, weights, x = _mlp(torch.float16)
    gm = capture(model, (x,), dynamic=False)

    def timer(label, fn):
        fn()
        return {"dense": 2e-3, "triton": 1e-3}[label]

    registry = BackendRegistry([DenseBackend(), TritonBackend()])
    disp = Dispatcher(registry=registry, timer=timer, measure_on_cpu=True)
    result = lower_linears(gm, LowerLinearsConfig(weights=weights, backend="auto", dispatcher=disp))
    assert _count(gm, NM_LINEAR) == 3 and set(result.info["backends"].values()) == {"triton"}
    assert all(d.speedup == pytest.approx(2.0) for d in result.info["decisions"].decisions)
    torch.testing.assert_close(_run(gm, x), _run(model, x), rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------ skips and errors


class Odd(nn.Module):
    """One linear of each kind that cannot lower."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(64, 32)  # not pruned: not N:M
        self.ragged = nn.Linear(6, 8)  # K=6 not divisible by 4
        self.scaled = nn.Parameter(torch.randn(16, 64))  # weight computed in the graph
        self.emb = nn.Embedding(10, 64)  # a listed weight read by embedding
        self.ok = nn.Linear(64, 16)

    def forward(self, x, y, ids):
        a = self.dense(x)
        b = self.ragged(y)
        c = torch.nn.functional.linear(x, self.scaled * 2.0)
        d = self.emb(ids)
        return a.sum() + b.sum() + c.sum() + d.sum() + self.ok(x).sum()


def test_every_skip_has_a_reason():
    model = Odd().eval()
    with torch.no_grad():
        model.ok.weight.mul_(nm_mask(model.ok.weight, "2:4"))
    args = (torch.randn(2, 64), torch.randn(2, 6), torch.tensor([1, 2]))
    gm = capture(model, args, dynamic=False)
    weights = {"dense.weight": 1, "ragged.weight": 1, "emb.weight": 1, "ok.weight": 1, "missing.weight": 1}
    result = lower_linears(gm, LowerLinearsConfig(weights=weights, backend="dense"))
    reasons = {s.name: s.reason for s in result.skipped}
    assert set(reasons) == {"dense.weight", "ragged.weight", "emb.weight", "missing.weight"}
    assert "not 2:4" in reasons["dense.weight"] and "nmgraph.convert" in reasons["dense.weight"]
    assert "in_features=6 is not divisible by M=4" in reasons["ragged.weight"]
    assert "aten.embedding" in reasons["emb.weight"] and "only aten.linear, aten.addmm and pointwise convolutions" in reasons["emb.weight"]
    assert "not read by any aten.linear" in reasons["missing.weight"]
    assert _count(gm, NM_LINEAR) == 1 and _count(gm, aten.linear.default) == 3
    torch.testing.assert_close(_run(gm, *args), _run(model, *args), rtol=1e-5, atol=1e-4)

    # without a list, every linear is considered: the computed weight is reported as such
    gm2 = capture(model, args, dynamic=False)
    result2 = lower_linears(gm2, LowerLinearsConfig(backend="dense"))
    computed = [s for s in result2.skipped if "not a parameter or buffer" in s.reason]
    assert len(computed) == 1 and "computed by" in computed[0].reason and "aten.mul" in computed[0].reason
    assert _count(gm2, NM_LINEAR) == 1


def test_strict_turns_skips_into_an_error():
    model, weights, x = _mlp()
    with torch.no_grad():
        model.fc2.weight.add_(1.0)  # no longer 2:4
    gm = capture(model, (x,), dynamic=False)
    with pytest.raises(StrictModeError, match=r"fc2\.weight: not 2:4"):
        lower_linears(gm, LowerLinearsConfig(weights=weights, backend="dense", strict=True))


def test_wrong_axis_in_the_list_is_skipped():
    model, _, x = _mlp()
    gm = capture(model, (x,), dynamic=False)
    result = lower_linears(gm, LowerLinearsConfig(weights={"fc1.weight": 0}, backend="dense"))
    assert [s.name for s in result.skipped] == ["fc1.weight"]
    assert "axis 0" in result.skipped[0].reason and _count(gm, NM_LINEAR) == 0


def test_forced_backend_unavailable_raises(monkeypatch):
    model, weights, x = _mlp()
    gm = capture(model, (x,), dynamic=False)
    with pytest.raises(BackendUnavailableError, match=r"cannot lower fc1\.weight.*CUDA devices only"):
        lower_linears(gm, LowerLinearsConfig(weights=weights, backend="cusparselt"))
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
            lower_linears(gm, LowerLinearsConfig(weights=weights, backend="triton"))
    assert _count(gm, aten.linear.default) == 3  # nothing half-done


def test_config_validation():
    with pytest.raises(UnsupportedError, match="backend='fast' is not one of"):
        LowerLinearsConfig(backend="fast")
    with pytest.raises(PatternError, match=r"LowerLinearsConfig\.pattern"):
        LowerLinearsConfig(pattern="4:2")
    with pytest.raises(UnsupportedError, match=r"weights\['fc1.weight'\] = 3"):
        LowerLinearsConfig(weights={"fc1.weight": 3})
    with pytest.raises(UnsupportedError, match="takes a LowerLinearsConfig or a dict"):
        lower_linears(capture(MLP(), (torch.randn(1, 64),), dynamic=False), 42)
    model, weights, x = _mlp()
    gm = capture(model, (x,), dynamic=False)
    result = lower_linears(gm, {"weights": weights, "backend": "dense"})  # a plain dict works too
    assert len(result.changed_nodes) == 3


# ------------------------------------------------------------------ HF models


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_hf_models_match_the_pruned_reference_and_export(family):
    model, args = hf_models.FACTORIES[family]()
    weights = _prune(model)
    ref = hf_models.first_tensor(_run(model, *args))
    gm = capture(model, args, dynamic=False)
    n_linear = _count(gm, aten.linear.default) + _count(gm, aten.addmm.default)
    result = lower_linears(gm, LowerLinearsConfig(weights=weights, backend="dense"))
    lowered = _count(gm, NM_LINEAR)
    # every pruned weight is lowered, except GPT-2's lm_head tied to the token embedding, which
    # is lowered for the head and reported for the embedding
    assert lowered == len(weights) == len(result.changed_nodes)
    assert _count(gm, aten.linear.default) + _count(gm, aten.addmm.default) == n_linear - lowered
    if family == "gpt2":
        assert [s.name for s in result.skipped] == ["lm_head.weight"]
        assert "aten.embedding" in result.skipped[0].reason
        assert sum(1 for w in weights.values() if w == 0) == 8  # Conv1D [in, out] weights (addmm)
    else:
        assert result.skipped == []
    out = hf_models.first_tensor(_run(gm, *args))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    ep = torch.export.export(gm, args)
    assert sum(1 for n in ep.graph.nodes if n.target in NM_LINEAR) == lowered
    torch.testing.assert_close(hf_models.first_tensor(_run(ep.module(), *args)), ref, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_llama_with_the_triton_kernel():
    model, args = hf_models.llama(layers=1)
    args = (args[0][:, :1],)  # one decode token for each of 2 sequences: 2 rows, the GEMV (fp32)
    weights = _prune(model)
    ref = hf_models.first_tensor(_run(model, *args))
    gm = capture(model, args, dynamic=False)
    result = lower_linears(gm, LowerLinearsConfig(weights=weights, backend="triton"))
    assert _count(gm, NM_LINEAR) == len(weights) == 8
    assert set(result.info["backends"].values()) == {"triton"}
    torch.testing.assert_close(hf_models.first_tensor(_run(gm, *args)), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ pointwise convolutions


class CNN(nn.Module):
    """3x3 convs around pointwise ones (the 1x1 convs of a ResNet bottleneck / MobileNet block)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 64, 1)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project = nn.Conv2d(64, 32, 1, bias=False)
        self.grouped = nn.Conv2d(32, 32, 1, groups=2)
        self.strided = nn.Conv2d(32, 32, 1, stride=2)
        self.padded = nn.Conv2d(32, 16, 1, padding=1)
        self.seq = nn.Conv1d(16, 24, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.expand(h))
        h = torch.relu(self.depthwise(h))
        h = self.grouped(self.project(h))
        h = self.padded(torch.relu(self.strided(h)))
        return self.seq(h.flatten(2))


def _cnn(dtype=torch.float32, size=6):
    torch.manual_seed(0)
    model = CNN().eval()
    weights = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.weight.shape[1] % 4 == 0:
                mod.weight.mul_(nm_mask(mod.weight, "2:4"))
                weights[f"{name}.weight"] = 1
    return model.to(dtype), weights, torch.randn(1, 3, size, size).to(dtype)


def test_pointwise_convolutions_lower_as_gemms_over_channels():
    model, weights, x = _cnn()
    ref = _run(model, x)
    gm = capture(model, (x,), dynamic=False)
    n_conv = _count(gm, aten.conv2d.default) + _count(gm, aten.conv1d.default)
    result = lower_linears(gm, LowerLinearsConfig(weights=weights, backend="dense"))
    gm.graph.lint()
    lowered = {gm.graph.find_nodes(op="call_function", target=DENSE_OP)[i].meta["nmgraph"].weight
               for i in range(len(result.changed_nodes))}
    assert lowered == {"expand.weight", "project.weight", "seq.weight"}  # the pointwise ones
    assert all(n.meta["nmgraph"].conv for n in gm.graph.find_nodes(op="call_function", target=DENSE_OP))
    assert _count(gm, aten.conv2d.default) + _count(gm, aten.conv1d.default) == n_conv - 3
    assert _count(gm, aten.permute.default) == 6  # channel-last in, channels back out, per lowered conv
    reasons = {s.name: s.reason for s in result.skipped}
    # not listed: stem (3 input channels) and depthwise (1 per group) hold no group of 4
    assert set(reasons) == {"grouped.weight", "strided.weight", "padded.weight"}
    assert "groups=2" in reasons["grouped.weight"] and "only pointwise ones" in reasons["grouped.weight"]
    assert "stride [2, 2]" in reasons["strided.weight"] and "padding [1, 1]" in reasons["padded.weight"]
    torch.testing.assert_close(_run(gm, x), ref, rtol=1e-5, atol=1e-5)
    assert sorted(result.info["dropped"]) == ["expand.weight", "project.weight", "seq.weight"]
    # the lowered graph exports with the rewrite in it
    ep = torch.export.export(gm, (x,))
    torch.testing.assert_close(_run(ep.module(), x), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_pointwise_convolutions_on_the_triton_kernels():
    # 1 x 4 x 4 positions = 16 rows (fp16 tensor-core kernel); 1 x 2 x 1 = 2 rows for the Conv1d (GEMV)
    model, weights, x = _cnn(torch.float16, size=4)
    ref = _run(model, x)
    gm = capture(model, (x,), dynamic=False)
    result = lower_linears(gm, LowerLinearsConfig(weights=weights, backend="triton"))
    lowered = sorted(n.meta["nmgraph"].weight for n in gm.graph.find_nodes(op="call_function", target=TRITON_OP))
    assert lowered == ["expand.weight", "project.weight", "seq.weight"] and len(result.changed_nodes) == 3
    torch.testing.assert_close(_run(gm, x), ref, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------ rows outside the measured bucket


@needs_kernel
def test_dynamic_rows_carry_the_dense_weight_and_every_m_is_right():
    # A graph captured with a dynamic batch is called with M the kernels serve (GEMV, tensor-core)
    # and with prefill sizes they do not: there the op runs the layer's dense weight.
    model, weights, _ = _mlp(torch.float16)
    x = torch.randn(4, 64, dtype=torch.float16)
    batch = torch.export.Dim("batch", min=1, max=512)
    gm = capture(model, (x,), dynamic_shapes=({0: batch},))
    result = lower_linears(gm, LowerLinearsConfig(weights=weights, backend="triton"))
    nodes = gm.graph.find_nodes(op="call_function", target=TRITON_OP)
    assert len(nodes) == 3 and all(n.meta["nmgraph"].dense_fallback for n in nodes)
    assert all(n.args[4] is not None for n in nodes)  # the dense slot holds the layer's weight
    assert result.info["dropped"] == []  # still read by the ops
    assert "dynamic input shape" in nodes[0].meta["nmgraph"].reason
    for rows in (1, 5, 80):
        xr = torch.randn(rows, 64, dtype=torch.float16)
        torch.testing.assert_close(_run(gm, xr), _run(model, xr), rtol=2e-3, atol=2e-3)


@needs_kernel
def test_static_graph_op_called_with_other_rows_is_still_right():
    # Lowered for 2 rows (fp32: the GEMV), without the dense weight; its op called with 3 and 70 rows
    # decompresses the packed weight for that call: correct, not fast (nmgraph.compile captures a new
    # graph for a new input shape instead).
    model, weights, _ = _mlp()
    gm = capture(model, (torch.randn(2, 64),), dynamic=False)
    lower_linears(gm, LowerLinearsConfig(weights=weights, backend="triton"))
    node = gm.graph.find_nodes(op="call_function", target=TRITON_OP)[0]
    assert node.meta["nmgraph"].weight == "fc1.weight" and not node.meta["nmgraph"].dense_fallback
    assert node.args[4] is None
    tensors = [None if a is None else gm.get_buffer(a.target) for a in node.args[1:5]]
    for rows in (3, 70):
        x = torch.randn(rows, 64)
        with torch.no_grad():
            y = TRITON_OP(x, *tensors, model.fc1.bias, *node.args[6:])
            torch.testing.assert_close(y, model.fc1(x), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_forced_triton_leaves_prefill_sizes_dense():
    model, weights, _ = _mlp(torch.float16)
    x = torch.randn(70, 64, dtype=torch.float16)
    gm = capture(model, (x,), dynamic=False)
    result = lower_linears(gm, LowerLinearsConfig(weights=weights, backend="triton"))
    assert result.changed_nodes == [] and len(result.skipped) == 3
    assert all("prefill size" in s.reason for s in result.skipped)
    assert _count(gm, aten.linear.default) == 3

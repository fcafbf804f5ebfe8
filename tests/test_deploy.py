import copy
import os

import pytest
import torch

import nmgraph
from nmgraph import UnsupportedError
from nmgraph.passes.lower_linears import lower_linears

from . import hf_models
from .hf_models import first_tensor


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_compile_matches_pruned_reference(name):
    model, args = hf_models.FACTORIES[name]()
    dense = copy.deepcopy(model)
    fast = nmgraph.compile(model, pattern="2:4", backend="auto", time_limit=1.0)
    out = first_tensor(fast(*args))
    plan = fast.report.plan
    assert plan is not None and plan.layers
    for info in plan.layers:  # the model's own weights are now exactly 2:4
        assert nmgraph.is_nm(model.get_parameter(info.name), "2:4", axis=info.axis)
    # reference: the pruned (and permuted) model run eagerly
    torch.testing.assert_close(out, first_tensor(model(*args)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, first_tensor(dense(*args)))  # pruning really happened
    lowering = next(iter(fast.report.lowerings.values()))
    assert len(lowering.skipped) == sum(i.op == "linear" for i in plan.layers)  # CPU: dense, each with reason
    assert all("CPU" in s.reason for s in lowering.skipped)
    # nothing lowered on a CPU: calls run the model's own forward, and the lowered graph (kept in the
    # report, what export reads) computes the same function
    assert list(fast.report.runs.values()) == ["model"]
    assert "runs the model's own forward" in str(fast.report)
    torch.testing.assert_close(first_tensor(lowering.gm(*args)), out, rtol=1e-5, atol=1e-5)
    out2 = first_tensor(fast(*args))  # cached, same result
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_compile_runs_the_lowered_graph_when_a_layer_is_lowered():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    x = torch.randn(2, 32)  # fp32 2:4 at 2 rows: the GEMV serves it
    fast = nmgraph.compile(model, "2:4", backend="triton", include=["2"], time_limit=1.0)
    out = fast(x)
    lowering = next(iter(fast.report.lowerings.values()))
    assert len(lowering.changed_nodes) == 2 and list(fast.report.runs.values()) == ["graph"]
    ops = [str(n.target) for n in lowering.gm.graph.nodes if n.op == "call_function"]
    assert sum("nm_linear" in t for t in ops) == 2
    with torch.no_grad():
        ref = model(x)  # the pruned model, eagerly
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_compile_tensorrt_without_gpu_says_what_to_install():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(nmgraph.BackendUnavailableError, match="needs an NVIDIA GPU"):
        nmgraph.compile(model, backend="tensorrt")(torch.randn(2, 8))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing permuted or pruned


def test_compile_errors():
    with pytest.raises(UnsupportedError, match="backend='warp'"):
        nmgraph.compile(torch.nn.Linear(4, 4), backend="warp")
    with pytest.raises(UnsupportedError, match="mode='fast'"):
        nmgraph.compile(torch.nn.Linear(4, 4), mode="fast")
    # a misspelled option is an error that lists the valid names, not silently ignored
    with pytest.raises(UnsupportedError, match=r"unknown option 'serach'; valid options: permute, search, seed"):
        nmgraph.compile(torch.nn.Linear(4, 4), serach="none")
    with pytest.raises(UnsupportedError, match=r"search='fastest'\) is not one of none, random, greedy"):
        nmgraph.compile(torch.nn.Linear(4, 4), search="fastest")


class _Typo(torch.nn.Module):  # its own forward: Dynamo remembers a frame whose backend failed
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x)


def test_torch_compile_backend_rejects_unknown_options():
    model = _Typo()
    before = model.fc.weight.detach().clone()
    opt = torch.compile(model, backend="nmgraph", options={"patern": "1:4"})
    try:
        with pytest.raises(Exception, match=r"unknown option 'patern'; valid options: pattern, backend, inductor, permute"):
            opt(torch.randn(2, 8))
    finally:
        torch._dynamo.reset()
    assert torch.equal(model.fc.weight, before)  # refused before any weight changed


def test_torch_compile_backend_by_name():
    model, args = hf_models.bert()
    dense = copy.deepcopy(model)
    opt = torch.compile(model, backend="nmgraph", options={"pattern": "2:4", "inductor": False, "time_limit": 1.0})
    out = first_tensor(opt(*args))
    names = [n for n, _ in model.named_parameters() if n.endswith("output.dense.weight")]
    assert names and all(nmgraph.is_nm(model.get_parameter(n), "2:4") for n in names)
    torch.testing.assert_close(out, first_tensor(model(*args)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, first_tensor(dense(*args)))


def test_torch_compile_backend_hands_rest_to_inductor():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    opt = torch.compile(model, backend="nmgraph", options={"pattern": "2:4", "time_limit": 1.0})
    out = opt(x)
    assert nmgraph.is_nm(model[0].weight, "2:4") and nmgraph.is_nm(model[2].weight, "2:4")
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_compile_with_inductor_matches_pruned_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).eval()
    x = torch.randn(4, 8)
    fast = nmgraph.compile(model, "2:4", inductor=True, time_limit=1.0, include=["2"])
    out = fast(x)
    assert nmgraph.is_nm(model[2].weight, "2:4")
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedError, match="positional inputs only"):
        nmgraph.compile(torch.nn.Linear(8, 4), inductor=True)(input=x)


def test_compile_train_mode_returns_prepared_graph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(4, 8)
    fast = nmgraph.compile(model, "2:4", mode="train", method="ste", permute=False)
    out = fast(x)
    gm = next(iter(fast._graphs.values()))
    masks = [n for n in gm.graph.nodes if n.op == "call_function" and "masked_weight" in str(n.target)]
    assert len(masks) == 2  # the two eligible weights; the output head stays dense
    out.square().sum().backward()
    assert model[0].weight.grad is not None  # trains the model's own parameters
    with torch.no_grad():  # STE forward: the 2:4-masked weights
        h = torch.relu(x @ (model[0].weight * nmgraph.nm_mask(model[0].weight, "2:4")).T + model[0].bias)
        h = torch.relu(h @ (model[2].weight * nmgraph.nm_mask(model[2].weight, "2:4")).T + model[2].bias)
        torch.testing.assert_close(out.detach(), model[4](h), rtol=1e-5, atol=1e-5)


def test_compile_reports_pruned_layers_without_a_sparse_kernel():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(2, 4, 8, 8)
    fast = nmgraph.compile(model, "2:4", time_limit=1.0)
    out = fast(x)
    assert nmgraph.is_nm(model[2].weight, "2:4")
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    reasons = dict(next(iter(fast.report.lowerings.values())).skipped)
    assert "no sparse kernel for this convolution (it has a 3x3 kernel" in reasons["0.weight"]
    assert "CPU" in reasons["2.weight"]  # pointwise: it lowers where a sparse kernel is faster; dense on a CPU
    with pytest.raises(nmgraph.StrictModeError, match=r"0\.weight: conv .*no sparse kernel"):
        nmgraph.compile(copy.deepcopy(model), "2:4", permute=False, strict=True)(x)


KERNEL = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(not KERNEL, reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")


@needs_kernel
def test_compile_speeds_up_a_cnn_through_its_pointwise_convolutions():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 1),
                                torch.nn.ReLU(), torch.nn.Conv2d(64, 16, 1), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 9, 4)).eval().half()
    x = torch.randn(1, 8, 3, 3, dtype=torch.float16)  # 9 positions: 9 rows for the pointwise convs
    fast = nmgraph.compile(model, "2:4", backend="triton", time_limit=1.0)
    out = fast(x)
    lowering = next(iter(fast.report.lowerings.values()))
    lowered = {n.meta["nmgraph"].weight for n in lowering.gm.graph.nodes if n.op == "call_function"
               and n.target is torch.ops.nmgraph.nm_linear_triton.default}
    assert lowered == {"2.weight", "4.weight"} and list(fast.report.runs.values()) == ["graph"]
    assert "0.weight" in dict(lowering.skipped)  # the 3x3 conv runs densely, with its reason
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=2e-3, atol=2e-3)


def test_inductor_mode_reaches_inductor(monkeypatch):
    # inductor_mode="reduce-overhead" is torch.compile's CUDA-graph mode: its config reaches compile_fx
    import torch._inductor.compile_fx as cfx

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(config_patches)
        return gm

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).eval()
    x = torch.randn(4, 8)
    fast = nmgraph.compile(model, "2:4", inductor=True, inductor_mode="reduce-overhead", time_limit=1.0)
    torch.testing.assert_close(fast(x), model(x))
    assert seen == [{"triton.cudagraphs": True}]
    opt = torch.compile(copy.deepcopy(model), backend="nmgraph", mode="reduce-overhead")
    try:
        opt(x)
    finally:
        torch._dynamo.reset()
    assert seen[-1] == {"triton.cudagraphs": True}
    with pytest.raises(UnsupportedError, match=r"inductor_mode='fastest'\) is not one of .*reduce-overhead"):
        nmgraph.compile(model, inductor_mode="fastest")


@needs_kernel
def test_torch_compile_with_dynamic_rows_keeps_every_m_right(monkeypatch):
    # Dynamo recompiles with a dynamic batch on the second shape: the lowered ops then carry their
    # layer's dense weight, so 2, 3 and 80 rows all run right (GEMV, tensor-core, dense).
    from nmgraph import deploy

    lowerings = []

    def spy(gm, config):
        result = lower_linears(gm, config)
        nodes = [n for n in gm.graph.nodes if n.name in result.changed_nodes]
        lowerings.append((config.dynamic_rows, [n.meta["nmgraph"].dense_fallback for n in nodes]))
        return result

    monkeypatch.setattr(deploy, "lower_linears", spy)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 8)).eval().half()
    opt = torch.compile(model, backend="nmgraph", options={"backend": "triton", "inductor": False,
                                                           "time_limit": 1.0}, fullgraph=True)
    try:
        for rows in (2, 3, 80):
            x = torch.randn(rows, 64, dtype=torch.float16)
            with torch.no_grad():
                torch.testing.assert_close(opt(x), model(x), rtol=2e-3, atol=2e-3)
    finally:
        torch._dynamo.reset()
    # a graph with dynamic rows (Dynamo's recompile, or the first one when Dynamo already knows the
    # batch varies) carries the dense weight in every op; a static one does not need it
    assert lowerings and lowerings[-1] == (True, [True, True])
    assert all(fallbacks == [dynamic] * 2 for dynamic, fallbacks in lowerings)


def test_a_torch_compile_backend_object_keeps_the_report():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    backend = nmgraph.TorchCompileBackend("2:4", inductor=False, time_limit=1.0)
    assert backend.reports == []  # lazy, like torch.compile
    opt = torch.compile(model, backend=backend)
    try:
        out = opt(x)
        assert len(backend.reports) == 1  # one Dynamo graph
        opt(x)
        assert len(backend.reports) == 1  # no recompilation for the same shape
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    report = backend.reports[0]
    assert isinstance(report, nmgraph.CompileReport)
    # named as in the model, not as Dynamo's graph inputs; the output layer stays dense, with its reason
    assert [i.name for i in report.plan.layers] == ["0.weight", "2.weight"]
    assert [s.name for s in report.plan.skipped] == ["4.weight"]
    assert all(nmgraph.is_nm(model.get_parameter(n), "2:4") for n in ("0.weight", "2.weight"))
    (lowering,) = report.lowerings.values()
    assert len(lowering.skipped) == 2 and all("CPU" in s.reason for s in lowering.skipped)  # dense on a CPU
    assert list(report.runs.values()) == ["graph"]
    assert "2 left dense" in str(backend) and "1 graphs compiled" in str(backend)
    assert str(report).startswith("model: 2 weights are 2:4 (") and report.model.dense_weights == 1


def test_a_torch_compile_backend_object_checks_its_options_when_made():
    with pytest.raises(UnsupportedError, match=r"nmgraph.TorchCompileBackend: unknown option 'patern'"):
        nmgraph.TorchCompileBackend(patern="1:4")
    with pytest.raises(UnsupportedError, match=r"backend='fast'\) is not one of auto"):
        nmgraph.TorchCompileBackend("2:4", backend="fast")
    with pytest.raises(nmgraph.PatternError):
        nmgraph.TorchCompileBackend("4:2")

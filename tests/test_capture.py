import pytest
import torch

import nmgraph
from nmgraph import CaptureError

from . import hf_models
from .hf_models import first_tensor


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit", "resnet"])
def test_capture_hf_models_equal_and_share_parameters(name):
    model, args = hf_models.FACTORIES[name]()
    gm = nmgraph.capture(model, args)
    assert isinstance(gm, torch.fx.GraphModule)
    assert nmgraph.graph_record(gm).captured_by == "export"
    with torch.no_grad():
        torch.testing.assert_close(first_tensor(gm(*args)), first_tensor(model(*args)), rtol=0, atol=0)
    own = dict(model.named_parameters())
    captured = dict(gm.named_parameters())
    assert set(captured) <= set(own) and captured
    assert all(p is own[n] for n, p in captured.items())


def test_gpt2_linears_are_addmm():
    model, args = hf_models.gpt2()
    gm = nmgraph.capture(model, args)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.addmm.default in targets


def test_optimizer_on_model_trains_graph():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(4, 8)
    gm = nmgraph.capture(model, (x,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = gm(x).detach().clone()
    gm(x).square().sum().backward()
    assert model[0].weight.grad is not None
    opt.step()
    after = gm(x).detach()
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, model(x).detach(), rtol=0, atol=0)


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum().item() > 0:  # data-dependent Python branch: neither tracer handles it
            return x * 2
        return x


def test_untraceable_model_raises_with_both_messages_and_fix():
    with pytest.raises(CaptureError) as info:
        nmgraph.capture(_DataDependent(), (torch.randn(3),), method="auto")
    msg = str(info.value)
    assert "torch.export (non-strict)" in msg and "torch.fx.symbolic_trace" in msg
    assert "use_cache=False" in msg and "dynamic_shapes" in msg


def test_gpt2_with_cache_error_suggests_use_cache():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    model = transformers.GPT2Model(cfg).eval()
    with pytest.raises(CaptureError, match="use_cache=False"):
        nmgraph.capture(model, (torch.randint(0, 32, (1, 4)),))


def test_symbolic_trace_fallback():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    gm = nmgraph.capture(model, (torch.randn(2, 4),), method="symbolic_trace")
    assert nmgraph.graph_record(gm).captured_by == "symbolic_trace"
    assert gm.get_parameter("0.weight") is model[0].weight


def test_not_a_module():
    with pytest.raises(CaptureError, match=r"needs a torch\.nn\.Module"):
        nmgraph.capture(lambda x: x, (torch.randn(2),))

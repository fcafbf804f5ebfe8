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


def test_gpt2_with_its_default_cache_config_captures():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, 32, (1, 4))
    gm = nmgraph.capture(model, (ids,))
    assert model.config.use_cache is True
    with torch.no_grad():
        torch.testing.assert_close(gm(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=0)


def test_symbolic_trace_fallback():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    gm = nmgraph.capture(model, (torch.randn(2, 4),), method="symbolic_trace")
    assert nmgraph.graph_record(gm).captured_by == "symbolic_trace"
    assert gm.get_parameter("0.weight") is model[0].weight


def test_not_a_module():
    with pytest.raises(CaptureError, match=r"needs a torch\.nn\.Module"):
        nmgraph.capture(lambda x: x, (torch.randn(2),))


# ---- stock HF causal LMs, keyword inputs, dynamic shapes (issue 14 item 1, issue 13 items 1 and 7) --------


@pytest.mark.parametrize("factory", ["llama", "qwen2"])
def test_causal_lm_with_default_config_captures_without_cache(factory):
    model, (ids,) = (hf_models.llama(use_cache=True, layers=1) if factory == "llama" else hf_models.qwen2())
    assert model.config.use_cache is True
    mask = torch.ones_like(ids)
    gm = nmgraph.capture(model, {"input_ids": ids, "attention_mask": mask})  # keyword inputs as called
    assert model.config.use_cache is True  # the user's config is untouched
    rec = nmgraph.graph_record(gm)
    assert rec.captured_by == "export" and any("use_cache=False" in n for n in rec.notes)
    out = gm(input_ids=ids, attention_mask=mask)
    assert getattr(out, "past_key_values", None) is None
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    # another batch size and sequence length run on the same graph (dynamic by default)
    ids2 = torch.randint(0, hf_models.VOCAB, (3, 5))
    with torch.no_grad():
        got = gm(input_ids=ids2, attention_mask=torch.ones_like(ids2)).logits
        torch.testing.assert_close(got, model(input_ids=ids2).logits, rtol=1e-5, atol=1e-5)
    assert {a.name: dict(a.dynamic) for a in rec.inputs} == {
        "input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    plan = nmgraph.analyze(gm, "2:4")
    assert len(plan.layers) == 7 and plan.permutable_fraction == 1.0


def test_use_cache_passed_by_the_caller_is_respected():
    model, (ids,) = hf_models.llama(use_cache=True, layers=1)
    gm = nmgraph.capture(model, (ids,), kwargs={"use_cache": False})
    assert not any("use_cache" in n for n in nmgraph.graph_record(gm).notes)
    assert model.config.use_cache is True


def test_example_batch_of_one_still_gives_a_dynamic_batch():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    gm = nmgraph.capture(model, (torch.randn(1, 8),))
    x = torch.randn(5, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert nmgraph.graph_record(gm).example_args[0].shape == (1, 8)  # the caller's inputs are recorded


class _BranchOnBatch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if x.shape[0] == 4 else y  # specializes the batch size


def test_a_batch_the_model_specializes_stays_static_with_a_warning_and_a_typed_error():
    model = _BranchOnBatch()
    with pytest.warns(nmgraph.CaptureWarning, match=r"kept x axis 0 \(batch\) static; torch.export specialized"):
        gm = nmgraph.capture(model, (torch.randn(4, 8),))
    x = torch.randn(4, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    with pytest.raises(nmgraph.ShapeError, match=r"captured with x of shape \[4, 8\] and its batch axis static"):
        gm(torch.randn(3, 8))


def test_static_capture_on_request():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    gm = nmgraph.capture(model, (torch.randn(2, 8),), dynamic=False)
    assert all(not a.dynamic for a in nmgraph.graph_record(gm).inputs)
    with pytest.raises(nmgraph.ShapeError, match=r"prepare\(\.\.\., inplace=True\)"):
        gm(torch.randn(3, 8))


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 4))


class _KeywordOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, *, x):
        return self.head(torch.relu(self.fc(x)))


@pytest.mark.parametrize("case", ["wrong width", "dict with another name", "positional to keyword-only"])
def test_a_failed_export_is_loud_and_analyze_refuses_the_traced_graph(case):
    """Issue 13 item 1: a failed torch.export used to become 'nothing pruned, nothing reported'."""
    model, example = {
        "wrong width": (_mlp(), (torch.randn(4, 15),)),
        "dict with another name": (_mlp(), {"y": torch.randn(4, 16)}),
        "positional to keyword-only": (_KeywordOnly(), (torch.randn(2, 16),)),
    }[case]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(nmgraph.CaptureWarning, match="torch.export failed"):
        gm = nmgraph.capture(model, example)
    assert nmgraph.graph_record(gm).captured_by == "symbolic_trace"
    with pytest.raises(nmgraph.UnsupportedError, match=r"cannot read \d weights .*call_module.*torch.export failed"):
        nmgraph.analyze(gm)
    with pytest.warns(nmgraph.CaptureWarning), pytest.raises(nmgraph.UnsupportedError, match="weight"):
        nmgraph.convert(model, example_inputs=example)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_keyword_inputs_as_a_dict_work_for_a_keyword_only_forward():
    model = _KeywordOnly()
    x = torch.randn(2, 16)
    gm = nmgraph.capture(model, {"x": x})
    torch.testing.assert_close(gm(x=x), model(x=x), rtol=0, atol=0)
    assert [i.name for i in nmgraph.analyze(gm).layers] == ["fc.weight"]


def test_uninitialized_lazy_module_is_a_capture_error():
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with pytest.raises(CaptureError, match=r"uninitialized lazy parameters \(0.weight, 0.bias\).*run the model once"):
        nmgraph.capture(lazy, (torch.randn(2, 16),))


def test_prepared_graph_takes_the_last_smaller_batch():
    """Issue 13 item 7: the last, smaller batch of an epoch on a prepared graph."""
    model = _mlp()
    gm = nmgraph.prepare(model, (torch.randn(8, 16),), "2:4", method="ste", permute=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in (8, 8, 3):
        gm(torch.randn(batch, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    gm.eval()
    x = torch.randn(3, 16)
    masked = {n: m for n, m in ((s.weight_name, s.hard) for _, s in gm.nmgraph_sparsity.layers())}
    ref = torch.func.functional_call(model, {n: model.get_parameter(n) * m for n, m in masked.items()}, (x,))
    torch.testing.assert_close(gm(x), ref, rtol=1e-6, atol=1e-6)

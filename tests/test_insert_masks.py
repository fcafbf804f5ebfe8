import pytest
import torch
import torch.nn.functional as F

import nmgraph
from nmgraph import PlanError, ShapeError
from nmgraph.analysis.plan import LayerInfo
from nmgraph.masking import MASK_OP, MDGF, SRSTE, STE, Schedule, SparsityState, TopKAST, TrainingConfig
from nmgraph.passes.insert_masks import STATE_NAME, InsertMasksConfig, MaskNodeInfo, insert_masks
from nmgraph.passes.runner import run_passes
from nmgraph.pattern import Pattern


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


class Tied(torch.nn.Module):
    """``a.weight`` is read by two linears."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(torch.relu(F.linear(h, self.a.weight)))


def _prepare(model, x, method=None, pattern="2:4", schedule=None, layers=None):
    method, schedule = method or STE(), schedule or Schedule()
    gm = nmgraph.capture(model, (x,))
    plan = nmgraph.analyze(gm, pattern)
    cfg = InsertMasksConfig(TrainingConfig(Pattern.parse(pattern), method, schedule),
                            plan.layers if layers is None else layers)
    (res,) = run_passes(gm, (insert_masks,), cfg, lint=True)
    return gm, plan, res


def _masked_reference(model, x, masks, beta=None):
    params = dict(model.named_parameters())
    new = {}
    for name, e in masks.items():
        w = params[name].detach()
        new[name] = w * e if beta is None else torch.where(e, w, w * beta)
    return torch.func.functional_call(model, new, (x,))


def test_inserts_one_mask_node_per_weight_read_and_matches_masked_model():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(3, 16)
    gm, plan, res = _prepare(model, x)
    gm.graph.lint()
    assert [i.name for i in plan.layers] == ["a.weight", "b.weight"]
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is MASK_OP]
    assert len(nodes) == 2 and res.changed_nodes == [n.name for n in nodes] and res.modified
    assert res.skipped == [] and res.info["masked"] == ["a.weight", "b.weight"]
    # 2 buffer reads (mask, hard) per mask node for STE without fine-tune: no beta, no grad_mask
    attrs = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(STATE_NAME)]
    assert sorted(attrs) == sorted(f"{STATE_NAME}.{c}_weight.{b}" for c in "ab" for b in ("mask", "hard"))
    for node, name in zip(nodes, ["a.weight", "b.weight"]):
        assert node.args[0].op == "get_attr" and node.args[0].target == name
        assert [u.target for u in node.users] == [torch.ops.aten.linear.default]
        assert node.args[5] == 0.0 and node.args[6] is False
        assert node.meta["nmgraph"] == MaskNodeInfo(name, f"{STATE_NAME}.{name.replace('.', '_')}", 1, Pattern(2, 4))
        consumer = next(iter(node.users))
        assert node.meta["nn_module_stack"] == consumer.meta["nn_module_stack"]
        assert node.meta["stack_trace"] == consumer.meta["stack_trace"]
        val = node.meta["val"]
        assert val.shape == gm.get_parameter(name).shape and val.dtype == torch.float32
        assert node.meta["tensor_meta"].shape == val.shape
    # weights untouched; output equals the model with W*E, E = nm_mask(W)
    state = getattr(gm, STATE_NAME)
    assert isinstance(state, SparsityState)
    masks = {st.weight_name: st.mask for _, st in state.layers()}
    for name, e in masks.items():
        assert torch.equal(e, nmgraph.nm_mask(model.get_parameter(name), "2:4"))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _masked_reference(model, x, masks), rtol=0, atol=0)
        assert not torch.allclose(gm(x), model(x))


def test_method_decides_node_inputs():
    torch.manual_seed(1)
    model, x = MLP(), torch.randn(3, 16)
    gm, _, _ = _prepare(model, x, method=MDGF("exp", alpha=0.5), schedule=Schedule(total_steps=10, finetune=0.2))
    node = next(n for n in gm.graph.nodes if n.target is MASK_OP)
    assert node.args[3].target == f"{STATE_NAME}.beta" and node.args[4].target.endswith(".grad_mask")
    state = getattr(gm, STATE_NAME)
    assert float(state.beta) == 1.0  # step 0 of the sparse phase: beta = exp(0)
    state.beta.fill_(0.25)
    masks = {st.weight_name: st.mask for _, st in state.layers()}
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _masked_reference(model, x, masks, beta=0.25), rtol=0, atol=0)
    gm2, _, _ = _prepare(MLP(), x, method=SRSTE(lambda_w=3e-4))
    assert [n.args[5] for n in gm2.graph.nodes if n.target is MASK_OP] == [3e-4, 3e-4]
    gm3, _, _ = _prepare(MLP(), x, method=TopKAST(), pattern="1:4")
    lam = [n.args[5] for n in gm3.graph.nodes if n.target is MASK_OP]
    assert lam == [pytest.approx(8e-4)] * 2  # 2e-4 / density 1/4
    assert all(n.args[4] is not None for n in gm3.graph.nodes if n.target is MASK_OP)


def test_weight_read_twice_is_masked_at_every_read():
    torch.manual_seed(2)
    model, x = Tied(), torch.randn(3, 16)
    gm = nmgraph.capture(model, (x,))
    wnode = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "a.weight")
    users = list(wnode.users)
    assert len(users) == 2
    with gm.graph.inserting_after(wnode):  # a second get_attr for the second use
        second = gm.graph.get_attr("a.weight")
    second.meta = dict(wnode.meta)
    users[1].replace_input_with(wnode, second)
    gm.recompile()
    plan = nmgraph.analyze(gm, "2:4")
    (res,) = run_passes(gm, (insert_masks,), InsertMasksConfig(TrainingConfig(Pattern(2, 4), STE()), plan.layers),
                        lint=True)
    nodes = [n for n in gm.graph.nodes if n.target is MASK_OP]
    assert len(nodes) == 2 and len(res.changed_nodes) == 2
    assert {n.args[1].target for n in nodes} == {f"{STATE_NAME}.a_weight.mask"}
    masks = {"a.weight": getattr(gm, STATE_NAME).a_weight.mask}
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _masked_reference(model, x, masks), rtol=0, atol=0)


def test_skips_are_reported_and_errors_are_typed():
    torch.manual_seed(3)
    model, x = MLP(), torch.randn(3, 16)
    gm = nmgraph.capture(model, (x,))
    plan = nmgraph.analyze(gm, "2:4")
    ghost = LayerInfo("missing.weight", (4, 8), 1, "linear", "linear_9", "missing")
    cfg = InsertMasksConfig(TrainingConfig(Pattern(2, 4), STE()), (*plan.layers, ghost))
    (res,) = run_passes(gm, (insert_masks,), cfg, lint=True)
    assert len(res.changed_nodes) == 2
    assert [(s.name, s.reason) for s in res.skipped] == [
        ("missing.weight", "not masked: no get_attr node reads it in this graph")]
    with pytest.raises(PlanError, match="already has an attribute 'nmgraph_sparsity'"):
        insert_masks(gm, cfg)

    gm = nmgraph.capture(MLP(), (x,))
    wrong = LayerInfo("a.weight", (32, 8), 1, "linear", "linear", "a")
    with pytest.raises(PlanError, match=r"'a.weight' has shape \(32, 16\) but the plan says \(32, 8\)"):
        insert_masks(gm, InsertMasksConfig(TrainingConfig(Pattern(2, 4), STE()), (wrong,)))
    odd = LayerInfo("a.weight", (32, 16), 1, "linear", "linear", "a")
    with pytest.raises(ShapeError, match="not divisible by M=32"):
        insert_masks(gm, InsertMasksConfig(TrainingConfig(Pattern(1, 32), STE()), (odd,)))
    with pytest.raises(PlanError, match="state_name must be a Python identifier"):
        InsertMasksConfig(TrainingConfig(Pattern(2, 4), STE()), (), state_name="a.b")


def test_nothing_eligible_changes_nothing():
    model, x = MLP(), torch.randn(3, 16)
    gm = nmgraph.capture(model, (x,))
    code = gm.code
    (res,) = run_passes(gm, (insert_masks,), InsertMasksConfig(TrainingConfig(Pattern(2, 4), STE()), ()))
    assert not res.modified and res.info["masked"] == [] and gm.code == code
    assert not hasattr(gm, STATE_NAME)

import copy

import pytest
import torch
from torch import nn

import nmgraph
from nmgraph import PlanError, VerificationError
from nmgraph.analysis.plan import Member, PermutationGroup, SparsityPlan
from nmgraph.passes.permute_channels import apply_permutation, kept_magnitude

from . import hf_models
from .hf_models import first_tensor


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def test_explicit_perms_move_every_member():
    model = _mlp()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 8)
    gm = nmgraph.capture(model, (x,))
    plan = nmgraph.analyze(gm, "2:4")
    g = next(g for g in plan.groups if g.size == 16)
    perm = torch.arange(16).flip(0)
    report = nmgraph.permute(gm, plan, perms={g.id: perm})
    assert report.permuted == [g.id]
    assert [s.name for s in report.skipped] == [f"group {o.id}" for o in plan.groups if o.id != g.id]
    assert torch.equal(model[0].weight, ref[0].weight[perm])
    assert torch.equal(model[0].bias, ref[0].bias[perm])
    assert torch.equal(model[2].weight, ref[2].weight[:, perm])
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-6, atol=1e-6)
    assert report.max_error < 1e-5


def test_search_none_changes_nothing_and_reports_kept():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    gm = nmgraph.capture(model, (torch.randn(2, 8),))
    plan = nmgraph.analyze(gm, "2:4")
    report = nmgraph.permute(gm, plan, search="none")
    assert report.permuted == [] and not report.modified
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for info in plan.layers:
        w = gm.get_parameter(info.name).detach()
        assert report.kept_before[info.name] == pytest.approx(kept_magnitude(w, "2:4"))
        mask = nmgraph.nm_mask(w, "2:4")
        assert report.kept_before[info.name] == pytest.approx(float((w.abs() * mask).sum() / w.abs().sum()))


def test_invalid_perms_are_rejected():
    gm = nmgraph.capture(_mlp(), (torch.randn(2, 8),))
    plan = nmgraph.analyze(gm, "2:4")
    g = plan.groups[0]
    with pytest.raises(PlanError, match="not a permutation"):
        nmgraph.permute(gm, plan, perms={g.id: torch.zeros(g.size, dtype=torch.long)})
    with pytest.raises(PlanError, match=r"names group 99"):
        nmgraph.permute(gm, plan, perms={99: torch.arange(4)})
    with pytest.raises(PlanError, match="search='magic' is not one of"):
        nmgraph.permute(gm, plan, search="magic")


def test_block_constraint_enforced():
    g = PermutationGroup(0, 8, (Member("w", 1),), block=4)
    assert "across blocks of 4" in g.check(torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]))
    for seed in range(5):
        p = g.random_permutation(torch.Generator().manual_seed(seed))
        assert g.check(p) is None and torch.equal(p // 4, torch.arange(8) // 4)


def test_wrong_plan_is_caught_and_undone():
    """A plan that forgets a coupled tensor changes the output: permute must raise and restore."""
    model = _mlp()
    x = torch.randn(4, 8)
    gm = nmgraph.capture(model, (x,))
    plan = nmgraph.analyze(gm, "2:4")
    g = next(g for g in plan.groups if g.size == 16)
    broken = PermutationGroup(g.id, g.size, tuple(m for m in g.members if m.name != "0.bias"), g.block,
                              g.consumers)
    bad_plan = SparsityPlan(plan.pattern, plan.layers, plan.skipped, (broken,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VerificationError, match=rf"permuting group {g.id} .*changed the model output"):
        nmgraph.permute(gm, bad_plan, search="random", seed=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_from_another_graph():
    gm = nmgraph.capture(_mlp(), (torch.randn(2, 8),))
    plan = nmgraph.analyze(gm, "2:4")
    other = nmgraph.capture(nn.Sequential(nn.Linear(8, 4)), (torch.randn(2, 8),))
    with pytest.raises(PlanError, match="re-run analyze"):
        nmgraph.permute(other, plan, search="random")
    with pytest.raises(PlanError, match="the plan was made for another graph"):
        apply_permutation(other, plan.groups[0], torch.arange(plan.groups[0].size))


def test_random_permutation_on_llama_keeps_outputs_and_parameters_shared():
    model, args = hf_models.llama(kv_heads=4)
    ref = first_tensor(model(*args)).detach()
    gm = nmgraph.capture(model, args)
    plan = nmgraph.analyze(gm, "2:4")
    report = nmgraph.permute(gm, plan, search="random", seed=7)
    assert len(report.permuted) == len(plan.groups) == 5
    # the user's model object sees the permuted parameters (shared) and still computes the same
    torch.testing.assert_close(first_tensor(model(*args)).detach(), ref, rtol=1e-5, atol=1e-5)
    assert set(report.kept_after) == {i.name for i in plan.layers}


def test_greedy_search_raises_kept_magnitude_end_to_end():
    model, args = hf_models.bert()
    ref = first_tensor(model(*args)).detach()
    gm = nmgraph.capture(model, args)
    plan = nmgraph.analyze(gm, "2:4")
    report = nmgraph.permute(gm, plan, search="greedy", seed=0, time_limit=2.0)
    assert report.permuted
    for gid in report.permuted:
        consumers = plan.group(gid).consumers
        before = sum(report.kept_before[c] for c in consumers)
        after = sum(report.kept_after[c] for c in consumers)
        assert after > before
    torch.testing.assert_close(first_tensor(model(*args)).detach(), ref, rtol=1e-5, atol=1e-5)


def test_verification_leaves_training_mode_buffers_alone():
    """A graph captured in training mode updates BatchNorm statistics; verifying must not."""
    from .test_analysis import ConvNet, _randomize_bn

    model = _randomize_bn(ConvNet("bn")).train()
    x = torch.randn(2, 4, 8, 8)
    gm = nmgraph.capture(model, (x,))
    plan = nmgraph.analyze(gm, "2:4")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    report = nmgraph.permute(gm, plan, search="random", seed=0)
    assert report.permuted
    norm_group = next(g for g in plan.groups if any(m.name == "norm.running_mean" for m in g.members))
    perm = report.perms[norm_group.id]
    assert torch.equal(model.norm.running_mean, before["norm.running_mean"][perm])  # permuted, not updated
    assert torch.equal(model.norm.running_var, before["norm.running_var"][perm])
    assert torch.equal(model.norm.num_batches_tracked, before["norm.num_batches_tracked"])

import copy
import dataclasses
import logging
import math
import time

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
    report = nmgraph.permute(gm, plan, search="greedy", seed=0, accept="magnitude")
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


# ------------------------------------------------ acceptance by the pruned model's error (issue 16)


class _Scaled(nn.Module):
    """Linear -> ReLU -> Linear whose second weight's columns alternate in scale, in runs of 4.

    ``loud_small=True``: channels 0-7 carry activations 100x the others but read by columns 10x
    smaller; mixing them with the large columns keeps more magnitude and prunes the loud channels.
    ``loud_small=False``: equal activations, columns large in runs of 4: mixing keeps every large one.
    """

    def __init__(self, loud_small: bool):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 8)
        with torch.no_grad():
            self.l1.bias.fill_(1.0)
            mag = torch.rand(8, 16) + 1.0
            sign = torch.randint(0, 2, (8, 16)) * 2.0 - 1.0
            if loud_small:
                self.l1.weight[:8] *= 100.0
                mag[:, :8] *= 0.1
            else:
                mag[:, [c for c in range(16) if (c // 4) % 2]] *= 0.1
            self.l2.weight.copy_(mag * sign)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def _pruned_error(model, plan, x, perm_report=None):
    """Relative error of the magnitude-pruned copy of ``model`` against ``model`` on ``x``."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for info in plan.layers:
            w = pruned.get_parameter(info.name)
            w.mul_(nmgraph.nm_mask(w, plan.pattern, axis=info.axis))
        return float((pruned(x) - model(x)).norm() / model(x).norm())


@pytest.mark.parametrize("loud_small", [True, False])
def test_a_permutation_is_kept_only_if_the_pruned_model_gets_closer(loud_small):
    model = _Scaled(loud_small).eval()
    x, held_out = torch.randn(64, 8), torch.randn(256, 8)
    ref = copy.deepcopy(model)
    gm = nmgraph.capture(model, (x,))
    plan = nmgraph.analyze(gm, "2:4", include=["l2"])
    (g,) = plan.groups
    report = nmgraph.permute(gm, plan, seed=0)
    d = report.groups[g.id]
    assert d.kept_after > d.kept_before  # the search found more magnitude either way
    assert d.error_before == pytest.approx(_pruned_error(ref, plan, x), rel=1e-4)
    assert d.decided_by == "error" and d.applied == (d.error_after < d.error_before)
    assert d.applied is not loud_small  # pruning the loud channels hurts although it keeps more
    assert report.pruned_error == (d.error_before, d.error_after if d.applied else d.error_before)
    # held-out inputs agree with the decision; the permuted dense model computes what it computed
    assert (_pruned_error(model, plan, held_out) < _pruned_error(ref, plan, held_out)) is d.applied
    torch.testing.assert_close(model(held_out), ref(held_out), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.l2.weight, ref.l2.weight) is loud_small
    # by kept magnitude alone, the loud case would have been permuted
    gm2 = nmgraph.capture(copy.deepcopy(ref), (x,))
    assert nmgraph.permute(gm2, plan, seed=0, accept="magnitude").permuted == [g.id]


def test_calibration_batches_count_in_the_error():
    model = _Scaled(False).eval()
    x = torch.randn(4, 8)
    gm = nmgraph.capture(model, (x,))
    plan = nmgraph.analyze(gm, "2:4", include=["l2"])
    calls = []
    hook = model.l2.register_forward_hook(lambda *a: calls.append(1))
    batches = [torch.randn(4, 8), (torch.randn(4, 8),)]
    report = nmgraph.permute(gm, plan, calibration=batches, verify=False)
    hook.remove()
    (d,) = report.groups.values()
    assert d.applied and d.error_after < d.error_before
    ref = _Scaled(False).eval()  # the error is over the example batch and the two calibration batches
    xs = torch.cat([x, batches[0], batches[1][0]])
    assert d.error_before == pytest.approx(_pruned_error(ref, plan, xs), rel=1e-4)
    assert not calls  # the captured graph ran, not the module's forward
    with pytest.raises(PlanError, match="batch 0 does not run on the captured graph"):
        nmgraph.permute(gm, plan, calibration=[torch.randn(3, 7)])  # another width (any batch size runs)


# ------------------------------------------------ budgets


def test_default_budget_scales_with_the_score_matrices():
    small = nmgraph.capture(_mlp(), (torch.randn(2, 8),))
    big = nmgraph.capture(nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                        nn.Linear(1024, 8)), (torch.randn(2, 64),))
    from nmgraph.passes.permute_channels import DEFAULT_TIME_LIMIT_MIN, default_time_limit

    t_small = default_time_limit(nmgraph.analyze(small, "2:4"), small)
    t_big = default_time_limit(nmgraph.analyze(big, "2:4"), big)
    assert t_small == DEFAULT_TIME_LIMIT_MIN < t_big < 300
    report = nmgraph.permute(small, nmgraph.analyze(small, "2:4"), accept="magnitude")
    assert DEFAULT_TIME_LIMIT_MIN <= report.time_limit < math.inf


def test_time_limit_bounds_the_whole_call_and_is_shared_largest_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 64),
                          nn.ReLU(), nn.Linear(64, 8)).eval()
    gm = nmgraph.capture(model, (torch.randn(4, 32),))
    plan = nmgraph.analyze(gm, "2:4")
    start = time.perf_counter()
    report = nmgraph.permute(gm, plan, time_limit=1.5)
    wall = time.perf_counter() - start
    # the bound covers the kept tables, the search, the acceptance forwards and the verification;
    # the slack is for a loaded CI machine (benchmarks/permute_budget.py measures it: within 10 %)
    assert wall < 1.5 * 1.1 + 1.0
    order = list(report.groups)
    sizes = [report.groups[g].size for g in order]
    assert sizes[0] == 1024  # the group with the most magnitude to win searched first
    assert report.groups[order[0]].budget >= max(report.groups[g].budget for g in order[1:])


def test_progress_bar_and_log(caplog):
    pytest.importorskip("tqdm")
    gm = nmgraph.capture(_mlp(), (torch.randn(2, 8),))
    with caplog.at_level(logging.INFO, logger="nmgraph.passes.permute_channels"):
        report = nmgraph.permute(gm, nmgraph.analyze(gm, "2:4"), progress=True)
    assert report.groups and all(f"group {g}" in caplog.text for g in report.groups)


# ------------------------------------------------ verification: dropout, float64 noise floor


def test_prepare_in_train_mode_with_dropout_inside_a_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4)).train()
    x = torch.randn(4, 8)
    train_gm = nmgraph.prepare(model, (x,), "2:4", permute=True, search="random", seed=1)
    record = nmgraph.graph_record(train_gm)
    assert record.permuted.permuted and record.permuted.max_error < 1e-5
    # dropout is still on in the graph
    assert any(n.target is torch.ops.aten.dropout.default and n.args[2] is True for n in train_gm.graph.nodes)


class _Cancelling(nn.Module):
    """A consumer whose output has a large common offset that BatchNorm (batch statistics) removes:
    float32 rounding of the offset is amplified far above 1e-5 of the output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(8, 64), nn.Linear(64, 16)
        self.bn = nn.BatchNorm1d(16)
        with torch.no_grad():
            self.l1.bias.fill_(1e3)
            self.l2.weight.mul_(1e-3).add_(0.1)

    def forward(self, x):
        return self.bn(self.l2(torch.relu(self.l1(x))))


def test_float32_noise_above_the_tolerance_is_checked_again_in_float64():
    model = _Cancelling().train()
    x = torch.randn(32, 8)
    gm = nmgraph.capture(model, (x,))
    plan = nmgraph.analyze(gm, "2:4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = nmgraph.permute(gm, plan, search="random", seed=0)
    assert report.permuted and report.max_error > report.tolerance  # float32 alone would have raised
    assert report.verified_by.startswith("a float64 re-run")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # a real coupling error still raises, with the float64 number in the message
    model.load_state_dict(before)
    g = plan.groups[0]
    broken = PermutationGroup(g.id, g.size, tuple(m for m in g.members if m.name != "l1.weight"), g.block,
                             g.consumers)
    with pytest.raises(VerificationError, match="float64 re-run moved them by"):
        nmgraph.permute(gm, SparsityPlan(plan.pattern, plan.layers, plan.skipped, (broken,)), search="random", seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------ all or nothing under interrupts


@pytest.mark.parametrize("where", ["apply", "accept", "verify"])
def test_an_interrupt_at_any_step_leaves_the_model_bit_identical(monkeypatch, where):
    from nmgraph.passes import permute_channels as pc

    model = _Scaled(False).eval()
    x = torch.randn(16, 8)
    gm = nmgraph.capture(model, (x,))
    plan = nmgraph.analyze(gm, "2:4", include=["l2"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}

    def interrupt_on(n, fn):
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return fn(*a, **k)
        return wrapped

    if where == "apply":  # between two tensors of one group (the second tensor's index)
        monkeypatch.setattr(pc, "_member_index", interrupt_on(2, pc._member_index))
        kwargs = {"search": "random"}
    elif where == "accept":  # after the candidate was applied and pruned, during its forward
        monkeypatch.setattr(pc, "_sample_errors", interrupt_on(2, pc._sample_errors))
        kwargs = {}
    else:
        monkeypatch.setattr(pc, "_rel_error", interrupt_on(1, pc._rel_error))
        kwargs = {}
    with pytest.raises(KeyboardInterrupt):
        nmgraph.permute(gm, plan, **kwargs)
    assert calls["n"] >= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_float64_recheck_gets_past_the_input_checks_of_an_exported_graph():
    # An exported graph checks its inputs' dtype in a forward pre-hook; the float64 re-run feeds
    # float64 inputs, so it must call the graph's forward itself (wav2vec2 and HuBERT, whose inputs
    # are float audio, reported "the float64 re-run could not run: Tensor dtype mismatch").
    from nmgraph.passes.permute_channels import FLOAT64_TOLERANCE, _float64_error

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = torch.randn(3, 8)
    gm = nmgraph.capture(model, (x,))
    with pytest.raises(Exception, match="dtype"):  # what the exported graph does with float64 inputs
        gm(x.double())
    plan = nmgraph.analyze(gm, "2:4", dense_head=False)
    g = plan.groups[0]
    perm = g.random_permutation(torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    apply_permutation(gm, g, perm)
    err, why = _float64_error(gm, [(g, perm)], (x,), {})
    assert why == "" and err is not None and err < FLOAT64_TOLERANCE
    assert all(p.dtype == torch.float32 for p in gm.parameters())  # converted back
    apply_permutation(gm, g, torch.argsort(perm))
    assert all(torch.equal(before[n], p) for n, p in gm.named_parameters())  # exactly, once
    # the check can fail: a "group" missing its consumer's columns changes the function
    partial = dataclasses.replace(g, members=tuple(m for m in g.members if m.axis == 0))
    apply_permutation(gm, partial, perm)
    err, why = _float64_error(gm, [(partial, perm)], (x,), {})
    assert why == "" and err > 1e-3

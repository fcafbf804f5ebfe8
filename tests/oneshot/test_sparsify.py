"""nmgraph.sparsify end to end: exactly N:M on real architectures, the user's module kept, a report
with the model-level summary first, typed errors, and the model untouched by a failed call."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import nmgraph
import nmgraph.oneshot.sequential as sequential_mod
from nmgraph.errors import ArgumentError, StrictModeError
from nmgraph.oneshot import CalibrationError
from tests.oneshot import models

ARCHS = {
    "llama": (models.llama, lambda: models.tokens(6)),
    "qwen2": (models.qwen2, lambda: models.tokens(6)),
    "gpt2": (models.gpt2, lambda: models.tokens(6)),
    "bert": (models.bert, lambda: models.tokens(6)),
    "cnn": (models.cnn, lambda: models.images(6)),
    "qwen2-moe": (models.qwen2_moe, lambda: models.tokens(6, length=32)),
}


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_data_aware_methods_make_every_eligible_weight_exactly_nm(arch, method):
    build, data = ARCHS[arch]
    torch.manual_seed(0)
    model = build()
    cls = type(model)
    report = nmgraph.sparsify(model, "2:4", method=method, calibration=data(), permute=False, progress=False)
    assert type(model) is cls and not model.training
    assert report.layers and len(report.layers) + len(report.skipped) >= len(report.layers)
    for layer in report.layers:
        w = model.get_parameter(layer.name)
        assert nmgraph.is_nm(w, "2:4", axis=layer.axis), layer.name
        assert float((w == 0).float().mean()) >= 0.5, layer.name
    assert report.output_rel_error is not None and 0 < report.output_rel_error < 2
    assert all(x.rel_error is not None and x.rel_error >= 0 for x in report.layers)
    assert report.params_nm == sum(model.get_parameter(x.name).numel() for x in report.layers)
    if arch == "qwen2-moe":
        experts = [x for x in report.layers if len(x.shape) == 3]
        assert len(experts) == 4 and all(x.axis == 2 for x in experts)
    if arch == "cnn":
        assert {x.name for x in report.layers} == {"grouped.weight", "point.weight", "fc.weight"}
        assert "3, not divisible by M=4" in dict(report.skipped)["stem.weight"]


def test_report_summary_comes_first_and_round_trips_through_json():
    torch.manual_seed(0)
    model = models.llama()
    report = nmgraph.sparsify(model, "2:4", method="sparsegpt", calibration=models.tokens(10), holdout=2,
                              permute=False)
    data = json.loads(report.to_json())
    assert list(data) == ["summary", "layers", "groups", "skipped", "notes"]
    s = data["summary"]
    assert list(s)[:2] == ["pattern", "method"] and s["pattern"] == "2:4" and s["method"] == "sparsegpt"
    assert s["eval_samples"] == 2 and s["calibration_samples"] == 8 and s["tokens_per_sample"] == 16
    assert 0 < s["nm_share"] < 1 and s["bytes_sparse"] < s["bytes_dense"]
    assert s["layers_pruned"] == 14 and s["layers_dense"] == 2 and s["peak_activation_bytes"] > 0
    assert {"capture", "reference", "prune", "evaluate"} <= set(s["stages"])
    text = str(report)
    assert text.startswith("sparsify 2:4 by sparsegpt: 14 weights N:M") and "held-out samples" in text
    assert "lm_head.weight: output head kept dense" in text


def test_model_keeps_its_hf_methods_and_loss_is_reported():
    torch.manual_seed(0)
    model = models.llama()
    assert model.config.use_cache  # a stock causal LM: capture traces it without the cache object
    cal = [{"input_ids": t.unsqueeze(0), "attention_mask": torch.ones(1, t.numel(), dtype=torch.long),
            "labels": t.unsqueeze(0)} for t in models.tokens(6)]
    report = nmgraph.sparsify(model, "2:4", method="wanda", calibration=cal, permute=False)
    assert report.loss_dense is not None and report.loss_sparse is not None
    assert report.loss_sparse != report.loss_dense and model.config.use_cache
    assert all(nmgraph.is_nm(model.get_parameter(x.name), "2:4", axis=x.axis) for x in report.layers)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_permutation_is_scored_by_the_method_and_kept_only_when_the_pruned_model_is_closer(method):
    torch.manual_seed(0)
    model = models.llama()
    snap = _snapshot(model)
    report = nmgraph.sparsify(model, "2:4", method=method, calibration=models.tokens(6), permute=True,
                              time_limit=30)
    assert report.groups and report.permutation_gain is not None and report.permutation_gain >= 0
    for g in report.groups:  # a group is adopted (before the end-to-end check) only when it keeps more saliency
        assert g.kept_after >= g.kept_before and (not g.applied or g.kept_after > g.kept_before)
    assert report.permutation_accepted is not None
    assert not report.permutation_accepted or report.error_permuted < report.error_unpermuted  # kept: better
    kept = report.error_permuted if report.permutation_accepted else report.error_unpermuted
    assert report.output_rel_error == pytest.approx(kept, rel=1e-12)
    assert any(g.applied for g in report.groups) == report.permutation_accepted
    assert all(nmgraph.is_nm(model.get_parameter(x.name), "2:4", axis=x.axis) for x in report.layers)
    plain = models.llama()
    plain.load_state_dict(snap)
    nmgraph.sparsify(plain, "2:4", method=method, calibration=models.tokens(6), permute=False)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert same != report.permutation_accepted


def _forced(monkeypatch, accept: bool):
    """Makes the held-out comparison come out as ``accept`` says: the per-sample scores of the second
    (permuted) attempt are moved far below or above the first's."""
    module = importlib.import_module("nmgraph.oneshot.sparsify")
    real = module._scores
    calls = []

    def scores(*args):
        calls.append(real(*args))
        shift = -10.0 if accept else 10.0
        return calls[-1] if len(calls) == 1 else [x + shift for x in calls[-1]]

    monkeypatch.setattr(module, "_scores", scores)
    return calls


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_a_rejected_permutation_leaves_exactly_the_weights_of_no_permutation(monkeypatch, method):
    torch.manual_seed(0)
    model = models.llama()
    snap = _snapshot(model)
    reference = models.llama()
    reference.load_state_dict(snap)
    expected = nmgraph.sparsify(reference, "2:4", method=method, calibration=models.tokens(8), permute=False)
    calls = _forced(monkeypatch, accept=False)
    report = nmgraph.sparsify(model, "2:4", method=method, calibration=models.tokens(8), permute=True)
    assert len(calls) == 2 and report.permutation_accepted is False
    assert report.error_unpermuted == expected.output_rel_error  # no labels: the output error decides
    assert any("permutation rejected" in n for n in report.notes)
    assert not any(g.applied for g in report.groups) and any("rejected" in g.note for g in report.groups)
    assert report.permutation_gain == 0.0 and all(x.permutation_gain == 0.0 for x in report.layers)
    _assert_same(model, _snapshot(reference))  # bit for bit: every parameter and buffer
    assert report.output_rel_error == expected.output_rel_error
    assert [x.rel_error for x in report.layers] == [x.rel_error for x in expected.layers]


def test_an_accepted_permutation_equals_permuting_first_then_pruning(monkeypatch):
    """Reference: the same permutations applied with nmgraph.permute to a copy, then sparsify without
    permutation; the outputs of the permuted model equal the dense model's before pruning."""
    torch.manual_seed(0)
    model = models.llama()
    snap = _snapshot(model)
    cal = models.tokens(8)
    perms = {}
    module = importlib.import_module("nmgraph.oneshot.sparsify")
    real_search = module.search_groups

    def search(*args, **kwargs):
        out = real_search(*args, **kwargs)
        perms.update(out[0])
        return out

    monkeypatch.setattr(module, "search_groups", search)
    _forced(monkeypatch, accept=True)
    report = nmgraph.sparsify(model, "2:4", method="sparsegpt", calibration=cal, permute=True)
    assert report.permutation_accepted is True and perms and any(g.applied for g in report.groups)
    monkeypatch.undo()
    reference = models.llama()
    reference.load_state_dict(snap)
    gm = nmgraph.capture(reference, (cal[0].unsqueeze(0),))
    plan = nmgraph.analyze(gm, "2:4")
    dense_out = reference(cal[-1].unsqueeze(0)).logits
    nmgraph.permute(gm, plan, perms=perms)
    torch.testing.assert_close(reference(cal[-1].unsqueeze(0)).logits, dense_out, rtol=1e-4, atol=1e-5)
    nmgraph.sparsify(reference, "2:4", method="sparsegpt", calibration=cal, permute=False)
    _assert_same(model, _snapshot(reference))


@pytest.mark.parametrize("pattern", ["1:4", "4:8"])
def test_other_patterns(pattern):
    torch.manual_seed(0)
    model = models.gpt2()
    report = nmgraph.sparsify(model, pattern, method="sparsegpt", calibration=models.tokens(4), permute=False)
    assert all(nmgraph.is_nm(model.get_parameter(x.name), pattern, axis=x.axis) for x in report.layers)


def test_magnitude_needs_only_example_inputs():
    model = models.cnn()
    report = nmgraph.sparsify(model, "2:4", example_inputs=(torch.randn(2, 3, 16, 16),), permute=False)
    assert report.method == "magnitude" and len(report.layers) == 3 and report.eval_samples == 1
    for x in report.layers:
        w = model.get_parameter(x.name)
        assert torch.equal(w != 0, nmgraph.nm_mask(w, "2:4", axis=x.axis) & (w != 0))


def test_bad_arguments_raise_typed_errors_and_leave_the_model_alone():
    model = models.llama()
    snap = _snapshot(model)
    with pytest.raises(ArgumentError, match="valid methods: 'magnitude', 'wanda', 'sparsegpt'"):
        nmgraph.sparsify(model, "2:4", method="obs", calibration=models.tokens(2))
    with pytest.raises(CalibrationError, match="does not tokenize"):
        nmgraph.sparsify(model, "2:4", method="wanda", calibration="def f(): pass")
    with pytest.raises(CalibrationError, match="needs calibration="):
        nmgraph.sparsify(model, "2:4", method="sparsegpt")
    with pytest.raises(ArgumentError, match=r"sparsify\(time_limit=-1\)"):
        nmgraph.sparsify(model, "2:4", calibration=models.tokens(2), time_limit=-1)
    with pytest.raises(nmgraph.PatternError):
        nmgraph.sparsify(model, "4:2", calibration=models.tokens(2))
    with pytest.raises(StrictModeError, match="strict=True and 2 weights would stay dense"):
        nmgraph.sparsify(model, "2:4", calibration=models.tokens(2), strict=True)
    _assert_same(model, snap)
    assert not model.training


@pytest.mark.parametrize("undo_in_memory", [True, False])
@pytest.mark.parametrize("permute", [False, True])
def test_a_failure_midway_restores_every_weight_and_undoes_the_permutation(monkeypatch, undo_in_memory, permute):
    """Undo log in memory, or on disk; failing in the only pruning pass, or in the second one, with
    the permutation applied and every weight pruned once already."""
    torch.manual_seed(0)
    model = models.llama().train()
    snap = _snapshot(model)
    calls = []
    real = sequential_mod.sparsegpt_prune
    fail_at = 14 + 9 if permute else 9  # 14 weights per pass

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential_mod, "sparsegpt_prune", flaky)
    module = importlib.import_module("nmgraph.oneshot.sparsify")  # the module, not the function of that name
    applied = []
    real_permute = module.permute_channels
    monkeypatch.setattr(module, "permute_channels", lambda *a, **k: applied.append(1) or real_permute(*a, **k))
    if not undo_in_memory:
        monkeypatch.setattr(module, "UNDO_MEMORY_BYTES", 0)
    with pytest.raises(RuntimeError, match="injected failure"):
        nmgraph.sparsify(model, "2:4", method="sparsegpt", calibration=models.tokens(6), permute=permute)
    _assert_same(model, snap)
    assert model.training and len(calls) == fail_at and len(applied) == int(permute)


def test_a_time_limit_too_small_for_a_search_skips_it_and_says_so():
    model = models.llama()
    report = nmgraph.sparsify(model, "2:4", method="wanda", calibration=models.tokens(4), time_limit=0)
    assert report.groups == () and any("permutation skipped" in n for n in report.notes)
    assert all(nmgraph.is_nm(model.get_parameter(x.name), "2:4", axis=x.axis) for x in report.layers)


def test_bf16_model_permutes_and_prunes():
    torch.manual_seed(0)
    model = models.llama().to(torch.bfloat16)
    report = nmgraph.sparsify(model, "2:4", method="sparsegpt", calibration=models.tokens(6), search="random")
    assert "permute" in report.stages and report.permutation_accepted is not None
    assert any(g.applied for g in report.groups) == report.permutation_accepted
    for x in report.layers:
        w = model.get_parameter(x.name)
        assert w.dtype == torch.bfloat16 and nmgraph.is_nm(w, "2:4", axis=x.axis)


def test_a_permutation_that_changes_a_bf16_model_is_caught_and_undone(monkeypatch):
    torch.manual_seed(0)
    model = models.llama().to(torch.bfloat16)
    snap = _snapshot(model)

    def consumers_only(gm, group, perm):  # a coupling the analysis "missed": the producers stay put
        for name in group.consumers:
            m = next(x for x in group.members if x.name == name)
            w = gm.get_parameter(name)
            if w.shape[m.axis] == perm.numel():
                with torch.no_grad():
                    w.copy_(w.index_select(m.axis, perm))

    def permute(gm, plan, perms=None, **_):
        for gid, perm in perms.items():
            consumers_only(gm, plan.group(gid), perm)

    module = importlib.import_module("nmgraph.oneshot.sparsify")
    monkeypatch.setattr(module, "permute_channels", permute)
    monkeypatch.setattr(module, "apply_permutation", consumers_only)  # the undo inverts what was done
    with pytest.raises(nmgraph.VerificationError, match="changed the model's main output"):
        nmgraph.sparsify(model, "2:4", method="magnitude", calibration=models.tokens(4), search="random")
    _assert_same(model, snap)


def test_with_labels_the_permutation_is_decided_by_the_held_out_loss():
    torch.manual_seed(0)
    model = models.llama()
    snap = _snapshot(model)
    cal = [{"input_ids": t.unsqueeze(0), "labels": t.unsqueeze(0)} for t in models.tokens(8)]
    report = nmgraph.sparsify(model, "2:4", method="wanda", calibration=cal, permute=True)
    plain = models.llama()
    plain.load_state_dict(snap)
    expected = nmgraph.sparsify(plain, "2:4", method="wanda", calibration=cal, permute=False)
    assert report.permutation_accepted is not None
    assert report.error_unpermuted == expected.loss_sparse  # the same pruning, the same held-out samples
    assert not report.permutation_accepted or report.error_permuted < report.error_unpermuted
    assert report.loss_sparse == (report.error_permuted if report.permutation_accepted else report.error_unpermuted)

"""Reports: tables and JSON for every result type, per-layer statistics, the PNG plot."""

import copy
import json

import pytest
import torch

import nmgraph
from nmgraph import report
from nmgraph.errors import UnsupportedError
from nmgraph.passes.permute_channels import permute

from .test_cli import Tiny  # the same three-layer MLP the CLI tests load through a factory

pytest.importorskip("rich")


def _setup():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(8, 16)
    gm = nmgraph.capture(model, (x,))
    return model, x, gm, nmgraph.analyze(gm, "2:4")


def _kept_ref(w, axis=1):
    a = w.detach().abs().double()
    return float((a * nmgraph.nm_mask(a, "2:4", axis=axis)).sum() / a.sum())


def test_plan_table_and_json():
    _, _, _, plan = _setup()
    text = report.render(plan, width=200)
    for info in plan.layers:
        assert info.name in text
    for skip in plan.skipped:
        assert skip.name in text and skip.reason[:30] in text
    assert f"{len(plan.layers)} weights can be 2:4 (" in text and f"{len(plan.skipped)} stay dense" in text
    assert json.loads(report.to_json(plan)) == json.loads(plan.to_json())


def test_plan_text_names_ops_by_where_they_run_not_by_graph_node_names():
    import re

    from . import hf_models

    model, args = hf_models.llama(layers=1)
    gm = nmgraph.capture(model, args)
    plan = nmgraph.analyze(gm, "2:4")
    text = report.render(plan, width=300) + str(plan)
    numbered = {n.name for n in gm.graph.nodes if re.search(r"_\d+$", n.name) and n.op != "get_attr"}
    assert not numbered & set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
    assert "slice in model.layers.0.self_attn" in text and "through linear in lm_head" in text


def test_layer_stats_identity_vs_permuted_and_sparsity():
    model, x, _, plan = _setup()
    twin = copy.deepcopy(model)
    twin_gm = nmgraph.capture(twin, (x,))
    perm = permute(twin_gm, nmgraph.analyze(twin_gm, "2:4"), search="greedy", seed=0)
    stats = report.layer_stats(model, plan, permuted=twin)
    by_name = {s.name: s for s in stats}
    assert set(by_name) == {i.name for i in plan.layers} | {s.name for s in plan.skipped}
    for info in plan.layers:
        s = by_name[info.name]
        w = dict(model.named_parameters())[info.name]
        assert s.eligible and s.kept_identity == pytest.approx(_kept_ref(w), rel=1e-6)
        w_perm = dict(twin.named_parameters())[info.name]
        assert s.kept_permuted == pytest.approx(_kept_ref(w_perm), rel=1e-6)
        assert s.kept_permuted == pytest.approx(perm.kept_after[info.name], rel=1e-6)
        assert s.sparsity == 0.5  # random weights: exactly half zero after 2:4
    for skip in plan.skipped:
        s = by_name[skip.name]
        assert not s.eligible and s.reason == skip.reason and s.sparsity == 0.0
    text = report.render(stats, width=200)
    assert "kept identity" in text and plan.layers[0].name in text


def test_plot_writes_png(tmp_path):
    model, _, _, plan = _setup()
    stats = report.layer_stats(model, plan)
    out = report.plot_layers(stats, tmp_path / "layers.png", pattern="2:4", title="t")
    from matplotlib.image import imread

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(str(out))
    assert img.shape[:2] == (600, 1200)  # figsize (12, 6) at 100 dpi
    # 250 layers (dense ones among them) fit the same image
    many = [report.LayerStat(f"model.layers.{i}.mlp.weight", (8, 8), i % 7 != 0, 0.5,
                             0.7 if i % 7 else None, 0.72 if i % 7 else None) for i in range(250)]
    big = report.plot_layers(many, tmp_path / "many.png", pattern="2:4")
    assert imread(str(big)).shape[:2] == (600, 1200)
    with pytest.raises(nmgraph.PlanError, match="no layers"):
        report.plot_layers([], tmp_path / "empty.png")


def test_convert_summary_measures_the_graph():
    pytest.importorskip("nmgraph.training")
    from nmgraph.training import convert

    _model, _x, gm, plan = _setup()
    out = convert(gm, "2:4", plan=plan)
    summary = report.convert_summary(out)
    assert {s.name for s in summary.layers} == {i.name for i in plan.layers}
    assert all(s.reason == "" and s.sparsity == 0.5 for s in summary.layers) and summary.all_nm
    assert [s.name for s in summary.skipped] == [s.name for s in plan.skipped]
    d = json.loads(report.to_json(out))
    assert len(d["layers"]) == len(plan.layers) and d["pattern"] == "2:4"
    assert "convert 2:4" in report.render(out, width=200)


def test_permute_report_table():
    _model, _x, gm, plan = _setup()
    perm = permute(gm, plan, search="greedy", seed=0)
    text = report.render(perm, width=200)
    for name, before in perm.kept_before.items():
        assert name in text and f"{100 * before:.1f}%" in text
    assert json.loads(report.to_json(perm))["kept_after"] == pytest.approx(perm.kept_after)


def test_saved_model_and_onnx_reports(tmp_path):
    from nmgraph.exporters import serialize
    from nmgraph.exporters.onnx_check import check_onnx

    model, x, _, plan = _setup()
    with torch.no_grad():
        for info in plan.layers:
            w = dict(model.named_parameters())[info.name]
            w.mul_(nmgraph.nm_mask(w, "2:4"))
    saved = serialize.save(model, tmp_path / "m", plan=plan)
    text = report.render(saved, width=200)
    assert all(info.name in text for info in plan.layers) and "compressed" in text
    assert f"{saved.nbytes} bytes stored" in text
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False)
    rep = check_onnx(tmp_path / "m.onnx", reference=model)
    text = report.render(rep, width=200)
    assert f"{len(rep.eligible)} eligible, 0 lost" in text and "eligible" in text


def test_unknown_object():
    with pytest.raises(UnsupportedError, match="No table for int"):
        report.render(3)

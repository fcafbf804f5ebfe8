"""The model-level line of every report (nmgraph.compress.model_summary): the same counts of N:M and
dense weights, and the same bytes, in the plan, convert, export, the CLI and nmgraph.sparsify."""

import copy

import pytest
import torch

import nmgraph
from nmgraph import report
from nmgraph.cli import main
from nmgraph.compress import compressed_nbytes, model_summary

from . import hf_models

pytest.importorskip("transformers")


def llama_bf16():
    """A bf16 Llama from a config (the CLI factory of the test below)."""
    model, args = hf_models.llama(layers=1)
    return model.to(torch.bfloat16), args


def test_counts_and_bytes_agree_across_plan_convert_export_cli_and_sparsify(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model, args = llama_bf16()
    twin = copy.deepcopy(model)
    gm = nmgraph.capture(model, args)
    plan = nmgraph.analyze(gm, "2:4")
    planned = model_summary(model, "2:4", {i.name: i.axis for i in plan.layers}, planned=True)
    nmgraph.convert(gm, "2:4", plan=plan)
    converted = report.convert_summary(gm, plan=plan).model
    export_report = nmgraph.export(model, tmp_path / "m.onnx", args, pattern="2:4")
    exported = export_report.model
    sparsified = nmgraph.sparsify(twin, "2:4", example_inputs=args, permute=False).summary()
    assert main(["-q", "inspect", "tests.test_model_summary:llama_bf16"]) == 0
    first = capsys.readouterr().out.splitlines()[0]

    # 7 Linear weights of the decoder are 2:4; the embedding and the output head stay dense
    counts = {(len(plan.layers), len(plan.skipped)), (planned.nm_weights, planned.dense_weights),
              (converted.nm_weights, converted.dense_weights), (exported.nm_weights, exported.dense_weights),
              (sparsified["layers_pruned"], sparsified["layers_dense"])}
    assert counts == {(7, 2)}
    params = dict(model.named_parameters())
    dense = sum(t.numel() * 2 for t in params.values())
    after = dense + sum(compressed_nbytes(params[i.name].shape, "2:4", torch.bfloat16) - params[i.name].numel() * 2
                        for i in plan.layers)
    assert {planned.bytes_dense, converted.bytes_dense, exported.bytes_dense, sparsified["bytes_dense"]} == {dense}
    assert {planned.bytes_compressed, converted.bytes_compressed, exported.bytes_compressed,
            sparsified["bytes_sparse"]} == {after}
    assert converted == exported and converted.dtype == "bfloat16"
    assert first == planned.line() and first.startswith("model: 7 weights can be 2:4 (")
    assert converted.line().startswith("model: 7 weights are 2:4 (")
    # every report starts with that line
    summary = report.convert_summary(gm, plan=plan)
    assert report.render(summary, width=400).lstrip().startswith(converted.line())
    assert report.to_dict(summary)["model"]["nm_weights"] == 7
    assert str(export_report).splitlines()[0] == converted.line()
    assert report.render(export_report, width=400).lstrip().startswith(converted.line())
    assert export_report.to_dict()["model"]["bytes_compressed"] == after


def test_tied_weights_count_once():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    m[1].weight = m[0].weight
    s = model_summary(m, "2:4", {"1.weight": 1})  # named by its second name: still one weight
    assert (s.nm_weights, s.dense_weights, s.total_params) == (1, 0, 64)
    assert s.bytes_compressed == compressed_nbytes((8, 8), "2:4", torch.float32)

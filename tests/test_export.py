"""ONNX export: onnxruntime equality on real architectures, the eligibility report, options."""

import warnings

import pytest
import torch

import nmgraph
from nmgraph.analysis.plan import LayerInfo, SparsityPlan
from nmgraph.errors import CaptureError, StrictModeError, UnsupportedError, VerificationError
from nmgraph.exporters.onnx_export import TOLERANCES, _verify, export

from . import hf_models
from .hf_models import first_tensor

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _gemm_weights(model):
    """{name: reduction axis} of every Linear / Conv / HF Conv1D weight (reference, by module type)."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    seen = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            axis = 1
        elif isinstance(mod, Conv1D):
            axis = 0
        else:
            continue
        if id(mod.weight) in seen:
            continue
        seen.add(id(mod.weight))
        if mod.weight.shape[axis] % 4 == 0:
            out[f"{mname}.weight"] = axis
    return out


def _prune(model, names=None):
    params = dict(model.named_parameters(remove_duplicate=False))
    axes = _gemm_weights(model)
    with torch.no_grad():
        for name, axis in axes.items():
            if names is None or name in names:
                w = params[name]
                w.mul_(nmgraph.nm_mask(w, "2:4", axis=axis))
    return axes


def _ort_outputs(path, tensors):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), tensors)})


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit", "resnet"])
def test_hf_models_export_equal_and_all_eligible(name, tmp_path):
    factory = hf_models.FACTORIES[name]
    model, args = factory(layers=1) if name != "resnet" else factory()
    axes = _prune(model)
    tied = {"lm_head.weight": "transformer.wte.weight"} if name == "gpt2" else {}
    expected = {tied.get(n, n) for n in axes}
    path = tmp_path / f"{name}.onnx"
    report = export(model, path, args, "2:4")
    onnx.checker.check_model(str(path))
    assert report.exporter == "dynamo" and report.exporter_fallback is None and not report.converted
    # Independent onnxruntime run against the PyTorch model, at the documented float32 tolerance.
    # a text model is exported as served: input_ids and attention_mask in, logits out
    feeds = [args[0], torch.ones_like(args[0])] if name in ("bert", "gpt2", "llama") else list(args)
    assert report.input_names == (("input_ids", "attention_mask") if name in ("bert", "gpt2", "llama")
                                  else report.input_names)
    got = torch.from_numpy(_ort_outputs(path, feeds)[0])
    with torch.no_grad():
        ref = first_tensor(model(*args))
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    assert report.verified and max(report.max_abs_diff) <= atol + rtol * float(ref.abs().max())
    # Every pruned weight is eligible in the ONNX graph, nothing was lost, dense ones explain why.
    assert set(report.eligible) == expected
    assert report.ok and not report.lost
    for layer in report.check.dense:
        assert layer.name not in expected and layer.reason


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _mlp(prune_axis=None):
    torch.manual_seed(0)
    model = _MLP().eval()
    with torch.no_grad():
        for lin in (model.fc1, model.fc2, model.head):
            lin.weight.mul_(nmgraph.nm_mask(lin.weight, "2:4"))
        if prune_axis is not None:  # fc2 pruned along the wrong axis
            w = torch.randn(64, 64)
            model.fc2.weight.copy_(w * nmgraph.nm_mask(w, "2:4", axis=prune_axis))
    return model, (torch.randn(4, 32),)


def test_weight_pruned_along_wrong_axis_is_reported_by_name(tmp_path):
    model, args = _mlp(prune_axis=0)
    report = export(model, tmp_path / "m.onnx", args)
    assert set(report.eligible) == {"fc1.weight", "head.weight"}
    assert [s.name for s in report.lost] == ["fc2.weight"]
    (layer,) = report.check.lost
    # A 2-D Linear exports as Gemm(transB=1) with the torch layout [N, K]: groups must run along
    # axis 1, and the report says the pattern is along axis 0.
    assert (layer.op, layer.axis) == ("Gemm", 1)
    assert "along axis 0 instead" in layer.reason
    dense_in_model = {s.name: s.reason for s in report.model_dense}
    assert "along axis 0 instead" in dense_in_model["fc2.weight"]
    with pytest.raises(StrictModeError, match=r"fc2\.weight"):
        export(model, tmp_path / "m2.onnx", args, strict=True, exporter="torchscript")


def test_plan_violation_is_lost_with_fix(tmp_path):
    model, args = _mlp()
    with torch.no_grad():
        model.fc2.weight.copy_(torch.randn(64, 64))  # dense, but the plan says 2:4
    plan = SparsityPlan(nmgraph.Pattern(2, 4), tuple(
        LayerInfo(f"{n}.weight", (o, i), 1, "aten.linear.default", n, n)
        for n, o, i in (("fc1", 64, 32), ("fc2", 64, 64))), (), ())
    report = export(model, tmp_path / "m.onnx", args, plan=plan, convert=False, exporter="torchscript")
    assert [s.name for s in report.plan_violations] == ["fc2.weight"]
    assert "run nmgraph.convert" in report.plan_violations[0].reason
    assert not report.ok


def test_fp16_and_dynamic_batch(tmp_path):
    model, args = _mlp()
    path = tmp_path / "m16.onnx"
    report = export(model, path, args, fp16=True, dynamic_batch=True)
    assert model.fc1.weight.dtype == torch.float32  # the caller's model is untouched
    proto = onnx.load(str(path))
    weights = {i.name: i for i in proto.graph.initializer if len(i.dims) == 2}
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights.values())
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert set(report.eligible) == {"fc1.weight", "fc2.weight", "head.weight"}
    assert report.tolerance == TOLERANCES[torch.float16]
    x = torch.randn(7, 32)  # another batch size than the example
    (got,) = _ort_outputs(path, [x.half()])
    with torch.no_grad():
        ref = model.half()(x.half()).float()
    torch.testing.assert_close(torch.from_numpy(got).float(), ref, rtol=2e-2, atol=2e-2)


def test_torchscript_exporter_and_fallback(tmp_path, monkeypatch):
    model, args = _mlp()
    ts = export(model, tmp_path / "ts.onnx", args, exporter="torchscript", dynamic_batch=True)
    assert ts.exporter == "torchscript" and set(ts.eligible) == {"fc1.weight", "fc2.weight", "head.weight"}

    real = torch.onnx.export

    def failing_dynamo(*a, dynamo=True, **kw):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real(*a, dynamo=False, **kw)

    monkeypatch.setattr(torch.onnx, "export", failing_dynamo)
    report = export(model, tmp_path / "fb.onnx", args)
    assert report.exporter == "torchscript"
    assert "simulated dynamo failure" in report.exporter_fallback
    with pytest.raises(CaptureError, match="simulated dynamo failure"):
        export(model, tmp_path / "d.onnx", args, exporter="dynamo")


def test_dense_model_is_converted_first(tmp_path):
    pytest.importorskip("nmgraph.training")
    torch.manual_seed(0)
    model = _MLP().eval()
    args = (torch.randn(4, 32),)
    report = export(model, tmp_path / "c.onnx", args, exporter="torchscript")
    assert report.converted
    # analyze keeps the output head dense; convert prunes the others in place.
    assert set(report.eligible) == {"fc1.weight", "fc2.weight"}
    assert nmgraph.is_nm(model.fc1.weight, "2:4") and not nmgraph.is_nm(model.head.weight, "2:4")
    assert any(s.name == "head.weight" and "left dense by convert" in s.reason for s in report.model_dense)


def test_verification_catches_a_different_model(tmp_path):
    model, args = _mlp()
    path = tmp_path / "m.onnx"
    export(model, path, args, exporter="torchscript")
    other = _MLP().eval()
    with pytest.raises(VerificationError, match=r"output 0 differs from PyTorch .* max \|diff\|"):
        _verify(other, args, {}, path, TOLERANCES[torch.float32], False)


def test_bad_arguments(tmp_path):
    model, args = _mlp()
    with pytest.raises(UnsupportedError, match="format='coreml'"):
        export(model, tmp_path / "m.x", args, format="coreml")
    with pytest.raises(nmgraph.SerializationError, match="does not exist"):
        export(model, tmp_path / "missing" / "m.onnx", args)
    with pytest.raises(UnsupportedError, match=r"needs a torch\.nn\.Module"):
        export(lambda x: x, tmp_path / "m.onnx", args)


def test_report_serializes(tmp_path):
    model, args = _mlp()
    report = export(model, tmp_path / "m.onnx", args, exporter="torchscript")
    import json

    d = json.loads(report.to_json())
    assert d["eligible"] == list(report.eligible) and d["lost"] == []
    assert d["check"]["eligible"] == 3 and d["exporter"] == "torchscript"
    with warnings.catch_warnings():
        text = str(report)
    assert "3 weights eligible for 2:4 sparse math, 0 lost" in text

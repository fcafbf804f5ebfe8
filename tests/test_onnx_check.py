"""The ONNX eligibility check: hand-built graphs for every layout rule, plus real exports."""

import numpy as np
import pytest
import torch

import nmgraph
from nmgraph.errors import SerializationError, UnsupportedError
from nmgraph.exporters.onnx_check import LayerStatus, check_onnx, diagnose_nm, parameter_aliases

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _pruned(shape, axis, pattern="2:4", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    return (w * nmgraph.nm_mask(w, pattern, axis=axis)).numpy()


def _bad_groups(w, axis, n=2, m=4):
    """Reference count of groups of m along axis with more than n nonzeros (numpy, independent)."""
    moved = np.moveaxis(w != 0, axis, -1)
    groups = moved.reshape(-1, m)
    return int((groups.sum(-1) > n).sum()), groups.shape[0]


def _model(nodes, inits, inputs, outputs):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              initializer=[numpy_helper.from_array(a, name) for name, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_gemm_transb_decides_the_axis():
    w_nk = _pruned((8, 16), axis=1)  # [N, K] for transB=1
    w_kn = _pruned((16, 8), axis=0)  # [K, N] for transB=0
    model = _model(
        [helper.make_node("Gemm", ["x", "a.weight"], ["h"], name="gemm_a", transB=1),
         helper.make_node("Gemm", ["h2", "b.weight"], ["y"], name="gemm_b", transB=0),
         helper.make_node("Identity", ["h"], ["h2_pre"]),
         helper.make_node("Concat", ["h2_pre", "h2_pre"], ["h2"], axis=1)],
        {"a.weight": w_nk, "b.weight": w_kn}, [_vi("x", [2, 16])], [_vi("y", [2, 8])])
    rep = check_onnx(model)
    assert [(x.name, x.status, x.axis, x.op) for x in rep.layers] == [
        ("a.weight", LayerStatus.ELIGIBLE, 1, "Gemm"), ("b.weight", LayerStatus.ELIGIBLE, 0, "Gemm")]
    assert rep.ok and len(rep.eligible) == 2


def test_weight_pruned_along_wrong_axis_is_lost_and_named():
    w = _pruned((8, 16), axis=0)  # 2:4 along the output axis: TensorRT reads K (axis 1)
    bad, total = _bad_groups(w, axis=1)
    assert bad > 0
    model = _model([helper.make_node("Gemm", ["x", "fc.weight"], ["y"], name="fc", transB=1)],
                   {"fc.weight": w}, [_vi("x", [2, 16])], [_vi("y", [2, 8])])
    rep = check_onnx(model)
    (layer,) = rep.lost
    assert layer.name == "fc.weight" and layer.node == "fc"
    assert f"{bad} of {total} groups of 4" in layer.reason
    assert "along axis 0 instead" in layer.reason and "[N, K] (transB=1)" in layer.reason
    assert not rep.ok and not rep.eligible


def test_expected_weight_transposed_by_export_is_lost():
    # The model's Linear weight [N, K] is 2:4 along K, but the graph feeds it to MatMul as [K, N]
    # without a Transpose (the exporter bug the check exists for).
    w = _pruned((16, 16), axis=1, seed=3)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": w},
                   [_vi("x", [2, 16])], [_vi("y", [2, 16])])
    rep = check_onnx(model, expected={"w"})
    (layer,) = rep.lost
    assert layer.reason.startswith("2:4 in the model, but as a MatMul weight [K, N] the node reads it")
    # The same graph without the expectation: the weight is 2:4 along axis 1, so still flagged.
    assert [x.status for x in check_onnx(model).layers] == [LayerStatus.LOST]


def test_follows_transpose_and_cast():
    w_nk = _pruned((8, 16), axis=1).astype(np.float32)  # Linear layout, transposed in the graph
    model = _model(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
         helper.make_node("Cast", ["wt"], ["wt16"], to=TensorProto.FLOAT16),
         helper.make_node("MatMul", ["x", "wt16"], ["y"], name="mm")],
        {"w": w_nk}, [_vi("x", [2, 16], TensorProto.FLOAT16)], [_vi("y", [2, 8], TensorProto.FLOAT16)])
    (layer,) = check_onnx(model).layers
    assert layer.status is LayerStatus.ELIGIBLE
    assert layer.path == ("Cast", "Transpose")
    assert layer.shape == (16, 8) and layer.onnx_shape == (8, 16) and layer.axis == 0


def test_conv_groups_along_input_channels_per_position():
    good = _pruned((8, 8, 3, 3), axis=1)
    wrong = _pruned((8, 8, 3, 3), axis=0, seed=1)
    dw = np.random.default_rng(0).standard_normal((8, 1, 3, 3)).astype(np.float32)
    model = _model(
        [helper.make_node("Conv", ["x", "c1.weight"], ["h"], name="c1", pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["h", "c2.weight"], ["h2"], name="c2", pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["h2", "dw.weight"], ["y"], name="dw", group=8, pads=[1, 1, 1, 1])],
        {"c1.weight": good, "c2.weight": wrong, "dw.weight": dw},
        [_vi("x", [1, 8, 5, 5])], [_vi("y", [1, 8, 5, 5])])
    rep = check_onnx(model)
    status = {x.name: x.status for x in rep.layers}
    assert status == {"c1.weight": LayerStatus.ELIGIBLE, "c2.weight": LayerStatus.LOST,
                      "dw.weight": LayerStatus.DENSE}
    assert "depthwise" in rep.layers[2].reason
    bad, total = _bad_groups(wrong, axis=1)
    assert f"{bad} of {total} groups" in rep.layers[1].reason


def test_runtime_weight_and_activation_products():
    w = _pruned((16, 8), axis=0)
    scale = np.full((1,), 0.5, dtype=np.float32)
    model = _model(
        [helper.make_node("Mul", ["w", "scale"], ["ws"], name="scale_w"),
         helper.make_node("MatMul", ["x", "ws"], ["h"], name="mm_w"),
         # activation x activation (like attention scores): not a weight, not reported
         helper.make_node("Transpose", ["h"], ["ht"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "ht"], ["y"], name="mm_act")],
        {"w": w, "scale": scale}, [_vi("x", [2, 16])], [_vi("y", [2, 2])])
    rep = check_onnx(model, expected={"w"})
    (layer,) = rep.layers
    assert layer.status is LayerStatus.LOST and layer.node == "mm_w"
    assert "through Mul node 'scale_w'" in layer.reason and "computed at run time" in layer.reason
    # Not expected and unknown: a dense runtime weight is just dense.
    dense_w = np.ones((16, 8), dtype=np.float32)
    model2 = _model(model.graph.node, {"w": dense_w, "scale": scale}, [_vi("x", [2, 16])], [_vi("y", [2, 2])])
    assert [x.status for x in check_onnx(model2).layers] == [LayerStatus.DENSE]


def test_not_divisible_and_missing_expected():
    w = np.ones((6, 6), dtype=np.float32)
    model = _model([helper.make_node("Gemm", ["x", "odd.weight"], ["y"], name="g", transB=1)],
                   {"odd.weight": w}, [_vi("x", [2, 6])], [_vi("y", [2, 6])])
    rep = check_onnx(model, expected={"gone.weight"})
    assert [(x.name, x.status) for x in rep.layers] == [
        ("odd.weight", LayerStatus.DENSE), ("gone.weight", LayerStatus.LOST)]
    assert "size 6 is not divisible by M=4" in rep.layers[0].reason
    assert "no Gemm/MatMul/Conv of the ONNX graph reads it" in rep.layers[1].reason


@pytest.mark.parametrize("pattern", ["1:4", "4:8"])
def test_other_patterns(pattern):
    w = _pruned((8, 32), axis=1, pattern=pattern)
    model = _model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], {"w": w},
                   [_vi("x", [2, 32])], [_vi("y", [2, 8])])
    assert check_onnx(model, pattern).layers[0].status is LayerStatus.ELIGIBLE
    n, m = map(int, pattern.split(":"))
    stricter = f"{n - 1}:{m}" if n > 1 else None
    if stricter:
        assert check_onnx(model, stricter).layers[0].status is LayerStatus.DENSE


def test_diagnose_counts_match_reference():
    w = torch.from_numpy(_pruned((12, 32), axis=0))
    d = diagnose_nm(w, "2:4", axis=1)
    bad, total = _bad_groups(w.numpy(), axis=1)
    assert (d.ok, d.bad_groups, d.groups, d.other_axis) == (False, bad, total, 0)
    assert diagnose_nm(w, "2:4", axis=0).ok


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)
        self.head = self.fc2  # tied alias: reported under the first name

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _prune_linears(model):
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(nmgraph.nm_mask(mod.weight, "2:4"))


def test_torchscript_export_names_from_node_names_and_values(tmp_path):
    model = _Tiny().eval()
    _prune_linears(model)
    x = torch.randn(3, 7, 16)  # 3-D input: Linear becomes MatMul with a folded [K, N] weight
    path = tmp_path / "tiny.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    standalone = check_onnx(path)
    with_ref = check_onnx(path, expected={"fc1.weight", "fc2.weight"}, reference=model)
    assert [(x.name, x.status, x.op) for x in with_ref.layers] == [
        ("fc1.weight", LayerStatus.ELIGIBLE, "MatMul"), ("fc2.weight", LayerStatus.ELIGIBLE, "MatMul")]
    assert [x.name for x in standalone.layers] == ["fc1.weight", "fc2.weight"]  # from /fc1/MatMul
    assert parameter_aliases(model)["head.weight"] == "fc2.weight"
    # Value matching when neither the initializer nor the node names help.
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        node.name = ""
    renamed = check_onnx(proto, reference=model)
    assert [(x.name, x.name_source) for x in renamed.layers] == [("fc1.weight", "value"), ("fc2.weight", "value")]


def test_torchscript_scope_names_of_sequential_children():
    w = _pruned((8, 8, 1, 1), axis=1)
    model = _model([helper.make_node("Conv", ["x", "onnx::Conv_7"], ["y"],
                                     name="/enc/stages.0/layer/layer.0/convolution/Conv")],
                   {"onnx::Conv_7": w}, [_vi("x", [1, 8, 4, 4])], [_vi("y", [1, 8, 4, 4])])
    (layer,) = check_onnx(model).layers
    assert (layer.name, layer.name_source) == ("enc.stages.0.layer.0.convolution.weight", "scope")


def test_bad_inputs():
    with pytest.raises(SerializationError, match="does not exist"):
        check_onnx("/nonexistent/model.onnx")
    with pytest.raises(UnsupportedError, match=r"takes a path or an onnx\.ModelProto"):
        check_onnx(torch.nn.Linear(2, 2))


def test_report_json_roundtrip():
    w = _pruned((8, 16), axis=1)
    model = _model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], {"w": w},
                   [_vi("x", [2, 16])], [_vi("y", [2, 8])])
    rep = check_onnx(model)
    import json

    d = json.loads(rep.to_json())
    assert (d["eligible"], d["lost"], d["dense"]) == (1, 0, 0)
    assert d["layers"][0]["status"] == "eligible" and d["layers"][0]["shape"] == [8, 16]
    assert "1 eligible, 0 lost, 0 dense" in str(rep)

"""format="tensorrt": the guarded import, the builder configuration, and the ONNX it consumes.

TensorRT cannot be installed on the CPU test machines, so the engine build itself runs only where
``tensorrt`` and a GPU exist (skipped otherwise, with that reason). What TensorRT is fed (the ONNX
graph and its eligibility report) and how nmgraph configures the builder are tested everywhere:
the latter against a recording stand-in for the ``tensorrt`` module.
"""

import importlib.util
import sys
import types

import pytest
import torch

import nmgraph
from nmgraph.errors import BackendUnavailableError
from nmgraph.exporters import tensorrt as nm_trt
from nmgraph.exporters.onnx_export import export

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight.mul_(nmgraph.nm_mask(lin.weight, "2:4"))
    return model, (torch.randn(4, 32),)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_no_gpu_raises_before_exporting(tmp_path):
    model, args = _mlp()
    with pytest.raises(BackendUnavailableError, match=r"NVIDIA GPU .* pip install 'nmgraph\[tensorrt\]'"):
        export(model, tmp_path / "m.engine", args, format="tensorrt")
    assert list(tmp_path.iterdir()) == []  # failed fast: nothing written


@pytest.mark.skipif(HAS_TRT, reason="checks the error raised when tensorrt is not installed")
def test_missing_package_names_what_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(BackendUnavailableError, match=r"'tensorrt' package, which is not installed: pip install 'nmgraph\[tensorrt\]'"):
        nm_trt.require_tensorrt()
    with pytest.raises(BackendUnavailableError, match=r"'torch_tensorrt' package"):
        nm_trt.require_tensorrt("torch_tensorrt")


class _Recorder:
    """A stand-in for the tensorrt module that records how nmgraph configures the builder."""

    def __init__(self, input_shapes):
        self.calls = []
        rec = self
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
        self.BuilderFlag = types.SimpleNamespace(SPARSE_WEIGHTS="SPARSE_WEIGHTS", FP16="FP16")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

        class Input:
            def __init__(self, i):
                self.name, self.shape = f"input_{i}", input_shapes[i]

        class Network:
            num_inputs = len(input_shapes)

            def get_input(self, i):
                return Input(i)

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                rec.calls.append(("profile", name, lo, opt, hi))

        class Config:
            def set_flag(self, flag):
                rec.calls.append(("flag", flag))

            def set_memory_pool_limit(self, pool, size):
                rec.calls.append(("pool", pool, size))

            def add_optimization_profile(self, profile):
                rec.calls.append(("add_profile",))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"engine-bytes"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                rec.calls.append(("parse", path))
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


def test_export_builds_engine_with_sparse_weights(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    fake = _Recorder([(-1, 32)])
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, args = _mlp()
    report = export(model, tmp_path / "m.engine", args, format="tensorrt", fp16=True, dynamic_batch=True,
                    exporter="torchscript")
    # The ONNX TensorRT parses is the checked one: both weights eligible.
    assert report.onnx_path == str(tmp_path / "m.onnx") and set(report.eligible) == {"0.weight", "2.weight"}
    assert report.engine_path == str(tmp_path / "m.engine")
    assert (tmp_path / "m.engine").read_bytes() == b"engine-bytes"
    assert ("parse", str(tmp_path / "m.onnx")) in fake.calls
    assert ("flag", "SPARSE_WEIGHTS") in fake.calls and ("flag", "FP16") in fake.calls
    # Dynamic batch: profile from batch 1 to 4x the example batch, optimum at the example.
    assert ("profile", "input_0", (1, 32), (4, 32), (16, 32)) in fake.calls


def test_fp32_static_engine_has_no_fp16_flag_or_profile(tmp_path, monkeypatch):
    fake = _Recorder([(4, 32)])
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    nm_trt.build_engine(tmp_path / "in.onnx", tmp_path / "out.engine")
    flags = [c[1] for c in fake.calls if c[0] == "flag"]
    assert flags == ["SPARSE_WEIGHTS"]
    assert not any(c[0] == "profile" for c in fake.calls)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (pip install 'nmgraph[tensorrt]' on a GPU machine)")
def test_real_engine_build(tmp_path):
    model, args = _mlp()
    report = export(model, tmp_path / "m.engine", args, format="tensorrt", fp16=True)
    assert (tmp_path / "m.engine").stat().st_size > 0 and report.ok

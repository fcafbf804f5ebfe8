"""The nmgraph CLI: end to end through `python -m nmgraph` (subprocess) and in-process error paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nmgraph
from nmgraph.cli import main
from nmgraph.exporters import serialize

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "tests.test_cli:tiny"


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny():
    """The factory the CLI imports: (model, example_inputs)."""
    torch.manual_seed(0)
    return Tiny().eval(), (torch.randn(4, 16, generator=torch.Generator().manual_seed(1)),)


def only_model():
    return Tiny()


def _run(*argv, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "nmgraph", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _reference_plan():
    model, args = tiny()
    return nmgraph.analyze(nmgraph.capture(model, args), "2:4")


def test_inspect_json_and_plot(tmp_path):
    png = tmp_path / "layers.png"
    res = _run("-q", "inspect", FACTORY, "--json", "--plot", str(png), "--search", "random")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    plan = _reference_plan()
    assert out["plan"] == json.loads(plan.to_json())
    assert [x["name"] for x in out["layers"]] == [i.name for i in plan.layers] + [s.name for s in plan.skipped]
    assert all(x["sparsity"] == 0.5 for x in out["layers"] if x["eligible"])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sparsify_then_export_end_to_end(tmp_path):
    out_dir = tmp_path / "sparse"
    res = _run("-q", "sparsify", FACTORY, "--out", str(out_dir), "--search", "greedy", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    plan = _reference_plan()
    assert [x["name"] for x in summary["convert"]["layers"]] == [i.name for i in plan.layers]
    assert all(x["reason"] == "" for x in summary["convert"]["layers"])

    # The directory loads into the architecture and into its own program, identically.
    model, args = tiny()
    loaded = serialize.load(out_dir, model)
    program = serialize.load(out_dir)
    saved = serialize.read_saved(out_dir)
    assert set(saved.compressed) == {i.name for i in plan.layers}
    for info in plan.layers:
        assert nmgraph.is_nm(dict(loaded.named_parameters())[info.name], "2:4")
    with torch.no_grad():
        assert torch.equal(program(*args), loaded(*args))
    # Permuting and pruning changed the function only through pruning: compare with the same
    # pipeline run in-process (capture, analyze, permute greedy seed 0, convert).
    ref_model, _ = tiny()
    gm = nmgraph.capture(ref_model, args)
    ref_plan = nmgraph.analyze(gm, "2:4")
    nmgraph.permute(gm, ref_plan, search="greedy", seed=0)
    from nmgraph.training import convert

    convert(gm, "2:4", plan=ref_plan)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args), ref_model(*args), rtol=0, atol=0)

    onnx_path = tmp_path / "m.onnx"
    res = _run("-q", "export", str(out_dir), "--out", str(onnx_path), "--json", "--dynamic-batch")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert set(rep["eligible"]) == set(saved.compressed) and rep["lost"] == []
    assert rep["dynamic_batch"] and rep["verified"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 16)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), loaded(x), rtol=1e-3, atol=1e-4)


def test_bad_factory_subprocess_one_line_error():
    res = _run("inspect", "no_such_pkg.models:build")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("nmgraph: error: cannot import module 'no_such_pkg.models'")


@pytest.mark.parametrize("cmd", ["inspect", "sparsify", "export", "bench"])
def test_help_per_subcommand(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    assert f"usage: nmgraph {cmd}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, code, message", [
    (["inspect", "tests.test_cli:nope"], 1, "module 'tests.test_cli' has no callable 'nope'"),
    (["inspect", "tests.test_cli:only_model"], 1, "returned only a model"),
    (["inspect", "missing_dir/"], 1, "does not exist"),
    (["inspect", "justaword"], 1, "neither a directory nor a factory"),
    (["inspect"], 1, "give exactly one model source"),
    (["inspect", FACTORY, "--hf-config", "bert"], 2, "not both"),
    (["inspect", "--hf-config", "nosuchmodel"], 1, "neither a preset"),
    (["inspect", "--hf-config", "missing.json"], 1, "does not exist"),
    (["export", FACTORY, "--out", "x.onnx", "--format", "coreml"], 2, "invalid choice: 'coreml'"),
    (["export", "/nonexistent/saved", "--out", "x.onnx"], 1, "does not exist"),
    (["sparsify", FACTORY], 2, "--out"),
    (["frobnicate"], 2, "invalid choice"),
    (["bench", "gemm", "--dir", "/nonexistent"], 1, "no benchmark script found"),
    (["bench", "nosuch"], 2, "unknown benchmark 'nosuch'"),
])
def test_bad_inputs_clear_errors(argv, code, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err
    if code == 1:
        assert len(err.strip().splitlines()) == 1


def test_not_a_saved_directory(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "m.onnx")]) == 1
    assert "has no nmgraph.json" in capsys.readouterr().err


def test_sparsify_from_trained_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = _reference_plan()
    eligible = {i.name for i in plan.layers}
    trained, _ = tiny()
    with torch.no_grad():
        for name, p in trained.named_parameters():
            p.add_(torch.randn_like(p))  # "training" moved the weights ...
            if name in eligible:
                p.mul_(nmgraph.nm_mask(p, "2:4"))  # ... and left the eligible ones 2:4
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": trained.state_dict()}, ckpt)
    out = tmp_path / "s"
    assert main(["-q", "sparsify", FACTORY, "--checkpoint", str(ckpt), "--out", str(out), "--no-program"]) == 0
    loaded = serialize.load(out, tiny()[0])
    for name, w in trained.state_dict().items():  # a trained N:M checkpoint is kept as it is: no permutation
        assert torch.equal(loaded.state_dict()[name], w), name
    captured = capsys.readouterr()
    assert "compressed" in captured.out and "already: no permutation search" in captured.err
    # a dense pretrained checkpoint gets the permutation search like any dense model
    dense, _ = tiny()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p))
    torch.save(dense.state_dict(), ckpt)
    assert main(["-q", "sparsify", FACTORY, "--checkpoint", str(ckpt), "--out", str(out), "--no-program"]) == 0
    assert "permute: kept magnitude" in capsys.readouterr().out
    permuted = serialize.load(out, tiny()[0])
    assert all(nmgraph.is_nm(permuted.get_parameter(n), "2:4") for n in eligible)
    # A checkpoint of another architecture is refused with the missing names.
    torch.save({"x": torch.zeros(1)}, ckpt)
    assert main(["sparsify", FACTORY, "--checkpoint", str(ckpt), "--out", str(out)]) == 1
    assert "lacks 6 tensors of the model" in capsys.readouterr().err


def test_hf_config_json_inspect(tmp_path, capsys):
    pytest.importorskip("transformers")
    cfg = {"model_type": "bert", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 16,
           "architectures": ["BertModel"]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert main(["-q", "inspect", "--hf-config", str(path), "--seq", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    prefix = "encoder.layer.0."
    # BertModel, 1 layer: the six encoder GEMMs; the pooler's output is a model output (dense head).
    assert {x["name"] for x in plan["layers"]} == {
        prefix + n + ".weight" for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                                         "attention.output.dense", "intermediate.dense", "output.dense")}
    assert "pooler.dense.weight" in {x["name"] for x in plan["skipped"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_tensorrt_without_gpu_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["export", FACTORY, "--out", str(tmp_path / "m.engine"), "--format", "tensorrt"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nmgraph: error: BackendUnavailableError: format='tensorrt' needs an NVIDIA GPU")
    assert "nmgraph[tensorrt]" in err and len(err.splitlines()) == 1


def test_bench_runs_scripts_in_quick_mode(tmp_path, capsys):
    for name in ("gemm", "e2e"):
        (tmp_path / f"{name}.py").write_text(
            "import sys, pathlib\n"
            "pathlib.Path(sys.argv[0]).with_suffix('.args').write_text(' '.join(sys.argv[1:]))\n")
    assert main(["bench", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "gemm.args").read_text() == "--quick"
    assert (tmp_path / "e2e.args").read_text() == "--quick"
    (tmp_path / "e2e.py").write_text("raise SystemExit(3)\n")
    assert main(["bench", "e2e", "--dir", str(tmp_path)]) == 1
    assert "benchmark e2e exited with code 3" in capsys.readouterr().err

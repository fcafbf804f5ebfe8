"""Save / load of N:M models: bit-identical round trips, corrupt and mismatched files."""

import json
import struct
from pathlib import Path

import pytest
import torch

import nmgraph
from nmgraph.errors import PlanError, SerializationError
from nmgraph.exporters.serialize import (
    META_FILE,
    WEIGHTS_FILE,
    load,
    plan_from_dict,
    read_example_inputs,
    read_saved,
    save,
)

from . import hf_models
from .hf_models import first_tensor

pytest.importorskip("safetensors")


def _prune_by_type(model, pattern="2:4"):
    """Prunes Linear / Conv2d / HF Conv1D weights (reference list, by module type); returns names."""
    from transformers.pytorch_utils import Conv1D

    p = nmgraph.Pattern.parse(pattern)
    pruned = set()
    seen = set()
    with torch.no_grad():
        for mname, mod in model.named_modules():
            axis = 0 if isinstance(mod, Conv1D) else 1 if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) else None
            if axis is None or id(mod.weight) in seen or mod.weight.shape[axis] % p.m:
                continue
            seen.add(id(mod.weight))
            # masked_fill keeps pruned entries +0.0, so the round trip is bitwise exact
            mod.weight.masked_fill_(~nmgraph.nm_mask(mod.weight, p, axis=axis), 0.0)
            pruned.add(f"{mname}.weight")
    return pruned


def _bits(t):
    t = t.detach().contiguous()
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32) if t.is_floating_point() else t


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(_bits(sa[k]), _bits(sb[k])), k


@pytest.mark.parametrize("name", ["gpt2", "resnet"])
def test_round_trip_is_bit_identical(name, tmp_path):
    factory = hf_models.FACTORIES[name]
    make = (lambda: factory(layers=1)) if name == "gpt2" else factory
    model, args = make()
    pruned = _prune_by_type(model)
    tied = {"lm_head.weight": "transformer.wte.weight"}
    pruned = {tied.get(n, n) for n in pruned}
    info = save(model, tmp_path / "m", example_inputs=args, program=False)
    assert set(info.compressed) == pruned and info.has_inputs and not info.has_program
    # Bytes stored: compressed values + index planes for N:M weights, the rest as is (tied once).
    state = model.state_dict()
    expect = 0
    for k, v in state.items():
        if name == "gpt2" and k == "lm_head.weight":
            continue
        expect += (nmgraph.compress(v, "2:4", axis=info.compressed[k]["axis"]).nbytes if k in pruned
                   else v.numel() * v.element_size())
    assert info.nbytes == expect and info.nbytes < info.dense_nbytes

    fresh, _ = make()
    loaded = load(tmp_path / "m", fresh)
    assert loaded is fresh
    _assert_same_state(model, loaded)
    with torch.no_grad():
        assert torch.equal(first_tensor(loaded(*args)), first_tensor(model(*args)))
    if name == "gpt2":  # ties survive: one tensor under both names
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_program_loads_without_the_class_and_with_another_batch(tmp_path):
    model, args = hf_models.bert(layers=1)
    _prune_by_type(model)
    save(model, tmp_path / "m", example_inputs=args)
    assert read_saved(tmp_path / "m").has_program
    program = load(tmp_path / "m")
    assert isinstance(program, torch.fx.GraphModule)
    x = torch.cat([args[0], args[0][:1]])  # batch 3: the program was saved with a dynamic batch
    with torch.no_grad():
        assert torch.equal(first_tensor(program(*args)), first_tensor(model(*args)))
        assert torch.equal(first_tensor(program(x)), first_tensor(model(x)))
    saved_args, saved_kwargs = read_example_inputs(tmp_path / "m")
    assert torch.equal(saved_args[0], args[0]) and saved_kwargs == {}


def _mlp(seed=0, hidden=32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 8))
    _prune_by_type(model)
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip(dtype, tmp_path):
    model = _mlp().to(dtype)
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m", lambda: (_mlp(seed=1).to(dtype), None))
    _assert_same_state(model, loaded)


def test_plan_and_permutations_round_trip(tmp_path):
    model = _mlp()
    gm = nmgraph.capture(model, (torch.randn(2, 16),))
    plan = nmgraph.analyze(gm, "2:4")
    perms = {g.id: g.random_permutation(torch.Generator().manual_seed(0)) for g in plan.groups}
    saved = save(model, tmp_path / "m", plan=plan, permutations=perms, metadata={"note": "x"})
    assert plan_from_dict(plan.to_dict()) == plan
    assert saved.plan == plan
    assert saved.permutations == {k: v.tolist() for k, v in perms.items()}
    assert saved.metadata == {"note": "x"}
    assert set(saved.compressed) == {info.name for info in plan.layers}


def test_plan_layer_not_nm_is_refused(tmp_path):
    model = _mlp()
    gm = nmgraph.capture(model, (torch.randn(2, 16),))
    plan = nmgraph.analyze(gm, "2:4")
    name = plan.layers[0].name
    with torch.no_grad():
        dict(model.named_parameters())[name].copy_(torch.randn(32, 16))
    with pytest.raises(PlanError, match=rf"Cannot save {name}: the plan lists it as 2:4 .* nmgraph.convert"):
        save(model, tmp_path / "m", plan=plan)


def _data_offset(file, key):
    """Byte offset of tensor ``key``'s data inside a safetensors file (header parsed by hand)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return 8 + n + header[key]["data_offsets"][0]


def test_corrupt_tensor_is_named(tmp_path):
    model = _mlp()
    save(model, tmp_path / "m")
    file = tmp_path / "m" / WEIGHTS_FILE
    key = "0.weight::nm.values"
    off = _data_offset(file, key)
    raw = bytearray(file.read_bytes())
    raw[off + 1] ^= 0x40
    file.write_bytes(bytes(raw))
    with pytest.raises(SerializationError, match=r"Tensor '0\.weight::nm\.values' .* fails its SHA-256 check"):
        load(tmp_path / "m", _mlp(seed=1))


def test_truncated_and_missing_files(tmp_path):
    model = _mlp()
    save(model, tmp_path / "m")
    file = tmp_path / "m" / WEIGHTS_FILE
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(SerializationError, match="corrupt or not a safetensors file"):
        load(tmp_path / "m", _mlp())
    file.unlink()
    with pytest.raises(SerializationError, match=f"missing {WEIGHTS_FILE}"):
        load(tmp_path / "m", _mlp())
    (tmp_path / "m" / META_FILE).write_text("{not json")
    with pytest.raises(SerializationError, match="not valid JSON"):
        load(tmp_path / "m", _mlp())
    with pytest.raises(SerializationError, match="not a directory saved by"):
        load(tmp_path / "nowhere", _mlp())


def test_newer_format_is_refused(tmp_path):
    save(_mlp(), tmp_path / "m")
    meta_file = tmp_path / "m" / META_FILE
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(SerializationError, match="format version 99"):
        load(tmp_path / "m", _mlp())


def test_mismatched_model_names_the_tensor(tmp_path):
    save(_mlp(), tmp_path / "m")
    with pytest.raises(SerializationError, match=r"Tensor '0\.weight' has shape \[32, 16\] .* but \[64, 16\]"):
        load(tmp_path / "m", _mlp(hidden=64))
    with pytest.raises(SerializationError, match=r"Tensor '0\.weight' is torch.float32 .* but torch.float16 .* does not cast"):
        load(tmp_path / "m", _mlp().half())
    other = torch.nn.Sequential(torch.nn.Linear(16, 32))
    with pytest.raises(SerializationError, match=r"the save has tensors the model lacks: \['2\.bias'"):
        load(tmp_path / "m", other)
    with pytest.raises(SerializationError, match=r"no program\.pt2: pass the model"):
        load(tmp_path / "m")


def test_docs_walkthrough_runs(tmp_path, monkeypatch):
    """The prepare -> train -> convert -> export -> save walk-through of docs/export.md runs as written."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("nmgraph.training")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    section = doc.split("## Walk-through", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/export.md", "exec"), namespace)  # its asserts are the checks
    report = namespace["report"]
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model_nm" / META_FILE).is_file()
    assert set(report.eligible) == {"0.weight", "2.weight"} and not report.lost

"""Save / load of N:M models: bit-identical round trips, corrupt and mismatched files."""

import hashlib
import json
import struct
import sys
from pathlib import Path

import pytest
import torch

import nmgraph
from nmgraph.errors import PlanError, SerializationError
from nmgraph.exporters.serialize import (
    META_FILE,
    WEIGHTS_FILE,
    load,
    manifest_digest,
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


# --- what a checkpoint refuses (docs/reliability.md) ------------------------------------------------


def _meta(root):
    return json.loads((root / META_FILE).read_text())


def _write_meta(root, meta, resign=True, key=None):
    """Writes an edited manifest; ``resign`` recomputes its digest as an attacker without the key can."""
    if resign:
        meta["signature"] = {"algorithm": "hmac-sha256" if key else "sha256", "digest": manifest_digest(meta, key)}
    (root / META_FILE).write_text(json.dumps(meta))


def _mlp4(seed=0):
    """Two layers of the same shape (2 and 4): a tampered alias could copy one into the other."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    _prune_by_type(model)
    return model


@pytest.mark.parametrize("field", ["pattern", "compressed", "dense", "aliases", "tensors", "plan", "permutations",
                                   "program", "program_imports", "inputs", "nbytes", "metadata", "files",
                                   "model_class", "nmgraph_version"])
def test_any_edit_of_the_manifest_is_refused(field, tmp_path):
    model = _mlp()
    x = torch.randn(2, 16)
    gm = nmgraph.capture(model, (x,))
    save(model, tmp_path / "m", plan=nmgraph.analyze(gm), permutations={0: torch.arange(32)},
         example_inputs=(x,), program=False, metadata={"note": "x"})
    meta = _meta(tmp_path / "m")
    meta[field] = {"pattern": "1:4", "nbytes": 1, "program": "program.pt2", "inputs": None,
                   "program_imports": ["os"], "model_class": "x.Y", "nmgraph_version": "0"}.get(field, {"x": []})
    _write_meta(tmp_path / "m", meta, resign=False)
    with pytest.raises(SerializationError, match=r"nmgraph\.json' fails its sha256 signature check: the manifest "
                                                 r"was edited after save"):
        load(tmp_path / "m", _mlp(seed=1))
    with pytest.raises(SerializationError, match="signature check"):
        read_saved(tmp_path / "m")


def test_an_alias_cannot_rewire_one_layer_into_another(tmp_path):
    model = _mlp4()
    save(model, tmp_path / "m")
    meta = _meta(tmp_path / "m")
    meta["compressed"].pop("4.weight")
    for k in [k for k in meta["tensors"] if k.startswith("4.weight::")]:
        meta["tensors"].pop(k)
    meta["aliases"]["4.weight"] = "2.weight"
    _write_meta(tmp_path / "m", meta, resign=False)
    target = _mlp4(seed=1)
    snap = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(SerializationError, match="signature check"):
        load(tmp_path / "m", target)
    # a forger who also rewrites the weights file, its hash and the digest
    from safetensors.torch import load_file, save_file

    file = tmp_path / "m" / WEIGHTS_FILE
    tensors = {k: v for k, v in load_file(str(file)).items() if not k.startswith("4.weight::")}
    save_file(tensors, str(file), metadata={"format": "nmgraph", "format_version": "3"})
    meta["files"][WEIGHTS_FILE] = {"sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                                   "size": file.stat().st_size}
    _write_meta(tmp_path / "m", meta)
    with pytest.raises(SerializationError, match=r"ties '4\.weight' to '2\.weight', but in Sequential they are "
                                                 r"different tensors: loading would copy one layer's weights"):
        load(tmp_path / "m", target)
    assert all(torch.equal(v, snap[k]) for k, v in target.state_dict().items())  # untouched
    meta["aliases"] = {"4.weight": "9.weight"}
    _write_meta(tmp_path / "m", meta)
    with pytest.raises(SerializationError, match=r"field 'aliases' ties '4\.weight' to '9\.weight', which is not a "
                                                 r"stored tensor"):
        load(tmp_path / "m", target)
    meta["aliases"] = {"0.bias": "2.bias"}
    _write_meta(tmp_path / "m", meta)
    with pytest.raises(SerializationError, match=r"field 'aliases' names '0\.bias' as tied to '2\.bias', but "
                                                 r"'0\.bias' is stored itself"):
        load(tmp_path / "m", target)


def test_a_program_copied_from_another_save_is_refused(tmp_path):
    x = torch.randn(2, 16)
    save(_mlp(seed=0), tmp_path / "a", example_inputs=(x,))
    save(_mlp(seed=5, hidden=64), tmp_path / "b", example_inputs=(x,))
    (tmp_path / "a" / "program.pt2").write_bytes((tmp_path / "b" / "program.pt2").read_bytes())
    with pytest.raises(SerializationError, match=r"program\.pt2' fails its SHA-256 check .* copied from another save"):
        load(tmp_path / "a")


def test_program_imports_are_never_imported_without_permission(tmp_path, monkeypatch):
    probe = tmp_path / "lib" / "nmgraph_import_probe.py"
    probe.parent.mkdir()
    marker = tmp_path / "imported"
    probe.write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(probe.parent))
    monkeypatch.delitem(sys.modules, "nmgraph_import_probe", raising=False)
    model = _mlp()
    x = torch.randn(2, 16)
    save(model, tmp_path / "m", example_inputs=(x,))
    meta = _meta(tmp_path / "m")
    meta["program_imports"] = ["nmgraph_import_probe"]
    _write_meta(tmp_path / "m", meta, resign=False)
    with pytest.raises(SerializationError, match="signature check"):
        load(tmp_path / "m")
    assert not marker.exists()  # verification comes before any import
    _write_meta(tmp_path / "m", meta)
    with pytest.raises(SerializationError, match=r"types defined in \['nmgraph_import_probe'\], which are not "
                                                 r"imported; nmgraph imports nothing .* allow_imports="):
        load(tmp_path / "m")
    assert not marker.exists()
    program = load(tmp_path / "m", allow_imports=["nmgraph_import_probe"])
    assert marker.exists()
    with torch.no_grad():
        assert torch.equal(program(x), model(x))
    meta["program_imports"] = ["os; import shutil"]
    _write_meta(tmp_path / "m", meta)
    with pytest.raises(SerializationError, match=r"field 'program_imports' must be a list of module names"):
        load(tmp_path / "m")


def test_a_flipped_byte_in_the_inputs_is_refused(tmp_path):
    x = torch.randn(2, 16)
    save(_mlp(), tmp_path / "m", example_inputs=(x,), program=False)
    file = tmp_path / "m" / "inputs.safetensors"
    raw = bytearray(file.read_bytes())
    raw[_data_offset(file, "args.0") + 3] ^= 0x01
    file.write_bytes(bytes(raw))
    with pytest.raises(SerializationError, match=r"inputs\.safetensors' fails its SHA-256 check"):
        read_example_inputs(tmp_path / "m")
    with pytest.raises(SerializationError, match=r"inputs\.safetensors' fails its SHA-256 check"):
        load(tmp_path / "m", _mlp(seed=1))


def test_a_changed_weights_header_is_refused(tmp_path):
    save(_mlp(), tmp_path / "m")
    file = tmp_path / "m" / WEIGHTS_FILE
    raw = file.read_bytes()
    file.write_bytes(raw.replace(b'"format_version":"3"', b'"format_version":"4"'))
    with pytest.raises(SerializationError, match=r"though every tensor matches its own: its header or metadata"):
        load(tmp_path / "m", _mlp(seed=1))


def test_a_file_save_did_not_write_is_refused(tmp_path):
    x = torch.randn(2, 16)
    save(_mlp(), tmp_path / "a", example_inputs=(x,))
    save(_mlp(), tmp_path / "m", program=False)
    (tmp_path / "m" / "program.pt2").write_bytes((tmp_path / "a" / "program.pt2").read_bytes())
    with pytest.raises(SerializationError, match=r"program\.pt2' is not listed in nmgraph\.json: it was added after save"):
        load(tmp_path / "m", _mlp())
    (tmp_path / "m" / "notes.txt").write_text("files nmgraph does not write are not its business")
    (tmp_path / "m" / "program.pt2").unlink()
    load(tmp_path / "m", _mlp())


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(compressed=[]), r"field 'compressed' must be an object"),
    (lambda m: m.update(tensors=list(m["tensors"])), r"field 'tensors' must be an object"),
    (lambda m: m["tensors"]["0.weight::nm.values"].pop("sha256"),
     r"field \"tensors\['0\.weight::nm\.values'\]\" must be an object with exactly 'sha256'"),
    (lambda m: m["tensors"]["0.bias"].update(sha256="00"), r"field \"tensors\['0\.bias'\]\.sha256\" must be 64 hex"),
    (lambda m: m["tensors"]["0.bias"].update(dtype="torch.float128"), r"\.dtype\" must be one of"),
    (lambda m: m["tensors"]["0.bias"].update(shape=[-1]), r"\.shape\" must be a list of sizes >= 0"),
    (lambda m: m.update(aliases=None), r"field 'aliases' must be an object \{tied name: stored name\}, got None"),
    (lambda m: m.update(dense={"a": 1}), r"field 'dense' must be an object"),
    (lambda m: m.update(pattern="4:2"), r"field 'pattern' must be an 'N:M' string, got '4:2'"),
    (lambda m: m.update(nbytes=-1), r"field 'nbytes' must be an integer >= 0"),
    (lambda m: m.update(program="../../etc/passwd"), r"field 'program' must be null or 'program\.pt2'"),
    (lambda m: m.update(permutations={"0": [0.5]}), r"field 'permutations' must be null or an object"),
    (lambda m: m.update(plan={"layers": 3}), r"The saved plan is malformed"),
    (lambda m: m.update(metadata=[]), r"field 'metadata' must be an object"),
    (lambda m: m.pop("files"), r"is missing the 'files' field"),
    (lambda m: m.update(files={}), r"field 'files' must be the files \['weights\.safetensors'\]"),
    (lambda m: m["compressed"]["0.weight"].update(axis=5), r"field \"compressed\['0\.weight'\]\.axis\" must be an axis"),
    (lambda m: m["compressed"]["0.weight"].update(n=1), r"compressed\['0\.weight'\]\.n/m\" must be the checkpoint's"),
    (lambda m: m.update(extra=1), r"has fields this nmgraph does not write: \['extra'\]"),
])
def test_malformed_fields_are_named(edit, match, tmp_path):
    save(_mlp(), tmp_path / "m")
    meta = _meta(tmp_path / "m")
    edit(meta)
    _write_meta(tmp_path / "m", meta)
    with pytest.raises(SerializationError, match=match):
        load(tmp_path / "m", _mlp(seed=1))


def test_a_missing_or_malformed_signature_is_refused(tmp_path):
    save(_mlp(), tmp_path / "m")
    meta = _meta(tmp_path / "m")
    meta.pop("signature")
    _write_meta(tmp_path / "m", meta, resign=False)
    with pytest.raises(SerializationError, match=r"field 'signature' is missing or malformed"):
        load(tmp_path / "m", _mlp())
    meta["format_version"] = 1  # an unsigned checkpoint of the first format
    _write_meta(tmp_path / "m", meta, resign=False)
    with pytest.raises(SerializationError, match=r"format version 1, written by an nmgraph that did not sign"):
        load(tmp_path / "m", _mlp())


def test_a_checkpoint_signed_with_a_key(tmp_path):
    model = _mlp()
    info = save(model, tmp_path / "m", key="s3cret")
    assert info.signature == "hmac-sha256"
    with pytest.raises(SerializationError, match=r"signed with a key \(HMAC-SHA256\): pass the key"):
        load(tmp_path / "m", _mlp(seed=1))
    with pytest.raises(SerializationError, match=r"fails its hmac-sha256 signature check.*or the key is wrong"):
        load(tmp_path / "m", _mlp(seed=1), key="guess")
    _assert_same_state(model, load(tmp_path / "m", _mlp(seed=1), key=b"s3cret"))
    meta = _meta(tmp_path / "m")
    meta["metadata"] = {"edited": True}
    _write_meta(tmp_path / "m", meta)  # re-signed without the key: a plain SHA-256
    with pytest.raises(SerializationError, match=r"is not signed with a key .* refusing it"):
        load(tmp_path / "m", _mlp(seed=1), key="s3cret")


@pytest.mark.parametrize("where", ["weights", "swap"])
def test_an_interrupted_save_keeps_the_previous_checkpoint(where, tmp_path, monkeypatch):
    import os

    import safetensors.torch

    old = _mlp(seed=0)
    x = torch.randn(2, 16)
    save(old, tmp_path / "m", example_inputs=(x,), program=False)
    (tmp_path / "m" / "README.txt").write_text("mine")
    if where == "weights":
        real = safetensors.torch.save_file
        calls = []

        def fake(*a, **k):  # the inputs file is written, then the interrupt hits the weights
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(safetensors.torch, "save_file", fake)
    else:
        real_replace = os.replace
        calls = []

        def fake_replace(src, dst):  # two old files moved aside, one new one moved in, then the interrupt
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", fake_replace)
    with pytest.raises(KeyboardInterrupt):
        save(_mlp(seed=7), tmp_path / "m", example_inputs=(torch.randn(3, 16),), program=False)
    monkeypatch.undo()
    _assert_same_state(old, load(tmp_path / "m", _mlp(seed=1)))
    args, _ = read_example_inputs(tmp_path / "m")
    assert torch.equal(args[0], x)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.txt", "inputs.safetensors",
                                                                  "nmgraph.json", "weights.safetensors"]
    new = _mlp(seed=7)
    save(new, tmp_path / "m", program=False)  # a later save replaces nmgraph's files, and only those
    _assert_same_state(new, load(tmp_path / "m", _mlp(seed=1)))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.txt", "nmgraph.json", "weights.safetensors"]


def test_save_to_a_path_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SerializationError, match=r"Cannot create the directory .*file/m.* pass a path under a "
                                                 r"directory you can write to"):
        save(_mlp(), tmp_path / "file" / "m")
    with pytest.raises(SerializationError, match=r"exists and is not a directory"):
        save(_mlp(), tmp_path / "file")


def test_an_interrupted_load_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    save(_mlp(seed=0), tmp_path / "m")
    target = _mlp(seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    real_copy, real_load = torch.Tensor.copy_, torch.nn.Module.load_state_dict
    calls: list[int] = []
    loading = []

    def copy_(self, *a, **k):  # inside load_state_dict: two tensors are copied, then the interrupt hits
        if loading:
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real_copy(self, *a, **k)

    def load_state_dict(self, *a, **k):
        loading.append(1)
        try:
            return real_load(self, *a, **k)
        finally:
            loading.clear()

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", load_state_dict)
    with pytest.raises(KeyboardInterrupt):
        load(tmp_path / "m", target)
    monkeypatch.undo()
    assert len(calls) == 3  # two tensors had been loaded
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def _bit_planes(positions, m):
    """The index layout of format version 2: bit b of the position of kept entry j at bit j % 8 of
    planes[b, row, j // 8]."""
    bits = max(1, (m - 1).bit_length())
    rows, kept = positions.shape
    planes = torch.stack([(positions >> b) & 1 for b in range(bits)])
    planes = torch.nn.functional.pad(planes, (0, -kept % 8)).view(bits, rows, -1, 8)
    return (planes * (2 ** torch.arange(8))).sum(-1).to(torch.uint8)


def _rewrite_as_version_2(root):
    """Turns a saved directory into what format version 2 wrote (bit-plane indices), signed."""
    from safetensors.torch import load_file, save_file

    meta = _meta(root)
    file = root / WEIGHTS_FILE
    tensors = load_file(str(file))
    for name, info in meta["compressed"].items():
        c = nmgraph.CompressedNM.from_state_dict(tensors, prefix=f"{name}::nm.")
        tensors[f"{name}::nm.indices"] = _bit_planes(c.unpack_indices(), info["m"]).contiguous()
    save_file(tensors, str(file), metadata={"format": "nmgraph", "format_version": "2"})
    meta["format_version"] = 2
    meta["tensors"] = {k: {"sha256": hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                           .hexdigest(), "dtype": str(t.dtype), "shape": list(t.shape)} for k, t in tensors.items()}
    meta["files"][WEIGHTS_FILE] = {"sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                                   "size": file.stat().st_size}
    _write_meta(root, meta)
    return tensors


def test_a_version_2_checkpoint_with_bit_planes_still_loads(tmp_path):
    model = _mlp().to(torch.bfloat16)
    save(model, tmp_path / "m")
    tensors = _rewrite_as_version_2(tmp_path / "m")
    assert tensors["0.weight::nm.indices"].shape == (2, 32, 1)  # 2 planes, 32 rows, 8 kept -> 1 byte
    loaded = load(tmp_path / "m", _mlp(seed=1).to(torch.bfloat16))
    _assert_same_state(model, loaded)
    # saving it again writes the current version, with the combination code
    save(loaded, tmp_path / "again")
    assert _meta(tmp_path / "again")["format_version"] == 3


def test_indices_that_disagree_with_the_version_are_refused(tmp_path):
    save(_mlp(), tmp_path / "m")
    _rewrite_as_version_2(tmp_path / "m")
    meta = _meta(tmp_path / "m")
    meta["format_version"] = 3
    _write_meta(tmp_path / "m", meta)
    with pytest.raises(SerializationError, match=r"'0\.weight' stores its indices as bit planes, but nmgraph\.json "
                                                 r"says format version 3"):
        load(tmp_path / "m", _mlp(seed=1))


def test_an_index_code_no_weight_has_is_refused(tmp_path):
    """A checkpoint whose hashes match but whose index bytes are out of the code's range (written by
    another tool): refused, naming the weight, not decoded to some other weights."""
    from safetensors.torch import load_file, save_file

    save(_mlp(), tmp_path / "m")
    meta = _meta(tmp_path / "m")
    file = tmp_path / "m" / WEIGHTS_FILE
    tensors = load_file(str(file))
    tensors["0.weight::nm.indices"][0, 0] = 255  # 2:4 packs 3 ranks of 6 per byte: 216 values
    save_file(tensors, str(file), metadata={"format": "nmgraph", "format_version": "3"})
    key = "0.weight::nm.indices"
    meta["tensors"][key]["sha256"] = hashlib.sha256(tensors[key].contiguous().view(-1).numpy().tobytes()).hexdigest()
    meta["files"][WEIGHTS_FILE] = {"sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                                   "size": file.stat().st_size}
    _write_meta(tmp_path / "m", meta)
    with pytest.raises(SerializationError, match=r"Compressed weight '0\.weight': .*index bytes that no 2:4 weight"):
        load(tmp_path / "m", _mlp(seed=1))

"""HF in, HF out: sharded bf16 directories read as stored, N:M directories that from_pretrained loads."""

from __future__ import annotations

import json

import pytest
import torch

import nmgraph
from nmgraph.exporters import hf

from . import hf_models

transformers = pytest.importorskip("transformers")


def _saved_llama(tmp_path, dtype=torch.bfloat16):
    """A tiny Llama saved as the Hub stores big ones: bf16, sharded safetensors with an index."""
    model, _ = hf_models.llama(layers=1, use_cache=True)
    model = model.to(dtype)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="60KB")
    assert (src / "model.safetensors.index.json").is_file()
    assert len(list(src.glob("model-*.safetensors"))) >= 2
    return model, src


def _pruned(model):
    ids = torch.randint(0, hf_models.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    gm = nmgraph.capture(model, (ids,))
    plan = nmgraph.analyze(gm, "2:4")
    nmgraph.convert(gm, "2:4", plan=plan)
    return plan


def test_a_sharded_bf16_directory_is_read_as_stored(tmp_path):
    model, src = _saved_llama(tmp_path)
    back = nmgraph.from_pretrained(src)
    assert type(back) is type(model) and back.dtype == torch.bfloat16
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_dense_output_is_an_hf_directory_with_a_sparsity_section_and_a_card(tmp_path):
    _, src = _saved_llama(tmp_path)
    model = nmgraph.from_pretrained(src)
    plan = _pruned(model)
    out = tmp_path / "out"
    saved = nmgraph.save_pretrained(model, out, plan=plan, method="magnitude",
                                    output_change={"relative_error": 0.125})
    assert saved.format == "dense" and set(saved.weights) == {i.name for i in plan.layers}
    section = json.loads((out / "config.json").read_text())["nmgraph"]
    assert section["pattern"] == "2:4" and section["format"] == "dense" and section["method"] == "magnitude"
    assert section["weights"] == {i.name: i.axis for i in plan.layers}
    assert set(section["dense"]) == {s.name for s in plan.skipped}
    assert section["permutation"] == {"applied": False, "groups": 0, "file": None}
    back = transformers.AutoModelForCausalLM.from_pretrained(out)  # a stock loader, nothing of nmgraph
    assert back.dtype == torch.bfloat16
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    assert all(nmgraph.is_nm(back.get_parameter(n), "2:4", axis=a) for n, a in section["weights"].items())
    card = (out / "README.md").read_text()
    assert "## N:M sparsity (nmgraph)" in card and "pruned by magnitude" in card
    assert "relative error 0.125" in card and "`model.layers.*.mlp.up_proj.weight` | 1" in card
    assert "`lm_head.weight`: output head kept dense" in card
    # saving again replaces the card section and the weights (no stale shard is left next to them)
    nmgraph.save_pretrained(model, out, plan=plan, method="magnitude")
    assert (out / "README.md").read_text().count("## N:M sparsity (nmgraph)") == 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


def test_a_plan_weight_that_is_not_nm_is_refused(tmp_path):
    model, _ = hf_models.llama(layers=1)
    ids = torch.randint(0, hf_models.VOCAB, (2, 8))
    plan = nmgraph.analyze(nmgraph.capture(model, (ids,)), "2:4")
    with pytest.raises(nmgraph.PlanError, match=r"Cannot save model\.layers\.0\..*the plan lists it as 2:4"):
        nmgraph.save_pretrained(model, tmp_path / "out", plan=plan)
    assert not (tmp_path / "out").exists()


def test_compressed_output_reads_back_bit_exact_and_stores_under_0_55_of_the_nm_bytes(tmp_path):
    _, src = _saved_llama(tmp_path)
    model = nmgraph.from_pretrained(src)
    plan = _pruned(model)
    out = tmp_path / "packed"
    saved = nmgraph.save_pretrained(model, out, plan=plan, compressed=True)
    assert saved.format == "compressed"
    params = dict(model.named_parameters())
    nm_dense = sum(params[n].numel() * 2 for n in saved.weights)  # bf16
    # kept values (half the entries, 2 bytes each) + one byte per 3 groups of 4 in every row
    nm_stored = sum(params[n].numel() + params[n].shape[0] * -(-params[n].shape[1] // 12) for n in saved.weights)
    others = sum(p.numel() * 2 for n, p in params.items() if n not in saved.weights)
    assert saved.nbytes == nm_stored + others and nm_stored / nm_dense < 0.55
    assert saved.ratio < 0.75
    for back in (nmgraph.load(out), nmgraph.from_pretrained(out)):
        assert type(back) is type(model) and back.dtype == torch.bfloat16
        assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, hf_models.VOCAB, (1, 4))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert back.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 6)


def test_side_files_are_copied_and_weights_are_not(tmp_path):
    _, src = _saved_llama(tmp_path)
    (src / "tokenizer_config.json").write_text("{}")
    (tmp_path / "out").mkdir()
    copied = hf.copy_side_files(src, tmp_path / "out")
    assert copied == ["generation_config.json", "tokenizer_config.json"]


def test_the_sparsify_report_counts_the_bytes_the_compressed_form_stores(tmp_path):
    """bytes_sparse of nmgraph.sparsify is what save_pretrained(compressed=True) writes (one size function)."""
    model, inputs = hf_models.llama(layers=1)
    model = model.to(torch.bfloat16)
    report = nmgraph.sparsify(model, "2:4", example_inputs=inputs, permute=False)
    saved = nmgraph.save_pretrained(model, tmp_path / "packed", compressed=True, report=report)
    summary = report.summary()
    assert summary["bytes_dense"] == saved.dense_nbytes
    assert summary["bytes_sparse"] == saved.nbytes < saved.dense_nbytes

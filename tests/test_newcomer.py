"""The newcomer's path end to end, on a Llama saved as the Hub stores one (sharded safetensors, bf16):

``nmgraph sparsify DIR --out OUT`` (bounded, with progress) -> ``from_pretrained(OUT)`` generates with
exactly N:M weights -> the Trainer recipe fine-tunes it (a smaller last batch, gradient
checkpointing) and resumes from a Trainer checkpoint -> the ONNX export has dynamic axes.
"""

from __future__ import annotations

import json

import pytest
import torch

import nmgraph
from nmgraph.cli import main

from . import hf_models

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("onnxruntime")


def _collate(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _texts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, hf_models.VOCAB, (int(n),), generator=g) for n in torch.randint(4, 10, (5,), generator=g)]


def _prepared(out):
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    example = _collate(_texts()[:2])
    example.pop("labels")
    return nmgraph.prepare(model, example, "2:4", method="sr-ste", inplace=True, total_steps=4, permute=False)


def _trainer(model, run):
    args = transformers.TrainingArguments(
        output_dir=str(run), per_device_train_batch_size=2, max_steps=4, gradient_checkpointing=True, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-3, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=_texts(), data_collator=_collate,
                                callbacks=[nmgraph.SparsityCallback(model)])


@pytest.mark.slow
def test_newcomer_path_on_a_sharded_bf16_llama(tmp_path, capsys):
    model, _ = hf_models.llama(layers=1, use_cache=True)
    src, out = tmp_path / "llama", tmp_path / "llama-2of4"
    model.to(torch.bfloat16).save_pretrained(src, max_shard_size="60KB")
    assert (src / "model.safetensors.index.json").is_file()

    assert main(["sparsify", str(src), "--out", str(out), "--time-limit", "20"]) == 0
    printed = capsys.readouterr()
    assert "sparsify 2:4 by magnitude" in printed.out and "(limit 20 s)" in printed.out
    assert "wrote" in printed.out and "from_pretrained" in printed.out

    section = json.loads((out / "config.json").read_text())["nmgraph"]
    assert section["pattern"] == "2:4" and len(section["weights"]) == 7
    sparse = transformers.AutoModelForCausalLM.from_pretrained(out)  # stock transformers
    assert sparse.dtype == torch.bfloat16
    assert all(nmgraph.is_nm(sparse.get_parameter(n), "2:4", axis=a) for n, a in section["weights"].items())
    assert sparse.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)

    # fine-tune with the Trainer: 5 samples in batches of 2 (the last has 1), gradient checkpointing
    tuned = _prepared(out)
    _trainer(tuned, tmp_path / "run").train()
    assert tuned.is_gradient_checkpointing and int(tuned.nmgraph_sparsity.step) == 4
    resumed = _prepared(out)
    _trainer(resumed, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    a, b = tuned.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    nmgraph.convert(tuned)
    assert type(tuned) is type(sparse)
    assert all(nmgraph.is_nm(tuned.get_parameter(n), "2:4", axis=ax) for n, ax in section["weights"].items())

    ids = torch.randint(1, hf_models.VOCAB, (2, 6))
    report = nmgraph.export(tuned, tmp_path / "llama.onnx", (ids,), "2:4")
    assert report.ok and report.input_names == ("input_ids", "attention_mask") and report.output_names == ("logits",)
    assert report.dynamic_axes["input_ids"] == {0: "batch", 1: "seq"}
    assert report.dynamic_axes["logits"] == {0: "batch", 1: "seq"}

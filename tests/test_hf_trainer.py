"""The HF Trainer recipe on the user's own model: prepare(inplace=True) + SparsityCallback + convert.

Each run keeps the habits of a plain fine-tune: a padding collator with variable lengths and a
smaller last batch, gradient checkpointing, evaluation, checkpoints that ``from_pretrained`` reads and
that ``resume_from_checkpoint`` continues bit for bit, then ``convert`` to a plain N:M model that
still generates.
"""

from __future__ import annotations

import json

import pytest
import torch

import nmgraph
from nmgraph.masking import masked_weights

from . import hf_models

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

VOCAB = hf_models.VOCAB
SAMPLES, BATCH, STEPS = 10, 4, 6  # 3 steps per epoch, the last one on 2 samples


def _llama():
    model, _ = hf_models.llama(layers=1, use_cache=True)
    return model


def _qwen2():
    model, _ = hf_models.qwen2(layers=1)
    return model


def _bert():
    model, _ = hf_models.bert(layers=1)
    return model


MODELS = {"llama": (_llama, True), "qwen2": (_qwen2, True), "bert": (_bert, False)}


class _Texts(torch.utils.data.Dataset):
    def __init__(self, causal: bool, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(5, 12, (SAMPLES,), generator=g)
        self.items = [torch.randint(1, VOCAB, (int(n),), generator=g) for n in lengths]
        self.labels = torch.randint(0, 3, (SAMPLES,), generator=g)
        self.causal = causal

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "label": self.labels[i]}


def _collate(causal: bool):
    def collate(items):
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(items):
            ids[i, : len(x["input_ids"])] = x["input_ids"]
            mask[i, : len(x["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100) if causal else torch.stack([x["label"] for x in items])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def _prepared(name: str):
    factory, causal = MODELS[name]
    torch.manual_seed(0)
    model = factory().train()
    example = _collate(causal)([_Texts(causal)[i] for i in range(2)])
    example.pop("labels")
    # llama: a random permutation exercises the permutation of the user's module (checked on its own output)
    out = nmgraph.prepare(model, example, "2:4", method="sr-ste", inplace=True, total_steps=STEPS,
                          permute=name == "llama", search="random")
    assert out is model
    return model, causal


def _trainer(model, causal, out_dir, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        max_steps=STEPS, gradient_checkpointing=True, eval_strategy="steps", eval_steps=3, save_steps=3,
        logging_steps=1, report_to=[], use_cpu=True, learning_rate=2e-3, disable_tqdm=True, seed=0, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=_Texts(causal), eval_dataset=_Texts(causal, 1),
                                data_collator=_collate(causal), callbacks=[nmgraph.SparsityCallback(model)])


def _hard_forward_matches_masks(model, batch):
    """In eval mode the prepared model computes exactly the plain model with weights * hard mask."""
    masks = {p.state.weight_name: p.state.hard for _, _, p in masked_weights(model)}
    params = {n: nmgraph.masking.latent_weight(model, n) for n in masks}
    model.eval()
    with torch.no_grad():
        got = model(**batch).logits
        plain = type(model)(model.config).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("nmgraph_sparsity")})
        for n, m in masks.items():
            plain.get_parameter(n).mul_(m)
        want = plain(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert set(params) and all(not nmgraph.is_nm(w, "2:4") for w in params.values())  # latent stays dense


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_trainer_recipe_partial_batch_checkpointing_eval_resume_convert(name, tmp_path):
    model, causal = _prepared(name)
    cls = type(model)
    trainer = _trainer(model, causal, tmp_path / "run")
    assert isinstance(trainer.callback_handler.callbacks[-1], transformers.TrainerCallback) or any(
        isinstance(c, nmgraph.SparsityCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    assert model.is_gradient_checkpointing
    assert int(model.nmgraph_sparsity.step) == STEPS
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == STEPS
    assert all(r["nm_sparsity"] == 0.5 and r["nm_phase"] == "sparse" and r["nm_pattern"] == "2:4" for r in logs)
    assert all(0.0 <= r["nm_mask_flips"] <= 1.0 for r in logs)
    assert any("eval_loss" in r for r in trainer.state.log_history)

    # a Trainer checkpoint is an HF directory: config.json, and from_pretrained reads the latent weights
    ckpt = tmp_path / "run" / f"checkpoint-{STEPS}"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == [cls.__name__]
    plain = cls.from_pretrained(ckpt)
    latent = {k: v for k, v in model.state_dict().items() if not k.startswith("nmgraph_sparsity")}
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in latent.items())

    # resuming from the middle checkpoint ends bit-identical to the uninterrupted run
    again, _ = _prepared(name)
    _trainer(again, causal, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    final, resumed = model.state_dict(), again.state_dict()
    assert final.keys() == resumed.keys()
    assert all(torch.equal(final[k], resumed[k]) for k in final)

    batch = _collate(causal)([_Texts(causal, 2)[i] for i in range(3)])
    batch.pop("labels")
    _hard_forward_matches_masks(model, batch)
    with torch.no_grad():
        before = model(**batch).logits
    masked = {p.state.weight_name: p.state.axis for _, _, p in masked_weights(model)}
    assert nmgraph.convert(model) is model
    assert type(model) is cls and not list(masked_weights(model)) and not hasattr(model, "nmgraph_sparsity")
    assert not any(model._forward_pre_hooks or m._state_dict_hooks for m in model.modules())
    assert len(masked) >= 6 and all(nmgraph.is_nm(model.get_parameter(n), "2:4", axis=a) for n, a in masked.items())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)
    if causal:
        out = model.generate(batch["input_ids"][:1, :4], attention_mask=batch["attention_mask"][:1, :4],
                             max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 7)

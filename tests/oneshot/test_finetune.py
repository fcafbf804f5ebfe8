"""Fine-tuning after sparsify with prepare(method="fixed"): the mask is the one sparsify chose."""

import pytest
import torch

import nmgraph

from . import models


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_fixed_masks_after_sparsify_keep_exactly_its_zeros_and_train_the_rest(method):
    torch.manual_seed(0)
    model = models.llama()
    report = nmgraph.sparsify(model, "2:4", method=method, calibration=models.tokens(6), permute=False,
                              progress=False)
    pruned = {x.name: (model.get_parameter(x.name).detach().clone(), x.axis) for x in report.layers}
    batch = {"input_ids": torch.stack(models.tokens(2, seed=1))}
    batch["labels"] = batch["input_ids"]
    assert nmgraph.prepare(model, batch, "2:4", method="fixed", inplace=True, permute=False) is model
    sparsity = nmgraph.SparsityCallback(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
        sparsity.step()
    nmgraph.convert(model)
    assert losses[-1] < losses[0]
    for name, (before, axis) in pruned.items():
        after = model.get_parameter(name)
        assert nmgraph.is_nm(after, "2:4", axis=axis), name
        assert torch.equal(after != 0, before != 0), name  # the zeros sparsify chose, no other
        assert not torch.equal(after, before), name  # and the kept weights trained

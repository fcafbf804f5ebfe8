import pytest
import torch

import nmgraph
from nmgraph import PlanError, UnsupportedError, VerificationError
from nmgraph.masking import MASK_OP, SDGF, Schedule, TrainingConfig
from nmgraph.passes.fold_masks import FoldMasksConfig, fold_masks, mask_nodes
from nmgraph.passes.insert_masks import STATE_NAME, InsertMasksConfig, insert_masks
from nmgraph.passes.runner import run_passes
from nmgraph.pattern import Pattern
from nmgraph.training import set_mode


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.head(torch.relu(self.fc(h)))


def _prepared(pattern="2:4", method=None, schedule=None):
    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(2, 16, 6, 6)
    gm = nmgraph.capture(model, (x,))
    plan = nmgraph.analyze(gm, pattern)
    cfg = TrainingConfig(Pattern.parse(pattern), method or SDGF("step"),
                         schedule or Schedule(total_steps=8))
    run_passes(gm, (insert_masks,), InsertMasksConfig(cfg, plan.layers), lint=True)
    return model, gm, x, plan


@pytest.mark.parametrize("pattern", ["2:4", "1:8"])
def test_fold_gives_exact_nm_weights_and_the_hard_mask_forward(pattern):
    model, gm, x, plan = _prepared(pattern)
    assert [i.name for i in plan.layers] == ["conv.weight", "fc.weight"]
    state = getattr(gm, STATE_NAME)
    # SDGF at step 0 trains with (M-1):M masks; the hard mask is the target pattern
    assert not torch.equal(state.conv_weight.mask, state.conv_weight.hard)
    with torch.no_grad():
        train_out = gm(x).clone()
        set_mode(gm, False)
        hard_out = gm(x).clone()
    assert not torch.equal(train_out, hard_out)
    hard = {st.weight_name: st.hard.clone() for _, st in state.layers()}
    (res,) = run_passes(gm, (fold_masks,), FoldMasksConfig(Pattern.parse(pattern)), lint=True)
    assert mask_nodes(gm) == [] and not hasattr(gm, STATE_NAME)
    assert not any(n.op == "get_attr" and n.target.startswith(STATE_NAME) for n in gm.graph.nodes)
    assert len(res.changed_nodes) == 2 and res.info["folded"] == ["conv.weight", "fc.weight"]
    assert res.info["removed_state"] == [STATE_NAME]
    p = Pattern.parse(pattern)
    for name, h in hard.items():
        w = model.get_parameter(name)  # folded in place: the model's own parameter
        assert nmgraph.is_nm(w, p)
        assert torch.equal(w != 0, h)  # exactly n nonzeros per group (random weights have no zeros)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), hard_out, rtol=0, atol=0)
        torch.testing.assert_close(model(x), hard_out, rtol=0, atol=0)


def test_fold_checks_pattern_and_verifies():
    _, gm, _, _ = _prepared()
    with pytest.raises(PlanError, match=r"targets 2:4, but convert was asked for 1:8. Pass pattern='2:4'"):
        fold_masks(gm, FoldMasksConfig(Pattern(1, 8)))
    getattr(gm, STATE_NAME).fc_weight.hard.fill_(True)  # corrupted: not an N:M mask
    with pytest.raises(VerificationError, match=r"'fc.weight' .* is not 2:4 along axis 1"):
        fold_masks(gm, FoldMasksConfig())
    with pytest.raises(PlanError, match=r"FoldMasksConfig\.pattern must be a Pattern"):
        FoldMasksConfig("2:4")


def test_fold_without_metadata_needs_nmgraph_state():
    _, gm, x, _ = _prepared()
    set_mode(gm, False)
    with torch.no_grad():
        ref = gm(x)
    # metadata dropped, MaskState still there: fold still knows axis and pattern
    for n in mask_nodes(gm):
        n.meta.pop("nmgraph")
    run_passes(gm, (fold_masks,), FoldMasksConfig())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)
    # a re-exported prepared graph: mask buffers live in plain modules, nothing describes them
    _, gm, x, _ = _prepared()
    set_mode(gm, False)
    exported = torch.export.export(gm, (x,)).module()
    assert any(n.target is MASK_OP for n in exported.graph.nodes)
    with pytest.raises(UnsupportedError, match=r"convert\(prepared\) before exporting"):
        fold_masks(exported, FoldMasksConfig())


def test_fold_on_graph_without_masks_is_a_no_op():
    torch.manual_seed(0)
    gm = nmgraph.capture(ConvNet(), (torch.randn(2, 16, 6, 6),))
    code = gm.code
    (res,) = run_passes(gm, (fold_masks,), None)
    assert not res.modified and res.info["folded"] == [] and gm.code == code

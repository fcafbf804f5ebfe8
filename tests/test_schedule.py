import math

import pytest
import torch

import nmgraph
from nmgraph import PatternError, PlanError
from nmgraph.masking import (
    MDGF,
    SDGF,
    SRSTE,
    STE,
    Fixed,
    MaskState,
    Phase,
    Schedule,
    SparsityState,
    TopKAST,
    TrainingConfig,
    method_from_name,
    plan_step,
)
from nmgraph.pattern import Pattern

# ---- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SRSTE(lambda_w=-1.0), r"SRSTE\.lambda_w must be in \[0.0, inf\]"),
        (lambda: SRSTE(lambda_w=float("nan")), r"SRSTE\.lambda_w must be a finite number"),
        (lambda: MDGF("cosine"), r"MDGF\.decay must be one of \('linear', 'exp'\)"),
        (lambda: MDGF(fraction=0.5, alpha=0.1), "MDGF.fraction and MDGF.alpha"),
        (lambda: MDGF(fraction=0.0), r"MDGF\.fraction must be in \(0.0, 1.0\]"),
        (lambda: MDGF(alpha=-2.0), r"MDGF\.alpha must be in \(0.0, inf\]"),
        (lambda: MDGF(end_beta=1.0), r"MDGF\.end_beta must be in \(0.0, 1.0\)"),
        (lambda: SDGF("spiral"), r"SDGF\.kind must be one of"),
        (lambda: TopKAST(n_backward=2.5), r"TopKAST\.n_backward must be an int"),
        (lambda: Schedule(total_steps=0), r"Schedule\.total_steps must be a positive int"),
        (lambda: Schedule(total_steps=10, warmup=1.0), r"Schedule\.warmup must be in \[0.0, 1.0\)"),
        (lambda: Schedule(total_steps=10, update_interval=0), r"Schedule\.update_interval must be an int >= 1"),
        (lambda: Schedule(warmup=0.1), r"pass Schedule\.total_steps"),
        (lambda: Schedule(total_steps=10, warmup=0.5, finetune=0.5), "leaves no sparse phase"),
        (lambda: TrainingConfig(Pattern(2, 4), SDGF()), r"'sdgf-step' schedules over the sparse phase"),
        (lambda: TrainingConfig(Pattern(2, 4), MDGF()), r"or MDGF\(alpha=\.\.\.\)"),
        (lambda: TrainingConfig(Pattern(2, 4), "ste"), r"TrainingConfig\.method must be a method config"),
    ],
)
def test_config_validation_names_the_field(make, match):
    with pytest.raises(PlanError, match=match):
        make()


def test_topkast_backward_pattern_rules():
    assert TopKAST().backward_pattern(Pattern(2, 4)) == Pattern(3, 4)
    assert TopKAST().backward_pattern(Pattern(1, 16)) == Pattern(2, 16)
    assert TopKAST(n_backward=6).backward_pattern(Pattern(2, 8)) == Pattern(6, 8)
    with pytest.raises(PatternError, match=r"need N < n_backward < M \(3 < n_backward < 4\)"):
        TrainingConfig(Pattern(3, 4), TopKAST())
    assert TopKAST(lambda_x=1e-4).penalty(Pattern(1, 4)) == pytest.approx(4e-4)
    assert TopKAST(lambda_x=1e-4, scale_by_density=False).penalty(Pattern(1, 4)) == 1e-4


def test_method_names():
    assert method_from_name("ste") == STE()
    assert method_from_name("SR-STE") == SRSTE(2e-4)
    assert method_from_name("mdgf-exp") == MDGF("exp")
    assert method_from_name("mdgf-linear").name == "mdgf-linear"
    assert method_from_name("sdgf-geo") == SDGF("geo")
    assert method_from_name("topkast") == TopKAST()
    assert method_from_name("fixed") == Fixed()
    cfg = MDGF("linear", alpha=0.01)
    assert method_from_name(cfg) is cfg
    with pytest.raises(PlanError, match="Unknown training method 'dense'"):
        method_from_name("dense")


# ---- schedules -----------------------------------------------------------------------------------


def test_phases_and_rounding():
    s = Schedule(total_steps=50, warmup=0.1, finetune=0.25, update_interval=3)
    assert (s.warmup_steps, s.sparse_steps, s.finetune_steps) == (5, 33, 12)
    phases = [s.phase(i) for i in range(60)]
    assert phases[:5] == [Phase.DENSE] * 5
    assert phases[5:38] == [Phase.SPARSE] * 33
    assert phases[38:] == [Phase.FINETUNE] * 22  # past total_steps stays in fine-tune
    assert Schedule().phase(10**6) is Phase.SPARSE


def test_update_steps_follow_interval_and_phase_entries():
    cfg = TrainingConfig(Pattern(2, 4), STE(), Schedule(total_steps=20, warmup=0.1, finetune=0.2, update_interval=4))
    updates = [i for i in range(25) if plan_step(cfg, i).update]
    # dense 0-1: steps 0 (entry); sparse 2..15: entry at 2, then every 4 from 2; finetune: entry at 16 only
    assert updates == [0, 2, 6, 10, 14, 16]
    entries = [i for i in range(25) if plan_step(cfg, i).entry]
    assert entries == [0, 2, 16]
    # fixed: the warm-up keeps the hard (evaluation) mask current; the sparse phase chooses once
    fixed = TrainingConfig(Pattern(2, 4), Fixed(), Schedule(total_steps=20, warmup=0.1))
    assert [i for i in range(20) if plan_step(fixed, i).update] == [0, 1, 2]


def test_mdgf_beta_by_hand():
    lin = TrainingConfig(Pattern(1, 8), MDGF("linear", fraction=0.5), Schedule(total_steps=100, warmup=0.2))
    # sparse phase 80 steps from step 20; beta reaches 0 after 40 steps: alpha = 1/40
    assert plan_step(lin, 0).beta == 1.0 and plan_step(lin, 19).phase is Phase.DENSE
    assert plan_step(lin, 20).beta == 1.0
    assert plan_step(lin, 30).beta == pytest.approx(1 - 10 / 40)
    assert plan_step(lin, 60).beta == 0.0 and plan_step(lin, 99).beta == 0.0
    exp = TrainingConfig(Pattern(1, 8), MDGF("exp"), Schedule(total_steps=100, finetune=0.1))
    alpha = -math.log(1e-3) / 90
    assert plan_step(exp, 45).beta == pytest.approx(math.exp(-alpha * 45))
    assert plan_step(exp, 89).beta == pytest.approx(math.exp(-alpha * 89))
    assert plan_step(exp, 90).beta == 0.0 and plan_step(exp, 90).phase is Phase.FINETUNE
    direct = TrainingConfig(Pattern(2, 4), MDGF("exp", alpha=0.05))
    assert plan_step(direct, 7).beta == pytest.approx(math.exp(-0.35))
    assert plan_step(TrainingConfig(Pattern(2, 4), STE()), 3).beta is None


def test_sdgf_stages():
    assert [str(p) for p in SDGF("step").stages(Pattern(1, 16))] == ["15:16", "8:16", "4:16", "2:16", "1:16"]
    assert [str(p) for p in SDGF("step").stages(Pattern(2, 4))] == ["3:4", "2:4"]
    assert [str(p) for p in SDGF("step").stages(Pattern(1, 4))] == ["3:4", "2:4", "1:4"]
    assert [str(p) for p in SDGF("step").stages(Pattern(1, 8))] == ["7:8", "4:8", "2:8", "1:8"]
    assert [str(p) for p in SDGF("step").stages(Pattern(3, 8))] == ["7:8", "4:8", "3:8"]
    assert [str(p) for p in SDGF("step").stages(Pattern(3, 4))] == ["3:4"]
    assert [str(p) for p in SDGF("geo").stages(Pattern(1, 16))] == ["8:128", "4:64", "2:32", "1:16"]
    assert [str(p) for p in SDGF("geo").stages(Pattern(1, 32))] == ["4:128", "2:64", "1:32"]
    cfg = TrainingConfig(Pattern(1, 8), SDGF("step"), Schedule(total_steps=12, warmup=0.25))
    # sparse phase: steps 3..11 (9 steps) in 4 equal frames: 3,3,2 / 3 -> index t*4//9
    got = [str(plan_step(cfg, i).pattern) for i in range(3, 12)]
    assert got == ["7:8", "7:8", "7:8", "4:8", "4:8", "2:8", "2:8", "1:8", "1:8"]
    assert [i for i in range(12) if plan_step(cfg, i).entry] == [0, 3, 6, 8, 10]


# ---- state ---------------------------------------------------------------------------------------


def _state(method, pattern="2:4", shapes=((8, 32),), **sched):
    p = Pattern.parse(pattern)
    cfg = TrainingConfig(p, method, Schedule(**sched))
    layers = [(f"l{i}", MaskState(f"w{i}", s, 1, p, with_grad_mask=cfg.uses_grad_mask)) for i, s in enumerate(shapes)]
    return SparsityState(cfg, layers)


def _weights(seed, shapes=((8, 32),)):
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


def test_state_phases_ste_with_warmup_and_finetune():
    st = _state(STE(), total_steps=6, warmup=1 / 3, finetune=1 / 3)
    layer = st.l0
    w = _weights(0)
    st.refresh(w, force=True)
    assert bool(layer.mask.all()) and bool(layer.grad_mask.all())  # dense warm-up
    assert torch.equal(layer.hard, nmgraph.nm_mask(w["w0"], "2:4"))
    assert st.pattern.tolist() == [4, 4] and layer.pattern.tolist() == [4, 4]
    for step in (1, 2, 3):
        w = _weights(step)
        st.advance(w)
        assert int(st.step) == step
    # step 2, 3: sparse, masks follow the weights, dense gradient
    assert torch.equal(layer.mask, nmgraph.nm_mask(w["w0"], "2:4")) and torch.equal(layer.hard, layer.mask)
    assert bool(layer.grad_mask.all()) and st.pattern.tolist() == [2, 4]
    w4 = _weights(4)
    st.advance(w4)  # step 4: fine-tune entry freezes nm_mask(W_4)
    frozen = nmgraph.nm_mask(w4["w0"], "2:4")
    assert torch.equal(layer.mask, frozen) and torch.equal(layer.grad_mask, frozen)
    st.advance(_weights(5))
    assert torch.equal(layer.mask, frozen) and torch.equal(layer.hard, frozen)


def test_state_fixed_holds_its_mask_and_uses_scores():
    st = _state(Fixed())
    w = _weights(0)
    score = torch.rand(8, 32, generator=torch.Generator().manual_seed(9))
    st.refresh(w, force=True, scores={"w0": score})
    chosen = nmgraph.nm_mask(w["w0"], "2:4", score)
    assert not torch.equal(chosen, nmgraph.nm_mask(w["w0"], "2:4"))
    for step in range(1, 4):
        st.advance(_weights(step))
        assert torch.equal(st.l0.mask, chosen) and torch.equal(st.l0.hard, chosen)
        assert torch.equal(st.l0.grad_mask, chosen)


def test_state_topkast_sets_backward_superset():
    st = _state(TopKAST(), pattern="1:8")
    w = _weights(1)
    st.refresh(w, force=True)
    assert torch.equal(st.l0.mask, nmgraph.nm_mask(w["w0"], "1:8"))
    assert torch.equal(st.l0.grad_mask, nmgraph.nm_mask(w["w0"], "2:8"))
    assert bool((st.l0.grad_mask | ~st.l0.mask).all())


def test_state_sdgf_masks_have_stage_pattern_and_geo_clamps_groups():
    st = _state(SDGF("step"), pattern="1:16", shapes=((4, 64),), total_steps=5)
    for step in range(5):
        w = _weights(step, ((4, 64),))
        if step:
            st.advance(w)
        else:
            st.refresh(w, force=True)
        n = [15, 8, 4, 2, 1][step]
        counts = st.l0.mask.view(4, 4, 16).sum(-1)
        assert bool((counts == n).all()), step
        assert torch.equal(st.l0.hard, nmgraph.nm_mask(w["w0"], "1:16"))
        assert st.l0.pattern.tolist() == [n, 16]
    # geo: K=32 cannot hold groups of 128 or 64 -> a 1:16 layer uses 2:32 in the first stages
    geo = _state(SDGF("geo"), pattern="1:16", shapes=((4, 32), (4, 128)), total_steps=4)
    w = _weights(0, ((4, 32), (4, 128)))
    geo.refresh(w, force=True)
    assert geo.l0.pattern.tolist() == [2, 32] and geo.l1.pattern.tolist() == [8, 128]
    assert torch.equal(geo.l0.mask, nmgraph.nm_mask(w["w0"], "2:32"))
    assert torch.equal(geo.l1.mask, nmgraph.nm_mask(w["w1"], "8:128"))
    assert geo.pattern.tolist() == [8, 128]


def test_state_mdgf_beta_buffer_and_state_dict_roundtrip():
    st = _state(MDGF("linear", alpha=0.25))
    st.refresh(_weights(0), force=True)
    for step in range(1, 3):
        st.advance(_weights(step))
    assert float(st.beta) == pytest.approx(0.5)
    sd = st.state_dict()
    assert {"step", "pattern", "beta", "l0.mask", "l0.hard", "l0.pattern"} <= set(sd)
    other = _state(MDGF("linear", alpha=0.25))
    other.load_state_dict(sd)
    assert int(other.step) == 2 and float(other.beta) == pytest.approx(0.5)
    assert torch.equal(other.l0.mask, st.l0.mask)
    with pytest.raises(PlanError, match="No weight 'w0'"):
        other.refresh({}, force=True)


def test_a_training_method_is_one_class():
    """A method of one's own: one Method subclass; prepare, the schedule and convert use it as is."""
    from dataclasses import dataclass
    from typing import ClassVar

    from nmgraph.masking import MASK_OP, Method
    from nmgraph.masking.select import nm_mask_fast

    @dataclass(frozen=True)
    class PenalisedSTE(Method):  # STE with a decay lam on the pruned weights and an all-ones gradient mask
        lam: float = 1e-3
        name: ClassVar[str] = "penalised-ste"
        grad_mask: ClassVar[bool] = True

        def penalty(self, pattern):
            return self.lam

        def update(self, st, w, stage, target, score, entry):
            e = nm_mask_fast(w, target, axis=st.axis)
            st.mask.copy_(e)
            st.hard.copy_(e)
            st.grad_mask.fill_(True)
            st.pattern.copy_(torch.tensor([target.n, target.m]))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(6, 8)
    gm = nmgraph.prepare(model, (x,), "2:4", method=PenalisedSTE(), permute=False)
    masks = [n for n in gm.graph.nodes if n.target is MASK_OP]
    assert len(masks) == 1 and masks[0].args[5] == 1e-3 and masks[0].args[4] is not None  # lam, grad mask
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cb = nmgraph.SparsityCallback(gm)
    for _ in range(3):
        gm(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        cb.step()
    gm.eval()
    with torch.no_grad():
        hard = gm(x)
    out = nmgraph.convert(gm)
    assert nmgraph.is_nm(model[0].weight, "2:4")
    with torch.no_grad():
        torch.testing.assert_close(out(x), hard)

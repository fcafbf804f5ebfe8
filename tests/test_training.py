import copy

import pytest
import torch

import nmgraph
from nmgraph import CaptureError, PlanError
from nmgraph.graph import graph_record
from nmgraph.masking import MASK_OP, MDGF, Phase, SparsityState
from nmgraph.masking.saliency import first_order
from nmgraph.passes.fold_masks import mask_nodes
from nmgraph.passes.insert_masks import STATE_NAME
from nmgraph.training import SparsityCallback, convert, hf_callback, prepare, set_mode

from . import hf_models
from .hf_models import first_tensor


class MLP(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 16)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.b(torch.relu(self.a(x))))))


def _state(gm) -> SparsityState:
    return getattr(gm, STATE_NAME)


def _train(gm, model, batches, steps, lr=0.05, callback=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    callback = callback or SparsityCallback(gm)
    for i in range(steps):
        x, r = batches[i % len(batches)]
        (first_tensor(gm(x)) * r).sum().backward()
        opt.step()
        opt.zero_grad()
        callback.step()
    return opt, callback


# ---- gradient formula of every method through prepare ---------------------------------------------

METHODS = ["ste", "sr-ste", "mdgf-linear", "mdgf-exp", "sdgf-step", "sdgf-geo", "topkast", "fixed"]


@pytest.mark.parametrize("method", METHODS)
def test_method_gradients_match_hand_computation(method):
    torch.manual_seed(0)
    model = MLP()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)) for _ in range(3)]
    gm = prepare(model, (batches[0][0],), "1:4", method=method, permute=False, total_steps=12)
    _train(gm, model, batches, 3)
    state = _state(gm)
    assert int(state.step) == 3
    beta = None if state.beta is None else float(state.beta)
    if method.startswith("mdgf"):
        assert 0.0 < beta < 1.0
    x, r = batches[0]
    # hand computation: W~ from the buffers, dL/dW~ by autograd on a plain functional call
    params = dict(model.named_parameters())
    wt = {}
    for _, st in state.layers():
        w = params[st.weight_name].detach()
        e = st.mask
        wt[st.weight_name] = (w * e if beta is None else torch.where(e, w, w * beta)).requires_grad_(True)
    out = torch.func.functional_call(model, {**{k: v.detach() for k, v in params.items()}, **wt}, (x,))
    upstream = dict(zip(wt, torch.autograd.grad((out * r).sum(), list(wt.values()))))
    (gm(x) * r).sum().backward()
    for _, st in state.layers():
        w = params[st.weight_name].detach()
        e, up = st.mask, upstream[st.weight_name]
        if method in ("ste", "mdgf-linear", "mdgf-exp", "sdgf-step", "sdgf-geo"):
            hand = up
        elif method == "sr-ste":
            hand = up + 2e-4 * (~e).float() * w
        elif method == "topkast":
            gb = nmgraph.nm_mask(w, "2:4")
            assert torch.equal(st.grad_mask, gb)
            hand = gb * up + 8e-4 * (gb & ~e).float() * w  # lambda_x / density = 2e-4 / (1/4)
        else:  # fixed
            hand = e * up
        torch.testing.assert_close(params[st.weight_name].grad, hand, rtol=1e-5, atol=1e-7)
    # the forward mask each method trains with
    wa = params["a.weight"].detach()
    if method == "sdgf-step":
        assert state.a_weight.pattern.tolist() == [3, 4] and state.pattern.tolist() == [3, 4]
    elif method == "sdgf-geo":  # stages 8:32, 4:16, 2:8, 1:4 over 12 steps: step 3 is in the second
        assert state.a_weight.pattern.tolist() == [4, 16] and state.b_weight.pattern.tolist() == [4, 16]
        assert bool((state.a_weight.mask.view(32, 1, 16).sum(-1) == 4).all())
    elif method != "fixed":
        assert torch.equal(state.a_weight.mask, nmgraph.nm_mask(wa, "1:4"))


# ---- HF models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_hf_prepare_train_convert(name):
    torch.manual_seed(0)
    model, args = hf_models.FACTORIES[name]()
    gm = prepare(model, args, "2:4", method="sr-ste", permute=False, total_steps=4, finetune=0.25)
    masked = graph_record(gm).prepared.masked
    assert len(masked) == len(mask_nodes(gm)) and len(masked) >= 10
    skipped = {s.name for s in graph_record(gm).prepared.skipped}
    assert not skipped & set(masked)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cb = SparsityCallback(gm)
    before = {n: model.get_parameter(n).detach().clone() for n in masked}
    for _ in range(4):
        loss = first_tensor(gm(*args)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        cb.step()
    assert torch.isfinite(loss)
    assert cb.state.current_plan().phase is Phase.FINETUNE
    assert all(not torch.equal(before[n], model.get_parameter(n)) for n in masked)
    gm.eval()
    with torch.no_grad():
        hard_out = first_tensor(gm(*args)).clone()
    inf = convert(gm)
    assert inf is gm and mask_nodes(inf) == [] and not hasattr(inf, STATE_NAME)
    for n in masked:
        w = model.get_parameter(n)
        assert nmgraph.is_nm(w, "2:4") and int((w != 0).sum()) == w.numel() // 2
    with torch.no_grad():
        torch.testing.assert_close(first_tensor(inf(*args)), hard_out, rtol=0, atol=0)
        torch.testing.assert_close(first_tensor(model(*args)), hard_out, rtol=0, atol=0)


def test_permutation_and_training_together():
    torch.manual_seed(0)
    model, args = hf_models.bert()
    with torch.no_grad():
        ref = first_tensor(model(*args)).clone()
    gm = prepare(model, args, "2:4", method="ste", permute=True, search="random", seed=3,
                 total_steps=6, warmup=1 / 3)
    report = graph_record(gm).permuted
    assert report.permuted  # random search applies a valid permutation to every group
    set_mode(gm, True, dropout=False)
    with torch.no_grad():  # dense warm-up: the permuted, masked graph computes the original function
        torch.testing.assert_close(first_tensor(gm(*args)), ref, rtol=1e-4, atol=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cb = SparsityCallback(gm)
    for _ in range(6):
        first_tensor(gm(*args)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        cb.step()
    gm.eval()
    with torch.no_grad():
        hard_out = first_tensor(gm(*args)).clone()
    convert(gm)
    for n in graph_record(gm).prepared.masked:
        assert nmgraph.is_nm(model.get_parameter(n), "2:4")
    with torch.no_grad():
        torch.testing.assert_close(first_tensor(gm(*args)), hard_out, rtol=0, atol=0)


# ---- resume ---------------------------------------------------------------------------------------


def _llama_run(steps, snapshot_at=None, resume=None):
    torch.manual_seed(0)
    model, args = hf_models.llama()
    gm = prepare(model, args, "1:4", method="mdgf-exp", permute=False, total_steps=8, warmup=0.25,
                 finetune=0.25)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if resume is not None:
        gm.load_state_dict(resume[0])
        opt.load_state_dict(resume[1])
    cb = SparsityCallback(gm)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, hf_models.VOCAB, (2, 8), generator=g) for _ in range(steps)]
    snap, losses = None, []
    for i in range(int(_state(gm).step), steps):
        loss = first_tensor(gm(batches[i])).float().logsumexp(-1).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
        cb.step()
        if snapshot_at is not None and i + 1 == snapshot_at:
            snap = (copy.deepcopy(gm.state_dict()), copy.deepcopy(opt.state_dict()))
    return gm, losses, snap


def test_state_dict_resume_is_bit_identical():
    gm_a, losses_a, snap = _llama_run(8, snapshot_at=4)
    assert snap[0][f"{STATE_NAME}.step"].item() == 4
    assert 0.0 < snap[0][f"{STATE_NAME}.beta"].item() < 1.0  # mid-decay
    gm_b, losses_b, _ = _llama_run(8, resume=snap)
    assert losses_b == losses_a[4:]
    sa, sb = gm_a.state_dict(), gm_b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert _state(gm_b).current_plan().phase is Phase.FINETUNE


# ---- graph mechanics ------------------------------------------------------------------------------


def test_eval_uses_hard_mask_and_train_eval_switch_masks_and_dropout():
    torch.manual_seed(0)
    model = MLP(dropout=0.5).eval()
    x = torch.randn(4, 16)
    gm = prepare(model, (x,), "2:4", method=MDGF("linear", alpha=0.25), permute=False)
    drop = [n for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default]
    assert len(drop) == 1 and drop[0].args[2] is True  # prepare returns training mode
    assert gm.training and all(n.args[6] is False for n in mask_nodes(gm))
    _train(gm, model, [(x, torch.randn(4, 4))], 2)
    state = _state(gm)
    assert float(state.beta) == pytest.approx(0.5)
    params = {k: v.detach() for k, v in model.named_parameters()}
    soft = {st.weight_name: torch.where(st.mask, params[st.weight_name], 0.5 * params[st.weight_name])
            for _, st in state.layers()}
    hard = {st.weight_name: params[st.weight_name] * st.hard for _, st in state.layers()}
    assert gm.eval() is gm and not gm.training and drop[0].args[2] is False
    assert all(n.args[6] is True for n in mask_nodes(gm))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), torch.func.functional_call(model, {**params, **hard}, (x,)),
                                   rtol=0, atol=0)
        set_mode(gm, True, dropout=False)
        torch.testing.assert_close(gm(x), torch.func.functional_call(model, {**params, **soft}, (x,)),
                                   rtol=0, atol=0)
    gm.train()
    code = gm.forward.__code__
    assert set_mode(gm, True) is False and gm.forward.__code__ is code  # no change, no recompile
    parent = torch.nn.Sequential(gm)
    parent.eval()  # nn.Module.eval on a parent reaches the prepared graph's override
    assert all(n.args[6] is True for n in mask_nodes(gm))
    gm.train()
    twin = copy.deepcopy(gm)  # a deep copy keeps train()/eval() switching its own graph
    twin.eval()
    assert all(n.args[6] is True for n in mask_nodes(twin))
    assert all(n.args[6] is False for n in mask_nodes(gm))


def test_export_and_compile_prepared_graph():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    gm = prepare(model, (x,), "2:4", method="topkast", permute=False, total_steps=10, finetune=0.2)
    _train(gm, model, [(x, torch.randn(4, 4))], 2)
    ep = torch.export.export(gm, (x,))
    assert sum(n.target is MASK_OP for n in ep.graph.nodes) == 2
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), gm(x), rtol=0, atol=0)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    assert SparsityCallback(compiled).state is _state(gm)  # found inside the compile wrapper
    out_c = compiled(x)
    out_c.square().sum().backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out_e = gm(x)
    out_e.square().sum().backward()
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads_c[n], p.grad, rtol=1e-6, atol=1e-7)


# ---- convert on graphs without masks --------------------------------------------------------------


def test_convert_plain_graph_by_magnitude_and_saliency():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    gm = nmgraph.capture(model, (x,))
    out = convert(gm, "2:4", inplace=False)
    assert out is not gm and torch.equal(model.a.weight, w0["a.weight"])  # copy: model untouched
    assert nmgraph.is_nm(out.get_parameter("a.weight"), "2:4")
    convert(gm, "2:4")
    assert torch.equal(model.a.weight, w0["a.weight"] * nmgraph.nm_mask(w0["a.weight"], "2:4"))
    assert torch.equal(model.b.weight, w0["b.weight"] * nmgraph.nm_mask(w0["b.weight"], "2:4"))
    assert torch.equal(model.head.weight, w0["head.weight"])  # output head left dense (reported)
    assert [s.name for s in graph_record(gm).converted.skipped] == ["head.weight"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)

    torch.manual_seed(1)
    model = MLP()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 16, generator=g), torch.randn(4, 4, generator=g)) for _ in range(2)]
    scores = first_order(model, ["a.weight", "b.weight"], batches, lambda m, b: (m(b[0]) * b[1]).sum())
    convert(model, "1:4", example_inputs=(x,), saliency=scores)
    for n in ("a.weight", "b.weight"):
        assert torch.equal(model.get_parameter(n), w0[n] * nmgraph.nm_mask(w0[n], "1:4", scores[n]))
    with pytest.raises(CaptureError, match="pass example_inputs= to capture"):
        convert(MLP(), "2:4")


def test_fixed_method_with_saliency_holds_mask_and_pruned_weights():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    gm = nmgraph.capture(model, (x,))
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 16, generator=g), torch.randn(4, 4, generator=g)) for _ in range(2)]
    scores = first_order(gm, ["a.weight", "b.weight"], batches, lambda m, b: (m(b[0]) * b[1]).sum())
    w0 = {n: model.get_parameter(n).detach().clone() for n in scores}
    gm = prepare(gm, None, "2:4", method="fixed", permute=False, saliency=scores)
    chosen = {n: nmgraph.nm_mask(w0[n], "2:4", scores[n]) for n in scores}
    _train(gm, model, batches, 3)
    for _, st in _state(gm).layers():
        e = chosen[st.weight_name]
        assert torch.equal(st.mask, e) and torch.equal(st.hard, e)
        w = model.get_parameter(st.weight_name)
        assert torch.equal(w[~e], w0[st.weight_name][~e])  # no gradient reached pruned weights
        assert not torch.equal(w[e], w0[st.weight_name][e])


def test_hf_trainer_callback_adapter():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    gm = prepare(model, (x,), "2:4", method="ste", permute=False)
    cb = hf_callback(gm)
    assert isinstance(cb, transformers.TrainerCallback)
    with torch.no_grad():
        model.a.weight.mul_(-torch.arange(16.0))  # new magnitudes -> new masks at the next step
    control = object()
    assert cb.on_step_end(None, None, control) is control
    assert int(_state(gm).step) == 1
    assert torch.equal(_state(gm).a_weight.mask, nmgraph.nm_mask(model.a.weight, "2:4"))


def test_prepare_errors():
    model, x = MLP(), torch.randn(4, 16)
    with pytest.raises(PlanError, match="saliency= chooses the mask of method 'fixed' only"):
        prepare(model, (x,), method="ste", permute=False, saliency={"a.weight": torch.ones(32, 16)})
    with pytest.raises(PlanError, match="would not follow the channel permutation"):
        prepare(model, (x,), method="fixed", saliency={"a.weight": torch.ones(32, 16)})
    with pytest.raises(PlanError, match=r"saliency score for 'a.weight' has shape \(2,\)"):
        prepare(model, (x,), method="fixed", permute=False, saliency={"a.weight": torch.ones(2)})
    with pytest.raises(PlanError, match="Pass either schedule= or total_steps"):
        prepare(model, (x,), permute=False, schedule=nmgraph.masking.Schedule(), total_steps=3)
    with pytest.raises(CaptureError, match="needs example_inputs"):
        prepare(model)
    with pytest.raises(PlanError, match="Unknown training method 'magic'"):
        prepare(model, (x,), method="magic")
    gm = prepare(model, (x,), "2:4", method="ste", permute=False)
    with pytest.raises(PlanError, match="already prepared"):
        prepare(gm, None, method="ste", permute=False)
    with pytest.raises(PlanError, match="targets 2:4, but convert was asked for 1:4"):
        convert(gm, "1:4")
    with pytest.raises(PlanError, match="no nmgraph mask state"):
        SparsityCallback(MLP())


def test_example_train_tiny_lm_smoke():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_lm.py"
    spec = importlib.util.spec_from_file_location("train_tiny_lm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--smoke", "--methods", "dense,fixed,sr-ste,mdgf-exp,sdgf-step", "--patterns", "1:8"])
    assert [(r["method"], r["pattern"]) for r in results] == [
        ("dense", "-"), ("fixed", "1:8"), ("sr-ste", "1:8"), ("mdgf-exp", "1:8"), ("sdgf-step", "1:8")]
    for r in results:
        # 6 steps from random init: the loss is near uniform over 128 symbols (7 bits), and finite
        assert 3.0 < r["val_bpc"] < 8.0
    assert all(r["masked_weights"] == 8 for r in results[1:])  # qkv, proj, up, down in 2 blocks


def test_prepare_verifies_the_permutation_with_dropout_off():
    """GPT-2 as transformers builds it is in train mode, with dropout in its residual stream and in
    scaled_dot_product_attention (inside a permutation group): the permutation is verified with
    dropout off (a dropout mask falls on other channels after a permutation), and dropout is back on
    in the prepared graph's training forward and off in its eval forward."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=hf_models.VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=32,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.training and cfg.attn_pdrop == 0.1
    reference = copy.deepcopy(model).eval()
    ids = torch.randint(0, hf_models.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    gm = prepare(model, (ids,), "2:4", method="ste", permute=True, search="greedy")
    report = graph_record(gm).permuted
    assert report.permuted and report.max_error <= 1e-5
    with torch.no_grad():  # the user's (permuted) model computes the reference's function
        torch.testing.assert_close(first_tensor(model.eval()(ids)), first_tensor(reference(ids)),
                                   rtol=1e-4, atol=1e-5)
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    drop = [n for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default]
    assert len(sdpa) == 1 and len(drop) == 3
    assert sdpa[0].args[4] == 0.1 and all(n.args[2] is True for n in drop)  # training forward: on
    gm.eval()
    assert sdpa[0].args[4] == 0.0 and all(n.args[2] is False for n in drop)  # eval: off, attention included
    with torch.no_grad():
        assert torch.equal(first_tensor(gm(ids)), first_tensor(gm(ids)))
    gm.train()
    assert sdpa[0].args[4] == 0.1 and all(n.args[2] is True for n in drop)


# ---- prepare(inplace=True): the masks on the user's own module ---------------------------------------


def _batches(n=3, batch=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 16, generator=g), torch.randn(batch, 4, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("method", ["sr-ste", "mdgf-linear", "topkast"])
def test_inplace_prepare_trains_like_the_prepared_graph(method):
    torch.manual_seed(0)
    graph_model = MLP()
    own = copy.deepcopy(graph_model)
    batches = _batches()
    gm = prepare(graph_model, (batches[0][0],), "2:4", method=method, permute=False, total_steps=6)
    out = prepare(own, (batches[0][0],), "2:4", method=method, permute=False, total_steps=6, inplace=True)
    assert out is own and isinstance(own, MLP)
    _train(gm, graph_model, batches, 4)
    _train(own, own, batches, 4)
    for name, p in graph_model.named_parameters():
        torch.testing.assert_close(nmgraph.masking.latent_weight(own, name), p, rtol=1e-5, atol=1e-6)
    for (_, a), (_, b) in zip(_state(gm).layers(), own.nmgraph_sparsity.layers()):
        assert torch.equal(a.hard, b.hard)
    x = torch.randn(3, 16)  # another batch size
    gm.eval()
    own.eval()
    torch.testing.assert_close(own(x), gm(x), rtol=1e-5, atol=1e-6)


def test_inplace_state_dict_keeps_the_plain_names_and_resumes():
    torch.manual_seed(0)
    model = MLP()
    plain_keys = list(model.state_dict())
    batches = _batches()
    prepare(model, (batches[0][0],), "2:4", method="sr-ste", permute=False, inplace=True)
    _train(model, model, batches, 2)
    sd = model.state_dict()
    assert [k for k in sd if not k.startswith(STATE_NAME)] == plain_keys  # a.weight, not a.parametrizations...
    assert int(sd[f"{STATE_NAME}.step"]) == 2
    fresh = MLP()
    prepare(fresh, (batches[0][0],), "2:4", method="sr-ste", permute=False, inplace=True)
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))
    model.eval()
    fresh.eval()
    x = torch.randn(5, 16)
    assert torch.equal(model(x), fresh(x))
    # and a dense model reads the latent weights of that checkpoint
    dense = MLP()
    missing, unexpected = dense.load_state_dict(sd, strict=False)
    assert not missing and all(k.startswith(STATE_NAME) for k in unexpected)


def test_inplace_eval_is_the_hard_mask_forward_and_convert_gives_the_plain_module_back():
    torch.manual_seed(0)
    model = MLP(dropout=0.2)
    batches = _batches()
    prepare(model, (batches[0][0],), "2:4", method="ste", permute=True, search="random", inplace=True)
    _train(model, model, batches, 3)
    model.eval()
    x = torch.randn(6, 16)
    hard = {st.weight_name: st.hard.clone() for _, st in model.nmgraph_sparsity.layers()}
    latent = {n: nmgraph.masking.latent_weight(model, n).detach().clone() for n in hard}
    want = torch.func.functional_call(model, {n: latent[n] * hard[n] for n in hard}, (x,))
    assert torch.equal(model(x), want)
    assert convert(model) is model
    assert type(model.a) is torch.nn.Linear and not hasattr(model, STATE_NAME)
    assert not any(m._state_dict_hooks or m._load_state_dict_pre_hooks for m in model.modules())
    assert all(nmgraph.is_nm(model.get_parameter(n), "2:4") for n in hard)
    assert torch.equal(model(x), want)


def test_inplace_prepare_refuses_a_graph_and_a_prepared_model():
    model, x = MLP(), torch.randn(4, 16)
    gm = nmgraph.capture(model, (x,))
    with pytest.raises(PlanError, match="pass the model itself, not a captured graph"):
        prepare(gm, None, inplace=True)
    prepare(model, (x,), permute=False, inplace=True)
    with pytest.raises(PlanError, match="already prepared"):
        prepare(model, (x,), permute=False, inplace=True)
    cb = SparsityCallback(model)
    assert cb.step() is None and cb.step_count == 1


def test_sparsity_callback_is_a_trainer_callback_and_logs_metrics():
    transformers = pytest.importorskip("transformers")
    model, x = MLP(), torch.randn(4, 16)
    prepare(model, (x,), permute=False, inplace=True, method="sr-ste")
    cb = nmgraph.SparsityCallback(model)
    assert isinstance(cb, transformers.TrainerCallback) and isinstance(cb, SparsityCallback)
    state = transformers.TrainerState()
    control = transformers.TrainerControl()
    assert cb.on_train_begin(None, state, control) is control
    with torch.no_grad():
        model.a.parametrizations.weight.original.mul_(-torch.arange(16.0))  # new magnitudes: masks flip
    cb.on_step_end(None, state, control)
    logs = {"loss": 1.0}
    state.global_step = 1
    state.log_history.append({**logs, "step": 1})
    cb.on_log(None, state, control, logs=logs)
    assert logs["nm_sparsity"] == 0.5 and logs["nm_phase"] == "sparse" and logs["nm_pattern"] == "2:4"
    assert 0.0 < logs["nm_mask_flips"] <= 1.0
    assert state.log_history[-1]["nm_mask_flips"] == logs["nm_mask_flips"]

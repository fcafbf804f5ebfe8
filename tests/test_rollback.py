"""All-or-nothing public calls: a failed convert / prepare / export / compile leaves the model exactly
as it was, bit for bit (docs/reliability.md).

Each test makes a call fail at one step, with a real fault (a NaN in a later layer, a corrupted mask)
or an injected one (a pass or a step monkeypatched to raise, ``KeyboardInterrupt`` included), and
then compares every tensor of the model's ``state_dict`` bitwise with a copy taken before the call,
the identity of every Parameter (an optimizer holds them), the training flags and, for a graph, its
nodes and outputs.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

import nmgraph
from nmgraph import rollback, training
from nmgraph.errors import (
    BackendUnavailableError,
    CaptureError,
    ShapeError,
    StrictModeError,
    VerificationError,
)
from nmgraph.passes import permute_channels
from nmgraph.passes.fold_masks import mask_nodes
from nmgraph.passes.insert_masks import STATE_NAME
from nmgraph.rollback import Rollback, TensorStore


class Injected(Exception):
    """A fault injected by a test."""


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def _x() -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(1))


class Snapshot:
    """A module's state before a call: bits of every state_dict tensor, Parameter objects, training flags."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.params = {k: id(p) for k, p in module.named_parameters(remove_duplicate=False)}
        self.modes = {k: m.training for k, m in module.named_modules()}

    def assert_unchanged(self) -> None:
        now = self.module.state_dict()
        assert list(now) == list(self.state)
        for k, v in now.items():
            old = self.state[k]
            assert v.dtype == old.dtype and v.shape == old.shape, k
            assert torch.equal(v.detach().reshape(-1).view(torch.uint8), old.reshape(-1).view(torch.uint8)), k
        assert {k: id(p) for k, p in self.module.named_parameters(remove_duplicate=False)} == self.params
        assert {k: m.training for k, m in self.module.named_modules()} == self.modes


def _raise_on_call(n: int, exc: type[BaseException], real=None):
    """A stand-in that calls ``real`` (if given) n - 1 times, then raises ``exc``."""
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            raise exc("injected fault")
        return real(*args, **kwargs) if real is not None else None

    return fake


# --- the undo log itself ---------------------------------------------------------------------------


def test_rollback_restores_tensors_in_place_and_graph_structure():
    model = _mlp()
    gm = nmgraph.capture(model, (_x(),))
    snap = Snapshot(gm)
    nodes = [n.format_node() for n in gm.graph.nodes]
    weight = model[0].weight
    with pytest.raises(KeyboardInterrupt), Rollback() as undo:
        undo.keep_module(gm)
        undo.keep_tensors([weight, weight])  # kept once
        with torch.no_grad():
            weight.mul_(0)
        gm.add_submodule("extra", torch.nn.Linear(2, 2))
        gm.register_buffer("extra_buffer", torch.ones(3))
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.ops.aten.relu.default, (next(iter(gm.graph.nodes)),))
        gm.recompile()
        torch.nn.Module.train(gm, False)
        raise KeyboardInterrupt
    snap.assert_unchanged()
    assert model[0].weight is weight and not hasattr(gm, "extra")
    assert [n.format_node() for n in gm.graph.nodes] == nodes


def test_rollback_commits_on_success():
    lin = torch.nn.Linear(4, 4)
    with Rollback() as undo:
        undo.keep_tensors([lin.weight])
        with torch.no_grad():
            lin.weight.zero_()
    assert not lin.weight.any()


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    big = torch.randn(64, 64, generator=g)
    return [torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g).to(torch.bfloat16),
            big[3:5],  # a view into a larger storage
            torch.randn(16, 8, generator=g).t(),  # not contiguous
            torch.randint(-5, 5, (7,), generator=g),
            torch.nn.Parameter(torch.randn(32, 4, generator=g))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


@pytest.mark.parametrize("memory_bytes", [None, 0, 600])  # all in memory, all on disk, some of each
def test_tensor_store_writes_back_the_same_bits_into_the_same_tensors(memory_bytes):
    tensors = _tensors()
    before = [_bits(t) for t in tensors]
    ids = [id(t) for t in tensors]
    store = TensorStore(memory_bytes)
    for t in tensors + tensors[:2]:  # saved once each
        store.save(t)
    total = sum(t.numel() * t.element_size() for t in tensors)
    assert len(store) == len(tensors) and store.bytes_in_memory + store.bytes_on_disk == total
    assert store.bytes_on_disk == {None: 0, 0: total}.get(memory_bytes, store.bytes_on_disk)
    if memory_bytes == 600:
        assert 0 < store.bytes_in_memory <= 600 and store.bytes_on_disk > 0
    folder = store.directory
    with torch.no_grad():
        for t in tensors:
            t.zero_()
    store.restore()
    assert [id(t) for t in tensors] == ids
    for t, b in zip(tensors, before):
        assert torch.equal(_bits(t), b)
    with torch.no_grad():
        tensors[0].add_(1)
    store.restore(0, 1)  # a range; the copies stay until close
    assert torch.equal(_bits(tensors[0]), before[0])
    store.close()
    assert len(store) == 0 and (folder is None or not os.path.exists(folder))


def test_tensor_store_spills_a_view_without_its_storage(tmp_path):
    big = torch.randn(256, 256)
    view = big[:2]
    with TensorStore(memory_bytes=0) as store:
        store.save(view)
        files = list(pathlib.Path(store.directory).iterdir())
        assert len(files) == 1 and files[0].stat().st_size < 8 * 1024  # 2 KiB of values, not the 256 KiB storage


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
def test_rollback_with_the_copies_on_disk_restores_bit_exact(exc):
    model = _mlp()
    snap = Snapshot(model)
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    with pytest.raises(exc), Rollback(memory_bytes=3000) as undo:  # the first weight in memory, the rest on disk
        undo.keep_tensors(weights[:2])
        undo.keep_tensors(weights[2:])
        assert undo.store.bytes_in_memory > 0 and undo.store.bytes_on_disk > 0
        folder = undo.store.directory
        with torch.no_grad():
            for w in weights[:3]:  # fails mid-way: some weights written, the last not yet
                w.mul_(-2.5)
        raise exc("injected fault")
    snap.assert_unchanged()
    assert not os.path.exists(folder)


# --- convert ---------------------------------------------------------------------------------------


def test_convert_nan_in_a_later_layer_raises_before_any_layer_is_pruned():
    model = _mlp()
    with torch.no_grad():
        model[4].weight[3, 5] = float("nan")
    snap = Snapshot(model)
    with pytest.raises(ShapeError, match=r"weight '4\.weight' \(read by node linear_2\) holds 1 NaN value\(s\), "
                                         r"the first at index \[3, 5\].*nothing was changed.*exclude=\['4'\]"):
        nmgraph.convert(model, example_inputs=(_x(),))
    snap.assert_unchanged()


def test_convert_nan_saliency_names_the_layer():
    model = _mlp()
    gm = nmgraph.capture(model, (_x(),))
    plan = nmgraph.analyze(gm)
    scores = {info.name: torch.rand(info.shape) for info in plan.layers}
    scores[plan.layers[-1].name][0, 0] = float("nan")
    snap = Snapshot(model)
    with pytest.raises(ShapeError, match=rf"saliency score for '{plan.layers[-1].name}' .* holds 1 NaN"):
        nmgraph.convert(gm, plan=plan, saliency=scores)
    snap.assert_unchanged()


@pytest.mark.parametrize("spilled", [False, True])
@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
def test_convert_interrupted_between_two_weights(monkeypatch, exc, spilled):
    if spilled:  # the undo log's copies in a temporary directory, as for a model larger than its memory share
        monkeypatch.setattr(rollback, "MEMORY_BYTES", 0)
    model = _mlp()
    snap = Snapshot(model)
    monkeypatch.setattr(torch.Tensor, "masked_fill_", _raise_on_call(2, exc, torch.Tensor.masked_fill_))
    with pytest.raises(exc):
        nmgraph.convert(model, example_inputs=(_x(),))
    monkeypatch.undo()
    snap.assert_unchanged()
    assert not nmgraph.is_nm(model[0].weight, "2:4")
    nmgraph.convert(model, example_inputs=(_x(),))  # the same call succeeds afterwards
    assert nmgraph.is_nm(model[0].weight, "2:4")


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
def test_convert_of_a_graph_fails_after_pruning(monkeypatch, exc):
    model = _mlp()
    gm = nmgraph.capture(model, (_x(),))
    snap, record = Snapshot(gm), nmgraph.graph_record(gm)
    monkeypatch.setattr(training, "update_graph_record", _raise_on_call(1, exc))
    with pytest.raises(exc):
        nmgraph.convert(gm)
    snap.assert_unchanged()
    assert nmgraph.graph_record(gm) is record


def _prepared(model=None):
    model = model or _mlp()
    gm = nmgraph.prepare(model, (_x(),), "2:4", method="ste", permute=False)
    return model, gm


def _out(gm):
    with torch.no_grad():
        return gm(_x())


def test_convert_with_a_bad_second_mask_folds_nothing():
    _, gm = _prepared()
    state = getattr(gm, STATE_NAME)
    second = sorted(n for n, _ in state.named_children())[1]
    getattr(state, second).hard.fill_(True)  # corrupted: not an N:M mask
    snap, n_masks, before = Snapshot(gm), len(mask_nodes(gm)), _out(gm)
    with pytest.raises(VerificationError, match=r"hard mask buffer .* is not an N:M mask.*Nothing was folded"):
        nmgraph.convert(gm)
    snap.assert_unchanged()
    assert len(mask_nodes(gm)) == n_masks and hasattr(gm, STATE_NAME)
    assert torch.equal(_out(gm), before)


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
def test_convert_of_a_prepared_graph_interrupted_while_rewriting_the_graph(monkeypatch, exc):
    model, gm = _prepared()
    snap, n_masks, before = Snapshot(gm), len(mask_nodes(gm)), _out(gm)
    nodes = [n.format_node() for n in gm.graph.nodes]
    monkeypatch.setattr(torch.fx.Graph, "erase_node", _raise_on_call(3, exc, torch.fx.Graph.erase_node))
    with pytest.raises(exc):
        nmgraph.convert(gm)
    monkeypatch.undo()
    snap.assert_unchanged()
    assert len(mask_nodes(gm)) == n_masks and [n.format_node() for n in gm.graph.nodes] == nodes
    assert torch.equal(_out(gm), before)
    inference = nmgraph.convert(gm)  # and it still converts
    assert not mask_nodes(inference) and nmgraph.is_nm(model[0].weight, "2:4")


# --- prepare ---------------------------------------------------------------------------------------


def test_prepare_refuses_nan_weights_without_permutation():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    snap = Snapshot(model)
    with pytest.raises(ShapeError, match=r"weight '2\.weight' .* holds 1 NaN"):
        nmgraph.prepare(model, (_x(),), "2:4", permute=False)
    snap.assert_unchanged()


def test_prepare_refuses_a_nan_saliency():
    model = _mlp()
    gm = nmgraph.capture(model, (_x(),))
    plan = nmgraph.analyze(gm)
    scores = {info.name: torch.rand(info.shape) for info in plan.layers}
    scores[plan.layers[1].name][1, 2] = float("nan")
    snap, nodes = Snapshot(gm), [n.format_node() for n in gm.graph.nodes]
    with pytest.raises(ShapeError, match=rf"saliency score for '{plan.layers[1].name}' .* first at index \[1, 2\]"):
        nmgraph.prepare(gm, pattern="2:4", method="fixed", permute=False, saliency=scores, plan=plan)
    snap.assert_unchanged()
    assert [n.format_node() for n in gm.graph.nodes] == nodes


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
def test_prepare_fails_after_permuting(monkeypatch, exc):
    model = _mlp()
    snap = Snapshot(model)
    monkeypatch.setattr(training, "insert_masks", _raise_on_call(1, exc))
    with pytest.raises(exc):
        nmgraph.prepare(model, (_x(),), "2:4", permute=True)
    snap.assert_unchanged()


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
def test_prepare_interrupted_between_two_tensors_of_a_permutation(monkeypatch, exc):
    """``permute`` rolls back its own changes on an Exception; ``prepare`` undoes any interrupt too."""
    model = _mlp()
    snap = Snapshot(model)
    monkeypatch.setattr(permute_channels, "apply_permutation",
                        _raise_on_call(2, exc, permute_channels.apply_permutation))
    with pytest.raises(exc):
        nmgraph.prepare(model, (_x(),), "2:4", permute=True, search="random")
    snap.assert_unchanged()


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
def test_prepare_of_a_graph_fails_after_inserting_masks(monkeypatch, exc):
    model = _mlp()
    gm = nmgraph.capture(model, (_x(),))
    snap, nodes, before = Snapshot(gm), [n.format_node() for n in gm.graph.nodes], _out(gm)
    monkeypatch.setattr(training, "_install_train_eval", _raise_on_call(1, exc))
    with pytest.raises(exc):
        nmgraph.prepare(gm, pattern="2:4", permute=True, search="random")
    snap.assert_unchanged()
    assert not hasattr(gm, STATE_NAME) and [n.format_node() for n in gm.graph.nodes] == nodes
    assert torch.equal(_out(gm), before)
    assert nmgraph.graph_record(gm).prepared is None and nmgraph.graph_record(gm).permuted is None
    monkeypatch.undo()
    nmgraph.prepare(gm, pattern="2:4", permute=False)  # the graph is still preparable


# --- export ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [CaptureError, KeyboardInterrupt])
def test_export_of_a_dense_model_fails_after_converting(monkeypatch, tmp_path, exc):
    pytest.importorskip("onnxscript")
    from nmgraph.exporters import onnx_export

    model = _mlp().train()
    snap = Snapshot(model)
    monkeypatch.setattr(onnx_export, "_to_onnx", _raise_on_call(1, exc))
    with pytest.raises(exc):
        nmgraph.export(model, tmp_path / "m.onnx", (_x(),))
    snap.assert_unchanged()
    assert not nmgraph.is_nm(model[0].weight, "2:4") and model.training


class _FixedBatch(torch.nn.Module):
    """A model that only runs at batch size 4: a dynamic batch cannot be exported."""

    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, x):
        return self.body(x).reshape(4, 8)


def test_export_with_a_dynamic_batch_the_model_refuses_changes_nothing(tmp_path):
    pytest.importorskip("onnxscript")
    model = _FixedBatch()
    snap = Snapshot(model)
    with pytest.raises(VerificationError, match=r"fails on the example inputs at batch size \+ 1 .*dynamic_batch=False"):
        nmgraph.export(model, tmp_path / "m.onnx", (_x(),), dynamic_batch=True)
    snap.assert_unchanged()


def test_export_dynamic_batch_check_runs_before_convert(tmp_path):
    pytest.importorskip("onnxscript")

    class KwOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp()

        def forward(self, *, x):
            return self.body(x)

    model = KwOnly()
    snap = Snapshot(model)
    with pytest.raises(nmgraph.UnsupportedError, match="dynamic_batch=True: cannot match the example inputs"):
        nmgraph.export(model, tmp_path / "m.onnx", (_x(),), dynamic_batch=True, kwargs={"y": _x()})
    snap.assert_unchanged()


# --- nmgraph.compile -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "cusparselt"])
def test_compile_with_a_backend_the_cpu_lacks_changes_nothing(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would run Triton on the CPU
    model = _mlp()
    snap = Snapshot(model)
    fast = nmgraph.compile(model, backend=backend)
    with pytest.raises(BackendUnavailableError, match=rf"backend='{backend}'\) cannot run on cpu: .*Nothing was changed"):
        fast(_x())
    snap.assert_unchanged()
    assert fast.report.plan is None and fast.report.permute is None


def test_compile_strict_on_a_cpu_changes_nothing():
    model = _mlp()
    snap = Snapshot(model)
    with pytest.raises(StrictModeError, match=r"strict=True\): these layers would stay dense:\n  - 0\.weight: .*CPU"):
        nmgraph.compile(model, strict=True)(_x())
    snap.assert_unchanged()


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
def test_compile_fails_while_lowering(monkeypatch, exc):
    from nmgraph import deploy

    model = _mlp()
    snap = Snapshot(model)
    fast = nmgraph.compile(model, search="random")
    monkeypatch.setattr(deploy, "lower_linears", _raise_on_call(1, exc))
    with pytest.raises(exc):
        fast(_x())
    snap.assert_unchanged()
    assert fast.report.plan is None and not fast.report.lowerings
    monkeypatch.undo()
    with torch.no_grad():
        fast(_x())  # the first call that succeeds permutes and prunes, once
    assert nmgraph.is_nm(model[0].weight, "2:4") and fast.report.permute is not None


def test_compile_refuses_nan_weights_before_permuting():
    model = _mlp()
    with torch.no_grad():
        model[4].weight[1, 1] = float("nan")
    snap = Snapshot(model)
    with pytest.raises(ShapeError, match=r"weight '4\.weight' .* holds 1 NaN"):
        nmgraph.compile(model)(_x())
    snap.assert_unchanged()

"""The node-major runner: exact layer inputs, layer-by-layer pruning against a hand-written reference,
and activation memory that does not grow with depth."""

from __future__ import annotations

import torch
from torch import nn

import nmgraph
from nmgraph.oneshot.sequential import collect_statistics, prune_layers
from nmgraph.oneshot.taps import Geometry, find_taps
from nmgraph.oneshot.wanda import wanda_prune
from tests.oneshot import models


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))))


def _setup(model, samples):
    gm = nmgraph.capture(model, samples[0][0], samples[0][1])
    plan = nmgraph.analyze(gm, "2:4")
    taps = find_taps(gm, plan.layers)
    geometry = {i.name: Geometry.of(i.shape, i.axis, taps[i.name][0]) for i in plan.layers}
    return gm, plan, taps, geometry


def test_statistics_are_the_inputs_each_linear_receives():
    torch.manual_seed(0)
    model = models.llama().eval()
    samples = [((t.unsqueeze(0),), {"use_cache": False}) for t in models.tokens(3)]
    gm, plan, taps, geometry = _setup(model, samples)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.__setitem__(name, seen.get(name, 0) + args[0].reshape(-1, args[0].shape[-1])
                                                      .pow(2).sum(0)))
        for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for args, kwargs in samples:
            model(*args, **kwargs)
    for h in hooks:
        h.remove()
    stats, rows, _ = collect_statistics(gm, taps, geometry, samples, "wanda")
    assert set(stats) == {i.name for i in plan.layers} and all(r == [48] for r in rows.values())
    for name, vec in stats.items():
        torch.testing.assert_close(vec[0], seen[name.rsplit(".", 1)[0]], rtol=1e-5, atol=1e-5)


def test_sequential_pruning_feeds_each_layer_the_pruned_layers_outputs():
    torch.manual_seed(0)
    model = MLP().eval()
    xs = [torch.randn(8, 16) for _ in range(3)]
    samples = [((x,), {}) for x in xs]
    ref = MLP().eval()
    ref.load_state_dict(model.state_dict())
    gm, _plan, taps, geometry = _setup(model, samples)
    outcomes, _ = prune_layers(gm, taps, geometry, samples, "wanda", "2:4", sequential=True)
    assert [o.name for o in outcomes] == ["l1.weight", "l2.weight", "l3.weight"]
    h = torch.cat(xs)
    with torch.no_grad():  # the reference: prune l1 on x, l2 on the pruned l1's outputs, ...
        for layer in (ref.l1, ref.l2, ref.l3):
            layer.weight.copy_(wanda_prune(layer.weight, h.pow(2).sum(0), "2:4")[0])
            h = torch.relu(layer(h))
    for name in ("l1", "l2", "l3"):
        torch.testing.assert_close(model.get_submodule(name).weight, ref.get_submodule(name).weight)
    errors = [o.rel_error for o in outcomes]
    assert all(e is not None and 0 < e < 1 for e in errors) and all(o.tokens == 24 for o in outcomes)


def test_whole_model_path_takes_every_statistic_from_the_dense_model():
    torch.manual_seed(0)
    model = MLP().eval()
    xs = [torch.randn(8, 16) for _ in range(2)]
    samples = [((x,), {}) for x in xs]
    with torch.no_grad():
        h1 = torch.relu(model.l1(torch.cat(xs)))
        want = wanda_prune(model.l2.weight, h1.pow(2).sum(0), "2:4")[0]
    gm, _, taps, geometry = _setup(model, samples)
    prune_layers(gm, taps, geometry, samples, "wanda", "2:4", sequential=False)
    torch.testing.assert_close(model.l2.weight, want)


def test_peak_activation_memory_does_not_grow_with_depth():
    samples = [((t.unsqueeze(0),), {"use_cache": False}) for t in models.tokens(4, length=32)]
    peaks, totals = [], []
    for layers in (2, 5):
        torch.manual_seed(0)
        model = models.llama(layers=layers)
        gm, plan, taps, geometry = _setup(model, samples)
        _, peak = prune_layers(gm, taps, geometry, samples, "wanda", "2:4", sequential=True)
        peaks.append(peak)
        # what keeping every layer's inputs for all samples would take
        totals.append(sum(4 * 32 * i.shape[i.axis] * 4 for i in plan.layers))
        assert all(nmgraph.is_nm(model.get_parameter(i.name), "2:4", axis=i.axis) for i in plan.layers)
    assert peaks[0] == peaks[1], peaks
    assert peaks[1] < totals[1] / 4, (peaks, totals)


def test_blocked_gram_is_x_transpose_x():
    from nmgraph.oneshot.sequential import _add_gram

    x = torch.randn(64, 1030, dtype=torch.float64)
    h = torch.ones(1030, 1030, dtype=torch.float64)
    _add_gram(h, x)
    torch.testing.assert_close(h, 1 + x.t() @ x)

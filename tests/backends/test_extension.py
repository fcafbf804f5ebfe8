"""A backend of one's own: one class (its own graph op included) plus one registry entry; the
lowering pass calls the op of the very object the dispatcher timed."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import nmgraph
from nmgraph.backends import Backend, BackendRegistry, GraphCall
from nmgraph.backends.dense import DenseBackend, compressed_shape, linear_weight
from nmgraph.backends.dispatch import Dispatcher
from nmgraph.backends.ops import check_x, register_frozen_linear
from nmgraph.passes.lower_linears import LowerLinearsConfig, lower_linears


@torch.library.custom_op("nmgraph_test::stored_linear", mutates_args=())
def stored_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                  in_features: int) -> torch.Tensor:
    check_x(x, in_features, "stored_linear")
    return F.linear(x, weight, bias)


register_frozen_linear(stored_linear, n_buffers=1, shape=lambda c: (c[0], c[1]), dense_weight=lambda b, c: b[0])


class StoredDense(Backend):
    """A 'sparse' backend for the test: the dense weight, stored once as a buffer."""

    name = "stored"

    def __init__(self) -> None:
        self.runs = 0

    def prepare(self, weight):
        return linear_weight(weight)

    def run(self, x, prepared, bias):
        self.runs += 1
        return F.linear(x, prepared, bias)

    def lower(self, weight, prepared) -> GraphCall:
        return GraphCall(torch.ops.nmgraph_test.stored_linear.default, (("stored_w", prepared),),
                         compressed_shape(weight))


def test_a_registered_backend_is_timed_and_lowered_as_one_object():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    gm = nmgraph.capture(model, (x,))
    plan = nmgraph.analyze(gm, "2:4", include=["2"])
    nmgraph.convert(gm, "2:4", plan=plan)
    reference = copy.deepcopy(model)
    stored = StoredDense()
    registry = BackendRegistry([DenseBackend(), stored])
    timings = {"dense": 2e-3, "stored": 1e-3}
    dispatcher = Dispatcher(registry=registry, timer=lambda label, fn: (fn(), timings[label])[1],
                            measure_on_cpu=True)
    result = lower_linears(gm, LowerLinearsConfig(weights={i.name: i.axis for i in plan.layers},
                                                  dispatcher=dispatcher))
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.nmgraph_test.stored_linear.default) == 2
    assert set(result.info["backends"].values()) == {"stored"} and stored.runs >= 2  # timed, then lowered
    assert isinstance(gm.get_buffer("0.weight_stored_w"), torch.Tensor)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-6, atol=1e-6)

"""Typed errors at the front door: every bad argument of a public call is an NMGraphError subclass
whose message names the argument and the fix, raised before anything changes (docs/reliability.md)."""

from __future__ import annotations

import math

import pytest
import torch

import nmgraph
from nmgraph.errors import ArgumentError, NMGraphError, PlanError, UnsupportedError
from nmgraph.validate import check_seed, check_time_limit

from .test_rollback import Snapshot


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 8))


def _captured():
    model = _mlp()
    gm = nmgraph.capture(model, (torch.randn(4, 16),))
    return model, gm, nmgraph.analyze(gm)


def test_argument_error_is_a_value_and_type_error():
    assert issubclass(ArgumentError, NMGraphError) and issubclass(ArgumentError, ValueError)
    assert issubclass(ArgumentError, TypeError)


def test_analyze_needs_a_captured_graph():
    model = _mlp()
    x = torch.randn(4, 16)
    with pytest.raises(UnsupportedError, match=r"got Sequential; call nmgraph.capture\(model, example_inputs\) first"):
        nmgraph.analyze(model)
    ep = torch.export.export(model, (x,))
    with pytest.raises(UnsupportedError, match=r"got a torch.export.ExportedProgram: pass nmgraph.capture\(model"):
        nmgraph.analyze(ep)


class _ReturnsNone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        self.b(self.a(x))


@pytest.mark.parametrize("call", [
    lambda m, x: nmgraph.analyze(nmgraph.capture(m, (x,))),
    lambda m, x: nmgraph.convert(m, example_inputs=(x,)),
    lambda m, x: nmgraph.prepare(m, (x,)),
    lambda m, x: nmgraph.compile(m)(x),
])
def test_a_forward_returning_none_is_refused(call):
    model = _ReturnsNone()
    snap = Snapshot(model)
    with pytest.raises(UnsupportedError, match=r"returns no tensor .*Make forward\(\) return its output"):
        call(model, torch.randn(2, 8))
    snap.assert_unchanged()


@pytest.mark.parametrize("kwargs,match", [
    ({"perms": {0: None}}, r"permute\(perms=\{0: NoneType\}\): a permutation is a 1-D LongTensor"),
    ({"perms": {0: torch.arange(32) + 0.5}}, r"perms=\{0: ...\}\) has dtype torch.float32: .*truncated silently"),
    ({"perms": {0: [0.0, 1.0]}}, r"has dtype torch.float32"),
    ({"perms": {0: torch.arange(32).view(4, 8)}}, r"has shape \[4, 8\]: a permutation is 1-D"),
    ({"perms": [torch.arange(32)]}, r"perms=...\) takes \{group_id: LongTensor\}, got list"),
    ({"seed": None}, r"permute\(seed=None\): the seed must be an int"),
    ({"seed": "0"}, r"permute\(seed='0'\)"),
    ({"seed": 1.5}, r"permute\(seed=1.5\)"),
    ({"seed": 2**70}, r"must fit in 64 bits"),
    ({"time_limit": "5"}, r"permute\(time_limit='5'\): a time limit is a number of seconds \(str given\)"),
    ({"time_limit": -1}, r"permute\(time_limit=-1\): a time limit is a number of seconds >= 0"),
    ({"time_limit": math.nan}, r"time_limit=nan"),
    ({"time_limit": True}, r"time_limit=True"),
])
def test_permute_arguments(kwargs, match):
    model, gm, plan = _captured()
    snap = Snapshot(model)
    with pytest.raises(ArgumentError, match=match):
        nmgraph.permute(gm, plan, **kwargs)
    snap.assert_unchanged()


def test_permute_needs_the_graph_and_the_plan():
    model, gm, plan = _captured()
    with pytest.raises(ArgumentError, match=r"permute\(\) permutes a captured graph in place, got Sequential: pass "
                                            r"the GraphModule returned by nmgraph.capture"):
        nmgraph.permute(model, plan)
    with pytest.raises(ArgumentError, match=r"needs the SparsityPlan returned by nmgraph.analyze\(gm\), got dict"):
        nmgraph.permute(gm, plan.to_dict())


def test_valid_arguments_pass():
    check_seed(0, "f")
    check_seed(torch.tensor(3).item(), "f")
    for t in (None, 0, 2.5, math.inf):
        check_time_limit(t, "f")
    _, gm, plan = _captured()
    g = plan.groups[0]
    report = nmgraph.permute(gm, plan, perms={g.id: g.random_permutation(torch.Generator().manual_seed(0)).tolist()})
    assert report.permuted == [g.id]


def test_compile_checks_seed_and_time_limit_up_front():
    with pytest.raises(ArgumentError, match=r"nmgraph.compile\(seed=None\)"):
        nmgraph.compile(_mlp(), seed=None)
    with pytest.raises(ArgumentError, match=r"nmgraph.compile\(time_limit=-2\)"):
        nmgraph.compile(_mlp(), time_limit=-2)


@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_a_name_pattern_that_matches_nothing_lists_near_names(arg):
    model, gm, _ = _captured()
    snap = Snapshot(model)
    with pytest.raises(PlanError, match=rf"{arg}='4.wieght' matches no parameter or module name of this graph "
                                        r"\(did you mean '4.weight'"):
        nmgraph.analyze(gm, **{arg: ["4.wieght"]})
    with pytest.raises(PlanError, match=rf"{arg}='fc9' matches no parameter"):
        nmgraph.convert(model, example_inputs=(torch.randn(4, 16),), **{arg: ["fc9"]})
    with pytest.raises(PlanError, match=rf"{arg}='2.\*x'"):
        nmgraph.prepare(model, (torch.randn(4, 16),), **{arg: ["2.*x"]})
    with pytest.raises(PlanError, match=rf"{arg}='lm_haed'"):
        nmgraph.compile(model, **{arg: ["lm_haed"]})(torch.randn(4, 16))
    snap.assert_unchanged()
    # a string is one pattern; a module name, a parameter name and a glob all match
    assert [i.name for i in nmgraph.analyze(gm, include="4").layers] == ["0.weight", "2.weight", "4.weight"]
    assert nmgraph.analyze(gm, exclude=["0.weight", "2", "*.bias"]).layers == ()
    with pytest.raises(ArgumentError, match=r"analyze\(include=...\) takes name patterns \(strings\), got 4"):
        nmgraph.analyze(gm, include=[4])


def test_misspelled_options_list_the_valid_names():
    # tests/test_deploy.py::test_compile_errors and ::test_torch_compile_backend_rejects_unknown_options
    # hold nmgraph.compile(serach=...) and torch.compile(options={"patern": ...}); here the model is unchanged
    model = _mlp()
    snap = Snapshot(model)
    with pytest.raises(UnsupportedError, match=r"unknown option 'serach'; valid options: permute, search"):
        nmgraph.compile(model, serach="none")
    snap.assert_unchanged()

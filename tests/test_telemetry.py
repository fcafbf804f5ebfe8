import logging

import pytest
import torch

from nmgraph.masking import STE, MaskState, SADTracker, Schedule, SparsityState, TrainingConfig
from nmgraph.pattern import Pattern
from nmgraph.training import SparsityCallback, prepare


def _state(total_steps=4):
    p = Pattern(1, 4)
    layers = [("l0", MaskState("w0", (1, 8), 1, p, with_grad_mask=False)),
              ("l1", MaskState("w1", (2, 4), 1, p, with_grad_mask=False))]
    st = SparsityState(TrainingConfig(p, STE(), Schedule(total_steps=total_steps)), layers)
    return st


def _set(st, l0, l1, step):
    st.l0.hard.copy_(torch.tensor([l0], dtype=torch.bool))
    st.l1.hard.copy_(torch.tensor(l1, dtype=torch.bool))
    st.step.fill_(step)


def test_sad_counts_by_hand():
    st = _state(total_steps=4)  # mid-training reference at step 2
    _set(st, [1, 0, 0, 0, 0, 1, 0, 0], [[1, 0, 0, 0], [0, 0, 0, 1]], 0)
    tracker = SADTracker(st)
    assert tracker.mid_step == 2
    # step 1: l0 moves its first group's kept weight; l1 unchanged. kept: l0 2, l1 2 -> 4 total
    _set(st, [0, 1, 0, 0, 0, 1, 0, 0], [[1, 0, 0, 0], [0, 0, 0, 1]], 1)
    r1 = tracker.update()
    assert r1["layers"]["w0"] == {"flips": 0.5, "dist_start": 0.5, "dist_mid": None}
    assert r1["layers"]["w1"] == {"flips": 0.0, "dist_start": 0.0, "dist_mid": None}
    assert (r1["step"], r1["flips"], r1["dist_start"], r1["dist_mid"]) == (1, 0.25, 0.25, None)
    assert r1["phase"] == "sparse" and r1["pattern"] == "1:4"
    # step 2 (mid): l0 goes back, l1 changes both groups
    _set(st, [1, 0, 0, 0, 0, 1, 0, 0], [[0, 1, 0, 0], [0, 0, 1, 0]], 2)
    r2 = tracker.update()
    assert r2["layers"]["w0"] == {"flips": 0.5, "dist_start": 0.0, "dist_mid": 0.0}
    assert r2["layers"]["w1"] == {"flips": 1.0, "dist_start": 1.0, "dist_mid": 0.0}
    assert (r2["flips"], r2["dist_start"], r2["dist_mid"]) == (0.75, 0.5, 0.0)
    # step 3: one l1 group returns to its start; relative to mid it moved
    _set(st, [1, 0, 0, 0, 0, 1, 0, 0], [[1, 0, 0, 0], [0, 0, 1, 0]], 3)
    r3 = tracker.update()
    assert r3["layers"]["w1"] == {"flips": 0.5, "dist_start": 0.5, "dist_mid": 0.5}
    assert (r3["flips"], r3["dist_start"], r3["dist_mid"]) == (0.25, 0.25, 0.25)
    assert [r["step"] for r in tracker.history] == [1, 2, 3]
    # resume the tracker from its state_dict: same answer for the next step
    other = SADTracker(st)
    other.load_state_dict(tracker.state_dict())
    _set(st, [0, 0, 1, 0, 0, 1, 0, 0], [[1, 0, 0, 0], [0, 0, 1, 0]], 4)
    a, b = tracker.update(), other.update()
    assert a == b and a["layers"]["w0"]["dist_mid"] == 0.5


def test_callback_telemetry_and_logging(caplog):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    gm = prepare(model, (x,), "2:4", method="ste", permute=False, total_steps=4)
    cb = SparsityCallback(gm, telemetry=True, log_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    start = model[0].weight.detach().clone()
    records = []
    with caplog.at_level(logging.INFO, logger="nmgraph.masking.telemetry"):
        for _ in range(4):
            gm(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
            records.append(cb.step())
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # reference: distance from the step-0 target mask, computed directly
    import nmgraph

    h0 = nmgraph.nm_mask(start, "2:4")
    h4 = nmgraph.nm_mask(model[0].weight, "2:4")
    expect = int((h4 & ~h0).sum()) / int(h4.sum())
    assert records[-1]["layers"]["0.weight"]["dist_start"] == pytest.approx(expect)
    assert records[-1]["dist_start"] > 0  # lr 0.5 moves the masks
    assert records[0]["dist_mid"] is None and records[1]["dist_mid"] == 0.0
    lines = [r.getMessage() for r in caplog.records if r.name == "nmgraph.masking.telemetry"]
    assert len(lines) == 2 and lines[0].startswith("SAD step 2 (sparse 2:4): flips")
    assert SparsityCallback(gm).step() is None  # telemetry off: nothing returned

"""Measured dispatch with a fake timer: fastest wins, dense unless sparse is faster, caching."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from nmgraph import compress, nm_mask
from nmgraph.backends import Backend, BackendRegistry, default_registry
from nmgraph.backends.dense import DenseBackend
from nmgraph.backends.dispatch import (
    CACHE_FORMAT,
    CPU_REASON,
    Dispatcher,
    DispatchReport,
    default_timer,
    m_bucket,
)
from nmgraph.errors import SerializationError, UnsupportedError


class FakeTimer:
    """Seconds per backend label; counts calls and checks the timed callable really runs."""

    def __init__(self, seconds):
        self.seconds = dict(seconds)
        self.calls = []

    def __call__(self, label, fn):
        out = fn()
        assert isinstance(out, torch.Tensor)
        self.calls.append(label)
        return self.seconds[label]


class ExactSparse(Backend):
    """A 'sparse kernel' that computes the right answer with F.linear (timed by the fake timer)."""

    def __init__(self, name, reason=None):
        self.name = name
        self.reason = reason

    def layer_reason(self, weight, dtype):
        return self.reason

    def prepare(self, weight):
        return DenseBackend().prepare(weight)

    def run(self, x, prepared, bias):
        return F.linear(x, prepared, bias)


class WrongSparse(ExactSparse):
    def run(self, x, prepared, bias):
        return F.linear(x, prepared, bias) + 1.0


class FailingSparse(ExactSparse):
    def run(self, x, prepared, bias):
        raise RuntimeError("kernel launch failed")


def _weight(n_out=24, k=64, pattern="2:4", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=g)
    return compress(w * nm_mask(w, pattern), pattern)


def _dispatcher(timer, *backends, **kwargs):
    registry = BackendRegistry([DenseBackend(), *backends])
    return Dispatcher(registry=registry, timer=timer, measure_on_cpu=True, **kwargs)


def test_chooses_the_fastest_sparse_kernel():
    timer = FakeTimer({"dense": 2e-3, "fast": 1e-3, "slow": 1.5e-3})
    d = _dispatcher(timer, ExactSparse("fast"), ExactSparse("slow")).decide("fc1.weight", _weight(), rows=4)
    assert d.backend == "fast" and d.source == "measured"
    assert d.times_ms == pytest.approx({"dense": 2.0, "fast": 1.0, "slow": 1.5})
    assert d.speedup == pytest.approx(2.0)
    assert "fast is 2.00x dense" in d.reason
    assert sorted(timer.calls) == ["dense", "fast", "slow"]


def test_dense_when_sparse_is_slower_or_not_faster_enough():
    slower = _dispatcher(FakeTimer({"dense": 1e-3, "s": 1.2e-3}), ExactSparse("s")).decide("a", _weight(), rows=1)
    assert slower.backend == "dense" and "dense is fastest" in slower.reason
    assert slower.speedup == pytest.approx(1.0)
    # 1% faster is within noise: below min_speedup=1.02 dense stays
    marginal = _dispatcher(FakeTimer({"dense": 1.01e-3, "s": 1e-3}), ExactSparse("s")).decide("a", _weight(), rows=1)
    assert marginal.backend == "dense" and "1.01x dense, below the 1.02x needed" in marginal.reason
    eager = _dispatcher(FakeTimer({"dense": 1.01e-3, "s": 1e-3}), ExactSparse("s"), min_speedup=1.0)
    assert eager.decide("a", _weight(), rows=1).backend == "s"


def test_decisions_are_cached_per_shape_bucket():
    timer = FakeTimer({"dense": 2e-3, "s": 1e-3})
    disp = _dispatcher(timer, ExactSparse("s"))
    w = _weight()
    first = disp.decide("l1", w, rows=3)  # bucket 4
    assert len(timer.calls) == 2
    again = disp.decide("l2", _weight(seed=1), rows=4)  # same key (bucket, N, K, pattern, dtype)
    assert len(timer.calls) == 2 and again.source == "memory" and again.layer == "l2"
    assert again.backend == first.backend and again.times_ms == first.times_ms
    disp.decide("l1", w, rows=5)  # bucket 8: measured again
    assert len(timer.calls) == 4
    disp.decide("l1", w, rows=4, bias=torch.randn(24))  # with a bias: another key
    assert len(timer.calls) == 6
    disp.decide("l3", _weight(n_out=40), rows=4)  # another N
    assert len(timer.calls) == 8
    report = disp.report()
    assert [d.layer for d in report.decisions] == ["l1", "l2", "l1", "l1", "l3"]
    assert [d.key.m_bucket for d in report.decisions] == [4, 4, 8, 4, 4]


def test_persistent_cache_round_trip(tmp_path):
    path = tmp_path / "sub" / "dispatch.json"
    timer = FakeTimer({"dense": 3e-3, "s": 1e-3})
    first = _dispatcher(timer, ExactSparse("s"), cache_path=path)
    chosen = first.decide("fc", _weight(), rows=16)
    data = json.loads(path.read_text())
    assert data["format"] == CACHE_FORMAT and len(data["entries"]) == 1
    (key, entry), = data["entries"].items()
    assert key == str(chosen.key) and entry["backend"] == "s"
    assert entry["times_ms"] == pytest.approx({"dense": 3.0, "s": 1.0})

    def never(label, fn):
        raise AssertionError("a cached decision must not be measured again")

    second = _dispatcher(never, ExactSparse("s"), cache_path=path)
    again = second.decide("fc", _weight(seed=5), rows=9)  # bucket 16 again
    assert again.source == "file" and again.backend == "s"
    assert again.times_ms == chosen.times_ms and again.reason == chosen.reason
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_cache_from_another_version_is_measured_again(tmp_path):
    path = tmp_path / "dispatch.json"
    _dispatcher(FakeTimer({"dense": 3e-3, "s": 1e-3}), ExactSparse("s"), cache_path=path).decide("fc", _weight(), rows=1)
    data = json.loads(path.read_text())
    data["env"]["torch"] = "0.0.0"
    path.write_text(json.dumps(data))
    timer = FakeTimer({"dense": 1e-3, "s": 3e-3})
    d = _dispatcher(timer, ExactSparse("s"), cache_path=path).decide("fc", _weight(), rows=1)
    assert d.source == "measured" and d.backend == "dense" and len(timer.calls) == 2


def test_unreadable_cache_is_an_error(tmp_path):
    path = tmp_path / "dispatch.json"
    path.write_text("{not json")
    disp = _dispatcher(FakeTimer({"dense": 1e-3}), cache_path=path)
    with pytest.raises(SerializationError, match=r"could not be read.*delete it"):
        disp.decide("fc", _weight(), rows=1)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(SerializationError, match="not an nmgraph dispatch cache"):
        _dispatcher(FakeTimer({"dense": 1e-3}), cache_path=path).decide("fc", _weight(), rows=1)


def test_cpu_runs_dense_without_measuring():
    def never(label, fn):
        raise AssertionError("no measuring on CPU")

    disp = Dispatcher(timer=never)  # default registry, measure_on_cpu=False
    d = disp.decide("fc", _weight(), rows=2, device="cpu")
    assert d.backend == "dense" and d.reason == CPU_REASON and d.source == "cpu"
    assert "no N:M kernel speeds up a CPU GEMM" in str(disp.report())


def test_wrong_failing_and_unavailable_candidates_are_not_chosen():
    timer = FakeTimer({"dense": 5e-3, "wrong": 1e-3, "fails": 1e-3, "nope": 1e-3, "ok": 4e-3})
    disp = _dispatcher(timer, WrongSparse("wrong"), FailingSparse("fails"), ExactSparse("nope", reason="no such dtype"),
                       ExactSparse("ok"))
    d = disp.decide("fc", _weight(), rows=1)
    assert d.backend == "ok" and set(d.times_ms) == {"dense", "ok"}
    assert d.unavailable["wrong"].startswith("output differs from dense")
    assert d.unavailable["fails"] == "failed: RuntimeError: kernel launch failed"
    assert d.unavailable["nope"] == "no such dtype"
    assert sorted(timer.calls) == ["dense", "ok"]


def test_no_sparse_candidate_keeps_dense_with_the_reasons():
    d = _dispatcher(FakeTimer({"dense": 1e-3}), ExactSparse("nope", reason="pattern 4:8 is not 2:4")).decide(
        "fc", _weight(), rows=1)
    assert d.backend == "dense" and "nope: pattern 4:8 is not 2:4" in d.reason and d.speedup == 1.0


def test_report_table_and_json():
    disp = _dispatcher(FakeTimer({"dense": 2e-3, "s": 1e-3}), ExactSparse("s"))
    disp.decide("encoder.fc1.weight", _weight(), rows=1)
    disp.decide("encoder.fc2.weight", _weight(n_out=40), rows=1)
    report = disp.report()
    assert isinstance(report, DispatchReport)
    text = str(report)
    assert "encoder.fc1.weight" in text and "encoder.fc2.weight" in text and "2.00x" in text
    assert "dense ms" in text and "s ms" in text
    data = json.loads(report.to_json())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert [d["backend"] for d in data["decisions"]] == ["s", "s"]
    assert data["decisions"][1]["key"]["n"] == 40 and data["decisions"][0]["speedup"] == pytest.approx(2.0)


def test_real_triton_kernel_with_a_fake_timer():
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 to run the Triton kernel")
    pytest.importorskip("triton")
    timer = FakeTimer({"dense": 2e-3, "triton": 1e-3})
    disp = Dispatcher(registry=default_registry(), timer=timer, measure_on_cpu=True)
    d = disp.decide("fc", _weight(), rows=2)  # fp32 2:4 at 2 rows: the GEMV
    assert d.backend == "triton" and "cusparselt" in d.unavailable
    assert "CUDA" in d.unavailable["cusparselt"]
    assert timer.calls == ["dense", "triton"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton backend on CPU tensors")
def test_backends_are_not_timed_outside_their_rows():
    # The Triton decode kernels decline prefill sizes, and M >= 3 where the tensor-core kernel has no
    # fast expansion: the dispatcher does not time them there and keeps the reason.
    timer = FakeTimer({"dense": 2e-3, "triton": 1e-3})
    disp = Dispatcher(registry=default_registry(), timer=timer, measure_on_cpu=True)
    prefill = disp.decide("fc", _weight(), rows=65)
    assert prefill.backend == "dense" and prefill.key.m_bucket == 128
    assert "prefill size" in prefill.unavailable["triton"]
    generic = disp.decide("fc", _weight(), rows=3)  # fp32 2:4: no fast tensor-core path
    assert generic.backend == "dense" and "no fast expansion for 2:4 float32" in generic.unavailable["triton"]
    assert timer.calls == ["dense", "dense"]

    class Decode(ExactSparse):
        def rows_reason(self, weight, dtype, rows):
            return None if rows <= 16 else "decode only"

    own = _dispatcher(FakeTimer({"dense": 2e-3, "dec": 1e-3}), Decode("dec"))
    assert own.decide("fc", _weight(), rows=16).backend == "dec"
    far = own.decide("fc", _weight(), rows=17)
    assert far.backend == "dense" and far.unavailable == {"dec": "decode only"}


def test_argument_validation():
    with pytest.raises(UnsupportedError, match="must include 'dense'"):
        Dispatcher(candidates=("triton",))
    with pytest.raises(UnsupportedError, match="Unknown nmgraph backend 'bogus'"):
        Dispatcher(candidates=("dense", "bogus"))
    with pytest.raises(UnsupportedError, match="min_speedup"):
        Dispatcher(min_speedup=0.5)
    for bad in (0.0, math.nan, -1.0):
        disp = _dispatcher(FakeTimer({"dense": bad}))
        with pytest.raises(UnsupportedError, match="expected seconds > 0"):
            disp.decide("fc", _weight(), rows=1)


def test_m_bucket_and_default_cpu_timer():
    assert [m_bucket(r) for r in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]
    calls = []
    seconds = default_timer(torch.device("cpu"), warmup=1, repeats=3)("dense", lambda: calls.append(1))
    assert seconds > 0 and len(calls) == 4

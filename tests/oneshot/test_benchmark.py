"""benchmarks/oneshot.py --quick: trains a tiny byte-level Llama a few steps and runs every variant."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest

pytest.importorskip("transformers")

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "oneshot.py")


def test_quick_mode_runs_every_variant():
    spec = importlib.util.spec_from_file_location("oneshot_benchmark", PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--threads", "1"])
    rows = out["results"]
    assert [r["variant"] for r in rows] == ["dense"] + [name for name, _, _ in bench.VARIANTS]
    assert all(math.isfinite(r["bpb"]) and r["bpb"] > 0 for r in rows)
    assert all(r["layers"] == 14 for r in rows[1:])  # every decoder Linear of the 2-layer model
    assert "| sparsegpt+perm |" in bench.table(rows, ["2:4"])

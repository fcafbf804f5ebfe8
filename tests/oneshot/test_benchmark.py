"""benchmarks/oneshot.py --quick: trains a tiny byte-level Llama a few steps and runs every variant; a
rejected permutation gives exactly the result without one."""

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
    by_name = {r["variant"]: r for r in rows}
    for name, _, permute in bench.VARIANTS:
        if not permute:
            continue
        row, plain = by_name[name], by_name[name.removesuffix("+perm")]
        assert row["permutation_accepted"] is not None  # no time limit: the permutation was tried
        assert not row["permutation_accepted"] or row["error_permuted"] < row["error_unpermuted"]
        if not row["permutation_accepted"]:  # rejected: the very weights of the run without permutation
            assert row["bpb"] == plain["bpb"] and row["output_rel_error"] == plain["output_rel_error"]
        assert row["error_unpermuted"] == plain["loss_sparse"]  # the decision is by the held-out loss

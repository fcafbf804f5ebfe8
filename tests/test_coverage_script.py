"""benchmarks/coverage.py keeps running: two cheap architectures through its per-model function."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py"


@pytest.fixture(scope="module")
def coverage():
    spec = importlib.util.spec_from_file_location("nmgraph_bench_coverage", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llama_is_permutable_and_compile_matches_the_pruned_reference(coverage):
    row = coverage.run_case("llama")
    assert row["errors"] == []
    assert row["capture"] == "export"
    assert row["eligible"] == 14 and row["permutable"] > 0
    assert row["permute_error"] <= 1e-5
    assert row["compile_diff"] == 0.0 and row["graph_diff"] == 0.0
    assert coverage.problems(row) == []
    assert "| llama | decoder | export | 14 |" in coverage.table([row])


def test_a_barrier_is_attributed_to_the_layers_it_costs(coverage):
    row = coverage.run_case("bert_bare")  # its residual stream is the model output
    assert row["errors"] == [] and row["compile_diff"] == 0.0 and row["graph_diff"] == 0.0
    assert 0 < row["permutable"] < 1
    unpermutable = round(row["eligible"] * (1 - row["permutable"]))
    assert sum(row["costly_barriers"].values()) >= unpermutable
    assert any("reaches the model output" in reason for reason in row["costly_barriers"])


def test_a_mismatch_or_an_untyped_error_fails_the_row(coverage):
    ok = {"name": "m", "errors": [], "ref_scale": 2.0, "compile_diff": 0.0, "graph_diff": 1e-7}
    assert coverage.problems(ok) == []
    assert coverage.problems({**ok, "graph_diff": 1e-3})
    typed = {"stage": "capture", "type": "CaptureError", "typed": True, "msg": "", "where": []}
    assert coverage.problems({**ok, "errors": [typed]}) == []
    assert coverage.problems({**ok, "errors": [{**typed, "type": "TypeError", "typed": False}]})
    assert coverage.problems({**ok, "errors": [{**typed, "stage": "permute", "type": "VerificationError"}]})

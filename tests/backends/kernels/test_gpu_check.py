"""benchmarks/gpu_check.py in its reduced mode (CPU, Triton interpreter), so the script cannot rot."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("triton")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="--cpu-smoke runs under TRITON_INTERPRET=1")
def test_cpu_smoke(tmp_path, capsys):
    import gpu_check

    out = tmp_path / "smoke.json"
    assert gpu_check.main(["--cpu-smoke", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["info"]["device"].startswith("cpu")
    assert len(data["rows"]) == len(gpu_check.SMOKE_SHAPES) * len(gpu_check.PATTERNS) * len(gpu_check.SMOKE_MS)
    for row in data["rows"]:  # the Triton backend's graph op, on the kernel its rows choose
        assert set(row["paths"]) == {"triton"}
        assert row["paths"]["triton"]["kernel"] == ("gemv" if row["M"] <= 2 else "mma")
        assert all(p["rel_err"] <= 1e-2 for p in row["paths"].values())
    assert "rel err" in capsys.readouterr().out

"""`make demo` runs examples/quickstart.py; this keeps it from rotting between releases."""

import importlib.util
import re
from pathlib import Path


def test_quickstart_runs_end_to_end(capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    out = capsys.readouterr().out
    diff = float(re.search(r"nmgraph.compile: max difference to the pruned graph (\S+)", out).group(1))
    assert diff <= 1e-5
    ort = float(re.search(r"onnxruntime vs torch: max \|diff\| (\S+)", out).group(1))
    assert ort <= 1e-4
    assert re.search(r"converted: 13 weights exactly 2:4", out)
    assert "calls run the model's own forward" in out

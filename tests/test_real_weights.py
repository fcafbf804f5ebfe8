"""benchmarks/real_weights.py keeps running: trained weights from a wheel through the whole pipeline.

Silero VAD (MIT, weights inside the silero-vad wheel, in the dev extra): its LSTMCell, unrolled over
the chunks at capture, is eligible and permutable, and the permutations ``permute`` keeps by the
pruned model's error do not raise that error on held-out inputs.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "real_weights.py"

if importlib.util.find_spec("silero_vad") is None:
    pytest.skip("silero-vad is not installed (pip install 'nmgraph[dev]' brings it)", allow_module_level=True)


@pytest.fixture(scope="module")
def real_weights():
    spec = importlib.util.spec_from_file_location("nmgraph_bench_real_weights", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_silero_vad_quick(real_weights):
    row = real_weights.run_case("silero_vad", quick=True, variants=(None, "error"))
    assert row["capture_diff"] <= 1e-6
    assert row["eligible"] == 6 and row["in_group"] == 6  # the LSTMCell's w_ih and w_hh among them
    none, error = row["variants"]["none"], row["variants"]["error"]
    before, after = error["pruned_error"]
    assert after <= before and error["kept"] <= error["candidates"]
    # held-out clips: the kept permutations do not move the pruned model further from the dense one
    assert error["held_out_error"] <= none["held_out_error"]
    assert "| silero_vad (silero-vad 6.2.3, MIT) |" in real_weights.table([row | {
        "variants": {**row["variants"], "magnitude": error}}])

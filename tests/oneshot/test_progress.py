"""sparsify's progress: one bar per stage (statistics, search, prune), the search bar one step per
group with the kept saliency, nothing when stderr is not a terminal."""

import sys

import pytest
import torch

import nmgraph

from . import models

tqdm_auto = pytest.importorskip("tqdm.auto")


class _Recorder:
    """Stands in for tqdm: records every bar made, its total, how far it got and its postfixes."""

    made: list

    def __init__(self, total=None, desc="", unit="it", leave=True, disable=False, **_):
        self.total, self.desc, self.unit, self.disable, self.n, self.postfixes = total, desc, unit, disable, 0, []
        self.closed = False
        type(self).made.append(self)

    def update(self, k=1):
        self.n += k

    def set_postfix_str(self, s, refresh=True):
        self.postfixes.append(s)

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _sparsify(monkeypatch, progress):
    recorder = type("Recorder", (_Recorder,), {"made": []})
    monkeypatch.setattr(tqdm_auto, "tqdm", recorder)
    torch.manual_seed(0)
    model = models.llama()
    report = nmgraph.sparsify(model, "2:4", method="wanda", calibration=models.tokens(6), permute=True,
                              time_limit=120, progress=progress)
    return report, recorder.made


def test_one_bar_per_stage_and_the_search_bar_counts_groups(monkeypatch):
    report, bars = _sparsify(monkeypatch, progress=True)
    descs = [b.desc for b in bars]
    assert sum(d.startswith("search 2:4") for d in descs) == 1  # one bar for every group, not one per group
    assert not any(d.startswith("permutation search") for d in descs)  # the search's own per-group bar
    search = next(b for b in bars if b.desc.startswith("search 2:4"))
    searched = [g for g in report.groups]
    assert search.unit == "group" and search.total == len(searched) > 0 and search.n == search.total
    assert any("kept" in s and "%" in s for s in search.postfixes)
    assert all(b.closed for b in bars)
    assert all(b.disable is None for b in bars)  # tqdm turns itself off when stderr is not a terminal


def test_no_bar_without_progress(monkeypatch):
    _, bars = _sparsify(monkeypatch, progress=False)
    assert bars == []


def test_progress_true_writes_nothing_when_stderr_is_not_a_terminal(capfd):
    assert not sys.stderr.isatty()
    torch.manual_seed(0)
    nmgraph.sparsify(models.llama(), "2:4", method="magnitude", example_inputs=models.tokens(1)[0][None],
                     permute=True, time_limit=60, progress=True)
    assert "search 2:4" not in capfd.readouterr().err

"""Calibration data: every accepted form becomes batch-1 samples of one shape; bad input raises a typed
error naming the item and the fix."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import nmgraph
from nmgraph.oneshot import CalibrationError, load_calibration


def test_token_sequences_become_one_row_each_and_seq_len_cuts_or_drops():
    seqs = [torch.arange(10), torch.arange(12), torch.arange(5)]
    cal = load_calibration(seqs, seq_len=8)
    assert len(cal) == 2 and cal.dropped == 1 and cal.tokens == 8
    (args, kwargs), _ = cal.samples
    assert args[0].shape == (1, 8) and kwargs == {} and torch.equal(args[0][0], torch.arange(8))


def test_a_batch_tensor_splits_along_dim0_and_num_samples_caps():
    batch = torch.randint(0, 50, (6, 4))
    cal = load_calibration(batch, num_samples=4)
    assert len(cal) == 4
    assert all(torch.equal(cal.samples[i][0][0], batch[i : i + 1]) for i in range(4))


def test_dicts_split_every_batched_tensor_and_extra_kwargs_do_not_override():
    ids = torch.randint(0, 50, (3, 7))
    item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": True}
    cal = load_calibration([item], extra_kwargs={"use_cache": False, "return_dict": True})
    assert len(cal) == 3
    args, kwargs = cal.samples[2]
    assert args == () and kwargs["input_ids"].shape == (1, 7) and torch.equal(kwargs["input_ids"], ids[2:3])
    assert kwargs["use_cache"] is True and kwargs["return_dict"] is True


def test_mappings_like_batch_encoding_and_dataloaders_are_read():
    encoding = collections.UserDict({"input_ids": torch.randint(0, 50, (2, 5))})  # BatchEncoding is a UserDict
    assert len(load_calibration([encoding])) == 2
    loader = DataLoader(TensorDataset(torch.randn(10, 3)), batch_size=4)  # last batch has 2 rows
    cal = load_calibration(loader)
    assert len(cal) == 10 and cal.samples[9][0][0].shape == (1, 3)


def test_reading_stops_after_num_samples():
    def stream():
        yield torch.zeros(2, 3)
        yield torch.zeros(2, 3)
        raise AssertionError("read past num_samples")

    assert len(load_calibration(stream(), num_samples=3)) == 3


@pytest.mark.parametrize(("data", "kwargs", "message"), [
    ("some text", {}, "does not tokenize text"),
    (["a", "b"], {}, "calibration item 0 is a str"),
    ([3], {}, "calibration item 0 is a int"),
    ([(1, 2)], {}, "without tensors"),
    ([], {}, "gave no samples"),
    (None, {}, "is None"),
    (42, {}, "is not iterable"),
    ([torch.zeros(1, 4), torch.zeros(1, 5)], {}, "sample 1 does not match sample 0"),
    ([torch.arange(4)], {"seq_len": 8}, r"gave no samples \(1 shorter than seq_len=8"),
    ([torch.randn(2, 3)], {"seq_len": 2}, "no 2-D integer"),
    ([torch.zeros(2)], {"num_samples": 0}, "num_samples must be a positive int"),
    ([torch.zeros(2)], {"seq_len": -1}, "seq_len must be a positive int"),
])
def test_bad_calibration_raises_a_typed_error(data, kwargs, message):
    with pytest.raises(CalibrationError, match=message):
        load_calibration(data, **kwargs)
    assert issubclass(CalibrationError, nmgraph.NMGraphError) and nmgraph.CalibrationError is CalibrationError

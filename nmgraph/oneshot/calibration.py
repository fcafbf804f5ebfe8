"""Calibration data: what the model is run on to measure the statistics one-shot pruning needs.

:func:`load_calibration` turns what a user has at hand into a list of samples, each ``(args, kwargs)``
as the model is called, with batch size 1 and one shape for all (the captured graph has static
shapes). Accepted forms:

* an iterable of model inputs (a list, a generator, a ``torch.utils.data.DataLoader``): each item is
  a tensor (the one positional input), a tuple or list of positional inputs, or a mapping of keyword
  inputs (``{"input_ids": ..., "attention_mask": ...}``, a tokenizer's ``BatchEncoding``);
* a single tensor, read as a batch along dim 0; a single mapping, read as one batch.

A 1-D integer tensor is one token sequence (``[T]`` becomes ``[1, T]``). Every other tensor is a batch
along dim 0: an item with batch size ``B`` gives ``B`` samples (every tensor whose dim 0 is ``B`` is
split; other values are shared). ``seq_len`` cuts token inputs (the 2-D integer tensors, and every
tensor of the sample whose dim 1 has their length) to their first ``seq_len`` positions and drops
shorter samples. ``num_samples`` stops reading after that many samples, so a long DataLoader is not
exhausted. Nothing is downloaded and no text is tokenized here.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nmgraph.errors import NMGraphError

__all__ = ["Calibration", "CalibrationError", "Sample", "load_calibration"]

log = logging.getLogger(__name__)

Sample = tuple[tuple[Any, ...], dict[str, Any]]


class CalibrationError(NMGraphError, ValueError):
    """Calibration data cannot be read as model inputs (wrong type, mixed shapes, nothing left)."""


@dataclass(frozen=True)
class Calibration:
    """Normalised calibration samples: ``samples[i] = (args, kwargs)`` with batch size 1.

    ``dropped`` counts samples left out because they were shorter than ``seq_len``.
    """

    samples: tuple[Sample, ...]
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def tokens(self) -> int | None:
        """Positions per sample of the first 2-D integer input (``None`` for non-token models)."""
        t = _token_tensor(self.samples[0]) if self.samples else None
        return None if t is None else int(t.shape[1])


def load_calibration(
    data: Any,
    *,
    num_samples: int | None = 128,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
    extra_kwargs: Mapping[str, Any] | None = None,
) -> Calibration:
    """Reads ``data`` into at most ``num_samples`` samples of batch size 1 (see the module docstring).

    ``extra_kwargs`` are added to every sample's keyword inputs unless the sample sets them itself.
    Raises :class:`CalibrationError` naming the item and what to pass instead.

    >>> cal = load_calibration([torch.arange(10), torch.arange(12)], seq_len=8)
    >>> len(cal), cal.samples[1][0][0].shape
    (2, torch.Size([1, 8]))
    """
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise CalibrationError(f"num_samples must be a positive int or None, got {num_samples!r}.")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise CalibrationError(f"seq_len must be a positive int or None, got {seq_len!r}.")
    items = _items(data)
    samples: list[Sample] = []
    dropped = 0
    for index, item in enumerate(items):
        args, kwargs = _as_call(item, index)
        for sample in _split(args, kwargs, index):
            if seq_len is not None:
                sample = _cut(sample, seq_len, index)
                if sample is None:
                    dropped += 1
                    continue
            samples.append(sample)
            if num_samples is not None and len(samples) >= num_samples:
                break
        if num_samples is not None and len(samples) >= num_samples:
            break
    if not samples:
        why = f" ({dropped} shorter than seq_len={seq_len} were dropped)" if dropped else ""
        raise CalibrationError(f"calibration data gave no samples{why}. Pass an iterable of model inputs, "
                               "e.g. a list of token-id tensors or a DataLoader of input dicts.")
    if dropped:
        log.info("calibration: %d samples shorter than seq_len=%d dropped", dropped, seq_len)
    extra = dict(extra_kwargs or {})
    out = []
    for args, kwargs in samples:
        kw = {**{k: v for k, v in extra.items() if k not in kwargs}, **kwargs}
        if device is not None:
            args = tuple(_to(a, device) for a in args)
            kw = {k: _to(v, device) for k, v in kw.items()}
        out.append((args, kw))
    order = list(out[0][1])
    out = [(a, {k: kw[k] for k in order} if set(kw) == set(order) else kw) for a, kw in out]
    _check_uniform(out)
    return Calibration(tuple(out), dropped)


def _items(data: Any) -> Iterable[Any]:
    if data is None:
        raise CalibrationError("calibration data is None; pass an iterable of model inputs or a DataLoader.")
    if isinstance(data, (torch.Tensor, Mapping)):
        return [data]
    if isinstance(data, (str, bytes)):
        raise CalibrationError(
            f"calibration is a {type(data).__name__}; nmgraph does not tokenize text. Pass token ids, e.g. "
            "[tokenizer(text, return_tensors='pt')] or a list of LongTensors.")
    try:
        return iter(data)
    except TypeError:
        raise CalibrationError(
            f"calibration of type {type(data).__name__} is not iterable; pass a list of model inputs (tensors, "
            "tuples of positional inputs or dicts of keyword inputs) or a torch DataLoader.") from None


def _as_call(item: Any, index: int) -> Sample:
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, Mapping):
        if not all(isinstance(k, str) for k in item):
            raise CalibrationError(f"calibration item {index} is a mapping with non-string keys; keyword inputs "
                                   "need their argument names as keys.")
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        if item and not any(isinstance(v, torch.Tensor) for v in item):
            raise CalibrationError(
                f"calibration item {index} is a {type(item).__name__} without tensors ({_short(item)}); each item "
                "is the model's input: a tensor, a tuple of positional inputs or a dict of keyword inputs.")
        return tuple(item), {}
    if isinstance(item, (str, bytes)):
        raise CalibrationError(
            f"calibration item {index} is a {type(item).__name__}; nmgraph does not tokenize text. Pass token ids "
            "(tokenizer(text, return_tensors='pt')) instead.")
    raise CalibrationError(
        f"calibration item {index} is a {type(item).__name__}; each item must be a tensor, a tuple/list of "
        "positional inputs or a dict of keyword inputs.")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _split(args: tuple, kwargs: dict, index: int) -> list[Sample]:
    """One sample per row of the batch; 1-D integer tensors are one token sequence."""
    def lift(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() == 1 and not v.is_floating_point() and not v.is_complex() \
                and v.dtype != torch.bool:
            return v.unsqueeze(0)
        return v

    args = tuple(lift(a) for a in args)
    kwargs = {k: lift(v) for k, v in kwargs.items()}
    tensors = [v for v in itertools.chain(args, kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() >= 1]
    if not tensors:
        raise CalibrationError(f"calibration item {index} holds no tensor with a batch dimension; pass the model's "
                               "inputs as tensors.")
    batch = tensors[0].shape[0]
    if batch == 0:
        raise CalibrationError(f"calibration item {index} has batch size 0.")

    def row(v: Any, i: int) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch:
            return v[i : i + 1]
        return v

    return [(tuple(row(a, i) for a in args), {k: row(v, i) for k, v in kwargs.items()}) for i in range(batch)]


def _token_tensor(sample: Sample) -> torch.Tensor | None:
    args, kwargs = sample
    for v in itertools.chain(args, kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point() and v.dtype != torch.bool:
            return v
    return None


def _cut(sample: Sample, seq_len: int, index: int) -> Sample | None:
    tokens = _token_tensor(sample)
    if tokens is None:
        raise CalibrationError(
            f"seq_len={seq_len} was given but calibration item {index} has no 2-D integer (token) input to cut; "
            "leave seq_len=None for non-token inputs.")
    length = int(tokens.shape[1])
    if length < seq_len:
        return None

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == length:
            return v[:, :seq_len]
        return v

    args, kwargs = sample
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _signature(sample: Sample) -> tuple:
    def sig(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype)
        return ("value", type(v).__name__)

    args, kwargs = sample
    return tuple(sig(a) for a in args), tuple((k, sig(v)) for k, v in kwargs.items())


def _check_uniform(samples: list[Sample]) -> None:
    first = _signature(samples[0])
    for i, s in enumerate(samples[1:], start=1):
        sig = _signature(s)
        if sig != first:
            raise CalibrationError(
                f"calibration sample {i} does not match sample 0: {_describe(sig)} vs {_describe(first)}. "
                "Every sample must have the same inputs and shapes (the model is captured once); pass "
                "seq_len= to cut token inputs to one length, or pad them to one length.")


def _describe(sig: tuple) -> str:
    args, kwargs = sig
    parts = [str(list(a[1])) if a[0] == "tensor" else a[1] for a in args]
    parts += [f"{k}={list(v[1]) if v[0] == 'tensor' else v[1]}" for k, v in kwargs]
    return "(" + ", ".join(parts) + ")"


def _to(v: Any, device: torch.device | str) -> Any:
    return v.to(device) if isinstance(v, torch.Tensor) else v

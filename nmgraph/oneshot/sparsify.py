"""``nmgraph.sparsify``: one call from a dense model to an N:M model, pruned in place, with a report.

Steps: read the calibration data; capture the model and analyze it (which weights can be N:M, which
channels move together); run the dense model on held-out samples; prune every eligible weight layer
by layer (:mod:`nmgraph.oneshot.sequential`) and run the held-out samples again. With ``permute``,
then: put the dense weights back (the pruned ones kept aside), search a channel permutation per group
under the method's own saliency within the time budget (:mod:`nmgraph.oneshot.permutation`), apply
it, prune again and keep whichever of the two pruned models does better on the held-out samples (their
loss when the samples carry labels, else the relative error of the main output); a rejected permutation is undone and the first result written back, so it leaves
exactly the weights ``permute=False`` gives. The report says how far the outputs moved and, for the
permutation, both errors.

The model is changed in place: the captured graph's parameters *are* the model's Parameter objects,
so permuting and pruning them changes the user's module, which stays the same object with its own
methods (``generate``, ``save_pretrained``). If anything fails (or is interrupted) the model is put
back exactly as it was: the permutations are undone by their inverses, then the pruned weights are
restored from an undo log (:class:`nmgraph.rollback.TensorStore`: in memory up to a limit, then in
a temporary directory, never as a second copy of the whole model in memory).
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from nmgraph.analysis import analyze
from nmgraph.capture import capture
from nmgraph.compress import compressed_nbytes
from nmgraph.errors import ArgumentError, CaptureError, StrictModeError, VerificationError
from nmgraph.oneshot.calibration import Calibration, CalibrationError, Sample, load_calibration
from nmgraph.oneshot.permutation import DEFAULT_MAX_ROWS, search_groups
from nmgraph.oneshot.report import GroupReport, LayerReport, SparsifyReport
from nmgraph.oneshot.sequential import ERROR_SAMPLES, METHODS, collect_statistics, prune_layers
from nmgraph.oneshot.taps import Geometry, find_taps
from nmgraph.passes.permute_channels import apply_permutation, default_time_limit
from nmgraph.passes.permute_channels import permute as permute_channels
from nmgraph.pattern import Pattern
from nmgraph.rollback import TensorStore
from nmgraph.validate import check_seed, check_time_limit

__all__ = ["METHODS", "sparsify"]

log = logging.getLogger(__name__)

SEARCHES = ("none", "random", "greedy", "exhaustive")
UNDO_MEMORY_BYTES = 256 * 2**20  # weights saved for rollback in memory up to this, then on disk
MAX_HOLDOUT = 8
# The statistics pass of a data-aware search, as a share of a sequential pruning pass (which takes the
# same statistics block by block and then prunes: measured on the 2-core CPU on a 1.1B-Llama decoder
# layer, 32 x 128 tokens, pruning took 3.5x (Wanda) and 2.4x (SparseGPT) the statistics alone).
STATS_SHARE = {"wanda": 1 / 3.5, "sparsegpt": 1 / 2.4}
SAFETY = 0.05  # share of the time limit kept free
# The second pruning pass (with the permutation) is budgeted at this many times the first one, measured
# minutes before in the same call: a shared CPU's speed still moves between the two.
ESTIMATE_MARGIN = 1.25
MIN_SEARCH_SHARE = 0.05  # the statistics pass and a search run only if the search can get this share of the limit
# A permutation is kept only when the held-out samples show an improvement of more than this many
# standard errors (paired over the samples): within the noise, the unpermuted result is kept.
ACCEPT_Z = 2.0
PERMUTE_TOLERANCE_16BIT = 5e-2  # relative L2 change of the output a permutation may cause in bf16/fp16


def sparsify(
    model: torch.nn.Module,
    pattern: Any = "2:4",
    method: str = "magnitude",
    example_inputs: Any = None,
    calibration: Any = None,
    permute: bool = True,
    time_limit: float | None = None,
    progress: bool | None = None,
    *,
    num_samples: int | None = 128,
    seq_len: int | None = None,
    holdout: int | None = None,
    sequential: bool = True,
    search: str = "greedy",
    seed: int = 0,
    max_score_rows: int = DEFAULT_MAX_ROWS,
    blocksize: int = 128,
    percdamp: float = 0.01,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dense_head: bool = True,
    strict: bool = False,
    threads: int | None = None,
) -> SparsifyReport:
    """Makes every eligible weight of ``model`` exactly N:M, in place, and reports what it cost.

    ``method``: ``"magnitude"`` (keep the largest ``|w|``), ``"wanda"`` (``|w| * ||x||``, Sun et al.
    2023) or ``"sparsegpt"`` (OBS mask and reconstruction, Frantar & Alistarh 2023); the data-aware
    two need ``calibration``: an iterable of model inputs (tensors, tuples of positional inputs, dicts
    of keyword inputs) or a DataLoader, read by :func:`nmgraph.oneshot.load_calibration` with
    ``num_samples`` and ``seq_len``. The last ``holdout`` samples (default: an eighth, 1 to 8) are not
    used for statistics but to measure the output change. ``example_inputs`` (positional inputs, or a
    dict of keyword inputs) is used when there is no calibration data: to capture, and as the one
    sample. The model is captured with the first calibration sample.

    ``permute``: after pruning, also try a channel permutation: search one per group of the plan under
    the method's own saliency (row-sampled to ``max_score_rows`` rows per group; a group's permutation
    is adopted when it keeps more of that saliency over all its consumers), prune the dense weights
    again with it, and keep it only if the held-out loss (samples with labels) or, without labels,
    output error is then smaller than without it
    (``report.permutation_accepted``, ``error_permuted``, ``error_unpermuted``); otherwise the
    weights are exactly those of ``permute=False``. This costs a second pruning pass.
    ``time_limit`` (seconds) bounds the whole call: the search gets what is left after the measured
    first pruning pass and, budgeted from it, the second (``report.stages`` shows where the time
    went; when no time is left the permutation is skipped, said in ``report.notes``); pruning itself
    is never cut short. ``None`` (default): the search gets
    :func:`nmgraph.passes.permute_channels.default_time_limit`'s budget (5 to 120 s, scaling with the
    score matrices) and the other stages take what they take; ``math.inf``: no limit.
    ``progress``: tqdm bars (default: when stderr is a terminal). ``sequential=False`` takes every
    layer's statistics from the dense model in one pass (small models); the default prunes layer by
    layer, each with the inputs of the already-pruned layers before it, holding one block's
    activations. ``blocksize``/``percdamp``: SparseGPT's column block and dampening. ``include``,
    ``exclude``, ``dense_head``: as for :func:`nmgraph.analyze`. ``strict``: a weight left dense or
    pruned by magnitude for lack of calibration inputs raises :class:`StrictModeError`. ``threads``:
    torch's intra-op CPU threads for the call (restored afterwards; ``None`` leaves the setting; on a
    small or busy CPU 1 is often fastest). Statistics, pruning and evaluation run under
    ``torch.no_grad``.

    Raises :class:`ArgumentError` (bad ``method``, ``search`` or numbers), :class:`CalibrationError`,
    :class:`CaptureError`, :class:`StrictModeError`; after any error the model is as it was.
    """
    start = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"sparsify() needs a torch.nn.Module, got {type(model).__name__}.")
    p = Pattern.parse(pattern)
    if method not in METHODS:
        raise ArgumentError(f"method={method!r} is not a one-shot pruning method; valid methods: "
                        f"{', '.join(repr(m) for m in METHODS)}.")
    if search not in SEARCHES:
        raise ArgumentError(f"search={search!r} is not a permutation search; valid: {', '.join(map(repr, SEARCHES))}.")
    check_time_limit(time_limit, "sparsify")
    check_seed(seed, "sparsify")
    if holdout is not None and (isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0):
        raise ArgumentError(f"holdout must be None or an int >= 0, got {holdout!r}.")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ArgumentError(f"blocksize must be a positive int, got {blocksize!r}.")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp >= 0:
        raise ArgumentError(f"percdamp must be a number >= 0, got {percdamp!r}.")
    if isinstance(max_score_rows, bool) or not isinstance(max_score_rows, int) or max_score_rows < 1:
        raise ArgumentError(f"max_score_rows must be a positive int, got {max_score_rows!r}.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ArgumentError(f"threads must be None or an int >= 1, got {threads!r}.")
    show = sys.stderr.isatty() if progress is None else bool(progress)
    notes: list[str] = []
    stages: dict[str, float] = {}

    cal = _calibration(model, method, example_inputs, calibration, num_samples, seq_len, notes)
    n = len(cal)
    h = holdout if holdout is not None else (0 if n < 2 else max(1, min(MAX_HOLDOUT, n // 8)))
    if h >= n:
        raise CalibrationError(f"holdout={h} leaves no calibration sample out of {n}; pass more samples or a "
                               "smaller holdout.")
    calib = list(cal.samples[: n - h])
    evaluation = list(cal.samples[n - h:]) if h else calib[:MAX_HOLDOUT]
    stages["read"] = time.perf_counter() - start

    was_training = model.training
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    # Originals of every weight pruning writes, saved while the channels are in the model's own order:
    # a failure undoes the permutations first, then writes these back.
    undo = TensorStore(UNDO_MEMORY_BYTES)
    applied: dict[int, torch.Tensor] = {}
    gm = plan = None
    try:
        model.eval()
        t = time.perf_counter()
        gm = capture(model, calib[0][0], calib[0][1], dynamic=False)
        plan = analyze(gm, p, include=include, exclude=exclude, dense_head=dense_head)
        stages["capture"] = time.perf_counter() - t
        if strict and plan.skipped:
            raise StrictModeError(f"strict=True and {len(plan.skipped)} weights would stay dense, e.g. "
                                  f"{plan.skipped[0].name}: {plan.skipped[0].reason}. Pass strict=False to "
                                  "leave them dense, or include=/exclude= to choose.")
        taps = find_taps(gm, plan.layers)
        geometry = {i.name: Geometry.of(i.shape, i.axis, taps[i.name][0]) for i in plan.layers}
        params = dict(gm.named_parameters(remove_duplicate=False))

        t = time.perf_counter()
        reference = _evaluate(model, evaluation)
        t_eval = time.perf_counter() - t
        stages["reference"] = t_eval
        bounded = time_limit is not None and not math.isinf(time_limit)

        def prune_and_evaluate(suffix: str):
            # magnitude needs no statistics: its pass only measures each layer's output error, on the samples
            # that measurement uses
            passed = calib[:ERROR_SAMPLES] if method == "magnitude" else calib
            t = time.perf_counter()
            outcomes, peak = prune_layers(gm, taps, geometry, passed, method, p, sequential=sequential,
                                          blocksize=blocksize, percdamp=percdamp,
                                          before_write=lambda _, param: undo.save(param), progress=show)
            stages["prune" + suffix] = time.perf_counter() - t
            fallbacks = [o for o in outcomes if any("pruned by magnitude" in x for x in o.notes)]
            if strict and fallbacks:
                raise StrictModeError(f"strict=True and {fallbacks[0].name} was pruned by magnitude: "
                                      f"{'; '.join(fallbacks[0].notes)}. Pass calibration data that reaches it.")
            t = time.perf_counter()
            after = _evaluate(model, evaluation)
            stages["evaluate" + suffix] = time.perf_counter() - t
            return outcomes, peak, after, _distance(reference, after, outcomes)

        # 1. Prune in the model's own channel order: the result without permutation, and the measured cost
        # of a pruning pass (what the permuted attempt will cost again).
        outcomes, peak, after, error_plain = prune_and_evaluate("")
        t_pass = stages["prune"] + stages["evaluate"]

        groups: list[GroupReport] = []
        per_layer: dict[str, tuple[float, float]] = {}
        decision: dict[str, Any] = {}
        searchable = permute and search != "none" and any(g.consumers for g in plan.groups)
        if searchable and bounded:
            # the second pass, the statistics (estimated from the pass just measured), permuting, and
            # restoring the weights twice (as long as saving them took)
            later = (STATS_SHARE.get(method, 0.0) * stages["prune"] + ESTIMATE_MARGIN * (t_pass + _permute_cost(gm, plan))
                     + 3 * undo.seconds)
            left = (1 - SAFETY) * time_limit - (time.perf_counter() - start) - later
            if left < MIN_SEARCH_SHARE * time_limit:
                searchable = False
                notes.append(f"permutation skipped: after pruning once ({t_pass:.0f} s with evaluation), a search and "
                             f"a second pruning pass (estimated {later:.0f} s besides the search) do not fit in "
                             f"time_limit={time_limit:g} s")
                log.warning("sparsify: %s", notes[-1])
        if searchable:
            # 2. Back to the dense weights (the result just computed kept aside), search under the method's
            # saliency, and, if a permutation keeps more, prune again with it.
            plain = TensorStore(UNDO_MEMORY_BYTES)
            try:
                t = time.perf_counter()
                for info in plan.layers:
                    plain.save(params[info.name])
                    undo.save(params[info.name])  # no-op for the pruned ones: every original saved unpermuted
                undo.restore()
                stages["restore"] = time.perf_counter() - t
                stats: dict[str, torch.Tensor] = {}
                if method != "magnitude":
                    t = time.perf_counter()
                    stats, _, _ = collect_statistics(gm, taps, geometry, calib, method, percdamp=percdamp,
                                                     progress=show)
                    stages["statistics"] = time.perf_counter() - t
                budget = default_time_limit(plan) if time_limit is None else None
                if bounded:
                    later = ESTIMATE_MARGIN * (t_pass + _permute_cost(gm, plan)) + 2 * plain.seconds
                    budget = max(0.0, (1 - SAFETY) * time_limit - (time.perf_counter() - start) - later)
                    notes.append(f"permutation search budget {budget:.1f} s (the second pruning pass and the rest "
                                 f"budgeted at {later:.1f} s: {ESTIMATE_MARGIN:g}x the measured first pass)")
                t = time.perf_counter()
                perms, searched, per_layer = search_groups(gm, plan, method, stats, geometry, search=search,
                                                           seed=seed, time_limit=budget, max_rows=max_score_rows,
                                                           progress=show)
                del stats
                stages["search"] = time.perf_counter() - t
                if perms:
                    t = time.perf_counter()
                    low_precision = any(x.dtype in (torch.float16, torch.bfloat16) for x in model.parameters())
                    permute_channels(gm, plan, perms=perms, verify=not low_precision)
                    applied = dict(perms)
                    if low_precision:
                        _check_permuted(model, evaluation[0], reference[0][0])
                    stages["permute"] = time.perf_counter() - t
                    outcomes_p, peak_p, after_p, error_perm = prune_and_evaluate(" permuted")
                    accepted, evidence = _decide(_scores(reference, after, outcomes),
                                                 _scores(reference, after_p, outcomes_p))
                    decision = {"accepted": accepted, "error_permuted": error_perm, "error_unpermuted": error_plain}
                    kind = _METRIC_NAME[_metric(reference, after)]
                    if accepted:
                        notes.append(f"permutation kept: held-out {kind} {error_perm:.6g} with it, {error_plain:.6g} "
                                     f"without; {evidence}")
                        outcomes, after, peak = outcomes_p, after_p, max(peak, peak_p)
                    else:
                        t = time.perf_counter()
                        _unpermute(gm, plan, applied)
                        applied = {}
                        plain.restore()
                        stages["restore"] += time.perf_counter() - t
                        why = (f"held-out {kind} {error_perm:.6g} with it, {error_plain:.6g} without; {evidence}")
                        notes.append(f"permutation rejected: {why}; the weights are those of pruning without it")
                        log.info("sparsify: %s", notes[-1])
                        searched = [replace(g, applied=False, note=f"rejected: {why}") if g.applied else g
                                    for g in searched]
                        per_layer = {k: (v[0], v[0]) for k, v in per_layer.items()}
                else:
                    t = time.perf_counter()
                    plain.restore()
                    stages["restore"] += time.perf_counter() - t
            finally:
                plain.close()
            groups = [GroupReport(g.id, g.size, g.block, g.consumers, g.rows_total, g.rows_searched, g.kept_before,
                                  g.kept_after, g.applied, g.seconds, g.note) for g in searched]

        report = _report(model, gm.named_parameters(remove_duplicate=False), plan, p, method, outcomes, groups, per_layer, reference, after, evaluation,
                         h == 0, cal, len(calib), stages, time_limit, peak, sequential, notes, start, decision)
    except BaseException:
        if applied and gm is not None:
            _unpermute(gm, plan, applied)
        undo.restore()
        raise
    finally:
        undo.close()
        model.train(was_training)
        torch.set_num_threads(saved_threads)
    log.info("%s", report.summary())
    return report


def _unpermute(gm, plan, applied: dict[int, torch.Tensor]) -> None:
    for gid, perm in reversed(list(applied.items())):
        apply_permutation(gm, plan.group(gid), torch.argsort(perm))


def _permute_cost(gm, plan) -> float:
    """Seconds to permute: a gather of every group member, timed on the largest eligible weight and
    scaled by the bytes of all parameters (an upper bound), plus the check's forward pass."""
    sizes = {i.name: math.prod(i.shape) for i in plan.layers}
    if not sizes:
        return 0.0
    name = max(sizes, key=sizes.get)
    w = gm.get_parameter(name)
    t = time.perf_counter()
    w.detach().index_select(0, torch.arange(w.shape[0] - 1, -1, -1))
    rate = (time.perf_counter() - t) / sizes[name]
    return rate * sum(x.numel() for x in gm.parameters())


def _calibration(model, method, example_inputs, calibration, num_samples, seq_len, notes) -> Calibration:
    # A transformers causal LM left with use_cache on is fine: capture traces it without the cache
    # object, and the reference/evaluation calls of the model itself read the logits, not the cache.
    extra: dict[str, Any] = {}
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = None
    if calibration is not None:
        return load_calibration(calibration, num_samples=num_samples, seq_len=seq_len, device=device,
                                extra_kwargs=extra)
    if example_inputs is None:
        raise CalibrationError(
            f"sparsify(method={method!r}) needs calibration= (an iterable of model inputs or a DataLoader) or, "
            "for magnitude pruning, example_inputs= to capture the model with.")
    if method != "magnitude":
        notes.append(f"no calibration data: {method} statistics come from example_inputs only")
        log.warning("sparsify(method=%r) without calibration=: using example_inputs as the calibration data", method)
    if isinstance(example_inputs, dict):
        item: Any = example_inputs
    elif isinstance(example_inputs, (tuple, list)):
        item = tuple(example_inputs)
    else:
        item = (example_inputs,)
    return load_calibration([item], num_samples=num_samples, seq_len=seq_len, device=device, extra_kwargs=extra)


def _main_output(out: Any) -> tuple[torch.Tensor | None, float | None]:
    """The model's main output (logits / hidden states: its first non-scalar float tensor) and its loss."""
    loss = None
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, dict) or hasattr(out, "keys"):
        items = list(out.items())
        for k, v in items:
            if k == "loss" and isinstance(v, torch.Tensor) and v.numel() == 1:
                loss = float(v)
        values = [v for k, v in items if k != "loss"]
    elif isinstance(out, (tuple, list)):
        values = list(out)
        if values and isinstance(values[0], torch.Tensor) and values[0].dim() == 0 and values[0].is_floating_point():
            loss = float(values[0])
    else:
        values = []
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 1:
            return v, loss
    return None, loss


def _evaluate(model: torch.nn.Module, samples: list[Sample]) -> list[tuple[torch.Tensor | None, float | None]]:
    results = []
    with torch.no_grad():
        for args, kwargs in samples:
            main, loss = _main_output(model(*args, **kwargs))
            results.append((None if main is None else main.detach().clone(), loss))
    return results


_METRIC_NAME = {"loss": "loss", "output": "relative output error", "layers": "RMS of the layers' errors"}


def _output_error(reference, after) -> float | None:
    """``||y' - y|| / ||y||`` of the main output over the samples, ``None`` if the model has none."""
    num = den = 0.0
    for (y0, _), (y1, _) in zip(reference, after):
        if y0 is not None and y1 is not None and y0.shape == y1.shape:
            num += float((y1.float() - y0.float()).pow(2).sum())
            den += float(y0.float().pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else None


def _metric(reference, after) -> str:
    if after and all(x is not None for _, x in after):
        return "loss"
    return "output" if _output_error(reference, after) is not None else "layers"


def _scores(reference, after, outcomes) -> list[float]:
    """Per held-out sample, the quantity :func:`_distance` aggregates (smaller is better): the loss, or
    the squared relative error of the main output; one value (the layers' RMS error) without either."""
    kind = _metric(reference, after)
    if kind == "loss":
        return [x for _, x in after]
    if kind == "output":
        out = []
        for (y0, _), (y1, _) in zip(reference, after):
            if y0 is not None and y1 is not None and y0.shape == y1.shape:
                den = float(y0.float().pow(2).sum())
                out.append(float((y1.float() - y0.float()).pow(2).sum()) / den if den > 0 else 0.0)
        return out
    return [_distance(reference, after, outcomes)]


def _decide(plain: list[float], permuted: list[float]) -> tuple[bool, str]:
    """Keep the permutation only when the held-out samples show it helps beyond their own noise: the
    mean per-sample improvement (paired: the same samples, without minus with) must exceed
    ``ACCEPT_Z`` standard errors of that mean; with one sample, any improvement. A tie or an
    improvement within the noise keeps the unpermuted result."""
    d = [a - b for a, b in zip(plain, permuted)]
    mean = sum(d) / len(d) if d else 0.0
    if len(d) < 2:
        return mean > 0, f"improvement {mean:.3g} on one sample (no noise estimate)"
    se = statistics.stdev(d) / math.sqrt(len(d))
    accepted = mean > 0 and mean > ACCEPT_Z * se
    return accepted, (f"mean improvement {mean:.3g} per sample, standard error {se:.2g} over {len(d)} samples "
                      f"({'above' if accepted else 'not above'} the {ACCEPT_Z:g} standard errors required)")


def _distance(reference, after, outcomes) -> float:
    """How good the pruned model is on the held-out samples (smaller is better): the mean loss the model
    returns when the samples carry labels (what the model is trained for); else the relative error of
    its main output against the dense model's; without either, the RMS of the layers' relative
    reconstruction errors."""
    kind = _metric(reference, after)
    if kind == "loss":
        return sum(x for _, x in after) / len(after)
    if kind == "output":
        return _output_error(reference, after)
    errs = [o.rel_error for o in outcomes if o.rel_error is not None]
    return (sum(e * e for e in errs) / len(errs)) ** 0.5 if errs else 0.0


def _check_permuted(model: torch.nn.Module, sample: Sample, before: torch.Tensor | None) -> None:
    """A permutation must leave the outputs as they were up to rounding. ``nmgraph.permute`` checks the
    largest deviation against 2e-2 of the largest output in 16-bit models, which rounding alone can
    exceed in a deep bf16 model (measured 2.07e-2 on a 22-layer random Llama); this checks the
    relative L2 change of the main output instead: rounding gives a few 1e-3, a coupling error
    moves the output by order 1."""
    if before is None:
        return
    after, _ = _evaluate(model, [sample])[0]
    err = float((after.float() - before.float()).norm() / before.float().norm().clamp_min(1e-30))
    if not err <= PERMUTE_TOLERANCE_16BIT:
        raise VerificationError(
            f"permuting the channels changed the model's main output by {err:.2e} (relative L2, tolerance "
            f"{PERMUTE_TOLERANCE_16BIT:g} for 16-bit weights); everything was undone. This is a coupling the "
            "analysis missed; please report the model. Workaround: permute=False.")


def _report(model, gm_params, plan, p, method, outcomes, groups, per_layer, reference, after, evaluation, in_sample, cal,
            n_calib, stages, time_limit, peak, sequential, notes, start, decision) -> SparsifyReport:
    own = list(model.parameters())  # each Parameter once, tied ones included once
    params = dict(gm_params)
    by_name = {i.name: i for i in plan.layers}
    total = sum(t.numel() for t in own)
    dense_bytes = sum(t.numel() * t.element_size() for t in own)
    pruned = [o for o in outcomes if o.name in by_name]
    nm = sum(math.prod(by_name[o.name].shape) for o in pruned)
    sparse_bytes = dense_bytes
    for o in pruned:
        info = by_name[o.name]
        dtype = params[o.name].dtype if o.name in params else torch.float32
        sparse_bytes += compressed_nbytes(info.shape, p, dtype, axis=info.axis) - math.prod(info.shape) * dtype.itemsize
    out_err = _output_error(reference, after)
    losses0 = [x for _, x in reference if x is not None]
    losses1 = [x for _, x in after if x is not None]
    layers = []
    for o in outcomes:
        info = by_name[o.name]
        before, kept_after = per_layer.get(o.name, (0.0, 0.0))
        gain = (kept_after - before) / before if before > 0 else 0.0
        layers.append(LayerReport(o.name, info.module, tuple(info.shape), info.axis, method, o.rel_error,
                                  o.kept_saliency, gain, o.tokens, o.seconds, tuple(o.notes)))
    perm_gain = None
    if per_layer:
        b = sum(v[0] for v in per_layer.values())
        a = sum(v[1] for v in per_layer.values())
        perm_gain = (a - b) / b if b > 0 else 0.0
    return SparsifyReport(
        pattern=str(p), method=method, params_total=total, params_nm=nm, bytes_dense=dense_bytes,
        bytes_sparse=sparse_bytes, output_rel_error=out_err,
        loss_dense=sum(losses0) / len(losses0) if losses0 else None,
        loss_sparse=sum(losses1) / len(losses1) if losses1 else None,
        eval_samples=len(evaluation), eval_in_sample=in_sample, permutation_gain=perm_gain,
        calibration_samples=n_calib, tokens_per_sample=cal.tokens, seconds=time.perf_counter() - start,
        stages=dict(stages), time_limit=time_limit, peak_activation_bytes=peak, sequential=sequential,
        layers=tuple(layers), groups=tuple(groups), skipped=tuple((s.name, s.reason) for s in plan.skipped),
        notes=tuple(notes), permutation_accepted=decision.get("accepted"),
        error_permuted=decision.get("error_permuted"), error_unpermuted=decision.get("error_unpermuted"))

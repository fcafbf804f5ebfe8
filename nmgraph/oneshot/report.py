"""What :func:`nmgraph.sparsify` did and what it cost, model-level summary first."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = ["GroupReport", "LayerReport", "SparsifyReport"]


@dataclass(frozen=True)
class LayerReport:
    """One pruned weight.

    ``rel_error``: ``||X W^T - X W'^T|| / ||X W^T||`` over the layer's calibration inputs ``X`` (the
    inputs it was pruned with: on the sequential path those produced by the already-pruned layers
    before it), bias excluded; ``None`` without calibration inputs. ``kept_saliency``: share of the
    method's saliency (of the weight as it was before pruning) that the kept entries hold.
    ``permutation_gain``: kept saliency gained by the channel permutation, in points of the layer's
    identity-order kept saliency (0.0 when its channels were not permuted). ``tokens``: input rows
    seen. ``seconds``: time to prune it (statistics of a shared input counted once).
    """

    name: str
    module: str
    shape: tuple[int, ...]
    axis: int
    method: str
    rel_error: float | None
    kept_saliency: float | None
    permutation_gain: float
    tokens: int
    seconds: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupReport:
    """One permutation group (see :class:`nmgraph.oneshot.permutation.GroupSearch`): kept share of the
    method's saliency over all its consumers before and after, whether it was adopted."""

    id: int
    size: int
    block: int
    consumers: int
    rows_total: int
    rows_searched: int
    kept_before: float
    kept_after: float
    applied: bool
    seconds: float
    note: str = ""


@dataclass(frozen=True)
class SparsifyReport:
    """Result of :func:`nmgraph.sparsify`.

    Model level: ``pattern``, ``method``; ``params_total`` (every parameter once), ``params_nm`` (in
    weights now exactly N:M) and ``nm_share``; ``bytes_dense`` (every parameter in its dtype) and
    ``bytes_sparse`` (the same with the N:M weights stored compressed: kept values plus in-group
    indices, as :func:`nmgraph.compress` stores them); ``output_rel_error``:
    ``||y' - y|| / ||y||`` of the model's main output (logits, hidden states) on ``eval_samples``
    held-out calibration samples (``eval_in_sample``: no sample could be held out, the error is on
    calibration data); ``loss_dense``/``loss_sparse``: the mean loss the model returned on them, if any;
    ``permutation_gain``: kept saliency gained by permuting channels, relative to the identity order,
    over all pruned weights; ``calibration_samples`` and ``tokens_per_sample``; ``seconds`` (wall) and
    ``stages`` (seconds per stage); ``time_limit``; ``peak_activation_bytes`` (calibration
    activations held at once by the pruning pass); ``sequential``.

    Permutation decision: ``permutation_accepted`` (``None`` when no permutation was tried: none
    asked for, none found, or no time for it), ``error_permuted`` and ``error_unpermuted``: the
    model pruned with and without the permutation on the held-out samples: the mean loss when the
    samples carry labels, else the relative output error against the dense model (the layers' RMS
    error for a model without either). The permutation is kept only when the per-sample
    improvement is above 2 standard errors (``notes`` give the figures).

    Detail: ``layers`` (:class:`LayerReport`), ``groups`` (:class:`GroupReport`), ``skipped`` (weights
    left dense, with the reason), ``notes``.
    """

    pattern: str
    method: str
    params_total: int
    params_nm: int
    bytes_dense: int
    bytes_sparse: int
    output_rel_error: float | None
    loss_dense: float | None
    loss_sparse: float | None
    eval_samples: int
    eval_in_sample: bool
    permutation_gain: float | None
    calibration_samples: int
    tokens_per_sample: int | None
    seconds: float
    stages: dict[str, float]
    time_limit: float | None
    peak_activation_bytes: int
    sequential: bool
    layers: tuple[LayerReport, ...] = ()
    groups: tuple[GroupReport, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = field(default=())
    permutation_accepted: bool | None = None
    error_permuted: float | None = None
    error_unpermuted: float | None = None

    @property
    def nm_share(self) -> float:
        """Share of the model's parameters that are in N:M weights."""
        return self.params_nm / self.params_total if self.params_total else 0.0

    @property
    def layer_error(self) -> float | None:
        """Mean of the layers' relative reconstruction errors."""
        errs = [x.rel_error for x in self.layers if x.rel_error is not None]
        return sum(errs) / len(errs) if errs else None

    def summary(self) -> dict:
        """The model-level figures (the first part of :meth:`to_dict`)."""
        return {
            "pattern": self.pattern, "method": self.method,
            "params_total": self.params_total, "params_nm": self.params_nm, "nm_share": self.nm_share,
            "bytes_dense": self.bytes_dense, "bytes_sparse": self.bytes_sparse,
            "output_rel_error": self.output_rel_error, "loss_dense": self.loss_dense, "loss_sparse": self.loss_sparse,
            "eval_samples": self.eval_samples, "eval_in_sample": self.eval_in_sample,
            "mean_layer_error": self.layer_error, "permutation_gain": self.permutation_gain,
            "calibration_samples": self.calibration_samples, "tokens_per_sample": self.tokens_per_sample,
            "layers_pruned": len(self.layers), "layers_dense": len(self.skipped),
            "groups_permuted": sum(g.applied for g in self.groups), "groups_searched": len(self.groups),
            "permutation_accepted": self.permutation_accepted, "error_permuted": self.error_permuted,
            "error_unpermuted": self.error_unpermuted,
            "seconds": self.seconds, "stages": dict(self.stages), "time_limit": self.time_limit,
            "peak_activation_bytes": self.peak_activation_bytes, "sequential": self.sequential,
        }

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "layers": [asdict(x) for x in self.layers],
            "groups": [asdict(g) for g in self.groups],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kwargs))

    def __str__(self) -> str:
        s = self.summary()
        lines = [f"sparsify {self.pattern} by {self.method}: {s['layers_pruned']} weights N:M "
                 f"({self.nm_share:.1%} of {self.params_total:,} parameters), {s['layers_dense']} left dense"]
        lines.append(f"  bytes: {_mb(self.bytes_dense)} dense -> {_mb(self.bytes_sparse)} with N:M weights "
                     f"compressed ({self.bytes_sparse / max(self.bytes_dense, 1):.3f})")
        if self.output_rel_error is not None:
            where = "calibration (no sample held out)" if self.eval_in_sample else f"{self.eval_samples} held-out"
            lines.append(f"  output change on {where} samples: relative error {self.output_rel_error:.4f}")
        if self.loss_dense is not None and self.loss_sparse is not None:
            lines.append(f"  loss: {self.loss_dense:.4f} dense -> {self.loss_sparse:.4f} "
                         f"({self.loss_sparse - self.loss_dense:+.4f})")
        if self.layer_error is not None:
            lines.append(f"  mean layer reconstruction error {self.layer_error:.4f}")
        if self.permutation_gain is not None:
            lines.append(f"  permutation: {s['groups_permuted']}/{len(self.groups)} groups permuted, kept "
                         f"{self.method} saliency {self.permutation_gain:+.2%}")
        if self.permutation_accepted is not None:
            lines.append(f"  permutation {'accepted' if self.permutation_accepted else 'rejected'}: held-out error "
                         f"{self.error_permuted:.6g} with it, {self.error_unpermuted:.6g} without")
        stages = ", ".join(f"{k} {v:.1f}" for k, v in self.stages.items())
        limit = "" if self.time_limit is None else f" (limit {self.time_limit:.0f} s)"
        lines.append(f"  time: {self.seconds:.1f} s{limit}: {stages}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.layers:
            width = max(len(x.name) for x in self.layers)
            lines.append(f"  {'weight':<{width}}  {'shape':<18} {'error':>7} {'kept':>6} {'perm':>7} {'s':>6}")
            for x in self.layers:
                err = "-" if x.rel_error is None else f"{x.rel_error:.4f}"
                kept = "-" if x.kept_saliency is None else f"{x.kept_saliency:.1%}"
                lines.append(f"  {x.name:<{width}}  {list(x.shape)!s:<18} {err:>7} {kept:>6} "
                             f"{x.permutation_gain:>+7.2%} {x.seconds:>6.2f}" + (
                                 f"  ({'; '.join(x.notes)})" if x.notes else ""))
        if self.skipped:
            lines.append("  left dense:")
            for name, reason in self.skipped:
                lines.append(f"  {name}: {reason}")
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"

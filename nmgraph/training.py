"""N:M sparse training: ``prepare`` a model with mask nodes, advance the schedule, ``convert`` to N:M.

>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> x = torch.randn(2, 8)
>>> gm = prepare(model, (x,), "2:4", method="sr-ste")
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> callback = SparsityCallback(gm)
>>> for _ in range(3):
...     gm(x).square().mean().backward()
...     opt.step(); opt.zero_grad(); _ = callback.step()
>>> inference = convert(gm)
>>> import nmgraph
>>> nmgraph.is_nm(model[0].weight, "2:4")  # model[2] is the output head, kept dense by analyze
True

The prepared graph's ``train()``/``eval()`` switch the mask nodes between the training forward and
the hard N:M forward (and dropout between on and off: ``aten.dropout`` nodes and the ``dropout_p``
of ``scaled_dot_product_attention``). Graphs from ``torch.export``
refuse ``train()``/``eval()`` by default; :func:`prepare` installs these two methods on the instance,
as torch's own ``ExportedProgram.module()`` does for its refusing ones.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from nmgraph.analysis import analyze
from nmgraph.analysis.plan import SparsityPlan
from nmgraph.capture import capture, no_cache
from nmgraph.errors import CaptureError, PlanError, UnsupportedError, VerificationError
from nmgraph.graph import ConvertRecord, PrepareRecord, fetch_attr, graph_record, update_graph_record
from nmgraph.masking import (
    MASK_OP,
    SADTracker,
    Schedule,
    SparsityState,
    TrainingConfig,
    attach_masks,
    detach_masks,
    latent_weight,
    masked_weights,
    method_from_name,
)
from nmgraph.masking.schedule import Phase
from nmgraph.passes.fold_masks import FoldMasksConfig, fold_masks, mask_nodes
from nmgraph.passes.insert_masks import STATE_NAME, InsertMasksConfig, insert_masks
from nmgraph.passes.permute_channels import permute as permute_channels
from nmgraph.passes.prune_weights import PruneWeightsConfig, prune_weights
from nmgraph.passes.runner import run_passes
from nmgraph.pattern import Pattern
from nmgraph.rollback import Rollback
from nmgraph.validate import check_plan_finite, check_seed

__all__ = ["AttentionDropout", "SparsityCallback", "convert", "hf_callback", "prepare", "set_mode", "without_dropout"]

log = logging.getLogger(__name__)

_DROPOUT = torch.ops.aten.dropout.default
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


@dataclass(frozen=True)
class AttentionDropout:
    """``node.meta["nmgraph"]`` of a ``scaled_dot_product_attention`` node whose dropout
    :func:`set_mode` switched off: the probability it restores when dropout is switched on."""

    p: float


def _sdpa_dropout(node: fx.Node) -> float:
    p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    return float(p) if isinstance(p, (int, float)) else 0.0


def _set_sdpa_dropout(node: fx.Node, p: float) -> None:
    if len(node.args) > 4:
        node.update_arg(4, p)
    else:
        node.update_kwarg("dropout_p", p)


def _switch_attention_dropout(node: fx.Node, on: bool) -> bool:
    """Switches an SDPA node's ``dropout_p`` off (recording it) or back on; returns whether it changed."""
    p = _sdpa_dropout(node)
    saved = node.meta.get("nmgraph")
    if not on and p != 0.0:
        node.meta = {**node.meta, "nmgraph": AttentionDropout(p)}
        _set_sdpa_dropout(node, 0.0)
        return True
    if on and p == 0.0 and isinstance(saved, AttentionDropout) and saved.p != 0.0:
        _set_sdpa_dropout(node, saved.p)
        return True
    return False


def _analyze(gm: fx.GraphModule, pattern: Pattern, include: Sequence[str], exclude: Sequence[str]) -> SparsityPlan:
    return analyze(gm, pattern, include=include, exclude=exclude)


def set_mode(gm: fx.GraphModule, training: bool = True, *, dropout: bool | None = None) -> bool:
    """Training forward (``training=True``) or hard N:M forward for every mask node of ``gm``.

    Dropout (``aten.dropout`` nodes and the ``dropout_p`` of ``scaled_dot_product_attention``) is
    switched on when ``dropout`` is true and off when it is false; ``None`` follows ``training``. The graph is recompiled only if a node changed (under
    ``torch.compile`` that is one recompilation per switch). Sets ``training`` on ``gm``'s modules.
    Returns whether the graph changed.
    """
    dropout = training if dropout is None else dropout
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is MASK_OP and node.args[6] is training:
            node.update_arg(6, not training)
            changed = True
        elif node.target is _DROPOUT and len(node.args) == 3 and node.args[2] is not dropout:
            node.update_arg(2, dropout)
            changed = True
        elif node.target is _SDPA and _switch_attention_dropout(node, dropout):
            changed = True
    if changed:
        gm.recompile()
    torch.nn.Module.train(gm, training)
    return changed


@contextlib.contextmanager
def without_dropout(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """Runs the block with every dropout of ``gm`` off; puts back each one that was on.

    A permutation is verified by comparing outputs before and after: with dropout on, the same
    random mask falls on other channels after the permutation, so an exact permutation would look
    like a changed function.
    """
    was_on = [n for n in gm.graph.nodes if n.op == "call_function" and (
        (n.target is _DROPOUT and len(n.args) == 3 and n.args[2] is True)
        or (n.target is _SDPA and _sdpa_dropout(n) != 0.0))]
    if not was_on:
        yield gm
        return
    for n in was_on:
        if n.target is _DROPOUT:
            n.update_arg(2, False)
        else:
            _switch_attention_dropout(n, False)
    gm.recompile()
    try:
        yield gm
    finally:
        for n in was_on:
            if n.target is _DROPOUT:
                n.update_arg(2, True)
            else:
                _switch_attention_dropout(n, True)
        gm.recompile()


def _train(self: fx.GraphModule, mode: bool = True) -> fx.GraphModule:
    set_mode(self, mode)
    return self


def _eval(self: fx.GraphModule) -> fx.GraphModule:
    set_mode(self, False)
    return self


def _install_train_eval(gm: fx.GraphModule) -> None:
    """Makes ``gm.train()``/``gm.eval()`` call :func:`set_mode`, also on deep copies of ``gm``."""
    gm.train = types.MethodType(_train, gm)
    gm.eval = types.MethodType(_eval, gm)
    hooks = getattr(gm, "_deepcopy_hooks", [])
    if hasattr(gm, "_register_deepcopy_hook") and _install_train_eval not in hooks:
        gm._register_deepcopy_hook(_install_train_eval)


def prepare(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | Any = None,
    pattern: Pattern | str | tuple[int, int] = "2:4",
    method: str | Any = "sr-ste",
    permute: bool = True,
    *,
    kwargs: Mapping[str, Any] | None = None,
    plan: SparsityPlan | None = None,
    total_steps: int | None = None,
    warmup: float = 0.0,
    finetune: float = 0.0,
    update_interval: int = 1,
    schedule: Schedule | None = None,
    saliency: str | Mapping[str, torch.Tensor] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    search: str = "greedy",
    seed: int = 0,
    time_limit: float | None = None,
    progress: bool = False,
    inplace: bool = False,
) -> torch.nn.Module:
    """Returns a trainable model in which every eligible weight is read through ``nmgraph::masked_weight``.

    ``inplace=False`` (default): a GraphModule with a mask node after each eligible weight. ``model``
    is captured with :func:`nmgraph.capture` (an already captured graph is used and modified in
    place); parameters stay the model's own, so an optimizer may be built on either.

    ``inplace=True``: the masks attach to ``model`` itself (a parametrization per eligible weight, see
    :mod:`nmgraph.masking.module_masks`) and ``model`` is returned: the same object, class and methods,
    so HF ``Trainer``, ``accelerate``, gradient checkpointing, ``generate``, any input shape and
    ``save_pretrained`` work as before. The plan and the permutation still come from the graph
    captured with ``example_inputs`` (a tuple, or a dict of keyword inputs as the model is called);
    after permuting, the model's own output on them is checked against its output before.
    ``method`` is a name (``"ste"``, ``"sr-ste"``, ``"mdgf-linear"``, ``"mdgf-exp"``,
    ``"sdgf-step"``, ``"sdgf-geo"``, ``"topkast"``, ``"fixed"``) or a config from
    :mod:`nmgraph.masking.methods`. The schedule is ``schedule=`` or built from ``total_steps``, ``warmup``,
    ``finetune`` and ``update_interval``. ``plan`` defaults to ``nmgraph.analyze(gm, pattern)``;
    ``permute`` reorders channels first (``search``, ``seed``; ``time_limit`` bounds it, default a
    budget that scales with the model, see :func:`nmgraph.permute`; ``progress`` shows a bar). ``saliency`` (method ``fixed``):
    ``"magnitude"`` or scores per weight name, computed on the graph as it is after permutation.

    Call :class:`SparsityCallback` ``.step()`` after every optimizer step.
    """
    p = Pattern.parse(pattern)
    method_cfg = method_from_name(method)
    if schedule is None:
        schedule = Schedule(total_steps, warmup, finetune, update_interval)
    elif (total_steps, warmup, finetune, update_interval) != (None, 0.0, 0.0, 1):
        raise PlanError("Pass either schedule= or total_steps/warmup/finetune/update_interval, not both.")
    config = TrainingConfig(p, method_cfg, schedule)
    scores: Mapping[str, torch.Tensor] | None = None
    if isinstance(saliency, Mapping):
        scores = saliency
    elif saliency not in (None, "magnitude"):
        raise PlanError(
            f"prepare(saliency={saliency!r}): pass 'magnitude' or a mapping weight name -> score "
            "(see nmgraph.masking.saliency.first_order / second_order)."
        )
    if scores is not None:
        if not method_cfg.scored:
            raise PlanError(f"saliency= chooses the mask of method 'fixed' only; method is {method_cfg.name!r}.")
        if schedule.warmup_steps:
            raise PlanError(
                "saliency scores describe the weights before training, but with warmup > 0 the fixed "
                "mask is chosen after the warm-up; use warmup=0 or magnitude saliency."
            )
        if permute:
            raise PlanError(
                "saliency scores are per element and would not follow the channel permutation: run "
                "nmgraph.permute() first, compute the scores on the permuted graph, then call "
                "prepare(..., permute=False, saliency=scores)."
            )

    if inplace and isinstance(model, fx.GraphModule):
        raise PlanError(
            "prepare(inplace=True) attaches the masks to your own module; pass the model itself, not a "
            "captured graph (or use inplace=False to get a prepared graph)."
        )
    if inplace and (hasattr(model, STATE_NAME) or next(masked_weights(model), None) is not None):
        raise PlanError(
            f"{type(model).__name__} is already prepared (it has {STATE_NAME!r}): call nmgraph.convert(model) "
            "to fold its masks first, or prepare a fresh copy."
        )
    if isinstance(model, fx.GraphModule) and graph_record(model) is not None:
        gm = model
    else:
        if example_inputs is None:
            raise CaptureError(
                f"prepare() needs example_inputs to capture {type(model).__name__}; pass them as a tuple."
            )
        gm = _capture_in_eval(model, example_inputs, kwargs) if inplace else capture(model, example_inputs, kwargs)
    if hasattr(gm, STATE_NAME):
        raise PlanError(
            f"This graph is already prepared (it has {STATE_NAME!r}). Call nmgraph.convert() on it, or "
            "prepare the original model."
        )
    if plan is None:
        plan = _analyze(gm, p, include, exclude)
    elif plan.pattern != p:
        raise PlanError(f"plan was made for pattern {plan.pattern} but prepare() was asked for {p}.")
    if scores is not None:
        PruneWeightsConfig(plan, scores)  # checks names and shapes before anything changes
    check_plan_finite(gm, plan, scores)
    if inplace:
        if permute:
            check_seed(seed, "prepare")
        return _prepare_module(model, gm, plan, config, permute=permute, search=search, seed=seed, scores=scores,
                               time_limit=time_limit, progress=progress)
    if permute:
        check_seed(seed, "prepare")
    with Rollback() as undo:
        if gm is model:  # the caller's graph is rewritten in place
            undo.keep_module(gm)
        if permute:
            undo.keep_tensors(fetch_attr(gm, m.name) for g in plan.groups for m in g.members)
            with without_dropout(gm):  # verified with dropout off: a permuted dropout mask is another function
                report = permute_channels(gm, plan, search=search, seed=seed, time_limit=time_limit,
                                          progress=progress)
            update_graph_record(gm, permuted=report)
            log.info("permutation before training: %s", report)
        results = run_passes(gm, (insert_masks,), InsertMasksConfig(config, tuple(plan.layers), scores=scores))
        res = results[0]
        skipped = [*plan.skipped, *res.skipped]
        if not res.modified:
            raise PlanError(
                f"prepare() found no weight to mask for {p}: {len(plan.layers)} eligible in the plan, "
                f"{len(skipped)} left dense ({'; '.join(f'{s.name}: {s.reason}' for s in skipped[:5])})."
            )
        for s in skipped:
            log.info("left dense: %s (%s)", s.name, s.reason)
        update_graph_record(gm, prepared=PrepareRecord(config, tuple(res.info["masked"]), tuple(skipped)))
        _install_train_eval(gm)
        set_mode(gm, True)
    log.info("prepared %d weights for %s; %d left dense", len(res.info["masked"]), config, len(skipped))
    return gm


def _prepare_module(model: torch.nn.Module, gm: fx.GraphModule, plan: SparsityPlan, config: TrainingConfig, *,
                    permute: bool, search: str, seed: int, scores: Mapping[str, torch.Tensor] | None,
                    time_limit: float | None = None, progress: bool = False) -> torch.nn.Module:
    """``prepare(inplace=True)``: permute through the graph, check the model itself, attach the masks."""
    if not plan.layers:
        raise PlanError(
            f"prepare() found no weight to mask for {config.pattern}: {len(plan.skipped)} left dense "
            f"({'; '.join(f'{s.name}: {s.reason}' for s in plan.skipped[:5])})."
        )
    rec = graph_record(gm)
    args, kwargs = (rec.example_args, dict(rec.example_kwargs)) if rec is not None else ((), {})
    with Rollback() as undo:  # any failure (or Ctrl-C) puts the model back as it was
        undo.keep_module(model)
        if permute:
            undo.keep_tensors(fetch_attr(gm, m.name) for g in plan.groups for m in g.members)
            before = _module_outputs(model, args, kwargs)
            report = permute_channels(gm, plan, search=search, seed=seed, time_limit=time_limit, progress=progress)
            if report.permuted:
                err = _relative_change(before, _module_outputs(model, args, kwargs))
                if err > (2e-2 if any(t.dtype in (torch.float16, torch.bfloat16) for t in before) else 1e-4):
                    raise VerificationError(
                        f"The permutation kept {type(model).__name__}'s captured graph exact but changed the "
                        f"module's own output (relative change {err:.2e}): a tensor the graph permuted is not one "
                        "the module reads (a constant made in forward?). The model was restored. Use permute=False."
                    )
            log.info("permutation before training: %s", report)
        for s in plan.skipped:
            log.info("left dense: %s (%s)", s.name, s.reason)
        attach_masks(model, config, [(i.name, i.shape, i.axis) for i in plan.layers], scores=scores)
    log.info("prepared %d weights of %s in place for %s; %d left dense", len(plan.layers),
             type(model).__name__, config, len(plan.skipped))
    return model


def _capture_in_eval(model: torch.nn.Module, example_inputs: Any, kwargs: Mapping[str, Any] | None) -> fx.GraphModule:
    """The graph ``prepare(inplace=True)`` analyzes and permutes through: captured in eval mode (dropout
    off, so the permutation check is deterministic), the model's modes restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        return capture(model, example_inputs, kwargs)
    finally:
        for m, mode in modes:
            m.training = mode


def _module_outputs(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """The model's floating-point outputs in eval mode, same RNG stream, buffers and mode restored."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [b for _, b in model.named_buffers()]
    saved = [b.detach().clone() for b in buffers]
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]), no_cache(model, kwargs):
            torch.manual_seed(0)
            out = model(*args, **kwargs)
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)
    out = out.to_tuple() if hasattr(out, "to_tuple") else out
    leaves = pytree.tree_leaves(out)
    return [x.detach().clone() for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _relative_change(ref: list[torch.Tensor], new: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(ref, new):
        if a.numel():
            worst = max(worst, float((a.float() - b.float()).abs().max()) / max(float(a.float().abs().max()), 1e-30))
    return worst


def convert(
    gm_or_prepared: torch.nn.Module,
    pattern: Pattern | str | tuple[int, int] | None = None,
    *,
    example_inputs: Sequence[Any] | Any = None,
    kwargs: Mapping[str, Any] | None = None,
    plan: SparsityPlan | None = None,
    saliency: Mapping[str, torch.Tensor] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    inplace: bool = True,
) -> fx.GraphModule:
    """Makes every eligible weight exactly N:M; returns the graph without mask nodes.

    On a prepared graph, folds each hard mask into its weight (``pattern`` defaults to the prepared
    one and must match it) and leaves the graph in eval mode (dropout off); the result's output
    equals the prepared graph's ``eval()`` output. On a
    graph without masks (or a model, captured with ``example_inputs``), prunes the weights of
    ``plan`` (default ``nmgraph.analyze(gm, pattern or "2:4")``) by magnitude or ``saliency``.
    Weights are changed in place (they are the model's own) unless ``inplace=False``.

    On a model prepared with ``prepare(..., inplace=True)``, folds each hard mask into its weight and
    removes the masks: the same model object comes back as a plain module (its own class, no
    parametrizations, hooks or mask state) whose masked weights are exactly N:M.
    """
    gm = gm_or_prepared
    if not isinstance(gm, fx.GraphModule) and next(masked_weights(gm), None) is not None:
        if plan is not None or saliency is not None:
            raise PlanError(
                "convert() folds the trained masks of a prepared model; plan= and saliency= apply only to a "
                "model without masks."
            )
        if not inplace:
            gm = copy.deepcopy(gm)
        with Rollback() as undo:
            undo.keep_tensors(latent_weight(gm, p.state.weight_name) for _, _, p in masked_weights(gm))
            undo.keep_module(gm)
            folded = detach_masks(gm, pattern=None if pattern is None else Pattern.parse(pattern))
        log.info("convert: folded masks into %d weights of %s", len(folded), type(gm).__name__)
        return gm
    if not isinstance(gm, fx.GraphModule):
        if example_inputs is None:
            raise CaptureError(
                f"convert() got a {type(gm).__name__}, not a captured graph: pass example_inputs= to capture "
                "it, or convert the GraphModule returned by nmgraph.prepare()/capture()."
            )
        gm = capture(gm, example_inputs, kwargs)
    if not inplace:
        gm = copy.deepcopy(gm)
    p = None if pattern is None else Pattern.parse(pattern)
    if mask_nodes(gm):
        if plan is not None or saliency is not None:
            raise PlanError(
                "convert() folds the trained masks of a prepared graph; plan= and saliency= apply only "
                "to a graph without mask nodes."
            )
        with Rollback() as undo:
            undo.keep_module(gm)
            undo.keep_tensors(fetch_attr(gm, n.args[0].target) for n in mask_nodes(gm)
                              if isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr")
            set_mode(gm, False)
            res = run_passes(gm, (fold_masks,), FoldMasksConfig(p))[0]
            patterns = set(res.info["patterns"].values())
            update_graph_record(gm, converted=ConvertRecord(
                tuple(res.info["folded"]), (), patterns.pop() if len(patterns) == 1 else None, res.info["axes"]))
        log.info("convert: folded masks into %d weights", len(res.info["folded"]))
        return gm
    p = p or Pattern(2, 4)
    if plan is None:
        plan = _analyze(gm, p, include, exclude)
    elif plan.pattern != p:
        raise PlanError(f"plan was made for pattern {plan.pattern} but convert() was asked for {p}.")
    config = PruneWeightsConfig(plan, saliency)
    with Rollback() as undo:
        if gm is gm_or_prepared:
            undo.keep_module(gm)
        undo.keep_tensors(fetch_attr(gm, info.name) for info in plan.layers)
        res = run_passes(gm, (prune_weights,), config)[0]
        pruned = res.info["pruned"]
        update_graph_record(gm, converted=ConvertRecord(tuple(pruned), tuple(plan.skipped), p,
                                                        {i.name: i.axis for i in plan.layers}))
    for s in plan.skipped:
        log.info("left dense: %s (%s)", s.name, s.reason)
    log.info("convert: pruned %d weights to %s by %s", len(pruned), p,
             "magnitude" if saliency is None else "saliency")
    return gm


def _find_state(module: torch.nn.Module) -> tuple[torch.nn.Module, SparsityState]:
    found = []
    for mod in module.modules():
        st = mod._modules.get(STATE_NAME)
        if isinstance(st, SparsityState):
            found.append((mod, st))
    if not found:
        raise PlanError(
            f"{type(module).__name__} has no nmgraph mask state: build the module with nmgraph.prepare() "
            "(a DDP- or torch.compile-wrapped prepared module is fine)."
        )
    if len(found) > 1:
        raise UnsupportedError(
            f"{type(module).__name__} holds {len(found)} prepared graphs; make one SparsityCallback per "
            "prepared graph."
        )
    return found[0]


def _weights(owner: torch.nn.Module, state: SparsityState) -> dict[str, torch.Tensor]:
    """The latent (unmasked) weights of ``state``'s layers: graph attributes or the module's originals."""
    return {st.weight_name: latent_weight(owner, st.weight_name) for _, st in state.layers()}


@functools.cache
def _trainer_callback_class(base: type) -> type:
    """``base`` (SparsityCallback) mixed with ``transformers.TrainerCallback`` (made once per process)."""
    import transformers

    return type(base.__name__, (base, transformers.TrainerCallback), {"__module__": base.__module__,
                                                                     "__doc__": base.__doc__})


class SparsityCallback:
    """Advances a prepared model's sparsity schedule: a ``transformers.TrainerCallback``, or ``.step()``.

    ``module`` is the prepared model (``prepare(..., inplace=True)``), the prepared graph, or a module
    wrapping either (DDP, ``torch.compile``). When transformers is installed the object *is* a
    ``transformers.TrainerCallback``: ``Trainer(model=model, callbacks=[nmgraph.SparsityCallback(model)])``
    advances the schedule after every optimizer step and adds to the Trainer's logs (printed, kept in
    ``trainer.state.log_history``) ``nm_sparsity`` (the share of masked weights the forward zeroes
    now), ``nm_mask_flips`` (the share of kept weights that changed per step, averaged since the last
    log), ``nm_sad_start`` (the share of kept weights that differ from the masks when training began),
    ``nm_phase`` (dense, sparse or finetune) and ``nm_pattern``. Without a Trainer, call
    :meth:`step` after every optimizer step.

    ``telemetry=True`` (or a :class:`SADTracker`) makes :meth:`step` return the SAD dict of the step;
    ``log_every`` sets the tracker's INFO logging interval.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> SparsityCallback:
        if cls is SparsityCallback and importlib.util.find_spec("transformers") is not None:
            cls = _trainer_callback_class(SparsityCallback)
        return super().__new__(cls)

    def __init__(self, module: torch.nn.Module, *, telemetry: bool | SADTracker = False, log_every: int = 0) -> None:
        self.owner, self.state = _find_state(module)
        if isinstance(telemetry, SADTracker):
            self.telemetry: SADTracker | None = telemetry
        else:
            self.telemetry = SADTracker(self.state, log_every=log_every) if telemetry else None
        self._flips: list[float] = []

    @property
    def config(self) -> TrainingConfig:
        return self.state.config

    @property
    def step_count(self) -> int:
        return self.state.current_step

    def step(self) -> dict[str, Any] | None:
        """Counts one optimizer step and updates masks and beta; returns SAD telemetry if enabled."""
        self.state.advance(_weights(self.owner, self.state))
        if self.telemetry is None:
            return None
        record = self.telemetry.update()
        self._flips.append(record["flips"])
        return record

    def hf(self, **kwargs: Any) -> SparsityCallback:
        """This callback (it already is a ``transformers.TrainerCallback``); kept for older code."""
        return self

    def metrics(self) -> dict[str, Any]:
        """What the callback adds to the Trainer's logs (see the class docstring)."""
        kept = total = 0
        with torch.no_grad():
            for _, st in self.state.layers():
                kept += int(st.mask.sum())
                total += st.mask.numel()
        plan = self.state.current_plan()
        out: dict[str, Any] = {"nm_sparsity": round(1 - kept / total, 6) if total else 0.0}
        if self.telemetry is not None:
            history = self.telemetry.history
            if self._flips:
                out["nm_mask_flips"] = sum(self._flips) / len(self._flips)
            if history:
                out["nm_sad_start"] = history[-1]["dist_start"]
        out["nm_phase"] = plan.phase.value
        out["nm_pattern"] = "dense" if plan.pattern is None or plan.phase is Phase.DENSE else str(plan.pattern)
        return out

    # --- transformers.TrainerCallback events (plain methods: no transformers import needed) --------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Starts mask telemetry from the masks as they are now (after a checkpoint was restored)."""
        if self.telemetry is None or self.telemetry.start_step != self.state.current_step:
            self.telemetry = SADTracker(self.state, keep_history=False)
        self._flips = []
        step = getattr(state, "global_step", None)
        if step is not None and step != self.state.current_step:
            log.warning(
                "SparsityCallback: the Trainer is at step %d but the model's sparsity schedule at step %d; the "
                "schedule counts from its own state (restored with the model's state_dict).", step,
                self.state.current_step)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Runs :meth:`step` after each optimizer step."""
        self.step()
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> Any:
        """Adds :meth:`metrics` to the logs being written and to ``state.log_history``."""
        if logs is None or "eval_loss" in logs or any(k.startswith("eval_") for k in logs):
            return control
        extra = self.metrics()
        self._flips = []
        logs.update(extra)
        history = getattr(state, "log_history", None)
        if history and isinstance(history[-1], dict) and history[-1].get("step") == getattr(state, "global_step", None):
            history[-1].update(extra)
        return control


def hf_callback(module_or_callback: torch.nn.Module | SparsityCallback, **kwargs: Any) -> Any:
    """The ``transformers.TrainerCallback`` for a prepared model: :class:`SparsityCallback` itself.

    Kept for older code; ``Trainer(..., callbacks=[nmgraph.SparsityCallback(model)])`` is the same.
    """
    import transformers

    cb = module_or_callback if isinstance(module_or_callback, SparsityCallback) else SparsityCallback(
        module_or_callback, **kwargs
    )
    if not isinstance(cb, transformers.TrainerCallback):
        cb.__class__ = _trainer_callback_class(SparsityCallback)
    return cb

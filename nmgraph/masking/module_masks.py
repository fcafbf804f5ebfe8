"""Masks on the user's own module: ``nmgraph::masked_weight`` applied whenever a weight is read.

``prepare(..., inplace=True)`` keeps the model the user built. Every eligible weight gets a
``torch.nn.utils.parametrize`` parametrization, :class:`MaskedWeight`, that returns
``nmgraph.masked_weight(W, mask, hard, beta, grad_mask, lam, hard_mode)``: the same op, the same
buffers (:class:`~nmgraph.masking.layer_state.MaskState`) and so the same forward and backward as a
mask node of a prepared graph. ``hard_mode`` follows the module's ``training`` flag (``model.eval()``
is the hard N:M forward). A parametrization is read at every attribute access, so any code that reads
the weight (the layer's forward, a parent reading ``self.proj.weight``, ``generate``, gradient
checkpointing's recomputation) sees the masked weight, for any input shape.

The masks and the schedule state live in one :class:`~nmgraph.masking.state.SparsityState` child of
the model (``model.nmgraph_sparsity``), so ``state_dict`` (and a Trainer checkpoint) carries them.
The latent weight keeps its Parameter object (an optimizer built before ``prepare`` still trains it)
and its state-dict name: the parametrized module's ``state_dict`` names it ``layer.weight`` again
(not ``layer.parametrizations.weight.original``) and ``load_state_dict`` maps it back, so
``save_pretrained`` / ``from_pretrained`` and checkpoints read as for the plain model.

:func:`detach_masks` folds every hard mask into its weight and removes the parametrizations, the
hooks and the state: the model is a plain module again, with N:M weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmgraph.errors import PlanError, VerificationError
from nmgraph.graph import owner_of
from nmgraph.masking.layer_state import MaskState
from nmgraph.masking.op import MASK_OP
from nmgraph.masking.schedule import TrainingConfig
from nmgraph.masking.state import STATE_NAME, SparsityState
from nmgraph.pattern import Pattern, is_nm

__all__ = ["STATE_NAME", "MaskedWeight", "attach_masks", "detach_masks", "latent_weight", "masked_weights"]

log = logging.getLogger(__name__)

class MaskedWeight(nn.Module):
    """The parametrization of one masked weight: ``W -> nmgraph.masked_weight(W, ...)``.

    It holds references to its :class:`MaskState` and the model's :class:`SparsityState` without
    registering them (they are the model's ``nmgraph_sparsity`` child; registering them here too would
    store every mask twice).
    """

    def __init__(self, state: MaskState, bank: SparsityState, lam: float) -> None:
        super().__init__()
        self._refs = (state, bank)  # a tuple: not registered as submodules
        self.lam = float(lam)
        self._handles: list[Any] = []

    @property
    def state(self) -> MaskState:
        return self._refs[0]

    @property
    def bank(self) -> SparsityState:
        return self._refs[1]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        st, bank = self._refs
        return MASK_OP(weight, st.mask, st.hard, bank.beta, st.grad_mask, self.lam, not self.training)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """Assigning ``module.weight = W`` (weight tying, ``functional_call``) sets the latent weight to ``W``."""
        return value

    def extra_repr(self) -> str:
        return f"{self.state.weight_name}, target={self.state.target}, lam={self.lam:g}"


def _aliases(model: nn.Module, name: str) -> list[str]:
    """Every name under which ``model`` holds the parameter called ``name`` (tied weights)."""
    target = dict(model.named_parameters(remove_duplicate=False)).get(name)
    if target is None:
        raise PlanError(
            f"The plan names weight {name!r}, which {type(model).__name__} does not have as a parameter; "
            "the plan was made for another model. Prepare the model the plan came from."
        )
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is target]


def masked_weights(model: nn.Module) -> Iterator[tuple[nn.Module, str, MaskedWeight]]:
    """``(owner module, attribute name, MaskedWeight)`` for every masked weight of ``model``."""
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for leaf, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, MaskedWeight):
                    yield module, leaf, p


def latent_weight(root: nn.Module, name: str) -> torch.Tensor | None:
    """The trained (unmasked) tensor at dotted ``name``: a parametrized weight's ``original``."""
    try:
        owner, leaf = owner_of(root, name)
    except AttributeError:
        return None
    if parametrize.is_parametrized(owner, leaf):
        return owner.parametrizations[leaf].original
    value = getattr(owner, leaf, None)
    return value if isinstance(value, torch.Tensor) else None


def _state_dict_hook(leaf: str):
    original = f"parametrizations.{leaf}.original"

    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        key = prefix + original
        if key not in state_dict:
            return
        # this module's entries are the last ones written: put the weight first among them, where the
        # plain module has it (Linear: weight, then bias)
        after = [k for k in state_dict if k.startswith(prefix) and k != key]
        state_dict[prefix + leaf] = state_dict.pop(key)
        if hasattr(state_dict, "move_to_end"):
            for k in after:
                state_dict.move_to_end(k)

    return hook


def _load_pre_hook(leaf: str):
    original = f"parametrizations.{leaf}.original"

    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
             missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + leaf
        if key in state_dict and prefix + original not in state_dict:
            state_dict[prefix + original] = state_dict.pop(key)

    return hook


def attach_masks(
    model: nn.Module,
    config: TrainingConfig,
    names: Sequence[tuple[str, tuple[int, ...], int]],
    *,
    scores: Mapping[str, torch.Tensor] | None = None,
) -> SparsityState:
    """Masks every weight ``(name, shape, axis)`` of ``names`` on ``model`` itself; returns the state.

    Raises :class:`PlanError` if the model already holds nmgraph masks or a weight is missing or has
    another shape. Nothing is changed when it raises.
    """
    if isinstance(getattr(model, STATE_NAME, None), nn.Module) or next(masked_weights(model), None):
        raise PlanError(
            f"{type(model).__name__} is already prepared (it has {STATE_NAME!r}): call nmgraph.convert(model) "
            "to fold its masks first, or prepare a fresh copy."
        )
    chosen: list[tuple[str, MaskState, list[str]]] = []
    taken: set[str] = set()
    for name, shape, axis in names:
        aliases = _aliases(model, name)
        weight = latent_weight(model, name)
        if tuple(weight.shape) != tuple(shape):
            raise PlanError(
                f"Weight {name!r} has shape {tuple(weight.shape)} but the plan says {tuple(shape)}: the plan "
                "was made for another model."
            )
        state = MaskState(name, tuple(shape), axis, config.pattern, with_grad_mask=config.uses_grad_mask,
                          device=weight.device)
        chosen.append((_child_name(name, taken), state, aliases))
    bank = SparsityState(config, [(child, st) for child, st, _ in chosen])
    bank.refresh({st.weight_name: latent_weight(model, st.weight_name) for _, st, _ in chosen}, force=True,
                 scores=scores)
    model.add_module(STATE_NAME, bank)
    lam = float(config.penalty)
    try:
        for _, st, aliases in chosen:
            for alias in aliases:
                owner, leaf = owner_of(model, alias)
                p = MaskedWeight(st, bank, lam)
                parametrize.register_parametrization(owner, leaf, p, unsafe=True)
                p._handles = [owner.register_state_dict_post_hook(_state_dict_hook(leaf)),
                              owner.register_load_state_dict_pre_hook(_load_pre_hook(leaf))]
    except BaseException:
        detach_masks(model, fold=False)
        raise
    log.info("attached masks to %d weights of %s (%s)", len(chosen), type(model).__name__, config)
    return bank


def _child_name(weight: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() else "_" for c in weight)
    if not base or base[0].isdigit():
        base = "w_" + base
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def detach_masks(model: nn.Module, *, fold: bool = True, pattern: Pattern | None = None) -> dict[str, int]:
    """Removes the masks from ``model``; with ``fold`` first multiplies each weight by its hard mask.

    Returns ``{weight name: reduction axis}`` of the folded weights. The latent Parameter objects stay
    the model's (an optimizer keeps working); the modules get their own classes back. Raises
    :class:`PlanError` if ``pattern`` differs from the masks' and :class:`VerificationError` if a folded
    weight is not N:M (before anything is changed).
    """
    found = list(masked_weights(model))
    states = {id(p.state): p.state for _, _, p in found}
    if fold:
        for st in states.values():
            if pattern is not None and st.target != pattern:
                raise PlanError(
                    f"Mask of {st.weight_name!r} targets {st.target}, but convert was asked for {pattern}. Pass "
                    f"pattern={str(st.target)!r} (or None) to fold it."
                )
            if not is_nm(st.hard, st.target, axis=st.axis):
                raise VerificationError(
                    f"The hard mask of {st.weight_name!r} is not {st.target} along axis {st.axis}: was the "
                    "nmgraph_sparsity state overwritten? Reload the prepared model's state_dict."
                )
    folded: dict[str, int] = {}
    with torch.no_grad():
        for owner, leaf, p in found:
            for h in p._handles:
                h.remove()
            original = owner.parametrizations[leaf].original
            if fold and p.state.weight_name not in folded:
                original.mul_(p.state.hard.to(original.device))
                folded[p.state.weight_name] = p.state.axis
            parametrize.remove_parametrizations(owner, leaf, leave_parametrized=False)
    if isinstance(getattr(model, STATE_NAME, None), SparsityState):
        delattr(model, STATE_NAME)
    return folded

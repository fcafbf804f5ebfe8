"""What nmgraph decided about a graph: eligible weights, weights left dense, permutation groups.

A :class:`SparsityPlan` is pure data produced by :func:`nmgraph.analyze`; the rewrite passes read
it, never the other way round.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from nmgraph.pattern import Pattern

__all__ = ["LayerInfo", "Member", "PermutationGroup", "Skip", "SparsityPlan"]


@dataclass(frozen=True)
class Skip:
    """A weight, node or group left as it is, with the reason a user can read."""

    name: str
    reason: str

    def __iter__(self) -> Iterator[str]:
        return iter((self.name, self.reason))


@dataclass(frozen=True)
class LayerInfo:
    """A weight that can be made N:M along its reduction axis.

    ``name`` is the parameter's qualified name (``encoder.layer.0.output.dense.weight``), ``axis``
    the reduction axis of the consuming GEMM (1 for Linear and conv weights, 0 for GPT-2's
    ``Conv1D`` which stores ``[in, out]``), ``op`` the consuming aten op, ``node`` the consuming
    node's name, ``module`` the owning module's qualified name, and ``group`` the id of the
    permutation group that holds its reduction channels (``None`` when they cannot be permuted).
    """

    name: str
    shape: tuple[int, ...]
    axis: int
    op: str
    node: str
    module: str
    group: int | None = None

    @property
    def rows_k(self) -> tuple[int, int]:
        k = self.shape[self.axis]
        numel = 1
        for s in self.shape:
            numel *= s
        return numel // k, k


@dataclass(frozen=True)
class Member:
    """One tensor axis that moves with a permutation group.

    Channels ``start:stop`` of axis ``axis`` of tensor ``name`` (a parameter or buffer) hold the
    group's channels; each channel spans ``inner`` consecutive indices (``inner > 1`` where a
    conv's channels are flattened into a Linear's input). ``repeat > 1``: the tensor holds every
    block of ``repeat_block`` channels ``repeat`` times in a row, each copy permuted like its
    block (grouped-query attention: a key/value head serves ``repeat`` query heads, so ``o_proj``
    columns and ``q_proj`` rows follow the permutation of their shared K/V head). ``stride > 0``:
    the group's channels sit in runs of ``stop - start`` starting at ``start`` and every ``stride``
    indices (Q, K and V interleaved per head in one fused projection). Iterates as
    ``(name, axis)``.
    """

    name: str
    axis: int
    start: int = 0
    stop: int | None = None
    inner: int = 1
    repeat: int = 1
    repeat_block: int = 0
    stride: int = 0

    def __iter__(self) -> Iterator:
        return iter((self.name, self.axis))


@dataclass(frozen=True)
class PermutationGroup:
    """Channels that must be reordered together for the network to compute the same function.

    ``block``: a permutation must keep every run of ``block`` consecutive channels in place as a
    set (e.g. ``head_dim`` for per-head V/O channels); ``block == size`` means no constraint beyond
    the group. ``consumers`` are the eligible weights whose reduction channels are this group's.
    """

    id: int
    size: int
    members: tuple[Member, ...]
    block: int
    consumers: tuple[str, ...] = ()
    kind: str = "channels"

    def random_permutation(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniformly random permutation that honours ``block``."""
        n_blocks = self.size // self.block
        perms = torch.argsort(torch.rand(n_blocks, self.block, generator=generator), dim=1)
        return (perms + torch.arange(n_blocks).unsqueeze(1) * self.block).flatten()

    def check(self, perm: torch.Tensor) -> str | None:
        """Why ``perm`` is not valid for this group, or ``None``."""
        if perm.dim() != 1 or perm.numel() != self.size:
            return f"expected a 1-D permutation of length {self.size}, got shape {tuple(perm.shape)}"
        if not torch.equal(torch.sort(perm).values, torch.arange(self.size, device=perm.device)):
            return "not a permutation of 0..size-1"
        blocks = torch.arange(self.size, device=perm.device) // self.block
        if not torch.equal(perm // self.block, blocks):
            return f"moves channels across blocks of {self.block} (e.g. between attention heads)"
        return None


@dataclass(frozen=True)
class SparsityPlan:
    """The decision for one graph and pattern; see :func:`nmgraph.analyze`."""

    pattern: Pattern
    layers: tuple[LayerInfo, ...]
    skipped: tuple[Skip, ...]
    groups: tuple[PermutationGroup, ...]
    barriers: tuple[Skip, ...] = field(default=())

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(f"{name!r} is not an eligible layer of this plan")

    def group(self, gid: int) -> PermutationGroup:
        for g in self.groups:
            if g.id == gid:
                return g
        raise KeyError(f"no permutation group {gid} in this plan")

    @property
    def permutable_fraction(self) -> float:
        """Fraction of eligible weights whose reduction channels can be permuted."""
        if not self.layers:
            return 0.0
        return sum(info.group is not None for info in self.layers) / len(self.layers)

    def to_dict(self) -> dict:
        return {
            "pattern": str(self.pattern),
            "layers": [asdict(info) for info in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "groups": [asdict(g) for g in self.groups],
            "barriers": [asdict(b) for b in self.barriers],
            "permutable_fraction": self.permutable_fraction,
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kwargs))

    def __str__(self) -> str:
        lines = [f"SparsityPlan {self.pattern}: {len(self.layers)} eligible, {len(self.skipped)} dense, "
                 f"{len(self.groups)} permutation groups ({self.permutable_fraction:.0%} of eligible "
                 "weights permutable)"]
        width = max([len(i.name) for i in self.layers] + [len(s.name) for s in self.skipped] + [10])
        lines.append(f"  {'weight':<{width}}  {'shape':<18} axis  group")
        for info in self.layers:
            grp = "-" if info.group is None else str(info.group)
            lines.append(f"  {info.name:<{width}}  {list(info.shape)!s:<18} {info.axis:>4}  {grp:>5}")
        if self.skipped:
            lines.append("  left dense:")
            for s in self.skipped:
                lines.append(f"  {s.name:<{width}}  {s.reason}")
        if self.groups:
            lines.append("  groups:")
            for g in self.groups:
                shown = ", ".join(g.consumers[:3]) + (f", ... ({len(g.consumers)} in all)" if len(g.consumers) > 3 else "")
                lines.append(f"  #{g.id:<3} {g.kind:<10} size {g.size:>5} block {g.block:>5} "
                             f"{len(g.members):>3} members, consumers: {shown or '-'}")
        if self.barriers:
            lines.append("  not permutable:")
            for b in self.barriers:
                lines.append(f"  {b.name}: {b.reason}")
        return "\n".join(lines)

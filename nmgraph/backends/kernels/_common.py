"""What the launchers of this package share: finding Triton, and checking a call's arguments.

Triton is imported only when a kernel is built (never at import time of :mod:`nmgraph`).
"""

from __future__ import annotations

import math
import os

import torch

from nmgraph.backends.kernels.repack import PackedNM
from nmgraph.errors import BackendUnavailableError, ShapeError, UnsupportedError

__all__ = ["SUPPORTED_DTYPES", "check_call", "import_triton", "interpreting", "unavailable_reason"]

#: Activation / weight dtypes the kernels accept (accumulation is always fp32).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INSTALL_HINT = "pip install nmgraph[triton]"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def import_triton():
    try:
        import triton
    except ImportError as e:
        raise BackendUnavailableError(
            f"The nmgraph N:M kernels need the triton package ({e}). Install it with `{_INSTALL_HINT}`."
        ) from None
    return triton


def unavailable_reason(device: torch.device | str | None) -> str | None:
    """Why the kernels cannot run on ``device`` (``None`` when they can)."""
    try:
        import_triton()
    except BackendUnavailableError as e:
        return str(e)
    if interpreting():
        return None
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        where = "no device given" if dev is None else f"device {dev}"
        return (f"Triton kernels need a CUDA device ({where}); set TRITON_INTERPRET=1 to run them (slowly) "
                "on the CPU for testing.")
    if not torch.cuda.is_available():
        return "torch.cuda is not available in this process."
    return None


def check_call(name: str, x: torch.Tensor, weight: PackedNM, bias: torch.Tensor | None) -> tuple[int, int]:
    """Validates ``name(x, weight, bias)``; returns ``(rows of x, K)``. Raises typed errors."""
    if not isinstance(weight, PackedNM):
        raise UnsupportedError(
            f"{name} needs the weight as a PackedNM (nmgraph.backends.kernels.repack(compressed)), got "
            f"{type(weight).__name__}."
        )
    if not isinstance(x, torch.Tensor):
        raise UnsupportedError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}.")
    k = weight.k
    if x.dim() < 1 or x.shape[-1] != k:
        raise ShapeError(
            f"{name}: x has shape {tuple(x.shape)} but the {weight.pattern} weight of shape {weight.shape} "
            f"reduces over K={k} (axis {weight.axis}); x must be [..., {k}]."
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedError(
            f"{name}: activation dtype {x.dtype} is not supported; use one of "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} (cast x and the weight)."
        )
    if weight.dtype != x.dtype:
        raise UnsupportedError(
            f"{name}: x is {x.dtype} but the weight values are {weight.dtype}; cast one of them (e.g. "
            f"weight.to({x.dtype}))."
        )
    n_out = weight.rows
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n_out,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ShapeError(f"{name}: bias has shape {shape}, expected ({n_out},) for a weight with "
                             f"{n_out} output features.")
        if bias.dtype != x.dtype:
            raise UnsupportedError(f"{name}: bias is {bias.dtype} but x is {x.dtype}; cast the bias to {x.dtype}.")
    devices = {x.device, weight.device}
    if bias is not None:
        devices.add(bias.device)
    if len(devices) != 1:
        raise UnsupportedError(
            f"{name}: tensors are on different devices ({', '.join(sorted(map(str, devices)))}); move x, the "
            "weight and the bias to one device."
        )
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise BackendUnavailableError(f"{name} cannot run: {reason}")
    return math.prod(x.shape[:-1]), k

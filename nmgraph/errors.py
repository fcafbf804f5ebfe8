"""Typed errors raised by nmgraph.

Every error a user can trigger is a subclass of :class:`NMGraphError`. Messages name the node or
layer, the rule that was violated and the fix to try.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "BackendUnavailableError",
    "CaptureError",
    "CaptureWarning",
    "NMGraphError",
    "PatternError",
    "PlanError",
    "SerializationError",
    "ShapeError",
    "StrictModeError",
    "UnsupportedError",
    "VerificationError",
]


class NMGraphError(Exception):
    """Base class of every error raised by nmgraph."""


class ArgumentError(NMGraphError, ValueError, TypeError):
    """An argument of a public call has the wrong type or value; the message names it and the fix.

    It is both a ``ValueError`` and a ``TypeError``, so code written for either keeps catching it.
    """


class PatternError(NMGraphError, ValueError):
    """An N:M pattern is malformed or out of range."""


class ShapeError(NMGraphError, ValueError):
    """A tensor's shape does not fit the requested N:M pattern (e.g. reduction dim not divisible by M)."""


class CaptureError(NMGraphError, RuntimeError):
    """The model could not be captured as an FX graph."""


class UnsupportedError(NMGraphError, NotImplementedError):
    """The graph or model uses something nmgraph does not support."""


class PlanError(NMGraphError, ValueError):
    """A sparsity plan or permutation does not match the graph it is applied to."""


class VerificationError(NMGraphError, RuntimeError):
    """A rewrite changed the model's outputs beyond tolerance."""


class StrictModeError(NMGraphError, RuntimeError):
    """``strict=True`` was requested and a layer would have been left dense."""


class BackendUnavailableError(NMGraphError, RuntimeError):
    """A requested backend (Triton, cuSPARSELt, TensorRT, ONNX) is not installed or has no device."""


class SerializationError(NMGraphError, RuntimeError):
    """A saved nmgraph artifact is missing, corrupt or does not match the model."""


class CaptureWarning(UserWarning):
    """Capture succeeded with less than asked: a static axis torch.export refused to make dynamic, or a
    ``torch.fx.symbolic_trace`` graph after ``torch.export`` failed (the message carries why)."""

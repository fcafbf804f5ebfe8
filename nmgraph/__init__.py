"""nmgraph: N:M structured sparsity for PyTorch models, as torch.fx graph passes.

Importing nmgraph loads torch and nmgraph's own modules only; optional dependencies (transformers,
triton, onnx, tensorrt) load on first use.
"""

from __future__ import annotations

from nmgraph.analysis import analyze
from nmgraph.capture import capture
from nmgraph.compress import CompressedNM, compress
from nmgraph.deploy import (
    CompiledModule,
    compile,
)
from nmgraph.errors import (
    BackendUnavailableError,
    CaptureError,
    NMGraphError,
    PatternError,
    PlanError,
    SerializationError,
    ShapeError,
    StrictModeError,
    UnsupportedError,
    VerificationError,
)
from nmgraph.export import ExportReport, export
from nmgraph.passes.permute_channels import PermuteReport, permute
from nmgraph.pattern import Pattern, is_nm, nm_mask
from nmgraph.permutation_search import SearchResult, kept_score, search_permutation
from nmgraph.analysis.plan import LayerInfo, Member, PermutationGroup, Skip, SparsityPlan
from nmgraph.serialize import load, save
from nmgraph.training import SparsityCallback, convert, prepare

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CaptureError",
    "CompiledModule",
    "CompressedNM",
    "ExportReport",
    "LayerInfo",
    "Member",
    "NMGraphError",
    "Pattern",
    "PatternError",
    "PermutationGroup",
    "PermuteReport",
    "PlanError",
    "SearchResult",
    "SerializationError",
    "ShapeError",
    "Skip",
    "SparsityCallback",
    "SparsityPlan",
    "StrictModeError",
    "UnsupportedError",
    "VerificationError",
    "__version__",
    "analyze",
    "capture",
    "compile",
    "compress",
    "convert",
    "export",
    "is_nm",
    "kept_score",
    "load",
    "nm_mask",
    "permute",
    "prepare",
    "save",
    "search_permutation",
]

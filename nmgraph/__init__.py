"""nmgraph: N:M structured sparsity for PyTorch models, as torch.fx graph passes.

Importing nmgraph loads torch and nmgraph's own modules only; optional dependencies (transformers,
triton, onnx, tensorrt) load on first use.
"""

from __future__ import annotations

from nmgraph._version import __version__
from nmgraph.analysis import analyze
from nmgraph.analysis.plan import LayerInfo, Member, PermutationGroup, Skip, SparsityPlan
from nmgraph.capture import capture
from nmgraph.compress import CompressedNM, compress
from nmgraph.deploy import CompiledModule, CompileOptions, CompileReport, TorchCompileBackend, compile
from nmgraph.errors import (
    ArgumentError,
    BackendUnavailableError,
    CaptureError,
    CaptureWarning,
    NMGraphError,
    PatternError,
    PlanError,
    SerializationError,
    ShapeError,
    StrictModeError,
    UnsupportedError,
    VerificationError,
)
from nmgraph.exporters.hf import HFSaved, from_pretrained, load, save_pretrained
from nmgraph.exporters.onnx_export import ExportReport, export
from nmgraph.exporters.serialize import save
from nmgraph.graph import GraphRecord, graph_record
from nmgraph.oneshot import CalibrationError, SparsifyReport, sparsify
from nmgraph.passes.permute_channels import PermuteReport, permute
from nmgraph.pattern import Pattern, is_nm, nm_mask
from nmgraph.search import SearchResult, kept_score, search_permutation
from nmgraph.training import SparsityCallback, convert, prepare

__all__ = [
    "ArgumentError",
    "BackendUnavailableError",
    "CalibrationError",
    "CaptureError",
    "CaptureWarning",
    "CompileOptions",
    "CompileReport",
    "CompiledModule",
    "CompressedNM",
    "ExportReport",
    "GraphRecord",
    "HFSaved",
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
    "SparsifyReport",
    "SparsityCallback",
    "SparsityPlan",
    "StrictModeError",
    "TorchCompileBackend",
    "UnsupportedError",
    "VerificationError",
    "__version__",
    "analyze",
    "capture",
    "compile",
    "compress",
    "convert",
    "export",
    "from_pretrained",
    "graph_record",
    "is_nm",
    "kept_score",
    "load",
    "nm_mask",
    "permute",
    "prepare",
    "save",
    "save_pretrained",
    "search_permutation",
    "sparsify",
]

"""TensorRT engines with N:M sparse weights.

Two routes, both with TensorRT's sparse-weights flag so it may pick structured-sparse tactics for
every layer whose constant weight is 2:4 along the reduction axis:

* :func:`build_engine` parses the ONNX file that :func:`nmgraph.export` wrote and checked (the
  route ``export(..., format="tensorrt")`` takes), with ``BuilderFlag.SPARSE_WEIGHTS``, FP16 when
  the export is float16, and an optimization profile over the batch axis when it is dynamic;
* :func:`compile_torch_tensorrt` compiles the PyTorch module with Torch-TensorRT
  (``sparse_weights=True``, precision from the model's dtype) and saves it.

TensorRT's sparse tensor cores implement 2:4 only; other N:M patterns build a valid engine with
dense tactics. Both need ``pip install 'nmgraph[tensorrt]'`` and an NVIDIA GPU; without them
:func:`require_tensorrt` raises :class:`BackendUnavailableError` saying so.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nmgraph.errors import BackendUnavailableError, CaptureError, VerificationError

__all__ = ["build_engine", "compile_torch_tensorrt", "require_tensorrt"]

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'nmgraph[tensorrt]' (installs torch-tensorrt, which brings the tensorrt wheel "
    "matching your CUDA) on a machine with an NVIDIA GPU (sparse tensor cores: Ampere or newer)"
)
_MAX_BATCH_FACTOR = 4


def require_tensorrt(module: str = "tensorrt") -> Any:
    """Imports ``module`` (``tensorrt`` or ``torch_tensorrt``) or raises BackendUnavailableError.

    Checks the GPU first, because without one TensorRT cannot build anything even if installed.
    """
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "format='tensorrt' needs an NVIDIA GPU with CUDA, and torch.cuda.is_available() is False "
            f"here. Export with format='onnx' and build the engine on the target machine, or "
            f"{INSTALL_HINT}."
        )
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailableError(
            f"format='tensorrt' needs the {module!r} package, which is not installed: {INSTALL_HINT}."
        ) from e


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    fp16: bool = False,
    example_inputs: Sequence[Any] = (),
    dynamic_batch: bool = False,
    max_batch: int | None = None,
    workspace_bytes: int = 1 << 30,
) -> Path:
    """Builds a serialized TensorRT engine from ``onnx_path`` with sparse weights enabled.

    With ``dynamic_batch`` the optimization profile spans batch 1 to ``max_batch`` (default
    ``4 x`` the example batch) with the example batch as the optimum.
    """
    trt = require_tensorrt("tensorrt")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise CaptureError(
            f"TensorRT could not parse {os.fspath(onnx_path)!r}: " + "; ".join(errors[:5])
        )
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if dynamic_batch:
        tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            shape = tuple(tensors[i].shape) if i < len(tensors) else tuple(max(d, 1) for d in inp.shape)
            top = max_batch or _MAX_BATCH_FACTOR * shape[0]
            profile.set_shape(inp.name, (1, *shape[1:]), shape, (top, *shape[1:]))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VerificationError(
            f"TensorRT failed to build an engine from {os.fspath(onnx_path)!r}; see the TensorRT log above."
        )
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    log.info("built TensorRT engine %s (sparse weights enabled, fp16=%s)", engine_path, fp16)
    return engine_path


def compile_torch_tensorrt(
    module: torch.nn.Module,
    example_inputs: Sequence[Any],
    path: str | os.PathLike | None = None,
    **options: Any,
) -> Any:
    """Compiles ``module`` with Torch-TensorRT and ``sparse_weights=True``; saves it to ``path``.

    Precision follows the model's dtype (float16 models enable FP16 kernels). ``options`` go to
    ``torch_tensorrt.compile``.
    """
    torch_tensorrt = require_tensorrt("torch_tensorrt")
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    inputs = [t.cuda() if isinstance(t, torch.Tensor) else t for t in example_inputs]
    compiled = torch_tensorrt.compile(
        module.cuda().eval(), ir="dynamo", inputs=inputs, enabled_precisions={dtype},
        sparse_weights=True, **options,
    )
    if path is not None:
        torch_tensorrt.save(compiled, os.fspath(path), inputs=inputs)
    return compiled

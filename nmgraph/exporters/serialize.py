"""Save a converted N:M model to a directory and load it back bit for bit.

Layout of a saved directory (format version :data:`FORMAT_VERSION`)::

    nmgraph.json           format + version, pattern, which weights are compressed (shape, axis,
                           dtype), tied-weight aliases, a SHA-256 per stored tensor, the plan,
                           the permutations and free-form metadata
    weights.safetensors    N:M weights as CompressedNM state tensors ("<name>::nm.values",
                           "::nm.indices", "::nm.meta"), every other parameter and buffer as is
    inputs.safetensors     the example inputs, when given
    program.pt2            optional: a torch.export program of the model *without* its weights
                           (they live in weights.safetensors), so a directory loads without the
                           model's Python class

:func:`load` checks every tensor against its checksum, shape and dtype and raises
:class:`SerializationError` naming the tensor on any mismatch; it never casts silently. Pruned
entries come back as ``+0.0``: a ``-0.0`` left by ``w * mask`` loads as ``+0.0`` (equal under
``torch.equal`` and in every product).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nmgraph._version import __version__
from nmgraph.analysis.plan import LayerInfo, Member, PermutationGroup, Skip, SparsityPlan
from nmgraph.capture import batch_dynamic_shapes, split_inputs
from nmgraph.compress import CompressedNM, compress
from nmgraph.errors import PlanError, SerializationError
from nmgraph.exporters.onnx_check import diagnose_nm
from nmgraph.exporters.onnx_export import sparse_weight_axes
from nmgraph.pattern import Pattern, PatternLike, is_nm

__all__ = [
    "FORMAT_VERSION",
    "SavedModel",
    "load",
    "plan_from_dict",
    "read_example_inputs",
    "read_saved",
    "save",
]

log = logging.getLogger(__name__)

FORMAT = "nmgraph"
FORMAT_VERSION = 1
META_FILE = "nmgraph.json"
WEIGHTS_FILE = "weights.safetensors"
INPUTS_FILE = "inputs.safetensors"
PROGRAM_FILE = "program.pt2"
_NM = "::nm."
# torch.export.save warns that a 1-element placeholder does not cover its "complete tensor".
_PLACEHOLDER_WARNING = "No complete tensor found"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


@dataclass(frozen=True)
class SavedModel:
    """The metadata of a saved directory (see :func:`read_saved`)."""

    path: Path
    pattern: Pattern
    compressed: dict[str, dict[str, Any]]
    dense: dict[str, str]
    aliases: dict[str, str]
    plan: SparsityPlan | None
    permutations: dict[int, list[int]] | None
    metadata: dict[str, Any] = field(default_factory=dict)
    has_program: bool = False
    has_inputs: bool = False
    nbytes: int = 0
    dense_nbytes: int = 0


def save(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    pattern: PatternLike = "2:4",
    plan: SparsityPlan | None = None,
    permutations: Any = None,
    example_inputs: Sequence[Any] | None = None,
    program: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> SavedModel:
    """Saves ``model`` (N:M weights compressed) to the directory ``path`` (created if needed).

    The weights to compress are the plan's layers, or without a plan the model's Linear / Conv /
    ``Conv1D`` weights (see :func:`nmgraph.exporters.onnx_export.sparse_weight_axes`) that are N:M. A plan layer
    that is not N:M raises :class:`PlanError` (run :func:`nmgraph.convert` first).
    ``permutations``: ``{group_id: LongTensor}`` (or an object with a ``perms`` mapping) recorded
    with the plan. ``program`` (default: when ``example_inputs`` are given) also saves a weightless
    ``torch.export`` program so :func:`load` works without the model's class.
    """
    from safetensors.torch import save_file


    p = Pattern.parse(pattern)
    if not isinstance(model, torch.nn.Module):
        raise SerializationError(f"save() needs a torch.nn.Module, got {type(model).__name__}.")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SerializationError(f"{str(out)!r} exists and is not a directory; pass a directory path.")
    out.mkdir(parents=True, exist_ok=True)
    ex_args, ex_kwargs = split_inputs(example_inputs) if example_inputs is not None else (None, None)
    axes, skips = sparse_weight_axes(model, p, plan, example_inputs=ex_args, kwargs=ex_kwargs)
    state = model.state_dict()
    aliases = _state_aliases(state)
    tensors: dict[str, torch.Tensor] = {}
    compressed: dict[str, dict[str, Any]] = {}
    dense: dict[str, str] = {s.name: s.reason for s in skips}
    nbytes = dense_nbytes = 0
    for name, value in state.items():
        if name in aliases:
            continue
        value = value.detach().cpu()
        dense_nbytes += value.numel() * value.element_size()
        axis = axes.get(name)
        if axis is not None and value.is_floating_point() and is_nm(value, p, axis=axis):
            c = compress(value, p, axis=axis)
            for key, t in c.state_dict(prefix=f"{name}{_NM}").items():
                tensors[key] = t.contiguous()
            compressed[name] = {"shape": list(value.shape), "axis": axis, "dtype": str(value.dtype),
                                "n": p.n, "m": p.m}
            nbytes += c.nbytes
            continue
        if axis is not None:

            reason = diagnose_nm(value, p, axis).reason
            if plan is not None:
                raise PlanError(
                    f"Cannot save {name}: the plan lists it as {p} but the weight is {reason}. Run "
                    "nmgraph.convert(...) before saving, or save without the plan."
                )
            dense[name] = f"stored dense: {reason}"
        tensors[name] = value.contiguous()
        nbytes += value.numel() * value.element_size()
    checksums = {k: {"sha256": _sha256(t), "dtype": str(t.dtype), "shape": list(t.shape)}
                 for k, t in tensors.items()}

    has_inputs = False
    if example_inputs is not None:
        _save_inputs(example_inputs, out / INPUTS_FILE)
        has_inputs = True
    has_program = False
    program_imports: list[str] = []
    if program or (program is None and example_inputs is not None):
        if example_inputs is None:
            raise SerializationError("save(program=True) needs example_inputs to export the program.")
        program_imports = _save_program(model, example_inputs, out / PROGRAM_FILE)
        has_program = True
    elif (out / PROGRAM_FILE).exists():
        (out / PROGRAM_FILE).unlink()  # a stale program from an earlier save would not match

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nmgraph_version": __version__,
        "pattern": str(p),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "compressed": compressed,
        "dense": dense,
        "aliases": aliases,
        "tensors": checksums,
        "plan": plan.to_dict() if plan is not None else None,
        "permutations": _perms_to_json(permutations),
        "program": PROGRAM_FILE if has_program else None,
        "program_imports": program_imports,
        "inputs": INPUTS_FILE if has_inputs else None,
        "nbytes": nbytes,
        "dense_nbytes": dense_nbytes,
        "metadata": dict(metadata or {}),
    }
    save_file(tensors, os.fspath(out / WEIGHTS_FILE), metadata={"format": FORMAT,
                                                                "format_version": str(FORMAT_VERSION)})
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
    log.info("saved %s: %d N:M weights compressed, %d bytes (%d dense)", out, len(compressed), nbytes,
             dense_nbytes)
    return read_saved(out)


def read_saved(path: str | os.PathLike) -> SavedModel:
    """Reads and validates ``nmgraph.json`` of a saved directory (tensors are not read)."""
    meta = _read_meta(Path(path))
    return SavedModel(
        path=Path(path),
        pattern=Pattern.parse(meta["pattern"]),
        compressed=dict(meta.get("compressed", {})),
        dense=dict(meta.get("dense", {})),
        aliases=dict(meta.get("aliases", {})),
        plan=plan_from_dict(meta["plan"]) if meta.get("plan") else None,
        permutations=({int(k): v for k, v in meta["permutations"].items()}
                      if meta.get("permutations") else None),
        metadata=dict(meta.get("metadata", {})),
        has_program=bool(meta.get("program")),
        has_inputs=bool(meta.get("inputs")),
        nbytes=int(meta.get("nbytes", 0)),
        dense_nbytes=int(meta.get("dense_nbytes", 0)),
    )


def load(
    path: str | os.PathLike,
    model: torch.nn.Module | Callable[[], Any] | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Loads a saved directory into ``model`` (a module, or a factory returning one) and returns it.

    Without ``model`` the saved ``torch.export`` program supplies the architecture (an
    ``fx.GraphModule``). Every tensor is checked against its checksum, and against the model's
    names, shapes and dtypes; any mismatch raises :class:`SerializationError` naming the tensor.
    """
    root = Path(path)
    meta = _read_meta(root)
    state = _read_state(root, meta, map_location)
    from_program = False
    if model is None:
        if not meta.get("program"):
            raise SerializationError(
                f"{str(root)!r} has no {PROGRAM_FILE}: pass the model (or a factory) to load into, e.g. "
                "nmgraph.exporters.serialize.load(path, MyModel(...)), or save with example_inputs= to include "
                "the program."
            )
        target = _load_program(root / PROGRAM_FILE, meta.get("program_imports", ()))
        from_program = True
    elif isinstance(model, torch.nn.Module):
        target = model
    elif callable(model):
        made = model()
        target = made[0] if isinstance(made, (tuple, list)) else made
        if not isinstance(target, torch.nn.Module):
            raise SerializationError(
                f"The model factory returned {type(target).__name__}, not a torch.nn.Module."
            )
    else:
        raise SerializationError(
            f"load(model=...) takes a torch.nn.Module or a factory, got {type(model).__name__}."
        )
    own = set(target.state_dict())
    for alias, name in meta.get("aliases", {}).items():
        if alias not in own and name in own:
            state.pop(alias, None)  # a traced program keeps one name per tied tensor
    _check_against(target, state, root)
    with torch.no_grad():
        target.load_state_dict(state, strict=True, assign=from_program)
    return target


def read_example_inputs(path: str | os.PathLike) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The ``(args, kwargs)`` saved with the model, or ``None`` when none were saved."""
    root = Path(path)
    meta = _read_meta(root)
    if not meta.get("inputs"):
        return None
    from safetensors.torch import load_file

    file = root / INPUTS_FILE
    try:
        tensors = load_file(os.fspath(file))
        from safetensors import safe_open

        with safe_open(os.fspath(file), framework="pt") as f:
            layout = json.loads(f.metadata()["layout"])
    except Exception as e:
        raise SerializationError(f"{str(file)!r} is missing or corrupt: {e}") from e
    args = tuple(tensors[k] if isinstance(k, str) and k in tensors else k for k in layout["args"])
    kwargs = {n: tensors[k] if isinstance(k, str) and k in tensors else k
              for n, k in layout["kwargs"].items()}
    return args, kwargs


def plan_from_dict(d: Mapping[str, Any]) -> SparsityPlan:
    """Rebuilds a :class:`SparsityPlan` from :meth:`SparsityPlan.to_dict` output."""
    try:
        layers = tuple(LayerInfo(**{**x, "shape": tuple(x["shape"])}) for x in d["layers"])
        skipped = tuple(Skip(**x) for x in d["skipped"])
        groups = tuple(
            PermutationGroup(**{**g, "members": tuple(Member(**m) for m in g["members"]),
                                "consumers": tuple(g.get("consumers", ()))})
            for g in d["groups"]
        )
        barriers = tuple(Skip(**x) for x in d.get("barriers", ()))
        return SparsityPlan(Pattern.parse(d["pattern"]), layers, skipped, groups, barriers)
    except (KeyError, TypeError) as e:
        raise SerializationError(f"The saved plan is malformed ({type(e).__name__}: {e}).") from e


# --- internals ------------------------------------------------------------------------------------


def _state_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: first name}`` for state entries that share one tensor (tied weights)."""
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype, t.device)
        if t.numel() and key in first:
            out[name] = first[key]
        else:
            first.setdefault(key, name)
    return out


def _sha256(t: torch.Tensor) -> str:
    flat = t.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else flat
    return hashlib.sha256(raw.numpy().tobytes() if flat.numel() else b"").hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (Path, Pattern)):
        return str(obj)
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON serializable")


def _perms_to_json(perms: Any) -> dict[str, list[int]] | None:
    if perms is None:
        return None
    if not isinstance(perms, Mapping):
        perms = getattr(perms, "perms", None)
        if not isinstance(perms, Mapping):
            raise SerializationError(
                "save(permutations=...) takes {group_id: LongTensor} or an object with a 'perms' "
                "mapping."
            )
    return {str(int(k)): [int(i) for i in torch.as_tensor(v).tolist()] for k, v in perms.items()}


def _read_meta(root: Path) -> dict[str, Any]:
    file = root / META_FILE
    if not root.is_dir():
        raise SerializationError(f"{str(root)!r} is not a directory saved by nmgraph.exporters.serialize.save.")
    if not file.is_file():
        raise SerializationError(
            f"{str(root)!r} has no {META_FILE}: not a directory saved by nmgraph.exporters.serialize.save."
        )
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SerializationError(f"{str(file)!r} is corrupt (not valid JSON: {e}).") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SerializationError(f"{str(file)!r} is not nmgraph metadata (format field missing).")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SerializationError(
            f"{str(file)!r} has format version {version!r}; this nmgraph reads up to "
            f"{FORMAT_VERSION}. Upgrade nmgraph."
        )
    for key in ("pattern", "tensors", "compressed"):
        if key not in meta:
            raise SerializationError(f"{str(file)!r} is missing the {key!r} field.")
    return meta


def _read_state(root: Path, meta: Mapping[str, Any], map_location) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    file = root / WEIGHTS_FILE
    if not file.is_file():
        raise SerializationError(f"{str(root)!r} is missing {WEIGHTS_FILE}.")
    raw: dict[str, torch.Tensor] = {}
    try:
        with safe_open(os.fspath(file), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for key in meta["tensors"]:
                if key not in keys:
                    raise SerializationError(
                        f"Tensor {key!r} is listed in {META_FILE} but missing from {WEIGHTS_FILE}: the "
                        "file is incomplete or from another save."
                    )
                raw[key] = f.get_tensor(key)
            extra = sorted(keys - set(meta["tensors"]))
    except SerializationError:
        raise
    except Exception as e:
        raise SerializationError(
            f"{str(file)!r} is corrupt or not a safetensors file ({type(e).__name__}: {e})."
        ) from e
    if extra:
        raise SerializationError(
            f"{WEIGHTS_FILE} holds tensors {extra[:5]} that {META_FILE} does not list: the files are "
            "from different saves."
        )
    for key, t in raw.items():
        want = meta["tensors"][key]
        if str(t.dtype) != want["dtype"] or list(t.shape) != want["shape"]:
            raise SerializationError(
                f"Tensor {key!r} is {t.dtype} {list(t.shape)} in {WEIGHTS_FILE} but {want['dtype']} "
                f"{want['shape']} in {META_FILE}: the files are from different saves."
            )
        if _sha256(t) != want["sha256"]:
            raise SerializationError(
                f"Tensor {key!r} in {str(file)!r} fails its SHA-256 check: the file is corrupt. "
                "Re-save the model."
            )
    state: dict[str, torch.Tensor] = {}
    for name, info in meta["compressed"].items():
        prefix = f"{name}{_NM}"
        try:
            c = CompressedNM.from_state_dict(raw, prefix=prefix)
        except SerializationError as e:
            raise SerializationError(f"Compressed weight {name!r}: {e}") from None
        if list(c.shape) != list(info["shape"]) or int(c.axis) != int(info["axis"]):
            raise SerializationError(
                f"Compressed weight {name!r} decodes to shape {list(c.shape)} axis {c.axis}, but "
                f"{META_FILE} records {info['shape']} axis {info['axis']}."
            )
        dense = c.to_dense()
        # Default strides: size-1 dims of a movedim'ed view keep odd strides that make conv
        # kernels pick a channels-last algorithm (different rounding).
        state[name] = torch.empty(dense.shape, dtype=dense.dtype).copy_(dense)
    for key, t in raw.items():
        if _NM not in key:
            state[key] = t
    for alias, name in meta.get("aliases", {}).items():
        if name not in state:
            raise SerializationError(f"Tied weight {alias!r} refers to {name!r}, which is not saved.")
        state[alias] = state[name]
    if str(map_location) != "cpu":
        moved = {}
        for t in state.values():
            moved.setdefault(id(t), t.to(map_location))
        state = {k: moved[id(t)] for k, t in state.items()}
    return state


def _check_against(model: torch.nn.Module, state: Mapping[str, torch.Tensor], root: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the model has tensors the save lacks: {missing[:5]}")
        if unexpected:
            parts.append(f"the save has tensors the model lacks: {unexpected[:5]}")
        raise SerializationError(
            f"{str(root)!r} does not match {type(model).__name__}: " + "; ".join(parts)
            + ". Load into the architecture that was saved."
        )
    for name, t in state.items():
        mine = own[name]
        if tuple(mine.shape) != tuple(t.shape):
            raise SerializationError(
                f"Tensor {name!r} has shape {list(t.shape)} in {str(root)!r} but {list(mine.shape)} in "
                f"{type(model).__name__}: load into the architecture that was saved."
            )
        if mine.dtype != t.dtype:
            raise SerializationError(
                f"Tensor {name!r} is {t.dtype} in {str(root)!r} but {mine.dtype} in "
                f"{type(model).__name__}; convert the model to {t.dtype} before loading (nmgraph "
                "does not cast silently)."
            )


def _save_inputs(example_inputs: Any, file: Path) -> None:
    from safetensors.torch import save_file

    args, kwargs = split_inputs(example_inputs)
    tensors: dict[str, torch.Tensor] = {}

    def slot(key: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return key
        if value is None or isinstance(value, (bool, int, float)):
            return value
        raise SerializationError(
            f"Example input {key!r} is a {type(value).__name__}; only tensors, None, bool, int and "
            "float can be saved."
        )

    layout = {"args": [slot(f"args.{i}", a) for i, a in enumerate(args)],
              "kwargs": {k: slot(f"kwargs.{k}", v) for k, v in kwargs.items()}}
    save_file(tensors, os.fspath(file), metadata={"layout": json.dumps(layout)})


def _save_program(model: torch.nn.Module, example_inputs: Any, file: Path) -> list[str]:
    """Saves a torch.export program whose weights are 1-element placeholders (weights.safetensors
    holds the real ones). Returns the modules defining the program's input/output container types
    (e.g. ``transformers.modeling_outputs``): loading must import them first to rebuild the types."""
    args, kwargs = split_inputs(example_inputs)
    try:
        ep = _export_program(model, args, kwargs)
    except Exception as e:
        raise SerializationError(
            f"Could not save a torch.export program of {type(model).__name__} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); save with "
            "program=False and load into the model object instead."
        ) from e
    persistent = set(model.state_dict())
    sd = ep.state_dict
    for key in list(sd):
        if key not in persistent:
            continue  # non-persistent buffers are not in weights.safetensors: keep their values
        v = sd[key]
        placeholder = torch.zeros((), dtype=v.dtype).expand(v.shape)
        sd[key] = (torch.nn.Parameter(placeholder, requires_grad=v.requires_grad)
                   if isinstance(v, torch.nn.Parameter) else placeholder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PLACEHOLDER_WARNING)
        torch.export.save(ep, os.fspath(file))
    modules: set[str] = set()
    for spec in (ep.call_spec.in_spec, ep.call_spec.out_spec):
        _spec_modules(spec, modules)
    return sorted(modules)


def _export_program(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch axis when the model allows it, else with static shapes."""

    try:
        return torch.export.export(model, args, kwargs, strict=False,
                                   dynamic_shapes=batch_dynamic_shapes(model, args, kwargs))
    except Exception:
        log.debug("dynamic-batch export failed; saving a static program", exc_info=True)
        return torch.export.export(model, args, kwargs, strict=False)


def _spec_modules(spec: Any, out: set[str]) -> None:
    if spec is None:
        return
    t = getattr(spec, "type", None)
    mod = getattr(t, "__module__", None)
    if mod and mod not in ("builtins", "collections", "torch.utils._pytree"):
        out.add(mod)
    children = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
    for child in children:
        _spec_modules(child, out)


def _load_program(file: Path, imports: Sequence[str] = ()) -> torch.nn.Module:
    for mod in imports:  # registers the container types of the program's inputs and outputs
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise SerializationError(
                f"{str(file)!r} returns {mod} types, and importing {mod!r} failed ({e}); install the "
                "package the model came from."
            ) from e
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PLACEHOLDER_WARNING)
            return torch.export.load(os.fspath(file)).module()
    except Exception as e:
        raise SerializationError(
            f"{str(file)!r} is corrupt or was written by an incompatible torch ({type(e).__name__}: "
            f"{e}). Load into the model object instead: load(path, MyModel(...))."
        ) from e

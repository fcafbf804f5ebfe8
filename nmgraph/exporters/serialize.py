"""Save a converted N:M model to a directory and load it back bit for bit; refuse anything else.

Layout of a saved directory (format version :data:`FORMAT_VERSION`)::

    nmgraph.json           the manifest: format + version, pattern, which weights are compressed
                           (shape, axis, dtype), tied-weight aliases, a SHA-256 per stored tensor,
                           a SHA-256 and size per file below, the plan, the permutations, free-form
                           metadata, and a signature over all of it
    weights.safetensors    N:M weights as CompressedNM state tensors ("<name>::nm.values",
                           "::nm.indices" (the combination code of nmgraph.compress), "::nm.meta"),
                           every other parameter and buffer as is
    inputs.safetensors     the example inputs, when given
    program.pt2            optional: a torch.export program of the model *without* its weights
                           (they live in weights.safetensors), so a directory loads without the
                           model's Python class

What a load checks, before it reads a tensor or imports anything:

* the manifest's signature: a SHA-256 over the canonical JSON of every other field (``key=``
  makes it an HMAC-SHA256 with your key; a manifest signed with a key is refused without it, and
  an unsigned one is refused with one);
* every field's type and value (a :class:`SerializationError` names the field);
* each file's SHA-256 and size, for every file the manifest lists (a file nmgraph writes that the
  manifest does not list is refused too);
* each tensor's dtype, shape and SHA-256 (the tensor is named when its file fails), and the
  ``aliases`` against the stored tensors and the model's own tied weights;
* the modules the program's input/output types come from (``program_imports``): one that is not
  already imported is imported only if the caller lists it in ``allow_imports=``.

:func:`save` writes into a staging directory and swaps the files in at the end (manifest last,
old files moved aside first and put back on any failure, ``KeyboardInterrupt`` included), so an
interrupted save leaves the previous checkpoint loadable. Pruned entries come back as ``+0.0``: a
``-0.0`` left by ``w * mask`` loads as ``+0.0`` (equal under ``torch.equal`` and in every product).

Versions: 3 stores in-group indices as a combination code (2.67 bits per 2:4 group); 2 stored them as
bit planes (2 bits per kept value) and still loads (its indices are re-encoded on reading). Version 1
(unsigned manifests) is refused with how to re-save.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
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
from nmgraph.errors import PatternError, PlanError, SerializationError
from nmgraph.exporters.onnx_check import diagnose_nm
from nmgraph.exporters.onnx_export import sparse_weight_axes
from nmgraph.pattern import Pattern, PatternLike, is_nm
from nmgraph.rollback import Rollback

__all__ = [
    "FORMAT_VERSION",
    "SavedModel",
    "load",
    "manifest_digest",
    "plan_from_dict",
    "read_example_inputs",
    "read_saved",
    "save",
]

log = logging.getLogger(__name__)

FORMAT = "nmgraph"
FORMAT_VERSION = 3
#: the oldest version :func:`load` reads (2: indices as bit planes, re-encoded on reading)
MIN_FORMAT_VERSION = 2
META_FILE = "nmgraph.json"
WEIGHTS_FILE = "weights.safetensors"
INPUTS_FILE = "inputs.safetensors"
PROGRAM_FILE = "program.pt2"
#: every file save writes, the manifest last
FILES = (WEIGHTS_FILE, INPUTS_FILE, PROGRAM_FILE, META_FILE)
SIGNATURES = ("sha256", "hmac-sha256")
_STAGING = ".nmgraph-staging-"
_PREVIOUS = ".nmgraph-previous-"
_NM = "::nm."
# torch.export.save warns that a 1-element placeholder does not cover its "complete tensor".
_PLACEHOLDER_WARNING = "No complete tensor found"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_CHUNK = 1 << 22


@dataclass(frozen=True)
class SavedModel:
    """The metadata of a saved directory (see :func:`read_saved`); ``signature`` is ``"sha256"``
    or ``"hmac-sha256"`` (signed with a key)."""

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
    signature: str = "sha256"


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
    key: bytes | str | None = None,
) -> SavedModel:
    """Saves ``model`` (N:M weights compressed) to the directory ``path`` (created if needed).

    The weights to compress are the plan's layers, or without a plan the model's Linear / Conv /
    ``Conv1D`` weights (see :func:`nmgraph.exporters.onnx_export.sparse_weight_axes`) that are N:M. A plan layer
    that is not N:M raises :class:`PlanError` (run :func:`nmgraph.convert` first).
    ``permutations``: ``{group_id: LongTensor}`` (or an object with a ``perms`` mapping) recorded
    with the plan. ``program`` (default: when ``example_inputs`` are given) also saves a weightless
    ``torch.export`` program so :func:`load` works without the model's class. ``key``: sign the
    manifest with HMAC-SHA256 under this key (then :func:`load` needs the same key). Files of the
    directory that nmgraph does not write are left alone; nmgraph's own are replaced all together,
    or not at all.
    """
    from safetensors.torch import save_file

    p = Pattern.parse(pattern)
    if not isinstance(model, torch.nn.Module):
        raise SerializationError(f"save() needs a torch.nn.Module, got {type(model).__name__}.")
    secret = _key_bytes(key)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SerializationError(f"{str(out)!r} exists and is not a directory; pass a directory path.")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise SerializationError(f"save(metadata=...) takes a mapping, got {type(metadata).__name__}.")
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
            for k, t in c.state_dict(prefix=f"{name}{_NM}").items():
                tensors[k] = t.contiguous()
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
    with_program = bool(program or (program is None and example_inputs is not None))
    if with_program and example_inputs is None:
        raise SerializationError("save(program=True) needs example_inputs to export the program.")

    created = not out.exists()
    _make_dir(out)
    staging = out / f"{_STAGING}{uuid.uuid4().hex}"
    done = False
    try:
        _make_dir(staging)
        program_imports: list[str] = []
        if example_inputs is not None:
            _save_inputs(example_inputs, staging / INPUTS_FILE)
        if with_program:
            program_imports = _save_program(model, example_inputs, staging / PROGRAM_FILE)
        save_file(tensors, os.fspath(staging / WEIGHTS_FILE),
                  metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
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
            "program": PROGRAM_FILE if with_program else None,
            "program_imports": program_imports,
            "inputs": INPUTS_FILE if example_inputs is not None else None,
            "nbytes": nbytes,
            "dense_nbytes": dense_nbytes,
            "metadata": dict(metadata or {}),
            "files": {name: _file_record(staging / name) for name in (WEIGHTS_FILE, INPUTS_FILE, PROGRAM_FILE)
                      if (staging / name).is_file()},
        }
        try:
            meta = json.loads(json.dumps(meta, default=_json_default))  # what load will read back
        except TypeError as e:
            raise SerializationError(f"save(metadata=...) cannot be written as JSON: {e}.") from e
        meta["signature"] = {"algorithm": "hmac-sha256" if secret else "sha256",
                             "digest": manifest_digest(meta, secret)}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        _swap_in(staging, out)
        done = True
    except OSError as e:
        raise SerializationError(f"Cannot write {str(out)!r} ({type(e).__name__}: {e}); the previous "
                                 "contents are unchanged. Check the path and its permissions.") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not done:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: the directory this call created
    log.info("saved %s: %d N:M weights compressed, %d bytes (%d dense)", out, len(compressed), nbytes,
             dense_nbytes)
    return read_saved(out, key=key)


def read_saved(path: str | os.PathLike, *, key: bytes | str | None = None) -> SavedModel:
    """Reads ``nmgraph.json`` of a saved directory and checks its signature and every field
    (tensors and files are not read: :func:`load` checks those)."""
    meta = _read_meta(Path(path), _key_bytes(key))
    return SavedModel(
        path=Path(path),
        pattern=Pattern.parse(meta["pattern"]),
        compressed=dict(meta["compressed"]),
        dense=dict(meta["dense"]),
        aliases=dict(meta["aliases"]),
        plan=plan_from_dict(meta["plan"]) if meta["plan"] else None,
        permutations=({int(k): v for k, v in meta["permutations"].items()} if meta["permutations"] else None),
        metadata=dict(meta["metadata"]),
        has_program=bool(meta["program"]),
        has_inputs=bool(meta["inputs"]),
        nbytes=int(meta["nbytes"]),
        dense_nbytes=int(meta["dense_nbytes"]),
        signature=meta["signature"]["algorithm"],
    )


def load(
    path: str | os.PathLike,
    model: torch.nn.Module | Callable[[], Any] | None = None,
    *,
    map_location: str | torch.device = "cpu",
    key: bytes | str | None = None,
    allow_imports: Sequence[str] = (),
) -> torch.nn.Module:
    """Loads a saved directory into ``model`` (a module, or a factory returning one) and returns it.

    Without ``model`` the saved ``torch.export`` program supplies the architecture (an
    ``fx.GraphModule``); the modules its input/output types come from must be imported already, or
    listed in ``allow_imports`` (e.g. ``["transformers.modeling_outputs"]``). The manifest's
    signature (``key``: the key it was saved with), every field, every file and every tensor are
    checked before the model is touched; any mismatch raises :class:`SerializationError` naming
    what is wrong, and the model is left as it was (as it is after any failure while loading, an
    interrupt included).
    """
    root = Path(path)
    secret = _key_bytes(key)
    meta = _read_meta(root, secret)
    _check_files(root, meta)
    state = _read_state(root, meta, map_location)
    from_program = False
    if model is None:
        if not meta["program"]:
            raise SerializationError(
                f"{str(root)!r} has no {PROGRAM_FILE}: pass the model (or a factory) to load into, e.g. "
                "nmgraph.exporters.serialize.load(path, MyModel(...)), or save with example_inputs= to include "
                "the program."
            )
        target = _load_program(root / PROGRAM_FILE, meta["program_imports"], allow_imports)
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
    own = target.state_dict()
    for alias, name in meta["aliases"].items():
        if alias not in own and name in own:
            state.pop(alias, None)  # a traced program keeps one name per tied tensor
    _check_against(target, state, root)
    _check_aliases_against(target, own, meta["aliases"], root)
    with Rollback() as undo, torch.no_grad():
        if target is model:  # the caller's module: all of it is loaded, or none of it
            undo.keep_tensors(own.values())
        target.load_state_dict(state, strict=True, assign=from_program)
    return target


def read_example_inputs(path: str | os.PathLike, *,
                        key: bytes | str | None = None) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The ``(args, kwargs)`` saved with the model (checked against the manifest), or ``None``."""
    root = Path(path)
    meta = _read_meta(root, _key_bytes(key))
    if not meta["inputs"]:
        return None
    from safetensors.torch import load_file

    file = root / INPUTS_FILE
    _check_file(root, INPUTS_FILE, meta)
    try:
        tensors = load_file(os.fspath(file))
        from safetensors import safe_open

        with safe_open(os.fspath(file), framework="pt") as f:
            layout = json.loads(f.metadata()["layout"])
        args = tuple(tensors[k] if isinstance(k, str) and k in tensors else k for k in layout["args"])
        kwargs = {n: tensors[k] if isinstance(k, str) and k in tensors else k
                  for n, k in layout["kwargs"].items()}
    except Exception as e:
        raise SerializationError(f"{str(file)!r} is missing or corrupt: {type(e).__name__}: {e}") from e
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
    except (KeyError, TypeError, ValueError, AttributeError, PatternError) as e:
        raise SerializationError(f"The saved plan is malformed ({type(e).__name__}: {e}).") from e


def manifest_digest(meta: Mapping[str, Any], key: bytes | None = None) -> str:
    """SHA-256 (or, with ``key``, HMAC-SHA256) of the canonical JSON of ``meta`` without its signature."""
    body = {k: v for k, v in meta.items() if k != "signature"}
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hmac.new(key, raw, hashlib.sha256).hexdigest() if key else hashlib.sha256(raw).hexdigest()


# --- writing -------------------------------------------------------------------------------------


def _key_bytes(key: Any) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise SerializationError("key= must be a non-empty bytes or str (the secret the manifest is signed with).")
    return bytes(key)


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SerializationError(
            f"Cannot create the directory {str(path)!r} ({type(e).__name__}: {e.strerror or e}); pass a path "
            "under a directory you can write to."
        ) from e


def _swap_in(staging: Path, out: Path) -> None:
    """Replaces nmgraph's files in ``out`` by those in ``staging``, all or none: old files are moved
    aside (manifest first, so a reader never pairs an old manifest with new files), new ones moved
    in (manifest last); on any failure the old ones are put back."""
    previous = out / f"{_PREVIOUS}{uuid.uuid4().hex}"
    previous.mkdir()
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in (META_FILE, *FILES[:-1]):
            if (out / name).exists():
                os.replace(out / name, previous / name)
                moved_out.append(name)
        for name in FILES:
            if (staging / name).exists():
                os.replace(staging / name, out / name)
                moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            os.replace(out / name, staging / name)
        for name in reversed(moved_out):
            os.replace(previous / name, out / name)
        shutil.rmtree(previous, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _file_record(file: Path) -> dict[str, Any]:
    return {"sha256": _file_sha256(file), "size": file.stat().st_size}


def _file_sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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


# --- reading and checking ------------------------------------------------------------------------


def _read_meta(root: Path, key: bytes | None) -> dict[str, Any]:
    """The manifest, its signature verified and every field checked."""
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
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise SerializationError(
            f"{str(file)!r} has format version {version!r}; this nmgraph reads up to "
            f"{FORMAT_VERSION}. Upgrade nmgraph."
        )
    if version < MIN_FORMAT_VERSION:
        raise SerializationError(
            f"{str(file)!r} has format version {version}, written by an nmgraph that did not sign its "
            f"checkpoints; this nmgraph reads signed checkpoints (versions {MIN_FORMAT_VERSION} to "
            f"{FORMAT_VERSION}) only. Load it with the nmgraph that wrote it and save it again."
        )
    _check_signature(meta, key, file)
    _check_fields(meta, file)
    return meta


def _check_signature(meta: dict[str, Any], key: bytes | None, file: Path) -> None:
    sig = meta.get("signature")
    if not (isinstance(sig, dict) and set(sig) == {"algorithm", "digest"} and sig["algorithm"] in SIGNATURES
            and isinstance(sig["digest"], str) and _HEX64.fullmatch(sig["digest"])):
        raise SerializationError(
            f"{str(file)!r}: field 'signature' is missing or malformed (expected {{'algorithm': one of "
            f"{SIGNATURES}, 'digest': 64 hex digits}}); the manifest cannot be verified."
        )
    if sig["algorithm"] == "hmac-sha256" and key is None:
        raise SerializationError(
            f"{str(file)!r} is signed with a key (HMAC-SHA256): pass the key it was saved with, key=..."
        )
    if sig["algorithm"] == "sha256" and key is not None:
        raise SerializationError(
            f"{str(file)!r} is not signed with a key (its digest is a plain SHA-256 that anyone can "
            "recompute), but key= was given: refusing it as a possibly rewritten checkpoint."
        )
    if not hmac.compare_digest(manifest_digest(meta, key), sig["digest"]):
        raise SerializationError(
            f"{str(file)!r} fails its {sig['algorithm']} signature check: the manifest was edited after "
            "save (or the key is wrong). Re-save the model."
        )


def _field_error(file: Path, name: str, want: str, got: Any) -> SerializationError:
    shown = repr(got)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return SerializationError(f"{str(file)!r}: field {name!r} must be {want}, got {shown}.")


def _is_int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _check_fields(meta: dict[str, Any], file: Path) -> None:
    """Every field of the manifest has the type and values save writes."""
    def need(name: str, ok: Callable[[Any], bool], want: str) -> None:
        if name not in meta:
            raise SerializationError(f"{str(file)!r} is missing the {name!r} field.")
        if not ok(meta[name]):
            raise _field_error(file, name, want, meta[name])

    def str_map(x: Any) -> bool:
        return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in x.items())

    need("nmgraph_version", lambda x: isinstance(x, str), "a string")
    need("model_class", lambda x: isinstance(x, str), "a string")
    need("pattern", lambda x: isinstance(x, str), "an 'N:M' string")
    try:
        pattern = Pattern.parse(meta["pattern"])
    except PatternError as e:
        raise _field_error(file, "pattern", "an 'N:M' string", meta["pattern"]) from e
    need("tensors", lambda x: isinstance(x, dict), "an object {tensor name: {sha256, dtype, shape}}")
    for name, info in meta["tensors"].items():
        where = f"tensors[{name!r}]"
        if not (isinstance(info, dict) and set(info) == {"sha256", "dtype", "shape"}):
            raise _field_error(file, where, "an object with exactly 'sha256', 'dtype' and 'shape'", info)
        if not (isinstance(info["sha256"], str) and _HEX64.fullmatch(info["sha256"])):
            raise _field_error(file, f"{where}.sha256", "64 hex digits", info["sha256"])
        if info["dtype"] not in _DTYPES:
            raise _field_error(file, f"{where}.dtype", f"one of {sorted(_DTYPES)}", info["dtype"])
        if not (isinstance(info["shape"], list) and all(_is_int(s) for s in info["shape"])):
            raise _field_error(file, f"{where}.shape", "a list of sizes >= 0", info["shape"])
    need("compressed", lambda x: isinstance(x, dict), "an object {weight name: {shape, axis, dtype, n, m}}")
    for name, info in meta["compressed"].items():
        where = f"compressed[{name!r}]"
        if not (isinstance(info, dict) and set(info) == {"shape", "axis", "dtype", "n", "m"}):
            raise _field_error(file, where, "an object with exactly 'shape', 'axis', 'dtype', 'n' and 'm'", info)
        if not (isinstance(info["shape"], list) and len(info["shape"]) >= 2 and all(_is_int(s) for s in info["shape"])):
            raise _field_error(file, f"{where}.shape", "a list of at least 2 sizes", info["shape"])
        if not (_is_int(info["axis"], -len(info["shape"])) and info["axis"] < len(info["shape"])):
            raise _field_error(file, f"{where}.axis", "an axis of its shape", info["axis"])
        if info["dtype"] not in _DTYPES:
            raise _field_error(file, f"{where}.dtype", f"one of {sorted(_DTYPES)}", info["dtype"])
        if (info["n"], info["m"]) != (pattern.n, pattern.m):
            raise _field_error(file, f"{where}.n/m", f"the checkpoint's pattern {pattern}", (info["n"], info["m"]))
        if name in meta["tensors"]:
            raise SerializationError(f"{str(file)!r}: {name!r} is listed both as compressed and as a stored tensor.")
        parts = [k for k in meta["tensors"] if k.startswith(f"{name}{_NM}")]
        if not parts:
            raise SerializationError(f"{str(file)!r}: compressed weight {name!r} has no stored tensors.")
    need("dense", str_map, "an object {weight name: reason}")
    need("aliases", str_map, "an object {tied name: stored name}")
    stored = {k for k in meta["tensors"] if _NM not in k} | set(meta["compressed"])
    for alias, target in meta["aliases"].items():
        if alias in stored:
            raise SerializationError(
                f"{str(file)!r}: field 'aliases' names {alias!r} as tied to {target!r}, but {alias!r} is stored "
                "itself: an alias may only name a tensor that save did not store."
            )
        if target not in stored:
            raise SerializationError(
                f"{str(file)!r}: field 'aliases' ties {alias!r} to {target!r}, which is not a stored tensor."
            )
    need("plan", lambda x: x is None or isinstance(x, dict), "null or a plan object")
    need("permutations", lambda x: x is None or (isinstance(x, dict) and all(
        isinstance(k, str) and k.lstrip("-").isdigit() and isinstance(v, list) and all(_is_int(i) for i in v)
        for k, v in x.items())), "null or an object {group id: list of channel indices}")
    need("program", lambda x: x in (None, PROGRAM_FILE), f"null or {PROGRAM_FILE!r}")
    need("inputs", lambda x: x in (None, INPUTS_FILE), f"null or {INPUTS_FILE!r}")
    need("program_imports", lambda x: isinstance(x, list) and all(
        isinstance(m, str) and _MODULE_NAME.fullmatch(m) for m in x), "a list of module names")
    need("nbytes", _is_int, "an integer >= 0")
    need("dense_nbytes", _is_int, "an integer >= 0")
    need("metadata", lambda x: isinstance(x, dict), "an object")
    need("files", lambda x: isinstance(x, dict) and set(x) <= set(FILES[:-1]),
         f"an object whose keys are among {list(FILES[:-1])}")
    for name, rec in meta["files"].items():
        if not (isinstance(rec, dict) and set(rec) == {"sha256", "size"} and isinstance(rec["sha256"], str)
                and _HEX64.fullmatch(rec["sha256"]) and _is_int(rec["size"])):
            raise _field_error(file, f"files[{name!r}]", "an object {'sha256': 64 hex digits, 'size': bytes}", rec)
    listed = {WEIGHTS_FILE, *([PROGRAM_FILE] if meta["program"] else []), *([INPUTS_FILE] if meta["inputs"] else [])}
    if set(meta["files"]) != listed:
        raise _field_error(file, "files", f"the files {sorted(listed)}", sorted(meta["files"]))
    unknown = sorted(set(meta) - {"format", "format_version", "signature", "nmgraph_version", "model_class",
                                  "pattern", "tensors", "compressed", "dense", "aliases", "plan", "permutations",
                                  "program", "program_imports", "inputs", "nbytes", "dense_nbytes", "metadata",
                                  "files"})
    if unknown:
        raise SerializationError(f"{str(file)!r} has fields this nmgraph does not write: {unknown}.")
    if meta["plan"] is not None:
        plan_from_dict(meta["plan"])


def _check_file(root: Path, name: str, meta: Mapping[str, Any]) -> None:
    rec = meta["files"].get(name)
    file = root / name
    if rec is None:
        raise SerializationError(f"{str(file)!r} is not listed in {META_FILE}.")
    if not file.is_file():
        raise SerializationError(f"{str(root)!r} is missing {name}, which {META_FILE} lists.")
    size = file.stat().st_size
    if size != rec["size"] or _file_sha256(file) != rec["sha256"]:
        raise SerializationError(
            f"{str(file)!r} fails its SHA-256 check ({size} bytes, {rec['size']} saved): it was changed or "
            "replaced after save (e.g. copied from another save). Re-save the model."
        )


def _check_files(root: Path, meta: Mapping[str, Any]) -> None:
    """Every file the manifest lists is the one save wrote; no file of nmgraph's is unlisted."""
    for name in FILES[:-1]:
        if name not in meta["files"] and (root / name).exists():
            raise SerializationError(
                f"{str(root / name)!r} is not listed in {META_FILE}: it was added after save. Remove it or re-save."
            )
    for name in meta["files"]:
        if name != WEIGHTS_FILE:  # the weights are checked tensor by tensor (naming a corrupt one)
            _check_file(root, name, meta)


def _read_state(root: Path, meta: Mapping[str, Any], map_location) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    file = root / WEIGHTS_FILE
    if not file.is_file():
        raise SerializationError(f"{str(root)!r} is missing {WEIGHTS_FILE}.")
    rec = meta["files"][WEIGHTS_FILE]
    whole_file_ok = file.stat().st_size == rec["size"] and _file_sha256(file) == rec["sha256"]
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
        if not whole_file_ok and _sha256(t) != want["sha256"]:
            raise SerializationError(
                f"Tensor {key!r} in {str(file)!r} fails its SHA-256 check: the file is corrupt. "
                "Re-save the model."
            )
    if not whole_file_ok:
        raise SerializationError(
            f"{str(file)!r} fails its SHA-256 check, though every tensor matches its own: its header or "
            "metadata was changed after save. Re-save the model."
        )
    state: dict[str, torch.Tensor] = {}
    for name, info in meta["compressed"].items():
        prefix = f"{name}{_NM}"
        legacy = meta["format_version"] < 3
        indices = raw.get(f"{prefix}indices")
        if indices is not None and (indices.dim() == 3) != legacy:
            raise SerializationError(
                f"Compressed weight {name!r} stores its indices as "
                f"{'bit planes' if not legacy else 'a combination code'}, but {META_FILE} says format version "
                f"{meta['format_version']}: the files are from different saves."
            )
        try:
            c = CompressedNM.from_state_dict(raw, prefix=prefix)
            if not legacy:
                c.check()
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
    for alias, name in meta["aliases"].items():
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


def _check_aliases_against(model: torch.nn.Module, own: Mapping[str, torch.Tensor], aliases: Mapping[str, str],
                           root: Path) -> None:
    """Every tie the save records is a tie of the model: an alias never rewires one layer's weight
    into another's."""
    ties = _state_aliases(own)
    for alias, name in aliases.items():
        if alias in own and name in own and ties.get(alias, alias) != ties.get(name, name):
            raise SerializationError(
                f"{str(root)!r} ties {alias!r} to {name!r}, but in {type(model).__name__} they are different "
                "tensors: loading would copy one layer's weights into another. Load into the architecture "
                "that was saved (with the same tied weights)."
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


def _load_program(file: Path, imports: Sequence[str], allow_imports: Sequence[str]) -> torch.nn.Module:
    """The saved program, after the modules of its input/output types are imported: those already
    imported are used as they are; any other is imported only if the caller allows it."""
    if isinstance(allow_imports, str):
        allow_imports = (allow_imports,)
    refused = [m for m in imports if m not in sys.modules and m not in allow_imports]
    if refused:
        raise SerializationError(
            f"{str(file)!r} returns types defined in {refused}, which are not imported; nmgraph imports "
            "nothing a checkpoint names unless you allow it: import it yourself first, or pass "
            f"load(..., allow_imports={refused!r})."
        )
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

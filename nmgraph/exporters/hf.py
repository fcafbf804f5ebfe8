"""Hugging Face checkpoints in and out.

**In.** :func:`from_pretrained` reads an HF model directory as it is stored (``config.json`` with
``model.safetensors`` or a sharded ``model.safetensors.index.json``; bf16/fp16 weights stay bf16/fp16)
through transformers' own ``from_pretrained``, offline. A directory :func:`save_pretrained` wrote in
nmgraph's compressed form is read back bit for bit.

**Out.** :func:`save_pretrained` writes a directory that ``transformers.AutoModel*.from_pretrained``
loads as a normal model:

* ``config.json`` with an ``"nmgraph"`` section: the format (``"dense"`` or ``"compressed"``), the
  pattern, every N:M weight with its reduction axis, the weights left dense with the reason, and
  whether (and how many) channel permutations were applied (their indices in
  ``nmgraph_permutations.json``);
* the weights: by default dense-stored N:M weights, written by the model's own ``save_pretrained``
  (sharded like any checkpoint, in the model's dtype); with ``compressed=True`` nmgraph's compressed
  form instead (``nmgraph.json`` + ``weights.safetensors``: kept values and a combination code of
  each group's kept set, 13/24 = 0.542 of the dense bytes for a 2:4 weight in bf16/fp16), which :func:`from_pretrained` /
  ``nmgraph.load`` decompress, checking every tensor's checksum;
* ``README.md`` with a model-card section: what was pruned, by which method, what it kept, and the
  measured output change.

>>> import transformers, tempfile, nmgraph
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
...                                num_key_value_heads=1, intermediate_size=64)
>>> model = transformers.LlamaForCausalLM(cfg)
>>> w = model.model.layers[0].mlp.up_proj.weight
>>> with torch.no_grad(): _ = w.mul_(nmgraph.nm_mask(w, "2:4"))
>>> out = tempfile.mkdtemp()
>>> saved = save_pretrained(model, out, pattern="2:4")
>>> list(saved.weights)
['model.layers.0.mlp.up_proj.weight']
>>> back = transformers.LlamaForCausalLM.from_pretrained(out)
>>> nmgraph.is_nm(back.model.layers[0].mlp.up_proj.weight, "2:4")
True
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nmgraph._version import __version__
from nmgraph.analysis.plan import LayerInfo, Skip, SparsityPlan
from nmgraph.errors import PlanError, SerializationError
from nmgraph.exporters import serialize
from nmgraph.exporters.onnx_check import diagnose_nm
from nmgraph.exporters.onnx_export import sparse_weight_axes
from nmgraph.pattern import Pattern, PatternLike, is_nm

__all__ = [
    "CONFIG_KEY",
    "HFSaved",
    "copy_side_files",
    "from_pretrained",
    "is_hf_directory",
    "load",
    "model_card",
    "save_pretrained",
    "sparsity_section",
]

log = logging.getLogger(__name__)

#: The key of nmgraph's section in ``config.json``.
CONFIG_KEY = "nmgraph"
PERMUTATIONS_FILE = "nmgraph_permutations.json"
CARD_FILE = "README.md"
_CARD_BEGIN = "<!-- nmgraph:begin -->"
_CARD_END = "<!-- nmgraph:end -->"
# What save_pretrained writes as weights; everything else in a source directory (tokenizer, chat
# template, generation config) is a side file copy_side_files carries over.
_WEIGHT_FILE = re.compile(r"(^(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)"
                          r"(\.index\.json)?$)|(^weights\.safetensors$)|(^nmgraph\.json$)|(^program\.pt2$)")


@dataclass(frozen=True)
class HFSaved:
    """What :func:`save_pretrained` wrote: the directory, the format, the N:M weights (``{name: axis}``),
    those left dense (``{name: reason}``), and the bytes of the weights as stored and as dense."""

    path: Path
    format: str
    pattern: Pattern
    weights: dict[str, int]
    dense: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0
    dense_nbytes: int = 0

    @property
    def ratio(self) -> float:
        """Stored bytes over the same weights stored dense, in the model's dtype."""
        return self.nbytes / self.dense_nbytes if self.dense_nbytes else float("nan")


def is_hf_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with a transformers ``config.json``."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def _read_config_json(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SerializationError(f"{str(root / 'config.json')!r} cannot be read as JSON: {e}") from e


def _model_class(config: Any, model_class: Any = None) -> Any:
    import transformers

    if model_class is not None:
        return getattr(transformers, model_class) if isinstance(model_class, str) else model_class
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _dtype_kwarg(dtype: Any) -> dict[str, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": dtype}


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = "auto",
    model_class: Any = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Loads the HF model directory ``path`` with its weights' stored dtype (``dtype="auto"``).

    A directory in nmgraph's compressed form (``config.json`` says ``"nmgraph": {"format":
    "compressed"}``) is built from its config and filled with the decompressed weights, bit for bit;
    any other is read by transformers' ``from_pretrained`` (sharded safetensors included), offline.
    ``model_class``: a transformers class or its name (default: the config's ``architectures``).
    """
    root = Path(path)
    if not is_hf_directory(root):
        raise SerializationError(
            f"{str(root)!r} is not an HF model directory (no config.json). Pass the directory that "
            "save_pretrained wrote."
        )
    import transformers

    config = transformers.AutoConfig.from_pretrained(os.fspath(root), local_files_only=True)
    cls = _model_class(config, model_class)
    section = _read_config_json(root).get(CONFIG_KEY) or {}
    if section.get("format") == "compressed":
        meta = serialize.read_saved(root)
        stored = {c["dtype"] for c in meta.compressed.values()}
        torch_dtype = getattr(torch, stored.pop().removeprefix("torch.")) if len(stored) == 1 else None
        if dtype != "auto" and dtype is not None:
            torch_dtype = dtype
        model = cls._from_config(config, **_dtype_kwarg(torch_dtype)) if torch_dtype is not None else cls(config)
        serialize.load(root, model)
        model.eval()
        return model
    return cls.from_pretrained(os.fspath(root), local_files_only=True, **_dtype_kwarg(dtype), **kwargs)


def load(path: str | os.PathLike, model: Any = None, **kwargs: Any) -> torch.nn.Module:
    """:func:`nmgraph.exporters.serialize.load`, and without ``model`` an HF directory in nmgraph's
    compressed form is built from its ``config.json`` (see :func:`from_pretrained`)."""
    root = Path(path)
    if model is None and is_hf_directory(root) and (root / serialize.META_FILE).is_file():
        return from_pretrained(root)
    return serialize.load(path, model, **kwargs)


def sparsity_section(
    model: torch.nn.Module,
    pattern: PatternLike,
    *,
    plan: SparsityPlan | None = None,
    fmt: str = "dense",
    permutations: Mapping[int, Any] | None = None,
    method: str | None = None,
) -> dict[str, Any]:
    """The ``"nmgraph"`` section of ``config.json``; raises :class:`PlanError` naming a weight that
    the plan lists but is not N:M."""
    p = Pattern.parse(pattern)
    axes, skips = sparse_weight_axes(model, p, plan)
    params = dict(model.named_parameters(remove_duplicate=False))
    weights: dict[str, int] = {}
    dense = {s.name: s.reason for s in skips}
    for name, axis in axes.items():
        w = params.get(name)
        if w is None:
            continue
        if is_nm(w, p, axis=axis) and bool((w != 0).any()):
            weights[name] = axis
        elif plan is not None:
            raise PlanError(
                f"Cannot save {name}: the plan lists it as {p} but the weight is "
                f"{diagnose_nm(w.detach(), p, axis).reason}. Run nmgraph.sparsify or nmgraph.convert first."
            )
        else:
            dense[name] = f"not {p}: {diagnose_nm(w.detach(), p, axis).reason}"
    return {
        "format": fmt,
        "pattern": str(p),
        "method": method,
        "weights": weights,
        "dense": dense,
        "permutation": {"applied": bool(permutations), "groups": len(permutations or {}),
                        "file": PERMUTATIONS_FILE if permutations else None},
        "nmgraph_version": __version__,
    }


def save_pretrained(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    pattern: PatternLike = "2:4",
    plan: SparsityPlan | None = None,
    compressed: bool = False,
    permutations: Mapping[int, Any] | None = None,
    method: str | None = None,
    report: Any = None,
    output_change: Mapping[str, Any] | None = None,
    max_shard_size: str | int | None = None,
) -> HFSaved:
    """Writes ``model`` (a transformers model whose eligible weights are N:M) to the HF directory ``path``.

    ``plan``: the weights that must be N:M (default: every GEMM weight that is). ``compressed``:
    nmgraph's compressed form instead of dense-stored weights (see the module docstring).
    ``permutations``: ``{group id: permutation}`` applied before pruning (recorded);
    ``method``/``report`` (a :class:`nmgraph.SparsifyReport` or anything with ``summary()``) and
    ``output_change`` (measured figures, e.g. ``{"relative_error": 0.03}``) go to the model card.
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise SerializationError(
            f"save_pretrained() writes transformers models; {type(model).__name__} has no save_pretrained/config. "
            "Use nmgraph.save(model, path) for other modules."
        )
    p = Pattern.parse(pattern)
    summary = dict(report.summary()) if report is not None and hasattr(report, "summary") else {}
    method = method or summary.get("method")
    if plan is None and report is not None and getattr(report, "layers", None):
        plan = _plan_of_report(report, p)
    section = sparsity_section(model, p, plan=plan, fmt="compressed" if compressed else "dense",
                               permutations=permutations, method=method)
    if not permutations and summary.get("groups_permuted"):
        section["permutation"] = {"applied": True, "groups": int(summary["groups_permuted"]), "file": None}
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SerializationError(f"{str(out)!r} exists and is not a directory; pass a directory path.")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # weights of an earlier save would be read next to the new ones
        if _WEIGHT_FILE.match(stale.name) and stale.is_file():
            stale.unlink()
    weights = section["weights"]
    state = {k: v for k, v in model.state_dict().items()}
    dense_nbytes = sum(v.numel() * v.element_size() for v in {id(t): t for t in state.values()}.values())
    if compressed:
        model.config.save_pretrained(os.fspath(out))
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(os.fspath(out))
        saved = serialize.save(model, out, pattern=p, plan=plan, permutations=permutations, program=False,
                               metadata={"hf": True, "model_class": type(model).__name__})
        missing = sorted(set(weights) - set(saved.compressed))
        if missing:
            raise SerializationError(f"save_pretrained(compressed=True) stored {missing[:3]} dense; they are N:M.")
        nbytes = saved.nbytes
    else:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(os.fspath(out), **kwargs)
        nbytes = dense_nbytes
    config = _read_config_json(out)
    config[CONFIG_KEY] = section
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if permutations:
        (out / PERMUTATIONS_FILE).write_text(json.dumps(
            {str(int(k)): [int(i) for i in torch.as_tensor(v).tolist()] for k, v in permutations.items()}))
    elif (out / PERMUTATIONS_FILE).exists():
        (out / PERMUTATIONS_FILE).unlink()
    result = HFSaved(out, section["format"], p, dict(weights), dict(section["dense"]), nbytes, dense_nbytes)
    _write_card(out, model_card(model, result, method=method, summary=summary, output_change=output_change,
                                permutation=section["permutation"]))
    log.info("saved %s (%s): %d N:M weights, %d bytes (%.3f of dense)", out, result.format, len(weights), nbytes,
             result.ratio)
    return result


def _plan_of_report(report: Any, pattern: Pattern) -> SparsityPlan:
    """The weights a :class:`nmgraph.SparsifyReport` pruned (``layers``) and left dense (``skipped``), as a plan."""
    layers = tuple(LayerInfo(x.name, tuple(x.shape), x.axis, getattr(x, "op", "") or "", "", getattr(x, "module", "") or "")
                   for x in report.layers)
    skipped = tuple(s if isinstance(s, Skip) else Skip(*s) for s in getattr(report, "skipped", ()))
    return SparsityPlan(pattern, layers, skipped, (), ())


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies what an HF directory holds besides weights and config (tokenizer files, chat template,
    README) from ``src`` to ``dst`` where ``dst`` has no such file; returns the names copied."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if not f.is_file() or _WEIGHT_FILE.match(f.name) or f.name in ("config.json", PERMUTATIONS_FILE):
            continue
        target = Path(dst) / f.name
        if not target.exists():
            shutil.copy2(f, target)
            copied.append(f.name)
    return copied


# --- model card ------------------------------------------------------------------------------------


def _family(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj.weight``."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", name)


def model_card(
    model: torch.nn.Module,
    saved: HFSaved,
    *,
    method: str | None = None,
    summary: Mapping[str, Any] | None = None,
    output_change: Mapping[str, Any] | None = None,
    permutation: Mapping[str, Any] | None = None,
) -> str:
    """The model-card section (Markdown) for a directory :func:`save_pretrained` wrote; ``permutation``
    is the config section's ``{"applied", "groups", "file"}``."""
    summary = dict(summary or {})
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    named = dict(model.named_parameters(remove_duplicate=False))
    nm = sum(named[n].numel() for n in saved.weights if n in named)
    dtype = next(iter(params.values())).dtype if params else torch.float32
    lines = [
        _CARD_BEGIN,
        "## N:M sparsity (nmgraph)",
        "",
        f"{len(saved.weights)} weights are **{saved.pattern}** sparse along their reduction axis "
        f"({nm:,} of {total:,} parameters, {nm / max(total, 1):.1%}); "
        f"{'pruned by ' + method if method else 'sparsified'} with nmgraph {__version__}.",
        "",
        f"- stored: {'nmgraph compressed (kept values + in-group indices)' if saved.format == 'compressed' else 'dense (zeros kept), loadable by any from_pretrained'}; "
        f"weights {saved.nbytes:,} bytes in {str(dtype).removeprefix('torch.')} "
        f"({saved.ratio:.3f} of the dense {saved.dense_nbytes:,})",
        "- channel permutation before pruning: " + _permutation_text(permutation),
    ]
    change = dict(output_change or {})
    if summary.get("output_rel_error") is not None:
        change.setdefault("relative_error", summary["output_rel_error"])
        change.setdefault("samples", summary.get("eval_samples"))
    if summary.get("loss_dense") is not None and summary.get("loss_sparse") is not None:
        change.setdefault("loss", f"{summary['loss_dense']:.4f} -> {summary['loss_sparse']:.4f}")
    if change:
        figures = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                            for k, v in change.items() if v is not None)
        lines.append(f"- measured output change against the dense model: {figures}")
    else:
        lines.append("- output change: not measured")
    families: dict[str, int] = {}
    for n in saved.weights:
        families[_family(n)] = families.get(_family(n), 0) + 1
    lines += ["", "| N:M weights | count |", "| --- | --- |"]
    lines += [f"| `{f}` | {c} |" for f, c in families.items()]
    if saved.dense:
        lines += ["", "Left dense:", ""]
        dense_fam: dict[tuple[str, str], int] = {}
        for n, r in saved.dense.items():
            key = (_family(n), r)
            dense_fam[key] = dense_fam.get(key, 0) + 1
        lines += [f"- `{f}`{f' (x{c})' if c > 1 else ''}: {r}" for (f, r), c in dense_fam.items()]
    lines += ["", _CARD_END, ""]
    return "\n".join(lines)


def _permutation_text(permutation: Mapping[str, Any] | None) -> str:
    if not permutation or not permutation.get("applied"):
        return "none"
    where = f" (indices in `{permutation['file']}`)" if permutation.get("file") else ""
    return f"{permutation.get('groups', 0)} channel groups reordered{where}; the model computes the same function"


def _write_card(out: Path, section: str) -> None:
    file = out / CARD_FILE
    text = file.read_text() if file.is_file() else ""
    if _CARD_BEGIN in text and _CARD_END in text:
        head, _, rest = text.partition(_CARD_BEGIN)
        _, _, tail = rest.partition(_CARD_END)
        text = head + section.rstrip("\n") + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    file.write_text(text)


def _names(items: Sequence[str]) -> str:
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

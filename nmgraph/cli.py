"""The ``nmgraph`` command line: ``inspect``, ``sparsify``, ``export``, ``bench``.

Models come from (the positional ``MODEL`` argument, or ``--hf-config``):

* a Python factory ``pkg.module:function`` or ``path/to/file.py:function`` returning a model or
  ``(model, example_inputs)`` (the current directory is importable);
* a Hugging Face model directory (``config.json`` with ``model.safetensors`` or sharded
  safetensors and their index; weights keep their stored dtype), as ``save_pretrained`` writes it;
  ``nmgraph sparsify HF_DIR --out OUT`` writes one that ``from_pretrained`` loads;
* a directory written by ``nmgraph sparsify`` / :func:`nmgraph.exporters.serialize.save`;
* ``--hf-config NAME`` (a small preset: bert, gpt2, llama, vit, resnet) or ``--hf-config
  config.json``: a transformers model with random weights, built offline.

Exit codes: 0 success, 1 error (one line on stderr; ``--verbose`` adds the traceback), 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nmgraph import report
from nmgraph.analysis import analyze
from nmgraph.capture import capture, set_eval, split_inputs
from nmgraph.compress import model_summary
from nmgraph.exporters import hf, serialize
from nmgraph.exporters.onnx_export import FORMATS, export
from nmgraph.oneshot import sparsify
from nmgraph.passes.permute_channels import permute
from nmgraph.pattern import is_nm
from nmgraph.report import layer_stats, print_report
from nmgraph.search import SEARCHES
from nmgraph.training import convert

__all__ = ["HF_PRESETS", "LoadedModel", "build_parser", "load_model", "main"]

log = logging.getLogger("nmgraph.cli")

BENCHMARKS = ("gemm", "e2e")

# Small transformers configs (random weights): name -> (config class, model class, config kwargs, input).
HF_PRESETS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "bert": ("BertConfig", "BertForSequenceClassification",
             {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 128, "max_position_embeddings": 64, "num_labels": 2}, "text"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"vocab_size": 1000, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64,
              "use_cache": False, "bos_token_id": 0, "eos_token_id": 0}, "text"),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64,
               "use_cache": False, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}, "text"),
    "vit": ("ViTConfig", "ViTForImageClassification",
            {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
             "image_size": 32, "patch_size": 8, "num_labels": 2}, "image"),
    "resnet": ("ResNetConfig", "ResNetForImageClassification",
               {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "layer_type": "bottleneck",
                "num_labels": 2}, "image"),
}


class CLIError(Exception):
    """A user error the CLI reports in one line with exit code 1."""


@dataclass
class LoadedModel:
    """A model ready for the commands: the module, its example inputs and where it came from."""

    model: Any
    args: tuple
    kwargs: dict
    source: dict[str, Any]
    saved: Any = None  # SavedModel when loaded from an nmgraph directory


# --- model loading --------------------------------------------------------------------------------


def load_model(spec: str | None, hf_config: str | None = None, *, batch: int = 2, seq: int = 16,
               seed: int = 0) -> LoadedModel:
    """Builds the model a command works on (see the module docstring for the sources)."""
    import torch

    if (spec is None) == (hf_config is None):
        raise CLIError("give exactly one model source: MODEL (factory or saved directory) or --hf-config")
    torch.manual_seed(seed)
    if hf_config is not None:
        return _hf_model(hf_config, batch=batch, seq=seq)
    path = Path(spec)
    if hf.is_hf_directory(path):
        return _pretrained_model(path, batch=batch, seq=seq)
    if path.is_dir():
        return _saved_model(path, batch=batch, seq=seq)
    if ":" not in spec:
        if path.suffix or os.sep in spec:
            raise CLIError(f"model {spec!r} does not exist (expected a saved nmgraph directory)")
        raise CLIError(f"model {spec!r} is neither a directory nor a factory 'pkg.module:function'")
    return _factory_model(spec)


def _factory_model(spec: str) -> LoadedModel:
    import torch

    target, _, func = spec.rpartition(":")
    if not target or not func:
        raise CLIError(f"factory {spec!r} must look like 'pkg.module:function' or 'file.py:function'")
    if target.endswith(".py"):
        file = Path(target)
        if not file.is_file():
            raise CLIError(f"factory file {target!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise CLIError(f"importing {target!r} failed: {type(e).__name__}: {e}") from e
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise CLIError(f"cannot import module {target!r} of factory {spec!r}: {e}") from e
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        raise CLIError(f"module {target!r} has no callable {func!r} (factory {spec!r})")
    made = fn()
    if isinstance(made, torch.nn.Module):
        raise CLIError(
            f"factory {spec!r} returned only a model; return (model, example_inputs) so nmgraph can "
            "capture it"
        )
    if not (isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise CLIError(f"factory {spec!r} must return (model, example_inputs), got {type(made).__name__}")
    model, inputs = made
    args, kwargs = split_inputs(inputs)
    return LoadedModel(model.eval(), args, kwargs, {"kind": "factory", "spec": spec})


def _hf_model(name: str, *, batch: int, seq: int) -> LoadedModel:
    try:
        import transformers
    except ImportError as e:
        raise CLIError("--hf-config needs transformers: pip install 'nmgraph[hf]'") from e
    path = Path(name)
    if name in HF_PRESETS:
        cfg_cls, model_cls, kw, _ = HF_PRESETS[name]
        config = getattr(transformers, cfg_cls)(**kw)
    elif path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise CLIError(f"config file {name!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CLIError(f"config file {name!r} is not valid JSON: {e}") from e
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise CLIError(f"config file {name!r} has no 'model_type' field")
        try:
            config = transformers.AutoConfig.for_model(model_type, **data)
        except ValueError as e:
            raise CLIError(f"config file {name!r}: {e}") from e
        archs = data.get("architectures") or []
        model_cls = archs[0] if archs and hasattr(transformers, archs[0]) else "AutoModel"
    else:
        raise CLIError(
            f"--hf-config {name!r} is neither a preset ({', '.join(HF_PRESETS)}) nor a config.json path"
        )
    return _build_hf(config, model_cls, batch=batch, seq=seq)


def _build_hf(config: Any, model_cls: str, *, batch: int, seq: int) -> LoadedModel:
    import transformers

    if hasattr(config, "use_cache"):
        config.use_cache = False
    cls = getattr(transformers, model_cls)
    model = cls.from_config(config) if model_cls.startswith("Auto") else cls(config)
    model.eval()
    source = {"kind": "hf-config", "class": model_cls, "config": config.to_dict()}
    return LoadedModel(model, _hf_inputs(config, batch=batch, seq=seq), {}, source)


def _hf_inputs(config: Any, *, batch: int, seq: int) -> tuple:
    """Example inputs for a transformers model: random token ids, or images for a vision config."""
    import torch

    g = torch.Generator().manual_seed(0)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if hasattr(config, "num_channels") and not hasattr(config, "vocab_size"):  # a vision model
        size = getattr(config, "image_size", 32) or 32
        size = size[0] if isinstance(size, (list, tuple)) else size
        return (torch.randn(batch, config.num_channels, size, size, generator=g),)
    vocab = getattr(config, "vocab_size", 100)
    return (torch.randint(0, vocab, (batch, seq), generator=g),)


def _pretrained_model(path: Path, *, batch: int, seq: int) -> LoadedModel:
    """An HF model directory, weights in their stored dtype (sharded checkpoints included)."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise CLIError(f"{str(path)!r} is a Hugging Face directory: pip install 'nmgraph[hf]' to read it") from e
    model = hf.from_pretrained(path)
    model.eval()
    source = {"kind": "hf-dir", "path": os.fspath(path), "class": type(model).__name__}
    return LoadedModel(model, _hf_inputs(model.config, batch=batch, seq=seq), {}, source)


def _saved_model(path: Path, *, batch: int, seq: int) -> LoadedModel:
    """A saved directory: rebuilt from its recorded source (a real module: fp16 and new shapes
    work), else from its torch.export program."""

    saved = serialize.read_saved(path)
    source = saved.metadata.get("source") or {}
    inputs = serialize.read_example_inputs(path)
    model = None
    if source.get("kind") in ("factory", "hf-config"):
        try:
            built = (_factory_model(source["spec"]) if source["kind"] == "factory"
                     else _rebuild_hf(source, batch=batch, seq=seq))
        except CLIError as e:
            if not saved.has_program:
                raise
            log.info("cannot rebuild %s from its source (%s); using its saved program", path, e)
        else:
            model = serialize.load(path, built.model)
            inputs = inputs or (built.args, built.kwargs)
    if model is None:
        if not saved.has_program:
            raise CLIError(
                f"{str(path)!r} has no saved program and no recorded model source; load it in Python "
                "with nmgraph.exporters.serialize.load(path, model)"
            )
        model = serialize.load(path)
    if inputs is None:
        raise CLIError(f"{str(path)!r} has no saved example inputs; re-save with example_inputs=")
    args, kwargs = inputs

    set_eval(model)
    return LoadedModel(model, args, kwargs, source, saved)


def _rebuild_hf(source: dict[str, Any], *, batch: int, seq: int) -> LoadedModel:
    import transformers

    data = dict(source["config"])
    config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    return _build_hf(config, source["class"], batch=batch, seq=seq)


# --- helpers ---------------------------------------------------------------------------------------


class _Steps:
    """A tqdm bar over the named steps of a command (stderr; off when not a terminal or --quiet)."""

    def __init__(self, names: Sequence[str], desc: str, quiet: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), desc=desc, unit="step", disable=True if quiet else None,
                        file=sys.stderr, leave=False)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        yield
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _print(obj: Any) -> None:

    print_report(obj)


def _analyze(loaded: LoadedModel, pattern: str) -> tuple[Any, Any]:

    gm = capture(loaded.model, loaded.args, loaded.kwargs)
    return gm, analyze(gm, pattern)


# --- commands ------------------------------------------------------------------------------------


def cmd_inspect(a: argparse.Namespace) -> int:

    loaded = load_model(a.model, a.hf_config, batch=a.batch, seq=a.seq, seed=a.seed)
    steps = _Steps(["capture + analyze", "permute", "plot"] if a.plot else ["capture + analyze"],
                   "inspect", a.quiet)
    with steps.step("capture + analyze"):
        _, plan = _analyze(loaded, a.pattern)
    stats = None
    if a.plot:
        with steps.step("permute"):
            stats = _permuted_stats(loaded, plan, a)
        with steps.step("plot"):
            report.plot_layers(stats, a.plot, pattern=plan.pattern,
                               title=f"{type(loaded.model).__name__}: {plan.pattern} kept magnitude "
                                     f"(search={a.search})")
    steps.close()
    summary = model_summary(loaded.model, plan.pattern, {i.name: i.axis for i in plan.layers}, planned=True)
    if a.json:
        out = {"model": summary.to_dict(), "plan": plan.to_dict()}
        if stats is not None:
            out["layers"] = report.to_dict(stats)
        _emit_json(out)
        return 0
    print(summary.line())
    _print(plan)
    if stats is not None:
        _print(stats)
        print(f"plot written to {a.plot}")
    return 0


def _permuted_stats(loaded: LoadedModel, plan: Any, a: argparse.Namespace) -> list[Any]:
    """Kept magnitude identity vs permuted, measured on a copy (the loaded model is unchanged)."""

    if a.search == "none":
        return layer_stats(loaded.model, plan)
    twin = copy.deepcopy(loaded.model)
    twin_gm = capture(twin, loaded.args, loaded.kwargs)
    twin_plan = analyze(twin_gm, plan.pattern)
    permute(twin_gm, twin_plan, search=a.search, seed=a.seed, time_limit=a.time_limit,
            example_inputs=loaded.args, example_kwargs=loaded.kwargs, progress=not a.quiet)
    return layer_stats(loaded.model, plan, permuted=twin)


def cmd_sparsify(a: argparse.Namespace) -> int:
    import torch

    if a.model is not None and hf.is_hf_directory(a.model):
        return _sparsify_pretrained(a)
    if a.compressed or a.method != "magnitude" or a.calibration:
        raise CLIError("--compressed, --method and --calibration apply to a Hugging Face model directory "
                       "(MODEL with a config.json)")
    loaded = load_model(a.model, a.hf_config, batch=a.batch, seq=a.seq, seed=a.seed)
    steps = _Steps(["load checkpoint", "capture", "analyze", "permute", "convert", "save"], "sparsify",
                   a.quiet)
    with steps.step("load checkpoint"):
        if a.checkpoint:
            _load_checkpoint(loaded.model, a.checkpoint)
    with steps.step("capture"):
        gm = capture(loaded.model, loaded.args, loaded.kwargs)
    with steps.step("analyze"):
        plan = analyze(gm, a.pattern)
    search = a.search or "greedy"
    if a.search is None and a.checkpoint:
        params = dict(loaded.model.named_parameters())
        trained = [i for i in plan.layers if i.name in params and is_nm(params[i.name], plan.pattern, axis=i.axis)]
        if trained and len(trained) == len(plan.layers):  # trained N:M: a permutation would undo nothing useful
            search = "none"
            print(f"nmgraph: note: --checkpoint {a.checkpoint} holds {plan.pattern} weights already: no "
                  "permutation search (pass --search to force one)", file=sys.stderr)
    perm_report = None
    with steps.step("permute"):
        if search != "none" and plan.groups:
            perm_report = permute(gm, plan, search=search, seed=a.seed, time_limit=a.time_limit,
                                  example_inputs=loaded.args, example_kwargs=loaded.kwargs, progress=not a.quiet)
    with steps.step("convert"), torch.no_grad():
        inference = convert(gm, plan.pattern, plan=plan)
    summary = report.convert_summary(inference, plan=plan)
    with steps.step("save"):
        saved = serialize.save(
            loaded.model, a.out, pattern=plan.pattern, plan=plan,
            permutations=perm_report.perms if perm_report is not None else None,
            example_inputs=(loaded.args, loaded.kwargs), program=not a.no_program,
            metadata={"source": loaded.source, "search": search,
                      "checkpoint": os.fspath(a.checkpoint) if a.checkpoint else None},
        )
    steps.close()
    if a.json:
        _emit_json({"plan": plan.to_dict(),
                    "permute": perm_report.to_dict() if perm_report is not None else None,
                    "convert": summary.to_dict(), "saved": report.to_dict(saved)})
        return 0
    if perm_report is not None:
        _print(perm_report)
    _print(summary)
    _print(saved)
    return 0


def _sparsify_pretrained(a: argparse.Namespace) -> int:
    """``nmgraph sparsify HF_DIR --out OUT``: nmgraph.sparsify on the model as stored, then an HF
    directory that from_pretrained loads (dense-stored N:M weights, or --compressed)."""
    src = Path(a.model)
    if a.checkpoint:
        raise CLIError("--checkpoint does not apply to a Hugging Face directory: its weights are the checkpoint")
    out = Path(a.out)
    if out.resolve() == src.resolve():
        raise CLIError(f"--out {a.out!r} is the input directory; write the sparse model to another one")
    steps = _Steps(["load", "sparsify", "save"], "sparsify", a.quiet)
    with steps.step("load"):
        loaded = _pretrained_model(src, batch=a.batch, seq=a.seq)
        calibration = _calibration(src, a) if a.calibration else None
    search = a.search or "greedy"
    with steps.step("sparsify"):
        result = sparsify(loaded.model, a.pattern, method=a.method, example_inputs=loaded.args,
                          calibration=calibration, permute=search != "none", time_limit=a.time_limit,
                          progress=not a.quiet, search=search, seed=a.seed)
    with steps.step("save"):
        saved = hf.save_pretrained(loaded.model, out, pattern=a.pattern, compressed=a.compressed, report=result)
        hf.copy_side_files(src, out)
    steps.close()
    if a.json:
        _emit_json({"sparsify": result.to_dict() if hasattr(result, "to_dict") else report.to_dict(result),
                    "saved": report.to_dict(saved)})
        return 0
    print(result)
    print(f"wrote {out} ({saved.format}): {len(saved.weights)} N:M weights, {len(saved.dense)} dense; weights "
          f"{saved.nbytes:,} bytes ({saved.ratio:.3f} of dense); load it with "
          + ("nmgraph.from_pretrained(path)" if saved.format == "compressed" else
             f"transformers.{type(loaded.model).__name__}.from_pretrained(path)"))
    return 0


def _calibration(src: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    """Calibration inputs from a text file, one sample per non-empty line, tokenized with the model
    directory's own tokenizer."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.fspath(src), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CLIError(f"--calibration needs the tokenizer of {str(src)!r}, which cannot be loaded: {e}") from e
    file = Path(a.calibration)
    if not file.is_file():
        raise CLIError(f"calibration file {a.calibration!r} does not exist")
    lines = [x for x in file.read_text().splitlines() if x.strip()]
    if not lines:
        raise CLIError(f"calibration file {a.calibration!r} has no text")
    return [dict(tok(x, return_tensors="pt", truncation=True, max_length=a.seq)) for x in lines]


def _load_checkpoint(model: Any, path: str) -> None:
    import torch


    file = Path(path)
    if file.is_dir():
        serialize.load(file, model)
        return
    if not file.is_file():
        raise CLIError(f"checkpoint {path!r} does not exist")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(os.fspath(file))
        else:
            state = torch.load(os.fspath(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIError(f"checkpoint {path!r} cannot be read: {type(e).__name__}: {e}") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CLIError(f"checkpoint {path!r} does not hold a state dict")
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise CLIError(f"checkpoint {path!r} lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    extra = sorted(k for k in state if k not in own)
    if extra:
        log.warning("checkpoint %s: ignoring %d tensors the model does not have (e.g. mask state %s)",
                    path, len(extra), extra[:3])
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in own}, strict=True)


def cmd_export(a: argparse.Namespace) -> int:

    loaded = load_model(a.model, a.hf_config, batch=a.batch, seq=a.seq, seed=a.seed)
    plan = loaded.saved.plan if loaded.saved is not None else None
    pattern = a.pattern or (str(loaded.saved.pattern) if loaded.saved is not None else "2:4")
    steps = _Steps(["export + verify + check"], "export", a.quiet)
    with steps.step("export + verify + check"):
        result = export(
            loaded.model, a.out, loaded.args, pattern, format=a.format, kwargs=loaded.kwargs, plan=plan,
            opset=a.opset, fp16=a.fp16, dynamic_batch=a.dynamic_batch, exporter=a.exporter,
            convert=False if a.no_convert else "auto", strict=a.strict,
        )
    steps.close()
    if a.json:
        _emit_json(result.to_dict())
    else:
        _print(result)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    root = Path(a.dir) if a.dir else _benchmarks_dir()
    which = a.which or list(BENCHMARKS)
    scripts = [(name, root / f"{name}.py") for name in which]
    missing = [str(s) for _, s in scripts if not s.is_file()]
    present = [(n, s) for n, s in scripts if s.is_file()]
    if not present:
        raise CLIError(f"no benchmark script found: {', '.join(missing)} (pass --dir to the benchmarks folder)")
    for m in missing:
        print(f"skipping {m}: not found", file=sys.stderr)
    worst = 0
    for name, script in present:
        cmd = [sys.executable, os.fspath(script), *([] if a.full else ["--quick"]), *a.extra]
        print(f"$ {' '.join(cmd)}", flush=True)
        rc = subprocess.call(cmd)
        if rc:
            print(f"nmgraph: error: benchmark {name} exited with code {rc}", file=sys.stderr)
            worst = 1
    return worst


def _benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parents[1] / "benchmarks"
    return here if here.is_dir() else Path.cwd() / "benchmarks"


# --- parser ---------------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="a Hugging Face model directory (config.json + safetensors), a factory "
                        "'pkg.module:function' / 'file.py:function' returning (model, example_inputs), or a "
                        "directory saved by 'nmgraph sparsify'")
    p.add_argument("--hf-config", metavar="NAME|config.json",
                   help=f"transformers model with random weights: a preset ({', '.join(HF_PRESETS)}) or "
                        "a config.json path (offline)")
    p.add_argument("--batch", type=int, default=2, help="example batch size for --hf-config (default 2)")
    p.add_argument("--seq", type=int, default=16, help="example sequence length for --hf-config (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, search)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nmgraph", description="N:M structured sparsity for PyTorch models.",
        epilog="Run 'nmgraph COMMAND --help' for each command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress; tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="show the sparsity plan of a model",
                       description="Capture a model, analyze it and print its sparsity plan: eligible "
                                   "weights, weights left dense (with reasons), permutation groups.")
    _add_model_args(p)
    p.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", metavar="OUT.png",
                   help="draw per-layer kept magnitude (identity vs permuted) and sparsity to a PNG")
    p.add_argument("--search", choices=SEARCHES, default="greedy",
                   help="permutation search for --plot (default greedy)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per permutation search")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("sparsify", help="permute + prune (or load a trained checkpoint), convert, save",
                       description="Make a model N:M: permute channels, prune (or load trained weights "
                                   "from --checkpoint), convert, and save it. A Hugging Face directory "
                                   "(config.json + safetensors, sharded or not) goes through "
                                   "nmgraph.sparsify and comes out as a Hugging Face directory that "
                                   "from_pretrained loads (dtype kept); other models as an nmgraph directory.")
    _add_model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    p.add_argument("--search", choices=SEARCHES, default=None,
                   help="permutation search (default greedy; none for a --checkpoint whose weights are already N:M)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per permutation search")
    p.add_argument("--checkpoint", metavar="FILE|DIR",
                   help="trained weights: a state dict (.pt/.pth/.bin/.safetensors) or an nmgraph directory")
    p.add_argument("--no-program", action="store_true",
                   help="do not save a torch.export program (loading then needs the model source)")
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="magnitude",
                   help="one-shot pruning method for a Hugging Face directory (default magnitude; wanda and "
                        "sparsegpt need --calibration)")
    p.add_argument("--calibration", metavar="TEXT_FILE",
                   help="calibration text, one sample per line, tokenized with the directory's tokenizer")
    p.add_argument("--compressed", action="store_true",
                   help="write nmgraph's compressed form (values + in-group indices) instead of dense-stored "
                        "N:M weights; load it with nmgraph.from_pretrained")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_sparsify)

    p = sub.add_parser("export", help="export to ONNX (or a TensorRT engine) and check N:M eligibility",
                       description="Export a model to ONNX, verify it with onnxruntime and report which "
                                   "weights TensorRT can run with N:M sparse math and which lost the "
                                   "pattern. --format tensorrt also builds an engine (needs "
                                   "nmgraph[tensorrt] and an NVIDIA GPU).")
    _add_model_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="output .onnx (or .engine for tensorrt)")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (default) or tensorrt")
    p.add_argument("--pattern", default=None, help="N:M pattern (default: the saved one, else 2:4)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--fp16", action="store_true", help="export float16 weights")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch axis dynamic")
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="torch.onnx exporter (auto: dynamo, TorchScript if it fails)")
    p.add_argument("--no-convert", action="store_true",
                   help="never prune: export the weights as they are")
    p.add_argument("--strict", action="store_true", help="fail if any weight lost its N:M pattern")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="run the GEMM / end-to-end benchmarks (quick mode)",
                       description="Run benchmarks/gemm.py and benchmarks/e2e.py (--quick unless --full).")
    p.add_argument("which", nargs="*", metavar="{gemm,e2e}",
                   help="which benchmarks (default: both)")
    p.add_argument("--dir", help="benchmarks folder (default: the repository's benchmarks/)")
    p.add_argument("--full", action="store_true", help="full runs instead of --quick")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to the scripts")
    p.set_defaults(func=cmd_bench)
    return parser


@contextlib.contextmanager
def _quiet_dependencies(quiet: bool) -> Iterator[None]:
    """Hides third-party deprecation chatter and INFO/WARNING logs; restores everything after."""
    names = ("torch", "transformers", "onnxscript")
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        if quiet:
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            for n in names:
                logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
        if getattr(a, "model", None) is not None and getattr(a, "hf_config", None) is not None:
            parser.error("give MODEL or --hf-config, not both")
        if a.command == "bench":
            bad = [w for w in a.which if w not in BENCHMARKS]
            if bad:
                parser.error(f"unknown benchmark {bad[0]!r}; choose from {', '.join(BENCHMARKS)}")
    except SystemExit as e:  # --help (0) and usage errors (2)
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with _quiet_dependencies(not a.verbose):
            return int(a.func(a) or 0)
    except KeyboardInterrupt:
        print("nmgraph: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- every failure becomes one line and exit code 1
        if a.verbose:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kind = "" if isinstance(e, CLIError) else f"{type(e).__name__}: "
        print(f"nmgraph: error: {kind}{msg}", file=sys.stderr)
        return 1

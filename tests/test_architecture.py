"""The package's import graph: no circle, no import of the package face from inside, own modules
imported at the top of files, no private name imported across modules (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import nmgraph
from nmgraph.backends import backend_names
from nmgraph.cli import build_parser
from nmgraph.deploy import compile_backends
from nmgraph.masking import METHOD_NAMES, METHODS, Method
from nmgraph.passes.lower_linears import lowering_backends
from nmgraph.search import SEARCHES

ROOT = Path(nmgraph.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


#: Optional third-party packages that nmgraph imports lazily (STYLE.md, the common brief).
OPTIONAL = {"transformers", "triton", "onnx", "onnxruntime", "onnxscript", "tensorrt", "torch_tensorrt",
            "safetensors", "tqdm", "accelerate"}


def _holds_optional_code(path: Path) -> bool:
    """A module that imports an optional package at its top (Triton kernels: ``@triton.jit`` needs
    triton when the module is imported). Importing it *is* importing that package, so it is imported
    lazily, where the package would be; it is the one kind of own module that may be."""
    for node in ast.parse(path.read_text()).body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        if any(n.split(".")[0] in OPTIONAL for n in names):
            return True
    return False


def _imports(mods: dict[str, Path]) -> tuple[nx.DiGraph, list[str], list[str]]:
    graph, lazy, private = nx.DiGraph(), [], []
    optional_code = {name for name, path in mods.items() if _holds_optional_code(path)}
    for name, path in mods.items():
        graph.add_node(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nmgraph":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    target = sub if sub in mods else node.module
                    if target != sub and alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{name} imports {node.module}.{alias.name}")
                    graph.add_edge(name, target)
            elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "nmgraph" for a in node.names):
                for alias in node.names:
                    if alias.name.split(".")[0] == "nmgraph":
                        graph.add_edge(name, alias.name)
            else:
                continue
            imported = {f"{node.module}.{a.name}" for a in node.names} | {node.module} \
                if isinstance(node, ast.ImportFrom) else {a.name for a in node.names}
            if node.col_offset and not imported & optional_code:
                lazy.append(f"{name}:{node.lineno}")
    graph.remove_edges_from(nx.selfloop_edges(graph))
    return graph, lazy, private


def test_import_graph_has_no_circle_and_no_upward_import():
    mods = _modules()
    graph, lazy, private = _imports(mods)
    assert list(nx.simple_cycles(graph)) == []
    # a module never imports a package that contains it (serialize once imported nmgraph for __version__)
    assert [(a, b) for a, b in graph.edges if a.startswith(b + ".")] == []
    assert lazy == [], "own modules are imported at the top of files"
    assert private == []
    rooms = nx.DiGraph()
    for a, b in graph.edges:
        ra, rb = ".".join(a.split(".")[:2]), ".".join(b.split(".")[:2])
        if ra != rb and rb != "nmgraph":
            rooms.add_edge(ra, rb)
    assert nx.is_directed_acyclic_graph(rooms)


def test_name_lists_derive_from_their_registries():
    assert set(backend_names()) <= set(compile_backends()) and set(backend_names()) <= set(lowering_backends())
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    search = next(a for a in sub.choices["sparsify"]._actions if a.dest == "search")
    assert tuple(search.choices) == SEARCHES
    assert tuple(METHODS) == METHOD_NAMES and all(isinstance(f(), Method) for f in METHODS.values())

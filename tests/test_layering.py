"""The dependency graph of src/slm, read from the source (ast): every module's slm imports sit in
its header (function-local ones only in `slm.cli`, which keeps the CLI's start fast), no import
cycle, and each module imports only its own layer or lower ones, so the graph reads bottom-up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

# Lowest first. A module may import modules of its own layer or of lower ones.
LAYERS = [
    ("base", ["slm", "slm.errors", "slm.atomic", "slm.paths", "slm.config", "slm.assets", "slm.threads"]),
    ("model", ["slm.model", "slm.sampling", "slm.tokenizer", "slm.chat"]),
    ("weights", ["slm.weights", "slm.pack", "slm.quantize", "slm.gguf_import", "slm.native"]),
    ("inference", ["slm.speculative", "slm.generate", "slm.load"]),
    ("data", ["slm.data"]),
    ("train and eval", ["slm.train", "slm.eval", "slm.gguf_export", "slm.distill"]),
    ("demo and serve", ["slm.demo", "slm.serve"]),
    ("cli", ["slm.cli", "slm.__main__"]),
]


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted((SRC / "slm").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


MODULES = _modules()


def _package(name: str) -> bool:
    return (SRC / Path(*name.split(".")) / "__init__.py").is_file()


def _targets(node: ast.AST, module: str) -> list[str]:
    """The slm modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "slm"]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the package of `module`
        pkg = module.split(".") if _package(module) else module.split(".")[:-1]
        base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
    if base.split(".")[0] != "slm":
        return []
    # `from slm.x import y` loads slm.x.y when y is a submodule
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _header_imports(name: str) -> set[str]:
    deps = set()
    for node in MODULES[name].body:
        for t in _targets(node, name):
            deps.add(t)
    return deps - {name}


def _layer(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or (p != "slm" and name.startswith(p + ".")) for p in prefixes):
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_layering.py: place it")


GRAPH = {name: _header_imports(name) for name in MODULES}


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_imports_go_down_the_layers():
    bad = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
           for m, deps in GRAPH.items() for d in deps if d in MODULES and _layer(d) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    # Package __init__ files re-export their submodules: an edge from a package to its own
    # submodules is not a dependency of the package's code.
    graph = {m: {d for d in deps if d in MODULES and not d.startswith(m + ".")} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_slm_imports_are_in_the_header_outside_the_cli():
    found = {}
    for name, tree in MODULES.items():
        if _layer(name) == len(LAYERS) - 1:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if _targets(sub, name):
                        found.setdefault(name, []).append(f"{name}:{sub.lineno}")
    bad = [loc for locs in found.values() for loc in locs]
    assert not bad, "function-local slm imports: " + ", ".join(bad)


def test_the_model_is_pure_math():
    """slm.model: no files, no distribution, no sampling, no backend kernels (packing is slm.pack's)."""
    assert GRAPH["slm.model"] <= {"slm.config"}
    source = (SRC / "slm" / "model.py").read_text()
    assert "torch.ops" not in source and "mkldnn" not in source

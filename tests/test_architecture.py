"""The package map of docs/architecture.md, enforced: every module's imports (read with ast, not
run) flow one way, from a package to packages of lower rank; imports inside functions are kept
for optional dependencies (and the few heavy libraries only one command needs), named here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "compress"

# rank: a module may import its own package and packages of lower rank, never higher or equal ones
RANKS = {
    "errors": 0, "config": 0,  # the base every section derives from, the one error users see
    "algorithms": 1, "data": 1,  # pure tensor math; text and token windows
    "model": 2,  # loading, anatomy, modules, restructured and sparse folders, tokenizer and tensor files
    "blocks": 3,  # where block i lives: stores, trials, weight sources, the block runner, forward passes, devices
    "stages": 4, "export": 4,  # compression stages; exporters (hf, gguf, onnx) and their checks
    "evaluation": 5,  # zero-shot tasks, exported files in their runtimes, tokens/s
    "reports": 6,  # report.md, comparison tables and plots
    "run": 7,  # the recipe, the engine, resume and publish, identity, validate, re-export, sweep
    "cli": 8, "__main__": 9,
}
# imported inside functions on purpose: optional extras (pyproject.toml), and libraries that only one
# command or code path needs and that cost seconds to import
LAZY = {
    "lm_eval": "eval extra", "gptqmodel": "gptq extra", "optimum": "gptq extra", "bitsandbytes": "bnb extra",
    "peft": "recover extra", "onnx": "onnx extra", "onnxruntime": "onnx extra", "onnxscript": "onnx extra",
    "onnx_ir": "onnx extra", "llama_cpp": "gguf extra", "sentencepiece": "gguf extra", "ray": "ray extra",
    "datasets": "datasets extra", "matplotlib": "plots only (report.md and compare), 1 s to import",
    "psutil": "optional: memory readings where it is installed",
}
# the command line imports each command's module when that command runs: `compress --help` and a
# usage error answer before torch and transformers are loaded
LAZY_FILES = {"cli.py"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def package_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def compress_imports(tree: ast.AST):
    """(line, imported compress module, inside a function) for every import of the package."""
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "compress" else [f"compress.{a.name}" for a in node.names]
            for name in names:
                yield node.lineno, name, id(node) in inside
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, id(node) in inside


def test_the_package_map_covers_every_package():
    packages = {package_of(p) for p in modules()} - {"__init__"}
    assert packages <= set(RANKS), f"packages missing from the map: {packages - set(RANKS)}"
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for name in packages:
        assert f"`{name}" in doc, f"docs/architecture.md does not describe {name}"


def test_imports_flow_one_way():
    wrong = []
    for path in modules():
        own = package_of(path)
        if own == "__init__":
            continue
        for line, name, _ in compress_imports(ast.parse(path.read_text())):
            if not name.startswith("compress."):
                continue
            target = name.split(".")[1]
            if target != own and RANKS[target] >= RANKS[own]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({own}, rank {RANKS[own]}) imports {name} (rank {RANKS[target]})")
    assert not wrong, "imports against the direction:\n" + "\n".join(wrong)


def test_imports_inside_functions_are_optional_dependencies_only():
    wrong = []
    for path in modules():
        for line, name, inside in compress_imports(ast.parse(path.read_text())):
            if inside and name.split(".")[0] not in LAZY and path.relative_to(PACKAGE).as_posix() not in LAZY_FILES:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} inside a function")
    assert not wrong, "move these to the top of their module (or name the optional dependency in LAZY):\n" + "\n".join(wrong)


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not long, "\n".join(long)


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"`((?:compress|tests|benchmarks|recipes|docs|\.ci)/[\w./*-]*)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_the_docs_name_exists(doc):
    missing = []
    for match in PATH.finditer(doc.read_text()):
        named = match.group(1).rstrip("/.")
        if not any(ROOT.glob(named)) and not (ROOT / named).exists():
            missing.append(named)
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"

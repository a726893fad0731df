"""The package's layout rules, read statically from every import (module-level and local):

* the LoRA-XS core never imports ``models`` or ``experiments``, directly or through another
  module;
* ``parallel`` (meshes, jitted programs, hosts) and ``models`` use ``tree`` and ``parallel`` only:
  the models never import the LoRA-XS transform;
* nothing in the package imports ``experiments`` (except ``experiments`` itself);
* ``interop`` (PEFT / Hugging Face / GGUF / official LoRA-XS formats) sits beside
  ``experiments``: it uses the core and ``models``, and nothing imports it;
* no module reaches for another module's private (``_x``) names.
"""

import ast
from pathlib import Path

import pytest

CORE = {"config", "svd", "bases", "apply", "intercept", "nnx", "merge", "partition", "io"}
SHARED = {"tree", "geometry"}   # path and layout helpers every layer may use


def _modules(repo: Path) -> dict[str, Path]:
    pkg = repo / "loraxs_jax"
    out = {}
    for f in pkg.rglob("*.py"):
        parts = f.relative_to(repo).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Package modules ``path`` imports: ``import a.b``, ``from a.b import c`` (c a module or a
    name in a.b), at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in known}


def _kind(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in ("models", "experiments", "parallel", "interop"):
        return parts[1]
    if parts[1] in SHARED:
        return "tree"
    assert parts[1] in CORE, f"{module} is in no layer of the layout: add it to CORE or a package"
    return "core"


ALLOWED = {  # kind -> kinds it may import
    "tree": {"tree"},
    "parallel": {"tree", "parallel"},
    "models": {"tree", "parallel", "models"},
    "core": {"tree", "parallel", "core", "package"},
    "package": {"tree", "parallel", "core", "package"},
    "experiments": {"tree", "parallel", "core", "package", "models", "experiments"},
    "interop": {"tree", "parallel", "core", "package", "models", "interop"},
}


@pytest.fixture(scope="module")
def graph(repo):
    mods = _modules(repo)
    known = set(mods)
    return {m: _imports(f, known) - {m} for m, f in mods.items()}


def test_every_import_respects_the_layers(graph):
    bad = [f"{m} ({_kind(m)}) imports {d} ({_kind(d)})" for m, deps in sorted(graph.items())
           for d in sorted(deps) if _kind(d) not in ALLOWED[_kind(m)]]
    assert not bad, "\n".join(bad)


def test_the_core_never_reaches_models_or_experiments_transitively(graph):
    for start in [m for m in graph if _kind(m) in ("core", "tree", "parallel")]:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            for d in graph[m]:
                if d == "loraxs_jax" or d in seen:   # the package init only re-exports the core
                    continue
                assert _kind(d) not in ("models", "experiments", "interop"), \
                    f"{start} reaches {d} via {m}"
                seen.add(d)
                todo.append(d)


def test_no_private_names_cross_module_boundaries(repo):
    files = [f for d in ("loraxs_jax", "tests", "benchmarks", "configs")
             for f in (repo / d).rglob("*.py")] + [repo / "train.py", repo / "eval.py"]
    ours = ("loraxs_jax", "benchmarks", "configs", "conftest")
    bad = []
    for f in files:
        tree = ast.parse(f.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.split(".")[0] in ours:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{f.relative_to(repo)}: from {node.module} import {a.name}")
                    aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases |= {(a.asname or a.name).split(".")[0] for a in node.names
                            if a.name.split(".")[0] in ours}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and \
                    not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in aliases:
                    bad.append(f"{f.relative_to(repo)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "\n".join(bad)

"""The package reads as layers, with imports pointing one way only (docs/architecture.md).

Every module of ``cwa`` is parsed with ``ast`` (imports inside functions included) and checked against
:data:`LAYERS`: a module may import from its own layer and the layers below it, never from one above.
A new module must be given a layer here, or this test fails.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cwa"

LAYERS: list[tuple[str, set[str]]] = [
    # Each layer is a set of packages (or modules); a module belongs to the longest one that prefixes its name.
    ("common", {"cwa", "cwa._legacy", "cwa.common"}),  # errors, atomic files, process settings, old module paths
    ("model", {"cwa.model"}),  # loading, parameter names, loss, sharding: pure torch
    ("scoring", {"cwa.scoring"}),  # scorers, saliency, shared pass, top-K, checkpoints, sizing: pure torch
    ("ablation", {"cwa.ablation"}),  # perturbations, controls, units, restore, statistics, super weights
    ("rundir", {"cwa.rundir"}),  # the one owner of a run directory: pure I/O, so that the callbacks write through it
    ("lightning", {"lightning", "pytorch_lightning", "cwa.fit"}),  # the loop and what consumes its results
    ("recipes", {"cwa.perturb", "cwa.find_super_weights", "cwa.compare", "cwa.report", "cwa.prune", "cwa.protect"}),
    ("cli", {"cwa.cli", "cwa.__main__"}),
]
PACKAGE_LAYER = {package: i for i, (_, packages) in enumerate(LAYERS) for package in packages}


def layer_of(module: str) -> int | None:
    """The layer of the longest package in :data:`LAYERS` that is the module or contains it (the root
    package ``cwa`` counts only for itself)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in PACKAGE_LAYER and (prefix != "cwa" or module == "cwa"):
            return PACKAGE_LAYER[prefix]
    return None


THIRD_PARTY_LAYERED = ("lightning", "pytorch_lightning")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
LAYER_OF = {name: layer for name in [*MODULES, *THIRD_PARTY_LAYERED] if (layer := layer_of(name)) is not None}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The cwa modules (or layered third-party packages) an import statement loads."""
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        base = node.module or ""
        if node.level:  # relative import
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}".rstrip(".")
        names = {base} | {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    out = set()
    for name in names:
        if name in MODULES:
            out.add(name)
        elif name.split(".")[0] in THIRD_PARTY_LAYERED:
            out.add(name.split(".")[0])
        elif name.startswith("cwa."):
            out.add(name.rpartition(".")[0])
    return out


def imports(module: str) -> tuple[set[str], set[str]]:
    """(imports run when the module is imported, every import anywhere in it) of one cwa module."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    at_import: set[str] = set()
    anywhere: set[str] = set()

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found = _targets(child, module)
                anywhere.update(found)
                if not deferred:
                    at_import.update(found)
            inner = deferred or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            inner = inner or (isinstance(child, ast.If) and _is_type_checking(child))
            visit(child, inner)

    visit(tree, False)
    at_import.discard(module)
    anywhere.discard(module)
    return at_import, anywhere


def test_every_package_is_one_layer_and_no_deeper_than_one_level() -> None:
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")} - {"cwa"}
    assert all(p.count(".") == 1 for p in packages), sorted(packages)
    assert all(p in PACKAGE_LAYER for p in packages), sorted(packages - set(PACKAGE_LAYER))


def test_every_module_has_a_layer() -> None:
    unassigned = sorted(set(MODULES) - set(LAYER_OF))
    assert not unassigned, (
        f"give these modules a layer in tests/test_layers.py (and docs/architecture.md): {unassigned}"
    )


def test_no_module_imports_from_a_higher_layer() -> None:
    upward = []
    for module in sorted(set(MODULES) & set(LAYER_OF)):  # an unassigned module fails the test above
        _, anywhere = imports(module)
        for target in anywhere:
            if target in LAYER_OF and LAYER_OF[target] > LAYER_OF[module]:
                upward.append(
                    f"{module} ({LAYERS[LAYER_OF[module]][0]}) imports {target} ({LAYERS[LAYER_OF[target]][0]})"
                )
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle_at_module_level() -> None:
    graph = {module: {t for t in imports(module)[0] if t in MODULES} for module in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                walk(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_parser_sees_imports_inside_functions() -> None:
    """The checks above are only as good as the parser: it must find a deferred import and a package re-export."""
    at_import, anywhere = imports("cwa.fit.trainer")
    assert "cwa.fit.console" in anywhere - at_import  # imported inside run_fit_sensitivity
    assert "lightning" in at_import
    assert "cwa.rundir" in imports("cwa.fit.callbacks")[0]


BELOW_FIT = ["common", "model", "scoring", "ablation", "rundir"]


def test_the_layers_below_fit_load_no_lightning() -> None:
    """One fresh interpreter imports the layers below ``fit`` from the bottom up and reports the Lightning
    modules loaded after each: the first layer that brings one in is the culprit. (One interpreter for all
    layers: each start imports torch, which costs seconds; ``cwa.scoring.scorers`` alone is covered too.)"""
    names = [name for name, _ in LAYERS]
    steps = [sorted(m for m in MODULES if LAYER_OF.get(m) == names.index(layer)) for layer in BELOW_FIT]
    code = (
        "import importlib, json, sys\n"
        f"for modules in {steps!r}:\n"
        "    for m in modules: importlib.import_module(m)\n"
        "    top = {m.split('.')[0] for m in sys.modules}\n"
        "    print(json.dumps(sorted(top & {'lightning', 'pytorch_lightning', 'lightning_fabric'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    loaded = dict(zip(BELOW_FIT, (json.loads(line) for line in out.stdout.splitlines()), strict=True))
    assert all(not found for found in loaded.values()), loaded

"""The package reads as layers, with imports pointing one way only (docs/architecture.md).

Every module of ``cwa`` is parsed with ``ast`` (imports inside functions included) and checked against
:data:`LAYERS`: a module may import from its own layer and the layers below it, never from one above.
A new module must be given a layer here, or this test fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cwa"

LAYERS: list[tuple[str, set[str]]] = [
    (
        "core",  # pure torch / numpy: unit-testable without a Trainer, no run directory, no Lightning
        {
            "cwa",
            "cwa.agreement",
            "cwa.checkpoint",
            "cwa.controls",
            "cwa.environment",
            "cwa.errors",
            "cwa.figures",
            "cwa.io",
            "cwa.loss",
            "cwa.metrics",
            "cwa.models",
            "cwa.params",
            "cwa.perturbations",
            "cwa.preflight",
            "cwa.published",
            "cwa.restore",
            "cwa.saliency",
            "cwa.scorers",
            "cwa.shard_loading",
            "cwa.shared_pass",
            "cwa.sharding",
            "cwa.sizing",
            "cwa.stats",
            "cwa.super_weights",
            "cwa.topk",
            "cwa.units",
        },
    ),
    (
        "rundir",  # the one owner of a run directory: pure I/O, so that the Lightning callbacks write through it
        {
            "cwa.rundir",
            "cwa.rundir.downstream",
            "cwa.rundir.files",
            "cwa.rundir.outputs",
            "cwa.rundir.perturbation",
            "cwa.rundir.rows",
            "cwa.rundir.run",
            "cwa.rundir.scores",
            "cwa.rundir.shared",
            "cwa.rundir.summary",
            "cwa.rundir.super_weights",
            "cwa.rundir.topk",
        },
    ),
    (
        "lightning",  # the loop (module, data module, strategies) and what consumes its results (callbacks)
        {
            "lightning",
            "pytorch_lightning",
            "cwa.callbacks",
            "cwa.console",
            "cwa.data",
            "cwa.distributed",
            "cwa.module",
            "cwa.trainer",
        },
    ),
    (
        "recipes",  # readers of run directories: perturb, compare, report, find-super-weights
        {
            "cwa.analysis",
            "cwa.compare",
            "cwa.downstream",
            "cwa.evaluate",
            "cwa.find_super_weights",
            "cwa.findings",
            "cwa.findings_placement",
            "cwa.perturb",
            "cwa.perturb_console",
            "cwa.perturb_figures",
            "cwa.report",
            "cwa.report_figures",
            "cwa.report_markdown",
            "cwa.report_text",
            "cwa.run_data",
        },
    ),
    ("cli", {"cwa.cli", "cwa.__main__"}),
]
LAYER_OF = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
THIRD_PARTY_LAYERED = ("lightning", "pytorch_lightning")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


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
    at_import, anywhere = imports("cwa.trainer")
    assert "cwa.console" in anywhere - at_import  # imported inside run_fit_sensitivity
    assert "lightning" in at_import
    assert "cwa.rundir" in imports("cwa.callbacks")[0]


@pytest.mark.parametrize("layer", ["core", "rundir"])
def test_the_layers_below_lightning_load_no_lightning(layer: str) -> None:
    modules = sorted(dict(LAYERS)[layer] & set(MODULES))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout[:500]


def test_scorers_alone_load_no_lightning() -> None:
    code = (
        "import sys, cwa.scorers; print([m for m in sys.modules if m.startswith(('lightning', 'pytorch_lightning'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"

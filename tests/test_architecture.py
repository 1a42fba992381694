"""docs/architecture.md stays true: every ```python block in it runs, each on its own, and its asserts hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
TEXT = DOC.read_text(encoding="utf-8")
# Each block padded with the doc's preceding lines as blank lines, so a traceback names the doc's own line.
BLOCKS = [
    "\n" * TEXT[: m.start(1)].count("\n") + m.group(1)
    for m in re.finditer(r"^```python\n(.*?)^```$", TEXT, flags=re.MULTILINE | re.DOTALL)
]
HEADINGS = re.findall(r"^## (Adding .*)$", TEXT, flags=re.MULTILINE)


def test_the_doc_has_a_worked_example_for_each_extension_point() -> None:
    assert HEADINGS == ["Adding a metric", "Adding a perturbation", "Adding a control", "Adding a report finding"]
    assert len(BLOCKS) == len(HEADINGS)
    assert all("assert " in block for block in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[h.removeprefix("Adding ").replace(" ", "_") for h in HEADINGS])
def test_the_worked_example_runs(block: str) -> None:
    code = compile(block, str(DOC), "exec")
    exec(code, {"__name__": "architecture_example"})


def _layer_table() -> list[tuple[str, set[str]]]:
    """(layer, modules) per row of the doc's layer table, top layer first. A cell lists ``cwa.package``
    names, each followed by its modules' short names."""
    start = TEXT.index("| layer | package: modules |")
    rows = []
    for line in TEXT[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        layer, cell = (c.strip() for c in line.strip("|").split("|")[:2])
        modules, package = set(), ""
        for name in re.findall(r"`([\w.]+)`", cell):
            if name == "cwa" or name.startswith("cwa."):
                package = name
                modules.add(name)
            else:
                modules.add(f"{package}.{name}")
        rows.append((layer, modules))
    return rows


def test_the_layer_table_names_every_module_in_its_layer() -> None:
    from test_layers import LAYER_OF, LAYERS, MODULES

    table = _layer_table()
    assert len(table) == len(LAYERS)
    for (layer, listed), index in zip(table, reversed(range(len(LAYERS))), strict=True):
        actual = {m for m in MODULES if LAYER_OF.get(m) == index}
        assert listed == actual, f"docs/architecture.md, layer {layer}: {sorted(listed ^ actual)}"

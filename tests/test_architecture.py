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

"""The README, docs/ and configs/ name only what exists: files, links and their anchors, and ``cwa.*`` names
that import, by their current paths (the old flat-package paths are for old configs and run directories)."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PATH = re.compile(r"(?<![\w/.-])((?:cwa|tests|scripts|configs|docs)/[\w./-]*\w)")
BARE_FILE = re.compile(r"(?<![\w/.-])(\w+\.(?:py|sh))\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")
DOTTED = re.compile(r"(?<![\w.])(cwa(?:\.\w+)+)")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)}


def _paragraphs(text: str) -> list[str]:
    return re.split(r"\n\s*\n", text)


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_named_files_exist(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = [p for p in PATH.findall(text) if not (ROOT / p.rstrip(".")).exists()]
    repo_files = {p.name for p in ROOT.glob("[!.]*/**/*") if p.suffix in (".py", ".sh")}
    missing += [f for f in BARE_FILE.findall(text) if f not in repo_files]
    assert not missing, f"{_name(doc)} names files that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_links_and_anchors_resolve(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            broken.append(target)
    assert not broken, f"{_name(doc)} links to what does not exist: {broken}"


def _resolves(dotted: str) -> bool:
    if dotted.endswith(".__main__"):  # importing it runs the command line
        return importlib.util.find_spec(dotted) is not None
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        for attr in parts[n:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS + CONFIGS, ids=_name)
def test_named_cwa_objects_import_by_their_current_paths(doc: Path) -> None:
    from cwa._legacy import MOVED

    unresolved, old = set(), set()
    for paragraph in _paragraphs(doc.read_text(encoding="utf-8")):
        for dotted in DOTTED.findall(paragraph):
            if not _resolves(dotted):
                unresolved.add(dotted)
            # A paragraph about the old paths names them on purpose.
            elif any(dotted == m or dotted.startswith(f"{m}.") for m in MOVED) and "_legacy" not in paragraph:
                old.add(dotted)
    assert not unresolved, f"{_name(doc)} names what does not import: {sorted(unresolved)}"
    assert not old, f"{_name(doc)} names old module paths (use the new ones): {sorted(old)}"

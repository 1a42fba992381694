"""The built wheel, not the editable install: every module is in it and the ``cwa`` command runs from it.

The wheel goes into a fresh virtual environment without pip's editable finder. Its dependencies (torch and
the rest) come from the environment running the tests, added to the new one's ``sys.path`` by a ``.pth``
line that names that site-packages as a plain path: Python processes ``.pth`` files only in site
directories, so the outer editable install's finder never runs, and a module missing from the wheel fails
to import instead of being found in the source tree.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import fit_args, latest_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _has_setuptools() -> bool:
    """A recent enough setuptools here lets pip build without fetching one (the build stays offline)."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    return int(setuptools.__version__.split(".")[0]) >= 68


def _build_wheel(tmp_path: Path) -> Path:
    # setuptools builds in the source tree (build/, *.egg-info): build from a copy, so the checkout stays clean.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "cwa", source / "cwa", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path / "dist"
    isolation = ["--no-build-isolation"] if _has_setuptools() else []
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", *isolation, "-w", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    (wheel,) = out.glob("cwa-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    outer = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (Path(purelib) / "outer-site-packages.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, text=True)
    return venv


def _env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PWD": str(cwd)}


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command[:2]} exited {done.returncode}:\n{done.stderr[-4000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    return done


def _wheel_modules(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        files = [n for n in archive.namelist() if n.startswith("cwa/") and n.endswith(".py")]
    names = [n.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for n in files]
    return sorted(names)


def test_the_wheel_installs_and_runs_fit_sensitivity_and_report(tmp_path, tiny_llama_dir):
    wheel = _build_wheel(tmp_path)
    modules = _wheel_modules(wheel)
    # Every module of the source tree is in the wheel (the old `packages = ["cwa"]` shipped no sub-package).
    source = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "cwa").rglob("*.py")
    )
    assert modules == source
    assert {"cwa.rundir.run", "cwa.scoring.scorers", "cwa.report.recipe"} <= set(modules)

    venv = _fresh_venv(tmp_path, wheel)
    python, cwa = venv / "bin" / "python", venv / "bin" / "cwa"
    work = tmp_path / "work"
    work.mkdir()
    # Every module imports from the wheel, from inside the new environment (``cwa.__main__`` runs the CLI
    # when imported: ``python -m cwa --help`` below covers it).
    check = (
        "import importlib, sys\n"
        f"prefix = {str(venv)!r}\n"
        "for name in sys.argv[1:]:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.startswith(prefix), (name, module.__file__)\n"
        "print(len(sys.argv) - 1)\n"
    )
    imported = [m for m in modules if m != "cwa.__main__"]
    assert _run([str(python), "-c", check, *imported], work).stdout.strip() == str(len(imported))
    assert "fit-sensitivity" in _run([str(python), "-m", "cwa", "--help"], work).stdout

    assert _run([str(cwa), *fit_args(tiny_llama_dir, work / "logs", k=10)], work).returncode == 0
    run = latest_run(work / "logs")
    for name in ("config.yaml", "scores.safetensors", "topk.csv", "summary.json", "figures/score_histogram.png"):
        assert (run / name).is_file(), name
    report = work / "report" / "report.md"
    _run([str(cwa), "report", str(run), "--output", str(report), "--sample", "2000"], work)
    text = report.read_text()
    assert "## Executive Summary" in text and "## Key Findings" in text and "tiny" in text
    assert (work / "report" / "report.json").is_file()

"""Paths from before the sub-packages keep working: old module paths, old configs, old run directories.

``tests/data/pre-layout`` holds two run directories written by cwa before the package had sub-packages (a
Hutchinson run, and a grad_x_weight run of a shared pass with its perturb set), on a 2-layer random Llama.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
from helpers import fit, latest_run
from safetensors.torch import load_file

from cwa._legacy import MOVED

FIXTURE = Path(__file__).parent / "data" / "pre-layout"


def test_every_old_module_path_is_the_module_at_its_new_path() -> None:
    for old, new in MOVED.items():
        module = importlib.import_module(old)
        assert module is importlib.import_module(new), old
        assert module.__spec__.name == new, (old, module.__spec__.name)  # the import gave back its own spec
    from cwa.scorers import HutchinsonDiag

    from cwa.scoring.hutchinson import HutchinsonDiag as Moved

    assert HutchinsonDiag is Moved


def test_an_unknown_old_looking_path_still_fails_as_usual() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("cwa.no_such_module")


@pytest.fixture
def old_runs(tmp_path: Path) -> list[Path]:
    runs = []
    for name in ("hutchinson_diag", "grad_x_weight"):
        shutil.copytree(FIXTURE / name, tmp_path / "logs" / name / "version_0")
        runs.append(tmp_path / "logs" / name / "version_0")
    return runs


def test_a_run_directory_from_before_the_layout_loads(old_runs: list[Path]) -> None:
    from cwa.rundir import Run

    hutchinson, gxw = (Run.load(run) for run in old_runs)
    assert hutchinson.metric == "hutchinson_diag" and gxw.metric == "grad_x_weight"
    assert len(gxw.topk) == 20
    scores = load_file(old_runs[1] / "scores.safetensors")
    best = gxw.topk.names[int(gxw.topk.param[0])]
    assert float(scores[best].view(-1)[int(gxw.topk.index[0])]) == pytest.approx(float(gxw.topk.score[0]).__abs__())
    rows = gxw.perturbation.rows
    assert rows and {r.target for r in rows} >= {"topk", "random_matched", "magnitude_matched"}


def test_report_and_compare_read_runs_from_before_the_layout(old_runs: list[Path], tmp_path: Path) -> None:
    from cwa.cli import main

    runs = f"[{','.join(str(r) for r in old_runs)}]"
    assert main(["report", "--runs", runs, "--output", str(tmp_path / "report.md"), "--ks=[5,20]"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "hutchinson_diag" in text and "grad_x_weight" in text
    assert main(["compare", "--runs", runs, "--output", str(tmp_path / "cmp"), "--ks=[5,20]"]) == 0
    assert (tmp_path / "cmp" / "compare.json").is_file()


def test_a_config_naming_old_class_paths_runs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(["the value of a name is an object"] * 200))
    config = tmp_path / "old.yaml"
    config.write_text(
        "model:\n"
        "  metric:\n"
        "    class_path: cwa.scorers.HutchinsonDiag\n"
        "    init_args: {probes: 1}\n"
        "data:\n"
        "  source:\n"
        "    class_path: cwa.data.TextFiles\n"
        f"    init_args: {{paths: [{corpus}]}}\n"
    )
    assert fit(tiny_llama_dir, tmp_path / "logs", "--config", str(config), k=5) == 0
    from cwa.rundir import Run

    run = Run.load(latest_run(tmp_path / "logs"))
    assert run.metric == "hutchinson_diag" and len(run.topk) == 5


def test_a_root_level_perturb_set_reads_beside_the_numbered_sets(old_runs: list[Path], tmp_path: Path) -> None:
    """An earlier cwa wrote perturb.csv at the run's root: it stays experiment 0 when new sets are added."""
    from cwa.report.recipe import report
    from cwa.rundir import Run, write_perturbation

    gxw = old_runs[1]
    old = Run.load(gxw).perturbation
    assert old.label == "perturb.csv" and old.number == 0
    write_perturbation(gxw, old.rows[:2], {"name": "rerun"})
    run = Run.load(gxw)
    assert [e.label for e in run.perturbations] == ["perturb.csv", "perturb/1 (rerun)"]
    assert run.perturbation.label == "perturb/1 (rerun)" and run.perturbations[0].rows == old.rows
    text = report([str(gxw)], tmp_path / "r.md", ks=[5], sample=200, figures=False).read_text()
    assert "R1 · perturb.csv (`cwa perturb`" in text and "R1 · perturb/1 (rerun) (`cwa perturb`" in text

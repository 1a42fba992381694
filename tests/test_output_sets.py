"""Every experiment keeps its own numbered set (``perturb/<n>/``, ``prune/<n>/``, ``protect/<n>/``): a second
run never replaces the first, two at once never collide, and report and compare read all of them (issue 20)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_compare import make_run as make_fit_run
from test_compare import random_scores
from test_perturb import _quick, make_run, tiny_dir  # noqa: F401  (tiny_dir is a fixture)

from cwa.common.errors import CwaError

pytestmark = pytest.mark.usefixtures("one_thread")


def _prune_row(perplexity: float):
    from cwa.rundir.interventions import PruneRow

    zero = {f"delta_{m}{s}": 0.0 for m in ("perplexity", "nll", "accuracy") for s in ("", "_low", "_high")}
    return PruneRow("dense", "", "", "", 0.0, 10, 0, perplexity, 1.6, 0.3, **zero, p_value=None, broken_fraction=0.0)


def test_a_second_perturb_keeps_the_first_and_the_report_shows_both(
    tiny_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from cwa.report.recipe import report
    from cwa.rundir import Run

    run = make_run(tmp_path, tiny_dir)
    _quick(run, tensorboard=False).run()
    _quick(run, ks=(1, 3), tensorboard=False, name="wider K").run()
    for n in ("1", "2"):
        files = {p.relative_to(run / "perturb" / n).as_posix() for p in (run / "perturb" / n).rglob("*")}
        assert {"perturb.csv", "perturb.json", "figures/perturb_dose_response.png"} <= files, n
    assert not (run / "perturb.csv").exists()  # nothing at the root: each experiment is its own set
    loaded = Run.load(run)
    assert [e.label for e in loaded.perturbations] == ["perturb/1", "perturb/2 (wider K)"]
    assert loaded.perturbation.label == "perturb/2 (wider K)"  # the latest
    assert {r.k for r in loaded.perturbations[0].rows if r.target == "topk"} == {2}
    assert {r.k for r in loaded.perturbations[1].rows if r.target == "topk"} == {1, 3}
    text = report([str(run)], tmp_path / "out" / "r.md", ks=[10], sample=200).read_text()
    assert "R1 · perturb/1 (`cwa perturb`" in text and "R1 · perturb/2 (wider K) (`cwa perturb`" in text
    assert "perturb/1/figures/perturb_dose_response.png" in text
    assert "perturb/2/figures/perturb_dose_response.png" in text
    saved = json.loads((tmp_path / "out" / "r.json").read_text())
    assert [e["experiment"] for e in next(iter(saved["perturbation"].values()))] == [
        "perturb/1",
        "perturb/2 (wider K)",
    ]
    from cwa.compare.recipe import compare

    other = make_run(tmp_path / "other", tiny_dir)
    out = compare([str(run), str(other)], ks=[5], sample=100, output=tmp_path / "cmp", figures=False)
    entries = json.loads((out / "compare.json").read_text())["runs"]
    assert [e["experiment"] for e in entries[0]["experiments"]] == ["perturb/1", "perturb/2"]
    assert entries[1]["experiments"] == []


def test_an_unusable_name_is_refused_in_one_sentence(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    run = make_run(tmp_path, tiny_dir)
    with pytest.raises(CwaError, match=r"^--name must be a short printable label"):
        _quick(run, name="two\nlines")


@pytest.mark.slow
def test_two_perturbs_at_once_on_one_run_both_complete(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """Two perturb processes started together on one run directory: two whole sets, both in the report."""
    run = make_run(tmp_path, tiny_dir)
    argv = [sys.executable, "-m", "cwa", "perturb", "--run", str(run), "--ks", "[2]", "--single", "1"]
    argv += ["--controls", "[random_matched]", "--seeds", "[0]", "--bootstrap", "50", "--permutations", "50"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen([*argv, "--name", name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name in ("a", "b")
    ]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()[-2000:]
    from cwa.report.recipe import report
    from cwa.rundir import Run

    experiments = Run.load(run).perturbations
    assert sorted(e.name for e in experiments) == ["a", "b"]
    assert sorted(e.path.name for e in experiments) == ["1", "2"]
    for e in experiments:
        assert e.rows[0].target == "baseline" and (e.path / "figures" / "perturb_dose_response.png").is_file()
        assert not (e.path / ".writer").exists()
    assert not list(run.rglob("*.tmp"))
    text = report([str(run)], tmp_path / "out" / "r.md", ks=[10], sample=200, figures=False).read_text()
    assert text.count("· perturb/") >= 2 and "(a)" in text and "(b)" in text


def _claim(root: str, start: str) -> str:
    """One racing writer: wait for the start signal, then claim and fill a set."""
    import time

    from cwa.rundir.outputs import new_set

    while not Path(start).exists():
        time.sleep(0.001)
    with new_set(Path(root), "prune") as outputs:
        outputs.stage("prune.json").write_text("{}")
        outputs.commit()
    return outputs.directory.name


def test_writers_that_race_never_share_a_set(tmp_path: Path) -> None:
    from concurrent.futures import ProcessPoolExecutor

    start = tmp_path / "go"
    with ProcessPoolExecutor(6) as pool:
        futures = [pool.submit(_claim, str(tmp_path), str(start)) for _ in range(12)]
        start.write_text("go")
        numbers = sorted(int(f.result()) for f in futures)
    assert numbers == list(range(1, 13))


def test_a_second_prune_keeps_the_first_and_the_report_shows_both(tmp_path: Path) -> None:
    from cwa.report.recipe import report
    from cwa.rundir.interventions import read_interventions, write_intervention

    run = make_fit_run(tmp_path, "p", random_scores(0), k=10)
    write_intervention(run, "prune", [_prune_row(5.0)], {"model": "tiny"})
    write_intervention(run, "prune", [_prune_row(7.0)], {"model": "tiny", "name": "second"})
    found = read_interventions(run, "prune")
    assert [(s.label, s.rows[0].perplexity) for s in found] == [("prune/1", 5.0), ("prune/2 (second)", 7.0)]
    text = report([str(run)], tmp_path / "out" / "r.md", ks=[10], sample=200, figures=False).read_text()
    assert "R1 · prune/1 (`cwa prune`)" in text and "R1 · prune/2 (second) (`cwa prune`)" in text


def test_a_set_whose_writer_died_is_removed_and_a_live_ones_is_kept(tmp_path: Path) -> None:
    import socket

    from cwa.rundir.interventions import read_interventions, write_intervention

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for number, pid in (("1", int(dead.stdout)), ("2", os.getpid())):
        folder = tmp_path / "prune" / number
        folder.mkdir(parents=True)
        (folder / ".writer").write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
        (folder / "prune.csv").write_text("half")
    assert read_interventions(tmp_path, "prune") == []  # sets without their json are not read
    written, _ = write_intervention(tmp_path, "prune", [_prune_row(5.0)], {})
    assert not (tmp_path / "prune" / "1").exists() and (tmp_path / "prune" / "2").is_dir()
    assert written == tmp_path / "prune" / "3"


def test_a_full_disk_while_compare_draws_leaves_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    import cwa.report.figures
    from cwa.cli import main

    runs = [make_fit_run(tmp_path, name, random_scores(i), k=10) for i, name in enumerate("ab")]

    def full(fig, path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cwa.report.figures, "_save", full)
    out = tmp_path / "cmp"
    argv = ["compare", "--runs", f"[{runs[0]},{runs[1]}]", "--ks", "[5]", "--sample", "100"]
    assert main([*argv, "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"cwa: error: cannot write '{out}': the disk is full."
    assert not out.exists()  # no compare.json looking complete, no figure, no temporary
    monkeypatch.undo()
    assert main([*argv, "--output", str(out)]) == 0
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {"compare.json", "figures/overlap_jaccard_k5.png"} <= set(before)
    monkeypatch.setattr(cwa.report.figures, "_save", full)
    assert main([*argv, "--output", str(out), "--ks", "[2,5]"]) == 1
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the previous compare.json and figures, untouched


def test_a_planted_link_in_place_of_the_sets_folder_is_refused(tmp_path: Path) -> None:
    from cwa.rundir.interventions import write_intervention

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "prune").symlink_to(elsewhere)
    with pytest.raises(CwaError, match=r"'.*run/prune' is a symbolic link; cwa writes only inside"):
        write_intervention(tmp_path / "run", "prune", [_prune_row(5.0)], {})
    assert not list(elsewhere.iterdir())

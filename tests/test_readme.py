"""The README runs as written: every command of its ```bash blocks (and of its tables' ``command`` columns), in
order, offline, on the embedded SmolLM2-135M, in a fresh working directory whose ``lightning_logs`` the
commands fill one after another, each working on what the ones before it wrote.

Sizes are shrunk by ``CWA_SMOKE=1`` (``cwa.common.smoke``), honoured by cwa itself, never by editing a
command. ``cwa`` commands run in this process through ``cwa.cli.main`` (what the ``cwa`` entry point calls;
interpreter and torch start-up would otherwise cost seconds each), except those that start more processes
(Lightning starts them by rerunning the parent's command line: ``python -m cwa`` then), everything else
through bash. A command
that needs the Hugging Face Hub (a config naming a hub model, a hub lm-eval task) must fail in one sentence,
with exit status 1 and no traceback, under ``HF_HUB_OFFLINE=1``; so must one that needs a GPU on a machine
without one. Two kinds of line are not run, each for a reason given in ``SKIPPED``: the test suite itself
(this test is part of it) and cluster launchers (``srun``), whose cwa command is parsed with ``--print_config``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cwa.cli import main
from cwa.common import smoke
from cwa.model.loading import is_embedded

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LINKED = (".venv", "configs", "scripts", "cwa", "tests", "pyproject.toml", "README.md")
"""What the fresh working directory links to from the checkout (everything but run outputs)."""
LOCAL_TASKS = {"cwa_pydoc_lastword"}
SKIPPED = {
    "bash scripts/test.sh": "runs the whole test suite, this test included: it would recurse",
    "python -m pytest": "runs the test suite, this test included: it would recurse",
}


@dataclass
class Line:
    """One command of the README: where it is, its words, and whether it must fail in one sentence."""

    number: int
    text: str

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def readme_lines(text: str) -> list[Line]:
    """The commands of the README in order: each line of a ```bash block (continuations joined, comments and
    blank lines dropped, a ``#!`` script's ``#SBATCH`` lines with it), and each backticked ``cwa ...``
    cell of a table column headed ``command`` that names no placeholder (``X.yaml``, ``RUN``, ``DIR``)."""
    lines: list[Line] = []
    in_block, header, command_column = False, None, None
    pending = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.startswith("```"):
            in_block = raw.strip() == "```bash" and not in_block
            continue
        if in_block:
            joined = pending + (raw.strip() if pending else raw)
            if joined.endswith("\\"):
                pending = joined[:-1].rstrip() + " "
                continue
            pending = ""
            if shlex.split(joined, comments=True):
                lines.append(Line(number, joined.strip()))
            continue
        if raw.startswith("|"):
            cells = [c.strip() for c in raw.strip().strip("|").split("|")]
            if header is None:
                header = cells
                command_column = next((i for i, c in enumerate(cells) if c == "command"), None)
            elif command_column is not None and command_column < len(cells) and not set(raw) <= set("|-: "):
                match = re.fullmatch(r"`(cwa [^`]+)`.*", cells[command_column])
                if match and not re.search(r"\b(X\.yaml|RUN|DIR)\b", match.group(1)):
                    lines.append(Line(number, match.group(1)))
        else:
            header = command_column = None
    return lines


def needs_hub(words: list[str]) -> bool:
    """Whether a cwa command needs the hub: a config naming a model that is neither embedded nor local, a
    hub lm-eval task."""
    for option, value in zip(words, words[1:], strict=False):
        if option == "--config" and value.endswith(".yaml"):
            pretrained = (yaml.safe_load((ROOT / value).read_text()).get("model") or {}).get("pretrained", "")
            if pretrained and not is_embedded(pretrained) and not Path(pretrained).exists():
                return True
        if option == "--tasks" and set(value.split(",")) - LOCAL_TASKS:
            return True
    return False


def launches_processes(words: list[str]) -> bool:
    """Whether a cwa command has Lightning start further processes (``devices`` above 1, on the command line or
    in its config): Lightning starts them by running this process's own command line again, so such a command
    runs as ``python -m cwa`` (as a user's would), not inside pytest."""
    devices = None
    for option, value in zip(words, [*words[1:], ""], strict=True):
        name, _, inline = option.partition("=")
        if name == "--config" and value.endswith(".yaml"):
            devices = (yaml.safe_load((ROOT / value).read_text()).get("trainer") or {}).get("devices", devices)
        elif name == "--trainer.devices":
            devices = inline or value
    return str(devices).isdigit() and int(devices) > 1


def one_sentence(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and line != smoke.MESSAGE]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("cwa: error: ") and lines[0].endswith("."), err
    return lines[0]


def run_cwa(words: list[str], capfd) -> tuple[int, str, str]:
    args = [match for word in words[1:] for match in (sorted(glob.glob(word)) if "*" in word else [word])]
    try:
        status = main(args)
    except SystemExit as done:  # --print_config and --help end through argparse's exit, as in a shell
        status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    out, err = capfd.readouterr()
    return status, out, err


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh directory linked to the checkout, with the README's environment: the virtual environment
    activated, offline, sizes shrunk."""
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path / ".venv"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", smoke.ENV):
        monkeypatch.setenv(name, "1")
    return tmp_path


def test_parser_finds_blocks_continuations_and_table_commands():
    text = "\n".join(
        [
            "| experiment | command |",
            "|---|---|",
            "| a | `cwa fit-sensitivity --config configs/gpt2.yaml` |",
            "| b | `cwa prune RUN...` |",
            "",
            "```bash",
            "cwa perturb --run x \\",
            "  --ks [1]   # a comment",
            "# only a comment",
            "```",
            "```",
            "cwa not-bash",
            "```",
        ]
    )
    found = [(line.number, line.text) for line in readme_lines(text)]
    assert found == [
        (3, "cwa fit-sensitivity --config configs/gpt2.yaml"),
        (8, "cwa perturb --run x --ks [1]   # a comment"),
    ]
    assert needs_hub(shlex.split(found[0][1])) and not needs_hub(["cwa", "--config", "configs/smollm2-135m.yaml"])
    assert launches_processes(["cwa", "x", "--config", "configs/smollm2-135m-fsdp2.yaml"])
    assert launches_processes(["cwa", "x", "--trainer.devices=2"]) and not launches_processes(["cwa", "x"])


def bootstrapped() -> bool:
    """Whether ``scripts/bootstrap.sh`` would do nothing: its stamp names this checkout's pyproject.toml, bootstrap
    script and torch. Only then may a README line that bootstraps run here, where ``.venv`` is the checkout's own
    (a reinstall from this temporary directory would point the environment at it)."""
    stamp = ROOT / ".venv" / ".cwa-bootstrap"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "scripts" / "bootstrap.sh").read_bytes())
    want = f"{digest.hexdigest()[:16]} {os.environ.get('CWA_TORCH', 'torch==2.13.0')}"
    return stamp.is_file() and stamp.read_text().strip() == want


def check(line: Line, workdir: Path, capfd) -> str | None:
    """Run one README command as the test runs it; what went wrong, or None."""
    words, where = line.words, f"README.md:{line.number}: {line.text}"
    program = Path(words[0]).name
    if "scripts/run-default.sh" in line.text and not bootstrapped():
        return f"{where}: .venv was not installed by scripts/bootstrap.sh from this checkout; run it first"
    if program == "cwa" and launches_processes(words) and not needs_hub(words):
        done = subprocess.run([sys.executable, "-m", "cwa", *words[1:]], capture_output=True, text=True)
        ok = done.returncode == 0 and "Traceback" not in done.stderr
        return None if ok else f"{where}: exit {done.returncode}\n{done.stderr[-3000:]}"
    if program == "cwa":
        status, _, err = run_cwa(words, capfd)
        if needs_hub(words):
            try:
                one_sentence(err)
            except AssertionError:
                return f"{where}: not one sentence:\n{err[-3000:]}"
            return None if status == 1 else f"{where}: exit {status}, expected 1"
        ok = status == 0 and "Traceback" not in err
        return None if ok else f"{where}: exit {status}\n{err[-3000:]}"
    if program == "tensorboard":  # it exists; serving would never return
        return None if (workdir / words[0]).is_file() else f"{where}: no {words[0]}"
    if program == "srun":  # no cluster here: the cwa command it launches must parse
        cwa = words[next(i for i, w in enumerate(words) if Path(w).name == "cwa") :]
        status, out, err = run_cwa([*cwa, "--print_config"], capfd)
        return None if status == 0 and "num_nodes: 2" in out else f"{where}: {err[-3000:]}"
    done = subprocess.run(["bash", "-c", line.text], capture_output=True, text=True)
    return None if done.returncode == 0 else f"{where}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_every_readme_command_runs(workdir, capfd):
    lines = readme_lines((ROOT / "README.md").read_text())
    assert len(lines) > 20
    capfd.readouterr()
    problems, skipped, started = [], [], time.perf_counter()
    for line in lines:
        reason = next((why for prefix, why in SKIPPED.items() if prefix in line.text), None)
        if reason:
            skipped.append(line)
            continue
        start = time.perf_counter()
        problem = check(line, workdir, capfd)
        if problem:
            problems.append(problem)
        with capfd.disabled():
            print(f"{time.perf_counter() - start:6.1f} s  README.md:{line.number}: {line.text[:100]}", flush=True)
    with capfd.disabled():
        print(f"{time.perf_counter() - started:6.1f} s in all; {len(skipped)} skipped (the test suite)", flush=True)
    assert not problems, "\n\n".join(problems)
    assert len(skipped) == sum(prefix in line.text for line in lines for prefix in SKIPPED)
    summaries = list((workdir / "lightning_logs").glob("*/version_*/summary.json"))
    assert summaries and all('"smoke": true' in p.read_text() for p in summaries)


if __name__ == "__main__":  # list the commands the test runs
    for found in readme_lines((ROOT / "README.md").read_text()):
        print(found.number, found.text, "(needs the hub)" if needs_hub(found.words) else "", file=sys.stdout)

"""The run directories of a shared pass: one complete run directory per metric.

A fit-sensitivity run whose ``model.metric`` is a list scores every metric in one pass
(:mod:`cwa.scoring.shared_pass`) and writes each metric's results to a run directory of its own beside the
logger's ``version_<n>``: ``version_<n>-<metric>``, each with a ``config.yaml`` naming that metric alone,
so that ``perturb`` and ``report`` read it like any single-metric run. ``version_<n>`` itself holds the
pass's configuration and its checkpoints while it runs (``resume_from`` points there) and is removed once
every metric's directory is complete (unless checkpoints are kept).
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

from cwa.common.io import atomic_open
from cwa.rundir.files import CONFIG, SUMMARY
from cwa.rundir.run import remove_unfinished_run

_PASS_FILES = (CONFIG, "hparams.yaml")
_VERSION = re.compile(r"^version_(\d+)(?:-.+)?$")  # what the CLI and the logger put in the pass's own directory


def metric_run_dir(base: Path, metric: str, beside: bool = True) -> Path:
    """The run directory of ``metric`` in the shared pass whose logger directory is ``base``.

    Args:
        base: the logger's run directory (``lightning_logs/<experiment>/version_<n>``).
        metric: the metric's short name.
        beside: ``version_<n>-<metric>`` beside ``base`` (a logger numbered it); False: ``base/<metric>``
            (no logger: ``base`` is the trainer's root directory).
    """
    return base.with_name(f"{base.name}-{metric}") if beside else base / metric


def next_version(experiment: Path) -> int:
    """The next free run number in ``experiment``: one above every ``version_<n>`` and ``version_<n>-<metric>``.

    Lightning's logger counts ``version_<n>`` only, so once a shared pass has removed its own directory the
    next run would take its number and two unrelated runs would share it.

    Args:
        experiment: ``lightning_logs/<experiment>`` (a missing one is empty).
    """
    numbers = [-1]
    if experiment.is_dir():
        for entry in experiment.iterdir():
            match = _VERSION.match(entry.name)
            if match and entry.is_dir():
                numbers.append(int(match.group(1)))
    return max(numbers) + 1


def write_metric_config(source: Path, target: Path, index: int) -> bool:
    """Copy the pass's ``config.yaml`` with ``model.metric`` reduced to its ``index``-th entry.

    Args:
        source: the shared pass's ``config.yaml`` (its ``model.metric`` is the list).
        target: the metric's ``config.yaml``.
        index: the metric's place in the list.

    Returns:
        False when there is no source (the CLI did not save one), True once written.
    """
    import yaml

    if not source.is_file():
        return False
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict) and isinstance(model.get("metric"), list):
        model["metric"] = model["metric"][index]
    with atomic_open(target, encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    return True


def remove_pass_dir(base: Path) -> None:
    """After every metric's directory is complete: remove the pass's own directory when nothing but its
    configuration is left in it (kept checkpoints or anything else keep it)."""
    for name in _PASS_FILES:
        (base / name).unlink(missing_ok=True)
    for events in base.glob("events.out.tfevents.*"):  # the logger's own file: each metric has its events
        events.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        base.rmdir()


def remove_unfinished_metric_runs(base: Path, metrics: list[str], beside: bool = True) -> None:
    """A failed shared pass leaves no incomplete metric directory behind (complete ones stay)."""
    for metric in metrics:
        path = metric_run_dir(base, metric, beside)
        if path.is_dir() and not (path / SUMMARY).exists():
            if beside:
                remove_unfinished_run(path)
            else:
                shutil.rmtree(path, ignore_errors=True)

"""The run directory: the one owner of its paths, its summary schema, its loaders and its writers.

``cwa fit-sensitivity`` writes a run directory only through this package (its callbacks call the writers);
``perturb``, ``compare`` and ``report`` read it only through :class:`Run`. A run directory is complete when
its ``summary.json`` says ``status: complete``: it is written last, after every other file of the run is on
disk. The package is pure I/O over torch, numpy and safetensors (no Lightning), so that the Lightning
callbacks below it in the call chain can write through it.

| file | written by | read by |
|---|---|---|
| ``config.yaml`` | fit-sensitivity's LightningCLI | :attr:`Run.config` (plain data, never code) |
| ``scores.safetensors`` | :func:`.scores.write_scores` / :func:`.scores.stream_scores` | :class:`.scores.LazyScores` |
| ``topk.csv`` | :func:`.topk.write_topk` | :func:`.topk.read_topk` (the one tie rule) |
| ``summary.json`` | :func:`.summary.write_summary`, last | :meth:`Run.load` (refuses incomplete runs) |
| ``perturb/<n>/perturb.csv`` + ``.json`` | :func:`.perturbation.write_perturbation` | :attr:`Run.perturbations` |
| ``perturb/<n>/downstream.csv`` | :func:`.perturbation.write_perturbation` (``--tasks``) | the same |
| ``{prune,protect}/<n>/`` | :func:`.interventions.write_intervention` | :func:`.interventions.read_interventions` |
| ``{prune,protect}/<n>/<kind>_downstream.csv`` | ``write_intervention`` (``--tasks``) | the same |
| ``super_weights.csv`` | :func:`.super_weights.write_super_weights` (one set with its summary) | find-super-weights |
| ``row_test.csv`` | :func:`.super_weights.write_super_weights` (same set, ``row_test``) | find-super-weights |
| ``accumulators/`` | :mod:`cwa.scoring.checkpoint` while running | resume; :func:`.run.remove_unfinished_run` |
| ``figures/`` | the figures callback; perturb (one set with its csv) | the report |

A shared pass of several metrics writes one such directory per metric, ``version_<n>-<metric>``
(:mod:`.shared`).

File names and kinds live in :mod:`.files`; :class:`OutputSet` (in :mod:`.outputs`) is the all-or-nothing
writer that perturb and find-super-weights use; :func:`.outputs.new_set` claims a numbered set directory
(``perturb/1/``, ``perturb/2/``...) per experiment, so no experiment replaces another.
"""

from cwa.rundir.downstream import DownstreamRow, read_downstream_csv
from cwa.rundir.files import (
    ACCUMULATORS,
    CONFIG,
    DOWNSTREAM_CSV,
    FIGURES,
    FIT_KIND,
    PERTURB_CSV,
    PERTURB_JSON,
    ROW_TEST,
    SCHEMA_VERSION,
    SCORES,
    SCORES_FORMAT,
    SUMMARY,
    SUPER_WEIGHTS,
    SUPER_WEIGHTS_KIND,
    TOPK,
    Key,
)
from cwa.rundir.outputs import OutputSet, check_name
from cwa.rundir.perturbation import (
    SET_TARGETS,
    ConditionKind,
    Perturbation,
    PerturbRow,
    read_perturb_csv,
    read_perturbation,
    read_perturbations,
    write_perturb_csv,
    write_perturbation,
)
from cwa.rundir.run import PREFETCH_K, Run, is_complete, load_runs, remove_unfinished_run, unique_names
from cwa.rundir.scores import LazyScores, scores_metadata, stream_scores, write_scores
from cwa.rundir.shared import (
    metric_run_dir,
    next_version,
    remove_pass_dir,
    remove_unfinished_metric_runs,
    write_metric_config,
)
from cwa.rundir.summary import Summary, metric_entry, write_summary
from cwa.rundir.super_weights import write_super_weights
from cwa.rundir.topk import TOPK_COLUMNS, read_topk, write_topk

__all__ = [
    "metric_entry",
    "metric_run_dir",
    "remove_pass_dir",
    "remove_unfinished_metric_runs",
    "next_version",
    "write_metric_config",
    "ACCUMULATORS",
    "CONFIG",
    "DOWNSTREAM_CSV",
    "FIGURES",
    "FIT_KIND",
    "PERTURB_CSV",
    "PERTURB_JSON",
    "PREFETCH_K",
    "SCHEMA_VERSION",
    "SCORES",
    "SCORES_FORMAT",
    "SUMMARY",
    "ROW_TEST",
    "SUPER_WEIGHTS",
    "SUPER_WEIGHTS_KIND",
    "TOPK",
    "TOPK_COLUMNS",
    "DownstreamRow",
    "Key",
    "LazyScores",
    "OutputSet",
    "check_name",
    "PerturbRow",
    "SET_TARGETS",
    "ConditionKind",
    "Perturbation",
    "Run",
    "Summary",
    "is_complete",
    "load_runs",
    "read_downstream_csv",
    "read_perturb_csv",
    "read_perturbation",
    "read_perturbations",
    "read_topk",
    "remove_unfinished_run",
    "scores_metadata",
    "stream_scores",
    "unique_names",
    "write_perturb_csv",
    "write_perturbation",
    "write_scores",
    "write_summary",
    "write_super_weights",
    "write_topk",
]

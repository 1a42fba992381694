"""The callbacks that consume a fit-sensitivity loop's scores, one job each, in this order:

1. :class:`TopKSelection` selects the top-K (on the row shards in sharded runs).
2. :class:`RunDirectoryWriter` writes ``scores.safetensors`` and ``topk.csv`` through :mod:`cwa.rundir`.
3. :class:`ScoreFigures` draws the figures.
4. :class:`TensorBoardHistograms` logs per-tensor score histograms.
5. :class:`SummaryWriter` writes ``summary.json``, last: its presence marks the run complete.

A shared pass of several metrics (``model.metric`` a list) runs this chain once per metric through
:class:`SharedPassRuns`, each time with a :class:`MetricView` of the module and the metric's own result.

Like Lightning's ``BasePredictionWriter`` they only read what the loop produced (the module's scores)
and never set anything on the module; they pass their results forward in one :class:`FitResult`, which
``CwaTrainer.fit_sensitivity`` creates, keeps in the callbacks' order, and returns.

In sharded runs (FSDP2) no rank ever holds every score: ``scores.safetensors`` is streamed tensor by
tensor (each tensor assembled from its row shards, written, freed), and the statistics, figures and
histograms then read the finished file lazily.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from torch import Tensor

from cwa import rundir
from cwa.common import smoke
from cwa.common.environment import environment, peak_memory
from cwa.common.io import inside, remove_stale_temporaries
from cwa.model.params import ParamInfo
from cwa.scoring import checkpoint
from cwa.scoring.topk import TopK, select_topk, select_topk_sharded


@dataclass
class FitResult:
    """What one fit-sensitivity run produced, filled in by the callbacks in turn.

    Attributes:
        run_dir: the run directory (every rank).
        topk: the selected weights with their values in ``weight`` (every rank).
        infos: the scored parameters in model order.
        scores: whole score tensors by parameter, on global zero: the module's own, or read lazily from
            the streamed file in sharded runs ({} where neither exists).
        timings: seconds of each phase after the loop (``topk_s``, ``write_s``, ``figures_s`` ...).
        summary: the ``summary.json`` written last (global zero only).
        shared_pass: the metrics of the shared pass this run is one of (None for a metric run alone).
        tensorboard: where this run's TensorBoard histograms go instead of the trainer's logger (a shared
            pass gives each metric's run directory its own events file).
    """

    run_dir: Path | None = None
    topk: TopK | None = None
    infos: dict[str, ParamInfo] = field(default_factory=dict)
    scores: Mapping[str, Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    summary: rundir.Summary | None = None
    shared_pass: list[str] | None = None
    tensorboard: object | None = None


class FitCallback(L.Callback):
    """A consumer of the fit-sensitivity result; ``stage`` is its place in the pipeline."""

    stage: ClassVar[int]

    @staticmethod
    def result(trainer: L.Trainer) -> FitResult:
        """The run's result object, kept by the trainer (``CwaTrainer.fit_sensitivity`` creates it)."""
        result = getattr(trainer, "fit_result", None)
        if not isinstance(result, FitResult):
            raise RuntimeError(f"{FitCallback.__name__}s run under cwa.fit.trainer.CwaTrainer.fit_sensitivity only.")
        return result


class TopKSelection(FitCallback):
    """Selects the top-K weights from the module's final scores (sharded or not) with their values."""

    stage = 10

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.scores:
            return
        result = self.result(trainer)
        start = time.perf_counter()
        if pl_module.scorer.sharded:  # a collective: every rank takes part and gets the same list
            topk = select_topk_sharded(pl_module.scores, pl_module.scorer.params, pl_module.k, pl_module.mode)
        else:
            topk = select_topk(pl_module.scores, pl_module.k, pl_module.mode)
            topk.weight = selected_weights(topk, dict(pl_module.model.named_parameters()))
        # Only the tensors the metric scored (wanda and obs leave out embeddings, norms and biases).
        result.topk, result.infos = topk, {n: pl_module.selected[n] for n in pl_module.scores}
        result.timings["topk_s"] = time.perf_counter() - start


def selected_weights(topk: TopK, params: Mapping[str, Tensor]) -> Tensor:
    """The values of the selected weights (float64 holds every model dtype's values exactly)."""
    weight = torch.empty(len(topk), dtype=torch.float64)
    for p, name in enumerate(topk.names):
        mask = topk.param == p
        if mask.any():
            flat = params[name].detach().reshape(-1)
            weight[mask] = flat[topk.index[mask].to(flat.device)].double().cpu()
    return weight


class RunDirectoryWriter(FitCallback):
    """Writes ``scores.safetensors`` (per the module's ``save_scores``) and ``topk.csv`` to the run directory."""

    stage = 20

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = self.result(trainer)
        if result.topk is None:
            return
        if result.run_dir is None:  # a shared pass names each metric's directory itself
            # trainer.log_dir is a collective (a broadcast) in distributed runs: every rank asks for it.
            result.run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        path = result.run_dir / rundir.SCORES
        metadata = rundir.scores_metadata(pl_module.scorer.name, pl_module.pretrained)
        start = time.perf_counter()
        if not pl_module.scorer.sharded:
            result.scores = pl_module.scores
            if trainer.is_global_zero and pl_module.save_scores != "off":
                rundir.write_scores(path, pl_module.scores, pl_module.save_scores, metadata)
        elif pl_module.save_scores != "off":
            self._stream_sharded(trainer, pl_module, path, metadata)
            result.timings["write_scores_s"] = time.perf_counter() - start
            start = time.perf_counter()
            result.scores = rundir.LazyScores(path) if trainer.is_global_zero else {}
        if trainer.is_global_zero:
            rundir.write_topk(result.run_dir / rundir.TOPK, result.topk, result.infos, {})
            result.timings["write_s"] = time.perf_counter() - start

    @staticmethod
    def _stream_sharded(trainer: L.Trainer, module: L.LightningModule, path: Path, metadata: dict) -> None:
        """Every rank takes part in assembling each tensor from its row shards; only global zero writes it."""
        from cwa.model.sharding import full_tensor

        params = module.scorer.params
        shapes = {n: tuple(params[n].shape) for n in module.scores}
        tensors = ((n, full_tensor(s, params[n])) for n, s in module.scores.items())
        rundir.stream_scores(path, shapes, tensors, module.save_scores, metadata, write=trainer.is_global_zero)


class ScoreFigures(FitCallback):
    """Draws ``figures/``: the log10 score histogram, the layer x module heatmap, where the top-K live.

    Args:
        enabled: draw the figures (false: no ``figures/``; the default callback is then not added).
    """

    stage = 30

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = self.result(trainer)
        # Sharded runs with save_scores off have no place to read whole score tensors from.
        if not (self.enabled and trainer.is_global_zero and result.topk is not None and result.scores):
            return
        from cwa.fit import figures

        start = time.perf_counter()
        title = f"{pl_module.pretrained} · {pl_module.scorer.name}"
        fig_dir = inside(result.run_dir, rundir.FIGURES)
        figures.score_histogram(result.scores, result.topk, title, fig_dir / "score_histogram.png")
        figures.layer_module_heatmap(result.scores, result.infos, title, fig_dir / "layer_module_heatmap.png")
        figures.topk_locations(result.topk, result.infos, f"{title} · {pl_module.mode}", fig_dir / "topk_locations.png")
        result.timings["figures_s"] = time.perf_counter() - start


class TensorBoardHistograms(FitCallback):
    """Logs a log10|score| histogram per tensor and the calibration loss to the TensorBoard logger.

    Args:
        enabled: log them (false: none; the default callback is then not added).
    """

    stage = 40

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = self.result(trainer)
        if not (self.enabled and trainer.is_global_zero and result.topk is not None and result.scores):
            return
        experiment = result.tensorboard
        if experiment is None and result.shared_pass is None and trainer.logger is not None:
            experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_histogram_raw"):
            tensorboard_histograms(experiment, result.scores, pl_module.scorer.mean_loss)


def tensorboard_histograms(experiment, scores: Mapping[str, Tensor], mean_loss: float) -> None:
    """log10|score| histogram per tensor (the scores span many decades) and the calibration loss."""
    for name, s in scores.items():
        a = s.detach().abs().reshape(-1).float()
        pos = a[a > 0].log10()
        if pos.numel() == 0:
            continue
        lo, hi = float(pos.min()), float(pos.max())
        bins = 64
        counts = torch.histc(pos, bins=bins, min=lo, max=hi if hi > lo else lo + 1e-6)
        limits = torch.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)[1:]
        experiment.add_histogram_raw(
            f"log10_score/{name}",
            min=lo,
            max=hi,
            num=int(pos.numel()),
            sum=float(pos.sum()),
            sum_squares=float(pos.double().pow(2).sum()),
            bucket_limits=limits.tolist(),
            bucket_counts=counts.tolist(),
            global_step=0,
        )
    if mean_loss == mean_loss:
        experiment.add_scalar("calibration/mean_nll", mean_loss, 0)
    experiment.flush()


class SummaryWriter(FitCallback):
    """Writes ``summary.json`` after every other file of the run: a run directory with one is complete."""

    stage = 90

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = self.result(trainer)
        if not trainer.is_global_zero or result.topk is None:
            return
        result.summary = build_summary(trainer, pl_module, result)
        rundir.write_summary(result.run_dir, result.summary)
        # The run is complete: its resume points and anything a killed writer left are no longer needed.
        checkpoint.finish(pl_module.checkpoint_directory, pl_module.keep_checkpoints)
        remove_stale_temporaries(result.run_dir)


def tensor_statistics(scores: Mapping[str, Tensor], topk: TopK) -> dict[str, dict]:
    """Per-tensor statistics of the scores and how many of the top-K each tensor holds."""
    counts = torch.bincount(topk.param, minlength=len(topk.names)).tolist()
    stats = {}
    for i, (name, s) in enumerate(scores.items()):
        a = s.detach().double()
        stats[name] = {
            "shape": list(s.shape),
            "numel": s.numel(),
            "mean": float(a.mean()),
            "std": float(a.std()) if s.numel() > 1 else 0.0,
            "min": float(a.min()),
            "max": float(a.max()),
            "abs_sum": float(a.abs().sum()),
            "zeros": int((a == 0).sum()),
            "topk_count": counts[i],
        }
    return stats


def build_summary(trainer: L.Trainer, module: L.LightningModule, result: FitResult) -> rundir.Summary:
    """The run's ``summary.json`` from the trainer, the module's settings and counters, and the result."""
    scorer = module.scorer
    datamodule = trainer.datamodule
    data = datamodule.describe() if datamodule is not None and hasattr(datamodule, "describe") else {}
    timings = {**module.timings, **result.timings}
    return rundir.Summary(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        model=module.pretrained,
        model_class=type(module.model).__name__,
        dtype=module.dtype_name,
        num_parameters=sum(p.numel() for p in module.model.parameters()),  # DTensor numel is the global size
        num_scored=sum(info.numel for info in result.infos.values()),
        scored_tensors=len(result.infos),
        metric=rundir.metric_entry(scorer.name, scorer.signed, scorer.settings(), scorer.facts(), scorer.description),
        mode=module.mode,
        k=module.k,
        topk_rows=len(result.topk),
        include=module.include,
        exclude=module.exclude,
        samples=data.get("num_samples"),
        tokens=int(scorer.tokens),
        mean_loss=scorer.mean_loss,
        perplexity=float(torch.tensor(scorer.mean_loss).exp()),
        seed=data.get("seed"),
        data=data,
        data_fingerprint=data.get("calibration_fingerprint"),
        world_size=trainer.world_size,
        strategy=type(trainer.strategy).__name__,
        timings={k: round(v, 4) for k, v in timings.items()},
        memory=peak_memory(),
        memory_ranks=module.rank_memory,
        resumed_from=module.resumed_batches,
        environment=environment(),
        tensors=tensor_statistics(result.scores, result.topk) if result.scores else {},
        layout={n: {"layer": i.layer, "module": i.module, "transposed": i.transposed} for n, i in result.infos.items()},
        shared_pass=result.shared_pass,
        smoke=smoke.active(),
    )


class MetricView:
    """The module as the fit callbacks see one metric of a shared pass: that metric's scorer and scores;
    every other attribute is the module's (read only, like the module itself).

    Args:
        module: the ``SensitivityModule`` that ran the shared pass.
        scorer: the metric's member scorer (``module.scorer.members[name]``).
        scores: its scores.
    """

    checkpoint_directory = None  # the pass removes its checkpoints once every metric's run is complete

    def __init__(self, module: L.LightningModule, scorer: object, scores: dict[str, Tensor]) -> None:
        self._module, self.scorer, self.scores = module, scorer, scores

    def __getattr__(self, name: str) -> object:
        return getattr(self._module, name)


class SharedPassRuns(FitCallback):
    """Runs the fit callbacks once per metric of a shared pass, each with that metric's own
    :class:`FitResult` and run directory (``cwa.rundir.shared``); the trainer keeps the results in
    ``fit_results``. ``CwaTrainer.fit_sensitivity`` puts the chain in here when the metric is a list.

    Args:
        chain: the fit callbacks, in pipeline order.
    """

    stage = 0

    def __init__(self, chain: list[FitCallback]) -> None:
        self.chain = list(chain)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.metric_scores:
            return
        # trainer.log_dir is a collective (a broadcast) in distributed runs: every rank asks for it.
        base = Path(trainer.log_dir or trainer.default_root_dir)
        beside = trainer.logger is not None
        metrics = list(pl_module.metric_scores)
        results = []
        for index, metric in enumerate(metrics):
            result = FitResult(run_dir=rundir.metric_run_dir(base, metric, beside), shared_pass=metrics)
            trainer.fit_result = result
            if trainer.is_global_zero:
                result.run_dir.mkdir(parents=True, exist_ok=True)
                rundir.write_metric_config(base / rundir.CONFIG, result.run_dir / rundir.CONFIG, index)
                result.tensorboard = _events_writer(trainer, result.run_dir)
            view = MetricView(pl_module, pl_module.scorer.members[metric], pl_module.metric_scores[metric])
            try:
                for callback in self.chain:
                    callback.on_validation_end(trainer, view)
            finally:
                if result.tensorboard is not None:
                    result.tensorboard.close()
            results.append(result)
        trainer.fit_results = results
        if trainer.is_global_zero:
            checkpoint.finish(pl_module.checkpoint_directory, pl_module.keep_checkpoints)
            if beside and not pl_module.keep_checkpoints:
                rundir.remove_pass_dir(base)


def _events_writer(trainer: L.Trainer, run_dir: Path) -> object | None:
    """A TensorBoard writer for one metric's run directory when the trainer logs to TensorBoard."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not isinstance(trainer.logger, TensorBoardLogger):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter as EventsWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter as EventsWriter
        except ImportError:
            return None
    return EventsWriter(log_dir=str(run_dir))


DEFAULT_CALLBACKS: tuple[type[FitCallback], ...] = (
    TopKSelection,
    RunDirectoryWriter,
    ScoreFigures,
    TensorBoardHistograms,
    SummaryWriter,
)
"""The pipeline ``CwaTrainer.fit_sensitivity`` completes: each one not given is added with its defaults."""

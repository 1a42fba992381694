"""The LightningModule that drives a scorer over calibration batches.

Under Lightning's ``ModelParallelStrategy`` the module shards the model with FSDP2 in
``configure_model``. Every forward and backward is then a collective, so all ranks run the same number
of steps (the data module adds filler batches whose loss counts zero). Metrics linear in the batch
(``grad_x_weight``) run every rank's batch at once: backward's reduce-scatter sums the gradients. Metrics
that are not (``grad_squared`` squares per-micro-batch gradients, ``hutchinson_diag`` draws one probe per
batch) take turns: in each step rank t's batch is scored while the other ranks join the collectives with
a two-token batch whose loss is multiplied by zero, so one step costs world_size forward/backward passes
of the turn-taking kind but matches the single-process result exactly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from cwa.common.environment import keep_freed_memory, peak_memory, release_freed_memory
from cwa.common.errors import CwaError
from cwa.fit import preflight
from cwa.fit.data import PAD_KEY
from cwa.fit.distributed import check_supported_strategy, is_sharded_strategy
from cwa.model import shard_loading
from cwa.model.loading import Dtype, set_attn_implementation
from cwa.model.loss import next_token_nll
from cwa.model.params import ParamInfo, as_patterns, compile_patterns, select_parameters
from cwa.model.sharding import all_gather_objects, all_reduce_sum, apply_fsdp2, local_of
from cwa.scoring import checkpoint
from cwa.scoring.metrics import make_scorer
from cwa.scoring.scorers import Scorer, nonfinite_error
from cwa.scoring.shared_pass import SharedPass
from cwa.scoring.topk import Mode, check_k


class SensitivityModule(L.LightningModule):
    """Wraps a Hugging Face causal LM; accumulates per-weight sensitivity scores in the validation loop.

    Args:
        pretrained: model to analyse: ``smollm2-135m`` (the embedded offline default), a Hugging Face
            Hub name (``gpt2``, ``meta-llama/Llama-3.1-8B``) or a local directory.
        metric: sensitivity metric: a short name (``magnitude``, ``grad_x_weight``, ``grad_squared``,
            ``hutchinson_diag``) or a class with options, e.g. ``class_path: cwa.scoring.scorers.HutchinsonDiag``
            with ``init_args: {probes: 4, hvp: finite_difference}``; or a list of them that share one
            forward and backward per batch (``[magnitude, grad_x_weight, grad_squared, wanda]``, see
            ``cwa.scoring.shared_pass``), each written to its own run directory ``version_<n>-<metric>``.
        k: how many critical weights to select (in total for ``global``, per tensor for ``per_layer``).
        mode: ``global`` (top-K over all selected tensors) or ``per_layer`` (top-K within each tensor).
        include: regular expressions; only parameters matching one are scored (all when empty). A
            pattern matches the whole name or whole dot-separated parts of it: ``layers.1`` never
            selects ``layers.10``.
        exclude: regular expressions of parameters not to score.
        dtype: dtype the model is loaded in; scores are accumulated in float32 regardless.
        attn_implementation: attention kernel (``eager``, ``sdpa``); None lets the metric choose
            (double-backward Hutchinson needs ``eager``).
        trust_remote_code: allow custom model code from the hub (off unless you trust the repository).
        revision: hub revision (branch, tag or commit) of the model.
        save_scores: dtype of ``scores.safetensors`` (``float32``, ``bfloat16``) or ``off``.
        checkpoint_every: save the accumulators, counters and position in the data every this many
            batches (per process), so that a killed run can be resumed with ``resume_from``. None: never.
        checkpoint_dir: where those checkpoints go (default: ``accumulators/`` in the run directory).
        resume_from: a checkpoint directory (or the run directory holding ``accumulators/``) of an
            interrupted run with the same settings and process count: its accumulators are loaded and
            the batches it had already seen are skipped; the scores equal an uninterrupted run's.
        keep_checkpoints: keep the checkpoints after the run completes (by default only the newest is
            kept while running, and it is removed once the run directory is complete).
        shard_loading: under FSDP2, build the model on the meta device, shard it, and let every rank read
            only its own rows from the checkpoint's safetensors files (false: every rank loads the whole
            checkpoint, then shards it). Checkpoints without safetensors are always loaded whole.
    """

    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        metric: Scorer | str | list[Scorer | str] = "grad_x_weight",
        k: int = 100,
        mode: Mode = "global",
        include: list[str] | str | None = None,
        exclude: list[str] | str | None = None,
        dtype: Dtype = "float32",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        save_scores: Literal["float32", "bfloat16", "off"] = "float32",
        checkpoint_every: int | None = None,
        checkpoint_dir: str | None = None,
        resume_from: str | None = None,
        keep_checkpoints: bool = False,
        shard_loading: bool = True,
    ) -> None:
        super().__init__()
        if checkpoint_every is not None and checkpoint_every < 1:
            raise CwaError(f"checkpoint_every must be at least 1, got {checkpoint_every}.")
        if k < 1:
            raise CwaError(f"k must be at least 1, got {k}.")
        if mode not in ("global", "per_layer"):
            raise CwaError(f"unknown mode '{mode}': use global or per_layer.")
        self.pretrained, self.k, self.mode = pretrained, k, mode
        self.include, self.exclude = as_patterns(include), as_patterns(exclude)
        for patterns, what in ((self.include, "include"), (self.exclude, "exclude")):
            compile_patterns(patterns, what)  # a bad regex fails here, before any model is loaded
        self.dtype_name, self.attn_implementation = dtype, attn_implementation
        self.trust_remote_code, self.revision, self.save_scores = trust_remote_code, revision, save_scores
        self.scorer = make_scorer(metric)
        preflight.check_scorer(self.scorer)
        self.keep_checkpoints, self.shard_loading = keep_checkpoints, shard_loading
        self.model: torch.nn.Module | None = None
        self.selected: dict[str, ParamInfo] = {}
        self.scores: dict[str, Tensor] = {}
        self.metric_scores: dict[str, dict[str, Tensor]] = {}  # a shared pass: each metric's scores
        self.timings: dict[str, float] = {}  # this module's phases: load_model_s, accumulate_s, reduce_s
        self.checkpoint_every, self.checkpoint_dir, self.resume_from = checkpoint_every, checkpoint_dir, resume_from
        self.resumed_batches = 0
        self.rank_memory: list[dict] | None = None
        self.sharded = False  # FSDP2: set with the model in configure_model, given to the scorer's bind
        self._ckpt_dir: Path | None = None
        self._started = 0.0

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self._preflight()
        start = time.perf_counter()
        strategy = self._trainer.strategy if self._trainer is not None else None
        check_supported_strategy(strategy)
        self.sharded = is_sharded_strategy(strategy)
        needed = self.scorer.required_attn_implementation()
        if needed and self.attn_implementation and self.attn_implementation != needed:
            raise CwaError(
                f"{self.scorer.name} with these settings needs attn_implementation '{needed}', "
                f"not '{self.attn_implementation}'."
            )
        files = self._shard_files() if self.sharded and self.shard_loading else []
        self.model, files = shard_loading.load_for_sharding(
            self.pretrained,
            files,
            self.dtype_name,
            attn_implementation=self.attn_implementation or needed,
            trust_remote_code=self.trust_remote_code,
            revision=self.revision,
        )
        if needed:
            set_attn_implementation(self.model, needed)
        self.select_parameters()
        if self.sharded:
            apply_fsdp2(self.model, strategy.root_device.type)
        if files:  # each rank reads its own rows only
            shard_loading.materialize(self.model, strategy.root_device)
            shard_loading.load_local_shards(self.model, files)
        self.timings["load_model_s"] = time.perf_counter() - start

    def _shard_files(self) -> list[Path]:
        """The safetensors files to shard-load from; [] (with a note) when the checkpoint has none."""
        files = shard_loading.checkpoint_files(self.pretrained, self.revision)
        if not files:
            shard_loading.note(
                f"'{self.pretrained}' has no safetensors files: every rank loads the whole checkpoint before sharding."
            )
        return files

    def _preflight(self) -> None:
        """Limits that are cheap to check before the weights are loaded (cwa.fit.preflight)."""
        seq_len = _data_attr(self, "seq_len") or 0
        preflight.check_context(self.pretrained, seq_len, self.trust_remote_code, self.revision)
        num_samples, batch_size = _data_attr(self, "num_samples"), _data_attr(self, "batch_size")
        if self._trainer is not None and num_samples and batch_size:
            preflight.check_processes(self._trainer.world_size, num_samples, batch_size)

    @property
    def checkpoint_directory(self) -> Path | None:
        """Where this run's checkpoints are written (None when it writes none)."""
        return self._ckpt_dir

    def select_parameters(self) -> None:
        """Select the scored tensors and freeze the rest (their gradients are never computed)."""
        chosen = select_parameters(self.model, self.include, self.exclude)
        check_k({name: info.numel for name, (_, info) in chosen.items()}, self.k, self.mode)
        for param in self.model.parameters():
            param.requires_grad_(False)
        for param, _ in chosen.values():
            param.requires_grad_(self.scorer.needs_data)
        self.selected = {name: info for name, (_, info) in chosen.items()}

    def bind_scorer(self) -> None:
        """Bind the scorer to the selected parameters as they are now: after sharding (FSDP2 replaces
        them with DTensors) and after the strategy moved them to their device."""
        if not self.selected:
            self.select_parameters()
        params = dict(self.model.named_parameters())
        self.scorer.bind({name: params[name] for name in self.selected}, sharded=self.sharded)
        self.scorer.attach(self.model)

    def loss_fn(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        return next_token_nll(self.model, batch)

    # -- loop ----------------------------------------------------------------------------------
    def idle_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """A loss that takes part in every collective of forward and backward but weighs nothing."""
        nll, _ = next_token_nll(self.model, batch)
        return nll * 0.0, 0

    def on_validation_epoch_start(self) -> None:
        self.bind_scorer()
        if self.checkpoint_every or self.resume_from:
            # trainer.log_dir is a collective in distributed runs: every rank asks for it.
            run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            self._ckpt_dir = Path(self.checkpoint_dir) if self.checkpoint_dir else run_dir / "accumulators"
        if self.resume_from:
            batches = self.trainer.num_val_batches[0] if self.trainer.num_val_batches else None
            self.resumed_batches = checkpoint.load(
                self.resume_from, self.scorer, self._fingerprint(), self.trainer, max_batches=batches
            )
        if self.scorer.repeats_passes:
            keep_freed_memory()  # released at the epoch's end
        self._started = time.perf_counter()

    def _fingerprint(self) -> dict:
        datamodule = getattr(self.trainer, "datamodule", None)
        fingerprint = getattr(datamodule, "fingerprint", None)
        return {
            "model": self.pretrained,
            "metric": self.scorer.name,
            "settings": self.scorer.settings(),
            "scored": list(self.selected),
            "data": fingerprint() if callable(fingerprint) else None,
            "batch_size": getattr(datamodule, "batch_size", None),
            "world_size": self.trainer.world_size,
        }

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if batch_idx < self.resumed_batches:
            return  # seen before the interruption; its contribution is in the loaded accumulators
        world, rank = self.trainer.world_size, self.trainer.global_rank
        filler = PAD_KEY in batch
        batch = {k: v for k, v in batch.items() if k != PAD_KEY}
        with torch.enable_grad():
            if not self.sharded:
                self.scorer.set_step(batch_idx * world + rank)
                self.scorer.update(batch, self.loss_fn)
            elif not self.scorer.turn_taking:
                self.scorer.set_step(batch_idx * world + rank)
                self._update(_idle_batch(batch, 1) if filler else batch, counting=not filler)
            else:
                self._take_turns(batch, batch_idx, 0 if filler else batch["input_ids"].shape[0])
        if self.checkpoint_every and (batch_idx + 1) % self.checkpoint_every == 0:
            checkpoint.save(self._ckpt_dir, self.scorer, batch_idx + 1, self._fingerprint(), self.trainer)
        self.log("calibration_nll", self.scorer.mean_loss, prog_bar=True, on_step=True, on_epoch=False, logger=False)

    def _update(self, batch: dict[str, Tensor], counting: bool) -> None:
        if counting:
            self.scorer.update(batch, self.loss_fn)
        else:  # another rank's turn or a filler batch: the same collectives, nothing counted
            self.scorer.take_part(batch, self.idle_loss)

    def _take_turns(self, batch: dict[str, Tensor], batch_idx: int, rows: int) -> None:
        """Score each rank's batch in turn (one small all-gather of batch sizes per step)."""
        import torch.distributed as dist

        world, rank = self.trainer.world_size, self.trainer.global_rank
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([rows], dtype=torch.long, device=self.device))
        for turn, size in enumerate(int(s) for s in sizes):
            if size == 0:
                continue  # that rank had only a filler batch this step
            self.scorer.set_step(batch_idx * world + turn)
            if turn == rank:
                self._update(batch, counting=True)
            else:
                # Same number of rows, so micro-batch loops run the same number of collectives.
                self._update(_idle_batch(batch, size), counting=False)

    def on_validation_epoch_end(self) -> None:
        self.timings["accumulate_s"] = time.perf_counter() - self._started
        release_freed_memory()  # the passes' activations and gradients are not needed for what follows
        start = time.perf_counter()
        if self.trainer.world_size > 1:
            self.scorer.reduce(all_reduce_sum)
        # Every rank must raise together (or none), or the others would wait in the next collective.
        bad = [(name, rank) for rank, names in enumerate(all_gather_objects(self.scorer.nonfinite())) for name in names]
        if bad:
            raise nonfinite_error(bad[0][0], next(iter(self.scorer.params.values())).dtype)
        if self.scorer.tokens == 0:
            raise CwaError("no calibration tokens were scored; check num_samples and the data.")
        if isinstance(self.scorer, SharedPass):
            self.metric_scores = self.scorer.compute_each()
        else:
            self.scores = self.scorer.compute()
        self.timings["reduce_s"] = time.perf_counter() - start
        # What this rank holds of the model and of the accumulators (row shards under FSDP2): the sizing check.
        held = {
            "weights_mib": sum(local_of(p).numel() * local_of(p).element_size() for p in self.model.parameters())
            / 2**20,
            "accumulators_mib": sum(
                t.numel() * t.element_size() for s in [self.scores, *self.metric_scores.values()] for t in s.values()
            )
            / 2**20,
        }
        self.rank_memory = all_gather_objects({**peak_memory(), "rss_at_scores_mib": _current_rss_mib(), **held})

    def configure_optimizers(self):  # noqa: D102 - scoring never optimizes
        return None


def _data_attr(module: L.LightningModule, name: str):
    """An attribute of the trainer's data module, or None before there is one."""
    trainer = module._trainer
    return getattr(getattr(trainer, "datamodule", None), name, None) if trainer is not None else None


def _idle_batch(batch: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """``rows`` copies of the first two tokens of ``batch``: the cheapest input that still runs every layer."""
    return {"input_ids": batch["input_ids"][:1, :2].expand(rows, 2).contiguous()}


def _current_rss_mib() -> float | None:
    """Resident memory now (Linux), beside the peak: after sharding, the peak still shows the full load."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None

"""Progress as plain lines where no terminal shows a progress bar (nohup, a batch scheduler, a pipe)."""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


class PlainProgress(L.Callback):
    """Prints ``cwa: scored batch i of n ...`` lines on global zero: after the first batch, then at most one
    every ``interval`` seconds, and after the last. Lightning's bar draws only on a terminal, so a run
    under nohup or a scheduler would otherwise say nothing for minutes.

    Args:
        interval: the least time between two lines, in seconds.
    """

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = float(interval)
        self._started = self._printed = 0.0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        self._printed = 0.0

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.is_global_zero:
            return
        total = trainer.num_val_batches[dataloader_idx] if trainer.num_val_batches else 0
        now = time.perf_counter()
        done = batch_idx + 1
        if done != 1 and done != total and now - self._printed < self.interval:
            return
        self._printed = now
        elapsed = now - self._started
        left = f", about {elapsed / done * (total - done):.0f} s left" if 0 < done < total else ""
        loss = getattr(getattr(pl_module, "scorer", None), "mean_loss", float("nan"))
        print(
            f"cwa: scored batch {done} of {total} ({elapsed:.0f} s{left}), calibration NLL {loss:.4f}",
            file=sys.stdout,
            flush=True,
        )


class ScoringBar(TQDMProgressBar):
    """Lightning's bar, saying what fit-sensitivity does (it runs in the validation loop)."""

    @property
    def validation_description(self) -> str:
        return "Scoring"


def use_plain_progress(trainer: L.Trainer, interval: float = 30.0) -> None:
    """On a stdout that is not a terminal, replace Lightning's progress bar with :class:`PlainProgress`; on a
    terminal, label the default bar "Scoring" rather than "Validation"."""
    if any(isinstance(c, PlainProgress) for c in trainer.callbacks):
        return
    if sys.stdout.isatty():
        trainer.callbacks[:] = [
            ScoringBar(c.refresh_rate) if type(c) is TQDMProgressBar else c for c in trainer.callbacks
        ]
        return
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, ProgressBar)]
    trainer.callbacks.append(PlainProgress(interval))

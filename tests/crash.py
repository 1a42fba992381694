"""A simulated kill for the resume tests: ``--trainer.callbacks+=crash.CrashAfter --trainer.callbacks.batches=N``
(``tests/`` is on the path of pytest and of the spawned test workers)."""

from __future__ import annotations

import lightning as L


class CrashAfter(L.Callback):
    """Raise after this process has seen ``batches`` validation batches (after the module's checkpoint).

    Args:
        batches: how many batches of this run to let through before the crash.
    """

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self.seen = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen += 1
        if self.seen >= self.batches:
            raise RuntimeError(f"CrashAfter({self.batches}): simulated crash after {self.seen} batches")


def crash_after(batches: int) -> list[str]:
    """The command-line options that add the crash."""
    return ["--trainer.callbacks+=crash.CrashAfter", f"--trainer.callbacks.batches={batches}"]

"""The Trainer with cwa's research verbs as methods (LightningCLI exposes them as subcommands)."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from cwa.artifacts import RunArtifacts
from cwa.data import CalibrationData
from cwa.distributed import check_supported_strategy
from cwa.module import SensitivityModule


class CwaTrainer(L.Trainer):
    """A ``lightning.Trainer`` with the ``fit_sensitivity`` research verb."""

    def fit_sensitivity(self, model: SensitivityModule, datamodule: CalibrationData | None = None) -> Path:
        """Score every selected weight over the calibration blocks and write the top-K run directory.

        Runs in the validation loop with gradients enabled and the model in eval mode, so every
        Lightning strategy, progress bar and logger applies."""
        # Before any model is loaded: FSDP1 is refused in one sentence (cwa.distributed explains why).
        check_supported_strategy(self.strategy)
        # Gradients are needed inside the loop: torch.inference_mode would forbid them.
        self.validate_loop.inference_mode = False
        # The data module shards blocks across ranks itself (no sampler padding duplicates a block).
        self._accelerator_connector.use_distributed_sampler = False
        if not any(isinstance(c, RunArtifacts) for c in self.callbacks):
            self.callbacks.append(RunArtifacts())
        self.validate(model, datamodule=datamodule, verbose=False)
        return model.run_dir

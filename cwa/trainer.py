"""The Trainer with cwa's research verbs as methods, and the LightningCLI that exposes them."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from cwa.callbacks import DEFAULT_CALLBACKS, FitCallback, FitResult
from cwa.data import CalibrationData
from cwa.distributed import check_supported_strategy, register_strategy_name
from cwa.module import SensitivityModule


class CwaTrainer(L.Trainer):
    """A ``lightning.Trainer`` with the ``fit_sensitivity`` research verb.

    The strategy name ``fsdp2`` needs :func:`cwa.distributed.register_strategy_name` to have run before
    the trainer is built (``run_fit_sensitivity`` does it).
    """

    fit_result: FitResult | None = None
    """The last ``fit_sensitivity`` run's result, filled in by the fit callbacks."""

    def fit_sensitivity(self, model: SensitivityModule, datamodule: CalibrationData | None = None) -> FitResult:
        """Score every selected weight over the calibration blocks and write the top-K run directory.

        Runs in the validation loop with gradients enabled and the model in eval mode, so every
        Lightning strategy, progress bar and logger applies. The fit callbacks (cwa.callbacks) that are
        not given are added with their defaults and all run in their pipeline order.

        Returns:
            The run's result: its directory, top-K, summary and timings (the summary on global zero only).
        """
        # Before any model is loaded: FSDP1 is refused in one sentence (cwa.distributed explains why).
        check_supported_strategy(self.strategy)
        # Gradients are needed inside the loop: torch.inference_mode would forbid them.
        self.validate_loop.inference_mode = False
        # The data module shards blocks across ranks itself (no sampler padding duplicates a block).
        self._accelerator_connector.use_distributed_sampler = False
        self._order_fit_callbacks()
        self.fit_result = FitResult()
        self.validate(model, datamodule=datamodule, verbose=False)
        return self.fit_result

    def _order_fit_callbacks(self) -> None:
        """Add each missing fit callback with its defaults; put them last, in pipeline order."""
        given = [c for c in self.callbacks if isinstance(c, FitCallback)]
        missing = [cls() for cls in DEFAULT_CALLBACKS if not any(isinstance(c, cls) for c in given)]
        others = [c for c in self.callbacks if not isinstance(c, FitCallback)]
        self.callbacks[:] = others + sorted(given + missing, key=lambda c: c.stage)


TRAINER_DEFAULTS = {
    "inference_mode": False,
    "use_distributed_sampler": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "cwa", "default_hp_metric": False},
    },
}


def run_fit_sensitivity(args: list[str], print_result: bool = True) -> Path | None:
    """``cwa fit-sensitivity ARGS`` as a function: parse the options (``--config`` files included) with
    LightningCLI, score, write the run directory and return it (None for ``-h`` / ``--print_config``).

    Args:
        args: the command line after ``fit-sensitivity``.
        print_result: print the run's summary and best weights (on global zero).
    """
    from lightning.pytorch.cli import LightningCLI

    register_strategy_name()

    class CwaCLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {"fit_sensitivity": {"model", "datamodule"}}

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("model.pretrained", "data.tokenizer")

        def after_fit_sensitivity(self) -> None:
            if print_result:
                from cwa.console import print_fit_result

                print_fit_result(self.trainer.fit_result)

    cli = CwaCLI(
        SensitivityModule,
        CalibrationData,
        trainer_class=CwaTrainer,
        args=["fit_sensitivity", *args],
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        auto_configure_optimizers=False,
    )
    result = getattr(getattr(cli, "trainer", None), "fit_result", None)
    return None if result is None else result.run_dir

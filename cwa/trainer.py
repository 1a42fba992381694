"""The Trainer with cwa's research verbs as methods, and the LightningCLI that exposes them."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L

from cwa.callbacks import DEFAULT_CALLBACKS, FitCallback, FitResult
from cwa.data import CalibrationData
from cwa.distributed import check_supported_strategy, register_strategy_name
from cwa.errors import argument_error
from cwa.module import SensitivityModule
from cwa.preflight import check_device, check_trainer
from cwa.rundir import remove_unfinished_run


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
        # Before any model is loaded: FSDP1 and flags that would quietly change the work are refused.
        check_supported_strategy(self.strategy)
        check_trainer(self)
        # Gradients are needed inside the loop: torch.inference_mode would forbid them.
        self.validate_loop.inference_mode = False
        # The data module shards blocks across ranks itself (no sampler padding duplicates a block).
        self._accelerator_connector.use_distributed_sampler = False
        self._order_fit_callbacks()
        self.fit_result = FitResult()
        try:
            self.validate(model, datamodule=datamodule, verbose=False)
        except SystemExit:
            if not self.interrupted:
                raise
            # Lightning turns Ctrl-C into a silent exit 1 and leaves SIGINT ignored: make it an interrupt.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._remove_unfinished_run()
            raise KeyboardInterrupt from None
        except BaseException:
            self._remove_unfinished_run()
            raise
        return self.fit_result

    def _remove_unfinished_run(self) -> None:
        """A run that failed leaves no ``version_N`` behind, unless it holds checkpoints to resume from."""
        logger = self.logger
        log_dir = getattr(logger, "log_dir", None) if logger is not None else None
        if not self.is_global_zero or not log_dir:
            return
        remove_unfinished_run(Path(log_dir))

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

        def before_instantiate_classes(self) -> None:
            # The requested device must exist before Lightning builds the Trainer (a traceback otherwise).
            trainer = self.config.get(str(self.subcommand), self.config).get("trainer", {})
            check_device(trainer.get("accelerator"), trainer.get("devices"))

        def after_fit_sensitivity(self) -> None:
            if print_result:
                from cwa.console import print_fit_result

                print_fit_result(self.trainer.fit_result)

    from jsonargparse import ArgumentError

    try:
        cli = CwaCLI(
            SensitivityModule,
            CalibrationData,
            trainer_class=CwaTrainer,
            args=["fit_sensitivity", *args],
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            trainer_defaults=TRAINER_DEFAULTS,
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False, "fit_sensitivity": {"exit_on_error": False}},
        )
    except ArgumentError as exc:
        raise argument_error("fit-sensitivity", exc) from None
    result = getattr(getattr(cli, "trainer", None), "fit_result", None)
    return None if result is None else result.run_dir

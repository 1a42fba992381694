"""The Trainer with cwa's research verbs as methods, and the LightningCLI that exposes them."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L

from cwa.common import smoke
from cwa.common.errors import CwaError, argument_error
from cwa.fit.callbacks import DEFAULT_CALLBACKS, FitCallback, FitResult, SharedPassRuns
from cwa.fit.data import CalibrationData
from cwa.fit.distributed import check_supported_strategy, is_sharded_strategy, register_strategy_name
from cwa.fit.module import SensitivityModule
from cwa.fit.preflight import check_context, check_device, check_hub, check_processes, check_trainer
from cwa.fit.progress import use_plain_progress
from cwa.rundir import ACCUMULATORS, next_version, remove_unfinished_metric_runs, remove_unfinished_run
from cwa.rundir.disk import DiskPlan
from cwa.scoring.shared_pass import SharedPass
from cwa.scoring.sizing import Memory


class CwaTrainer(L.Trainer):
    """A ``lightning.Trainer`` with the ``fit_sensitivity`` research verb.

    The strategy name ``fsdp2`` needs :func:`cwa.fit.distributed.register_strategy_name` to have run before
    the trainer is built (``run_fit_sensitivity`` does it).
    """

    fit_result: FitResult | None = None
    """The last ``fit_sensitivity`` run's result, filled in by the fit callbacks."""
    fit_results: list[FitResult] | None = None
    """A shared pass's results, one per metric in the order of ``model.metric`` (None for one metric)."""

    def fit_sensitivity(
        self, model: SensitivityModule, datamodule: CalibrationData | None = None, dry_run: bool = False
    ) -> FitResult | list[FitResult] | Memory:
        """Score every selected weight over the calibration blocks and write the top-K run directory.

        Runs in the validation loop with gradients enabled and the model in eval mode, so every
        Lightning strategy, progress bar and logger applies. The fit callbacks (cwa.fit.callbacks) that are
        not given are added with their defaults and all run in their pipeline order.

        Args:
            model: the module with the model and metric settings.
            datamodule: the calibration data.
            dry_run: only print the memory each rank would need (weights, gradients, accumulators and the
                metric's extras, from the model's config.json on the meta device, sharded as configured)
                and return it: no weights are loaded, no data is read, nothing is written and the
                configured accelerator need not be present.

        Returns:
            The run's result: its directory, top-K, summary and timings (the summary on global zero only);
            for a list of metrics (one shared pass) one such result per metric, each with its own run
            directory; with ``dry_run`` the per-rank memory estimate.
        """
        # Before any model is loaded: FSDP1 and flags that would quietly change the work are refused.
        check_supported_strategy(self.strategy)
        if dry_run:
            return dry_run_fit_sensitivity(model, self.world_size, is_sharded_strategy(self.strategy), datamodule)
        check_trainer(self)
        # Gradients are needed inside the loop: torch.inference_mode would forbid them.
        self.validate_loop.inference_mode = False
        # The data module shards blocks across ranks itself (no sampler padding duplicates a block).
        self._accelerator_connector.use_distributed_sampler = False
        shared = isinstance(model.scorer, SharedPass)
        self._number_run()
        self._order_fit_callbacks(shared)
        use_plain_progress(self)
        self.fit_result, self.fit_results = FitResult(), None
        try:
            self.validate(model, datamodule=datamodule, verbose=False)
        except SystemExit:
            if not self.interrupted:
                raise
            # Lightning turns Ctrl-C into a silent exit 1 and leaves SIGINT ignored: make it an interrupt.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._remove_unfinished_run(model)
            raise KeyboardInterrupt from None
        except BaseException:
            self._remove_unfinished_run(model)
            raise
        return self.fit_results if shared else self.fit_result

    def _number_run(self) -> None:
        """Give an unnumbered TensorBoard logger the next number free of every ``version_<n>`` and
        ``version_<n>-<metric>`` (its own count skips the latter, which outlive their pass's ``version_<n>``).
        One process only: the ranks of a launched run would race to list the directory."""
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = self.logger
        if isinstance(logger, TensorBoardLogger) and logger._version is None and self.world_size == 1:
            logger._version = next_version(Path(logger.root_dir))

    def _remove_unfinished_run(self, model: SensitivityModule) -> None:
        """A run that failed leaves no ``version_N`` behind, unless it holds checkpoints to resume from (nor,
        for a shared pass, an incomplete ``version_N-<metric>``)."""
        logger = self.logger
        log_dir = getattr(logger, "log_dir", None) if logger is not None else None
        if not self.is_global_zero or not log_dir:
            return
        if isinstance(model.scorer, SharedPass):
            remove_unfinished_metric_runs(Path(log_dir), list(model.scorer.members))
        remove_unfinished_run(Path(log_dir))

    def _order_fit_callbacks(self, shared: bool = False) -> None:
        """Add each missing fit callback with its defaults; put them last, in pipeline order (inside one
        :class:`SharedPassRuns` for a shared pass, which runs them once per metric)."""
        given = [c for c in self.callbacks if isinstance(c, FitCallback) and not isinstance(c, SharedPassRuns)]
        for wrapper in (c for c in self.callbacks if isinstance(c, SharedPassRuns)):
            given += wrapper.chain
        missing = [cls() for cls in DEFAULT_CALLBACKS if not any(isinstance(c, cls) for c in given)]
        others = [c for c in self.callbacks if not isinstance(c, FitCallback)]
        chain = sorted(given + missing, key=lambda c: c.stage)
        self.callbacks[:] = others + ([SharedPassRuns(chain)] if shared else chain)


def dry_run_fit_sensitivity(
    model: SensitivityModule, world_size: int, sharded: bool, datamodule: CalibrationData | None = None
) -> Memory:
    """Print and return the memory one rank of this fit-sensitivity run would need, without running it.

    The model is built on the meta device from its config.json (no weights), the selection and the metric's
    own restrictions (``Scorer.plan_scored``: Linear / Conv1D weights for wanda and obs) decide which tensors
    count, the metric's ``memory`` what it holds beside the weights, and the FSDP2
    plan (row shards over ``world_size`` ranks, one unit per decoder layer and the root) or DDP's
    replication decides what each rank holds (``cwa.scoring.sizing``).

    Args:
        model: the module with the model and metric settings (nothing is loaded into it).
        world_size: processes of the planned run (devices x nodes).
        sharded: FSDP2 (``ModelParallelStrategy``) rather than DDP or one process.
        datamodule: the calibration data, for the checks that need only its settings (it is not read).
    """
    import torch

    from cwa.model.loading import build_meta_model
    from cwa.model.params import select_parameters
    from cwa.scoring.sizing import format_memory, model_layout, plan_memory
    from cwa.scoring.topk import check_k

    scorer = model.scorer
    scorer.check_plan(model.dtype_name, sharded)
    if datamodule is not None:
        check_context(model.pretrained, datamodule.seq_len, model.trust_remote_code, model.revision)
        check_processes(world_size, datamodule.num_samples, datamodule.batch_size)
    meta = build_meta_model(model.pretrained, model.dtype_name, model.trust_remote_code, model.revision)
    chosen = select_parameters(meta, model.include, model.exclude)
    check_k({name: info.numel for name, (_, info) in chosen.items()}, model.k, model.mode)
    scored, widths = scorer.plan_scored(meta, {name: param for name, (param, _) in chosen.items()})
    layout = model_layout(meta, scored, world_size, sharded, widths)
    memory = plan_memory(layout, scorer, model.dtype_name, model.save_scores)
    plan = f"FSDP2, rows sharded over {world_size} ranks" if sharded else "replicated (DDP or one process)"
    options = ", ".join(f"{k}={v}" for k, v in scorer.settings().items())
    title = (
        f"Dry run of fit-sensitivity: {model.pretrained} in {model.dtype_name}, {world_size} process(es), {plan}; "
        f"metric {scorer.name}{f' ({options})' if options else ''}; {layout.scored:,} of {layout.total:,} "
        f"parameters scored in {len(scored)} tensors; largest FSDP unit {layout.largest_unit:,} parameters."
    )
    device = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = (props.name, props.total_memory)
    print(format_memory(memory, title, device), flush=True)
    print(_disk_table(model, meta, world_size, sharded), flush=True)
    return memory


def plan_run_disk(model: SensitivityModule, world_size: int, sharded: bool, meta: object | None = None) -> DiskPlan:
    """The bytes of every file this fit-sensitivity run writes (``cwa.rundir.disk``), from shapes alone.

    Args:
        model: the module with the model and metric settings (nothing is loaded into it).
        world_size: processes of the planned run.
        sharded: FSDP2 rather than DDP or one process.
        meta: the model built on the meta device (built here when None).
    """
    from cwa.model.loading import build_meta_model
    from cwa.model.params import select_parameters
    from cwa.rundir.disk import checkpoint_states, plan_disk

    if meta is None:
        meta = build_meta_model(model.pretrained, model.dtype_name, model.trust_remote_code, model.revision)
    chosen = select_parameters(meta, model.include, model.exclude)
    scored, _ = model.scorer.plan_scored(meta, {name: param for name, (param, _) in chosen.items()})
    infos = {name: chosen[name][1] for name in scored}
    bound = checkpoint_states(model.scorer, meta, {n: param for n, (param, _) in chosen.items()}, world_size, sharded)
    states, settings = bound if bound is not None else (None, {})
    fingerprint = {"model": model.pretrained, "metric": model.scorer.name, "settings": settings}
    fingerprint |= {"scored": list(chosen), "batch_size": None, "world_size": world_size}
    metric = next(iter(getattr(model.scorer, "members", None) or [model.scorer.name]))
    plan = plan_disk(infos, metric, model.pretrained, model.save_scores, model.k, model.mode, states, fingerprint)
    if not model.checkpoint_every and states is not None:
        plan.notes[f"{ACCUMULATORS}/"] = "only written with checkpoint_every"
    return plan


def _disk_table(model: SensitivityModule, meta: object, world_size: int, sharded: bool) -> str:
    from cwa.rundir.disk import format_disk

    plan = plan_run_disk(model, world_size, sharded, meta)
    metrics = list(getattr(model.scorer, "members", None) or [model.scorer.name])
    title = f"\nDisk per run directory (save_scores: {model.save_scores})"
    title += f", one run directory per metric ({len(metrics)}):" if len(metrics) > 1 else ":"
    table = format_disk(plan, title)
    return table if f"{ACCUMULATORS}/" in plan.files else table + "\naccumulators/: no figure for this metric"


class PlannedTrainer:
    """Stands in for the Trainer when ``cwa fit-sensitivity --dry_run true`` plans a run: the configured
    accelerator (8 GPUs, say) need not exist where the plan is made, so no Trainer is built.

    Args:
        accelerator: the configured ``trainer.accelerator``.
        devices: the configured ``trainer.devices``.
        num_nodes: the configured ``trainer.num_nodes``.
        strategy: the configured ``trainer.strategy`` (a name or a strategy instance).
    """

    fit_result: FitResult | None = None

    def __init__(self, accelerator: object, devices: object, num_nodes: int, strategy: object) -> None:
        self.world_size = _device_count(accelerator, devices) * max(int(num_nodes or 1), 1)
        self.strategy = _strategy_instance(strategy)
        check_supported_strategy(self.strategy)

    def fit_sensitivity(
        self, model: SensitivityModule, datamodule: CalibrationData | None = None, dry_run: bool = True
    ) -> Memory:
        return dry_run_fit_sensitivity(model, self.world_size, is_sharded_strategy(self.strategy), datamodule)


def _device_count(accelerator: object, devices: object) -> int:
    """The number of devices per node a Trainer would use, without building one."""
    import torch

    text = str(devices).strip() if devices is not None else "auto"
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text.lstrip("-").isdigit() and int(text) > 0:
        return int(text)
    name = str(accelerator or "auto").lower()
    if name in ("cpu", "mps") or (name == "auto" and not torch.cuda.is_available()):
        return 1
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    raise CwaError(
        f"trainer.devices={devices} cannot be resolved without the {name} devices here; set --trainer.devices "
        "to the number the run will use."
    )


def _strategy_instance(strategy: object) -> object:
    """A strategy name resolved through Lightning's registry (``fsdp2``, ``ddp``, ``fsdp``); instances as given."""
    if not isinstance(strategy, str):
        return strategy
    from lightning.pytorch.strategies import StrategyRegistry

    return StrategyRegistry.get(strategy) if strategy in StrategyRegistry else strategy


def _bare_dry_run(args: list[str]) -> list[str]:
    """``--dry_run`` alone means ``--dry_run true`` (jsonargparse wants a value for a bool)."""
    return [
        "--dry_run=true" if a == "--dry_run" and (i + 1 == len(args) or args[i + 1].startswith("-")) else a
        for i, a in enumerate(args)
    ]


def metric_class_names(args: list[str]) -> list[str]:
    """``--model.metric hutchinson_diag --model.metric.probes 8``: a short name followed by options of the
    metric becomes its class's import path, which jsonargparse can give options to (a short name is a plain
    string to it, and its options then end in a page of union errors).

    Args:
        args: the command line after ``fit-sensitivity``.
    """
    from cwa.scoring.metrics import METRICS

    if not any(a.startswith("--model.metric.") for a in args):
        return args
    out = list(args)
    for i, token in enumerate(args):
        name, equals, value = token.partition("=")
        if name != "--model.metric":
            continue
        if not equals and i + 1 < len(args):
            value = args[i + 1]
        if value in METRICS:
            cls = METRICS[value]
            path = f"{cls.__module__}.{cls.__qualname__}"
            if equals:
                out[i] = f"--model.metric={path}"
            else:
                out[i + 1] = path
    return out


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


def _check_devices(section: dict) -> None:
    """Before Lightning builds the Trainer (a traceback otherwise) and launches any process (the sentence is
    printed once): the requested devices exist and every process gets calibration data."""
    trainer = section.get("trainer", {})
    check_device(trainer.get("accelerator"), trainer.get("devices"))
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    data = section.get("data", {})
    samples, batch = data.get("num_samples"), data.get("batch_size")
    counted = isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit())
    if counted and isinstance(samples, int) and isinstance(batch, int) and batch > 0:
        check_processes(int(devices) * int(nodes), samples, batch)


def run_fit_sensitivity(args: list[str], print_result: bool = True) -> Path | list[Path] | None:
    """``cwa fit-sensitivity ARGS`` as a function: parse the options (``--config`` files included) with
    LightningCLI, score, write the run directory and return it (None for ``-h`` / ``--print_config``; one
    directory per metric, in the list's order, when ``model.metric`` is a list).

    Args:
        args: the command line after ``fit-sensitivity``.
        print_result: print the run's summary and best weights (on global zero).
    """
    from lightning.pytorch.cli import LightningCLI

    register_strategy_name()
    args = metric_class_names(_bare_dry_run(args))

    class CwaCLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {"fit_sensitivity": {"model", "datamodule"}}

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("model.pretrained", "data.tokenizer")

        def before_instantiate_classes(self) -> None:
            section = smoke.shrink(self.config.get(str(self.subcommand), self.config))
            check_hub(str(section.get("model", {}).get("pretrained", "")))
            if not section.get("dry_run"):  # a dry run plans for devices that need not be here
                _check_devices(section)

        def instantiate_trainer(self, **kwargs):
            section = self.config_init.get(str(self.subcommand), self.config_init)
            if not section.get("dry_run"):
                return super().instantiate_trainer(**kwargs)
            trainer = section.get("trainer", {})
            return PlannedTrainer(
                trainer.get("accelerator"), trainer.get("devices"), trainer.get("num_nodes"), trainer.get("strategy")
            )

        def after_fit_sensitivity(self) -> None:
            results = getattr(self.trainer, "fit_results", None) or [self.trainer.fit_result]
            if print_result:
                from cwa.fit.console import print_fit_result

                for result in results:
                    if result is not None:
                        print_fit_result(result)

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
    trainer = getattr(cli, "trainer", None)
    results = getattr(trainer, "fit_results", None)
    if results:
        return [r.run_dir for r in results]
    result = getattr(trainer, "fit_result", None)
    return None if result is None else result.run_dir

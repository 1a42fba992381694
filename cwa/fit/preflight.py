"""Checks that run before any weights are loaded: each refuses a setting the run cannot honour, in one sentence.

Every function here is cheap (it reads a model's ``config.json`` at most) and raises ``CwaError``:

* ``check_context``: ``seq_len`` beyond the model's context window.
* ``check_processes``: more processes than calibration batches.
* ``check_scorer``: absurd probe counts and finite-difference steps.
* ``check_hub``: a hub name while the hub is unreachable (:mod:`cwa.model.hub`).
* ``check_device``: an accelerator that is not there, or more devices than exist.
* ``check_writable``: an output directory that cannot be written.
* ``check_trainer``: Lightning Trainer flags that would make ``fit-sensitivity`` score only part of the
  data (or nothing), or write somewhere other than where the user asked, and still exit 0.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from cwa.common.errors import CwaError
from cwa.model.hub import check_hub

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
MAX_PROBES = 1024
"""Hutchinson probes per batch beyond this are refused: each is a backward pass, and the estimate's error
falls as 1/sqrt(probes x batches), so more batches are the cheaper way to a tighter estimate."""


def model_context(pretrained: str, trust_remote_code: bool = False, revision: str | None = None) -> int | None:
    """The context window (tokens) a model's config declares, read without loading any weights.

    Args:
        pretrained: the model name or directory, as ``model.pretrained`` takes it.
        trust_remote_code: passed to ``AutoConfig`` (custom configurations).
        revision: hub revision.

    Returns:
        The context length, or None where it cannot be read cheaply (the config declares none, or the
        embedded model has not been converted yet). A config that cannot be fetched at all returns None
        too: loading the model then reports why, in one sentence.
    """
    from cwa.model.loading import embedded_cache, is_embedded, resolve_model_path

    if is_embedded(pretrained):
        config_file = embedded_cache(pretrained) / "config.json"
        if not config_file.exists():
            return None
        path = str(config_file.parent)
    else:
        check_hub(pretrained)
        path = resolve_model_path(pretrained)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception:  # unreachable hub, custom code: the model load that follows says what is wrong
        return None
    config = getattr(config, "get_text_config", lambda: config)()
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(pretrained: str, seq_len: int, trust_remote_code: bool = False, revision: str | None = None) -> None:
    """Refuse ``seq_len`` beyond the model's context window.

    Args:
        pretrained: the model name or directory.
        seq_len: tokens per calibration block.
        trust_remote_code: passed to ``AutoConfig``.
        revision: hub revision.
    """
    context = model_context(pretrained, trust_remote_code, revision)
    if context is not None and seq_len > context:
        raise CwaError(
            f"seq_len={seq_len} is beyond the context of '{pretrained}' ({context} tokens); "
            f"use --data.seq_len {context} or less."
        )


def check_processes(world_size: int, num_samples: int, batch_size: int) -> None:
    """Refuse more processes than calibration batches (a process without a batch has nothing to score).

    Args:
        world_size: number of processes (devices x nodes).
        num_samples: calibration blocks.
        batch_size: blocks per batch.
    """
    batches = -(-num_samples // batch_size)
    if world_size > batches:
        raise CwaError(
            f"{world_size} processes but only {batches} calibration batches (num_samples={num_samples}, "
            f"batch_size={batch_size}); use at most {batches} devices, or more samples or a smaller batch_size."
        )


def check_scorer(scorer: Any) -> None:
    """Refuse probe counts and finite-difference steps that cannot give a useful estimate.

    Args:
        scorer: a ``cwa.scoring.scorers.Scorer``; only the options it has are checked.
    """
    probes = getattr(scorer, "probes", None)
    if probes is not None and not 1 <= probes <= MAX_PROBES:
        raise CwaError(
            f"probes={probes} is outside 1..{MAX_PROBES}; more calibration samples tighten the estimate "
            "more cheaply than more probes per batch."
        )
    eps = getattr(scorer, "fd_eps", None)
    if eps is not None and not (math.isfinite(eps) and 0 < eps < 1):
        raise CwaError(f"fd_eps={eps} must be a small positive relative step (e.g. 1e-4).")


def check_device(accelerator: str | None, devices: Any) -> None:
    """Refuse an accelerator that is not available, or more devices than it has.

    Args:
        accelerator: Lightning's ``accelerator`` (``cpu``, ``cuda``, ``gpu``, ``mps``, ``auto``...).
        devices: Lightning's ``devices`` (an int, a list of indices, a string, or ``auto``).
    """
    import torch

    name = (str(accelerator) if accelerator is not None else "auto").lower()
    if name in ("cuda", "gpu"):
        available, label = (torch.cuda.device_count() if torch.cuda.is_available() else 0), "CUDA GPU"
    elif name == "mps":
        mps = getattr(torch.backends, "mps", None)
        available, label = (1 if mps is not None and mps.is_available() else 0), "MPS device"
    else:
        return  # cpu (processes may outnumber cores), auto, or an accelerator Lightning checks itself
    if available == 0:
        raise CwaError(f"accelerator '{accelerator}' was requested but this machine has no {label}; use cpu or auto.")
    wanted = _device_count(devices)
    if wanted is not None and wanted > available:
        raise CwaError(
            f"devices={devices} asks for {wanted} but accelerator '{accelerator}' has {available} {label}(s)."
        )


def _device_count(devices: Any) -> int | None:
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1", ""):
            return None
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        try:
            return int(text)
        except ValueError:
            return None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    return None


def check_writable(directory: str | os.PathLike) -> None:
    """Fail now, in one sentence naming it, if ``directory`` cannot be created and written.

    Creates the directory (and its parents) if missing; writes and removes one empty probe file.

    Args:
        directory: where a run will write its outputs.
    """
    from cwa.common.io import os_error

    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cwa-write-check.", suffix=".tmp", dir=directory)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
    except OSError as exc:
        raise os_error(exc, directory) from None


def check_trainer(trainer: Any) -> None:
    """Refuse Trainer settings under which ``fit-sensitivity`` would quietly score less, or write elsewhere.

    Call it in ``CwaTrainer.fit_sensitivity`` before ``validate``.

    Args:
        trainer: the ``lightning.Trainer`` that will run fit-sensitivity.
    """
    if getattr(trainer, "fast_dev_run", False):
        raise CwaError(
            "trainer.fast_dev_run scores one batch and writes the run into the current directory; "
            "use a small --data.num_samples for a quick run instead."
        )
    overfit = getattr(trainer, "overfit_batches", 0)
    if overfit:
        raise CwaError(
            f"trainer.overfit_batches={overfit} would score a few batches repeatedly; use --data.num_samples."
        )
    limit = getattr(trainer, "limit_val_batches", 1.0)
    if not (isinstance(limit, float) and limit == 1.0):
        raise CwaError(
            f"trainer.limit_val_batches={limit} would score only part of the calibration blocks (or none); "
            "choose how many with --data.num_samples instead."
        )
    _check_nodes(trainer)
    _check_fit_only(trainer)
    _check_precision(trainer)
    _check_output_location(trainer)


_CLUSTER_VARIABLES = (
    "MASTER_ADDR",
    "NODE_RANK",
    "SLURM_NTASKS",
    "LSB_JOBID",
    "OMPI_COMM_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
)


def _check_nodes(trainer: Any) -> None:
    """Several nodes without a cluster launcher: every process would wait for nodes that never come."""
    nodes = getattr(trainer, "num_nodes", 1) or 1
    if nodes > 1 and not any(v in os.environ for v in _CLUSTER_VARIABLES):
        raise CwaError(
            f"trainer.num_nodes={nodes} but no cluster launcher started this process (no MASTER_ADDR, NODE_RANK "
            "or SLURM variables), so it would wait forever for the other nodes; start it with torchrun or srun "
            "on each node, or use num_nodes=1."
        )


def _check_fit_only(trainer: Any) -> None:
    """Training-loop options do nothing in fit-sensitivity (it runs Lightning's validation loop once)."""
    fit_loop = getattr(trainer, "fit_loop", None)
    epoch_loop = getattr(fit_loop, "epoch_loop", None)
    set_options = {
        "max_steps": getattr(fit_loop, "max_steps", -1) != -1,
        "min_steps": getattr(fit_loop, "min_steps", None) not in (None, -1, 0),
        "min_epochs": getattr(fit_loop, "min_epochs", None) not in (None, 0),
        "accumulate_grad_batches": getattr(trainer, "accumulate_grad_batches", 1) != 1,
        "gradient_clip_val": getattr(trainer, "gradient_clip_val", None) not in (None, 0, 0.0),
        "val_check_interval": getattr(trainer, "val_check_interval", 1.0) != 1.0,
        "check_val_every_n_epoch": getattr(trainer, "check_val_every_n_epoch", 1) not in (None, 1),
        "limit_train_batches": getattr(trainer, "limit_train_batches", 1.0) != 1.0,
    }
    if epoch_loop is not None and getattr(epoch_loop, "_max_steps", None) is not None:
        set_options["max_steps"] = set_options["max_steps"] or epoch_loop._max_steps not in (-1, None)
    flagged = [name for name, is_set in set_options.items() if is_set]
    if flagged:
        raise CwaError(
            f"trainer.{flagged[0]} is a training option and has no effect on fit-sensitivity, which scores "
            "every calibration batch exactly once; remove it (--data.num_samples and --data.batch_size set "
            "the work)."
        )


def _check_precision(trainer: Any) -> None:
    precision = str(getattr(trainer, "precision", "32-true"))
    if precision not in ("32-true", "32"):
        raise CwaError(
            f"trainer.precision={precision} is not how fit-sensitivity sets numeric precision (it would cast "
            "or autocast the model behind the scorer's back); use --model.dtype float32, bfloat16 or float16."
        )


def _check_output_location(trainer: Any) -> None:
    """The run directory comes from the logger: without one, or with default_root_dir beside one, the
    outputs would land somewhere other than where the user pointed."""
    loggers = list(getattr(trainer, "loggers", []) or [])
    if not loggers:
        raise CwaError(
            "fit-sensitivity needs a logger to name its run directory (trainer.logger is off); "
            "keep the default TensorBoardLogger and set --trainer.logger.init_args.save_dir DIR."
        )
    root = getattr(trainer, "_default_root_dir", None)
    save_dir = getattr(loggers[0], "save_dir", None)
    if root and Path(root).resolve() != Path.cwd().resolve() and save_dir is not None:
        save = Path(save_dir)
        if not save.is_absolute() or Path(root).resolve() not in save.resolve().parents:
            raise CwaError(
                f"trainer.default_root_dir={root} is ignored when a logger names the run directory "
                f"(it writes under '{save_dir}'); set --trainer.logger.init_args.save_dir {root} instead."
            )
    if save_dir is not None:
        check_writable(save_dir)

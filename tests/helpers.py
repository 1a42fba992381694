"""The test suite's shared ways to fit a tiny model and to make a run directory.

``fit_args`` is the one fit-sensitivity command line of the tests: each test states only the settings its
assertions depend on. ``write_run`` is the one way to make a complete run directory without running a fit:
it writes every file through :mod:`cwa.rundir`, as the fit-sensitivity callbacks do, ``summary.json`` last.
"""

from __future__ import annotations

from pathlib import Path

import torch

NO_FIGURES = ("--trainer.callbacks+=cwa.fit.callbacks.ScoreFigures", "--trainer.callbacks.enabled=false")


def fit_args(
    model_dir: Path | str | None,
    save_dir: Path,
    *extra: str,
    name: str | None = "tiny",
    seq_len: int = 32,
    num_samples: int = 6,
    batch_size: int | None = 4,
    k: int | None = None,
    accelerator: str | None = "cpu",
    figures: bool = True,
) -> list[str]:
    """The ``cwa fit-sensitivity`` arguments of a small run, logged under ``save_dir/name/version_<n>``.

    Args:
        model_dir: the model directory; None for the embedded default (SmolLM2-135M).
        save_dir: the logger's save directory.
        extra: further arguments, appended last, so they override the ones above.
        name: the experiment name; None keeps the config's.
        seq_len: tokens per calibration block.
        num_samples: calibration blocks.
        batch_size: blocks per batch; None keeps the default.
        k: the top-K size; None keeps the default.
        accelerator: the Trainer's accelerator; None leaves Lightning to choose (a visible GPU included).
        figures: False switches the figures callback off (it dominates a tiny run's time).
    """
    args = ["fit-sensitivity"]
    if model_dir is not None:
        args.append(f"--model.pretrained={model_dir}")
    if accelerator is not None:
        args.append(f"--trainer.accelerator={accelerator}")
    args += [f"--data.seq_len={seq_len}", f"--data.num_samples={num_samples}"]
    if batch_size is not None:
        args.append(f"--data.batch_size={batch_size}")
    if k is not None:
        args.append(f"--model.k={k}")
    args.append(f"--trainer.logger.init_args.save_dir={save_dir}")
    if name is not None:
        args.append(f"--trainer.logger.init_args.name={name}")
    args.append("--trainer.enable_progress_bar=false")
    if not figures:
        args += NO_FIGURES
    return [*args, *extra]


def fit(model_dir: Path | str | None, save_dir: Path, *extra: str, **settings) -> int:
    """Run ``cwa fit-sensitivity`` in process with :func:`fit_args`; its exit code."""
    from cwa.cli import main

    return main(fit_args(model_dir, save_dir, *extra, **settings))


def latest_run(save_dir: Path, name: str = "tiny") -> Path:
    """The newest ``version_<n>`` under ``save_dir/name``."""
    runs = sorted((Path(save_dir) / name).glob("version_*"), key=lambda p: (len(p.name), p.name))
    assert runs, f"no run directory under {Path(save_dir) / name}"
    return runs[-1]


def write_run(
    run: Path,
    scores: dict[str, torch.Tensor],
    *,
    weights: dict[str, torch.Tensor] | None = None,
    infos: dict | None = None,
    model: str = "tiny-llama",
    metric: str | dict = "grad_x_weight",
    mode: str = "global",
    k: int = 10,
    save_scores: bool = True,
    config: dict | None = None,
    perturb_rows: list[dict] | None = None,
    tensors: dict[str, dict] | None = None,
    **summary: object,
) -> Path:
    """A complete fit-sensitivity run directory at ``run``, written through :mod:`cwa.rundir`.

    Args:
        run: the directory to create (its parents too).
        scores: one score tensor per parameter; the top-K is selected from them as fit-sensitivity does.
        weights: the weights written into ``topk.csv``; zeros when None.
        infos: each parameter's :class:`cwa.model.params.ParamInfo`; derived from the names when None.
        model: ``summary.json``'s model.
        metric: the metric's name, or its whole summary entry.
        mode: ``global`` or ``per_layer``.
        k: the top-K size.
        save_scores: False leaves out ``scores.safetensors`` (readers then fall back to ``topk.csv``).
        config: written as ``config.yaml`` when given (perturb reads the model and data from it).
        perturb_rows: ``perturb.csv`` rows (strings or numbers per column), written with ``perturb.json``.
        tensors: ``summary.json``'s per-tensor statistics; shape, numel, abs_sum and topk_count when None.
        summary: further :class:`cwa.rundir.Summary` fields (tokens, mean_loss, seed, data, ...).
    """
    import yaml

    from cwa.model.params import ParamInfo, split_name
    from cwa.rundir import PerturbRow, Summary, write_perturbation, write_scores, write_summary, write_topk
    from cwa.scoring.topk import select_topk

    run = Path(run)
    run.mkdir(parents=True)
    if infos is None:
        infos = {n: ParamInfo(n, tuple(s.shape), *split_name(n)) for n, s in scores.items()}
    if weights is None:
        weights = {n: torch.zeros_like(s) for n, s in scores.items()}
    topk = select_topk(scores, k, mode)
    write_topk(run / "topk.csv", topk, infos, weights)
    if save_scores:
        metric_name = metric if isinstance(metric, str) else metric["name"]
        write_scores(run / "scores.safetensors", scores, "float32", {"metric": metric_name})
    if config is not None:
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    if tensors is None:
        counts = torch.bincount(topk.param, minlength=len(topk.names)).tolist()
        tensors = {
            n: {"shape": list(s.shape), "numel": s.numel(), "abs_sum": float(s.abs().double().sum()), "topk_count": c}
            for (n, s), c in zip(scores.items(), counts, strict=True)
        }
    if isinstance(metric, str):
        metric = {"name": metric, "signed": metric == "hutchinson_diag"}
    layout = {n: {"layer": i.layer, "module": i.module, "transposed": i.transposed} for n, i in infos.items()}
    summary.setdefault("layout", layout)
    summary.setdefault("topk_rows", len(topk))
    if perturb_rows:
        rows = [PerturbRow.parse({key: str(value) for key, value in row.items()}) for row in perturb_rows]
        write_perturbation(run, rows, {"run": str(run)})
    write_summary(run, Summary(model=model, metric=metric, mode=mode, k=k, tensors=tensors, **summary))
    return run


def latest_set(directory: Path, kind: str = "perturb") -> Path:
    """The newest numbered set of ``kind`` (``perturb/<n>/``, ``prune/<n>/``, ``protect/<n>/``) in a directory."""
    numbered = [p for p in (Path(directory) / kind).iterdir() if p.name.isdigit()]
    return max(numbered, key=lambda p: int(p.name))

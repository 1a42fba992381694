"""``cwa perturb``: perturb the top-K weights of a fit-sensitivity run and matched controls, measure the
held-out damage with bootstrap confidence intervals and paired tests.

The model is loaded once and never cloned: each condition writes its perturbation into the chosen
weights in place (one indexed write per tensor), runs one forward pass over the held-out blocks and
restores the saved bits, verified by checksum, also when the condition fails.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cwa.errors import CwaError
from cwa.io import atomic_open, write_json
from cwa.perturbations import (
    ChecksumCache,
    ControlUnavailable,
    MagnitudeBins,
    Perturbation,
    Selection,
    bottomk,
    perturbed,
    random_matched,
    selection_from,
    selection_size,
    topk_prefix,
)
from cwa.stats import SequenceStats, bootstrap_deltas, bootstrap_weights, paired_sign_flip_test
from cwa.topk import TopK

PERTURB_COLUMNS = [
    "condition", "perturbation", "target", "k", "rank", "seed", "n_weights", "perplexity", "nll", "accuracy",
    "delta_perplexity", "delta_perplexity_low", "delta_perplexity_high", "delta_nll", "delta_nll_low",
    "delta_nll_high", "delta_accuracy", "delta_accuracy_low", "delta_accuracy_high", "p_value", "p_value_vs",
]  # fmt: skip
CONTROLS = ("random_matched", "magnitude_matched", "bottomk")
Control = Literal["random_matched", "magnitude_matched", "bottomk"]


# -- the run being tested --------------------------------------------------------------------------
@dataclass
class Run:
    """What ``cwa perturb`` reads from a fit-sensitivity run directory."""

    path: Path
    model: dict
    data: dict
    summary: dict
    topk: TopK

    @property
    def scores_path(self) -> Path:
        return self.path / "scores.safetensors"


def _read_yaml(path: Path) -> dict:
    import yaml

    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def read_ranked_list(path: Path, names: list[str] | None = None) -> TopK:
    """The top-K list of ``topk.csv``, ordered by |score| (ties: parameter order, flat index).

    A ``per_layer`` list (K per tensor, tensors in turn) is re-ranked globally, so that its first K rows
    are the K highest scores in it, as for a ``global`` list.

    Args:
        path: the ``topk.csv`` file.
        names: the scored parameters in model order (from ``summary.json``); by first appearance if None.
    """
    import csv as _csv

    with open(path, newline="") as handle:
        rows = list(_csv.DictReader(handle))
    if not rows:
        raise CwaError(f"the top-K list {path} is empty.")
    missing = {"parameter", "index", "score"} - set(rows[0])
    if missing:
        raise CwaError(f"{path} is not a cwa top-K list (it lacks the columns {', '.join(sorted(missing))}).")
    names = list(names or [])
    position = {n: i for i, n in enumerate(names)}
    for row in rows:
        if row["parameter"] not in position:
            position[row["parameter"]] = len(names)
            names.append(row["parameter"])
    param = torch.tensor([position[r["parameter"]] for r in rows], dtype=torch.long)
    index = torch.tensor([int(r["index"]) for r in rows], dtype=torch.long)
    score = torch.tensor([float(r["score"]) for r in rows], dtype=torch.float32)
    # Stable sorts: by |score| descending, ties by parameter order then flat index.
    order = torch.argsort(index, stable=True)
    order = order[torch.argsort(param[order], stable=True)]
    order = order[torch.argsort(score[order].abs(), descending=True, stable=True)]
    return TopK(names=names, param=param[order], index=index[order], score=score[order])


def load_run(path: str | Path) -> Run:
    """Read a fit-sensitivity run directory, or fail with one sentence saying what is missing."""
    run_dir = Path(path).expanduser()
    if not run_dir.is_dir():
        raise CwaError(f"run directory '{path}' does not exist.")
    if not (run_dir / "topk.csv").exists():
        raise CwaError(
            f"'{path}' has no top-K list (topk.csv); point --run at a finished `cwa fit-sensitivity` run "
            "directory or pass --fit_config."
        )
    if not (run_dir / "config.yaml").exists():
        raise CwaError(f"'{path}' has no config.yaml, so the model and held-out data cannot be rebuilt.")
    config = _read_yaml(run_dir / "config.yaml")
    summary = {}
    if (run_dir / "summary.json").exists():
        import json

        summary = json.loads((run_dir / "summary.json").read_text())
    names = list(summary.get("layout", {})) or None
    topk = read_ranked_list(run_dir / "topk.csv", names)
    return Run(run_dir, dict(config.get("model") or {}), dict(config.get("data") or {}), summary, topk)


def build_data(run: Run, heldout_samples: int | None, batch_size: int | None):
    """The run's data module with the same settings, so its held-out split is the run's."""
    import importlib

    from cwa.data import CalibrationData

    settings = dict(run.data)
    source = settings.get("source", "pydoc")
    if isinstance(source, dict) and "class_path" in source:
        module, _, cls = source["class_path"].rpartition(".")
        source = getattr(importlib.import_module(module), cls)(**(source.get("init_args") or {}))
    settings["source"] = source
    settings.setdefault("tokenizer", run.model.get("pretrained", "smollm2-135m"))
    if heldout_samples is not None:
        settings["heldout_samples"] = heldout_samples
    if batch_size is not None:
        settings["batch_size"] = batch_size
    known = {
        "source",
        "tokenizer",
        "seq_len",
        "num_samples",
        "batch_size",
        "heldout_fraction",
        "heldout_samples",
        "seed",
        "num_workers",
    }
    data = CalibrationData(**{k: v for k, v in settings.items() if k in known})
    data.setup()
    return data


def run_fit_sensitivity(config: str, extra: list[str]) -> Path:
    """Run ``cwa fit-sensitivity --config CONFIG EXTRA...`` and return the run directory it created."""
    from cwa import cli

    if not Path(config).expanduser().exists():
        raise CwaError(f"fit config '{config}' does not exist.")
    settings = _read_yaml(Path(config).expanduser())
    logger = ((settings.get("trainer") or {}).get("logger") or {}).get("init_args") or {}
    save_dir = logger.get("save_dir", "lightning_logs")
    for flag in ("--trainer.logger.init_args.save_dir", "--trainer.default_root_dir"):
        if flag in extra[:-1]:
            save_dir = extra[extra.index(flag) + 1]
    root = Path(save_dir).expanduser()
    before = {p: p.stat().st_mtime for p in root.glob("**/summary.json")} if root.exists() else {}
    started = time.time()
    if cli.main(["fit-sensitivity", "--config", str(config), *extra]) != 0:
        raise CwaError(f"`cwa fit-sensitivity --config {config}` failed; see its message above.")
    fresh = [p for p in root.glob("**/summary.json") if p not in before or p.stat().st_mtime > before[p]]
    fresh = [p for p in fresh if p.stat().st_mtime >= started - 1]
    if not fresh:
        raise CwaError(f"fit-sensitivity finished but no new run directory appeared under {root}.")
    return max(fresh, key=lambda p: p.stat().st_mtime).parent


# -- evaluation ------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    stats: SequenceStats
    perplexity: float  # torchmetrics
    seconds: float


@torch.inference_mode()
def evaluate(model: torch.nn.Module, blocks: Tensor, batch_size: int, device: torch.device) -> Evaluation:
    """One forward pass over ``blocks``: per-sequence NLL sums, token counts, correct predictions, and
    the torchmetrics perplexity of the whole pass."""
    from torchmetrics.text import Perplexity

    start = time.perf_counter()
    metric = Perplexity().to(device)
    nll, tokens, correct = [], [], []
    for first in range(0, blocks.shape[0], batch_size):
        input_ids = blocks[first : first + batch_size].to(device)
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        labels = input_ids[:, 1:]
        token_nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        nll.append(token_nll.view(labels.shape).double().sum(1).cpu())
        tokens.append(torch.full((labels.shape[0],), labels.shape[1], dtype=torch.float64))
        correct.append((logits.argmax(-1) == labels).sum(1).double().cpu())
        metric.update(logits, labels)
    stats = SequenceStats(torch.cat(nll), torch.cat(tokens), torch.cat(correct))
    return Evaluation(stats, float(metric.compute()), time.perf_counter() - start)


# -- conditions ------------------------------------------------------------------------------------
@dataclass
class Condition:
    perturbation: Perturbation
    target: str
    k: int | None = None
    rank: int | None = None
    seed: int | None = None
    select: Callable[[], Selection] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        parts = [self.perturbation.kind, self.target]
        if self.rank is not None:
            parts.append(f"rank={self.rank}")
        elif self.k is not None:
            parts.append(f"k={self.k}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return "/".join(parts)


@dataclass
class Result:
    condition: Condition | None  # None: the baseline
    evaluation: Evaluation
    n_weights: int
    apply_restore_s: float = 0.0
    select_s: float = 0.0
    where: str = ""


def _seeded(*parts: int) -> torch.Generator:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def _where(topk: TopK, rank: int, layout: Mapping[str, dict], shapes: Mapping[str, tuple[int, ...]]) -> str:
    name = topk.names[int(topk.param[rank - 1])]
    index = int(topk.index[rank - 1])
    shape = shapes.get(name, ())
    if len(shape) == 2:
        r, c = divmod(index, shape[1])
        if layout.get(name, {}).get("transposed"):
            r, c = c, r
        return f"{name}[{r},{c}]"
    return f"{name}[{index}]"


def perturb(
    run: str | None = None,
    fit_config: str | None = None,
    fit_args: list[str] | None = None,
    perturbation: str | list[str] = "zero",
    ks: tuple[int, ...] = (1, 10, 100, 1000, 10000),
    single: int = 10,
    controls: tuple[str, ...] = CONTROLS,
    seeds: tuple[int, ...] = (0, 1, 2),
    factor: float = 0.0,
    sigma: float = 1.0,
    relative_to: Literal["weight", "tensor_std"] = "weight",
    bit: int | str = "exponent_msb",
    heldout_samples: int | None = None,
    heldout_tokens: int | None = None,
    batch_size: int | None = None,
    magnitude_bins: int = 100,
    bootstrap: int = 2000,
    permutations: int = 10000,
    confidence: float = 0.95,
    device: str = "auto",
    verify: bool = True,
    figures: bool = True,
    tensorboard: bool = True,
) -> Path:
    """Perturb the top-K weights of a fit-sensitivity run and matched controls; measure held-out damage.

    Args:
        run: a finished ``cwa fit-sensitivity`` run directory (with topk.csv, config.yaml, summary.json
            and, for the bottom-K control, scores.safetensors).
        fit_config: instead of ``run``: a fit-sensitivity YAML to run first; its new run directory is used.
        fit_args: extra fit-sensitivity options with ``fit_config``, e.g. ``[--model.k, "1000"]``.
        perturbation: one perturbation or a list: ``zero``, ``sign_flip``, ``scale``, ``gaussian_noise``,
            ``bit_flip``.
        ks: top-K sizes to perturb (a dose-response curve); each at most the length of the run's list.
        single: perturb each of the top ``single`` weights alone (0: no single-weight ablation).
        controls: controls of the same size for every K: ``random_matched`` (random weights, the same
            count from each tensor as the top-K set), ``magnitude_matched`` (random weights from the
            same |w| quantile bins), ``bottomk`` (lowest |score|, needs scores.safetensors).
        seeds: seeds of the random controls (each control is drawn once per seed and K).
        factor: the multiplier of ``scale``.
        sigma: the noise level of ``gaussian_noise``.
        relative_to: ``gaussian_noise`` scale: ``weight`` (sigma * |w|) or ``tensor_std`` (sigma * the
            tensor's standard deviation).
        bit: the bit ``bit_flip`` flips in the weight's storage format (fp32, bf16, fp16): ``sign``,
            ``exponent_msb`` or an index, 0 = least-significant mantissa bit.
        heldout_samples: evaluate at most this many held-out blocks (None: the run's setting).
        heldout_tokens: evaluate only the first this many tokens of each held-out block (None: whole
            blocks): more, shorter sequences for the same compute give the statistics more units.
        batch_size: held-out blocks per forward pass (None: the run's setting).
        magnitude_bins: number of |w| quantile bins of ``magnitude_matched``.
        bootstrap: bootstrap resamples (over held-out sequences) for the confidence intervals.
        permutations: random sign patterns of the paired test (exact enumeration up to 16 sequences).
        confidence: coverage of the confidence intervals.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        verify: checksum every touched tensor after restoring it (fails loudly if a bit differs).
        figures: write figures/perturb_dose_response.png and figures/perturb_single_weight.png.
        tensorboard: write TensorBoard scalars into the run directory.

    Returns:
        The run directory (with perturb.csv, perturb.json and the figures).
    """
    started = time.perf_counter()
    settings = dict(locals())
    kinds = [perturbation] if isinstance(perturbation, str) else list(perturbation)
    if not kinds:
        raise CwaError("give at least one perturbation.")
    perturbations = [Perturbation(kind, factor, sigma, relative_to, bit) for kind in kinds]
    for control in controls:
        if control not in CONTROLS:
            raise CwaError(f"unknown control '{control}': use {', '.join(CONTROLS)}.")
    ks = tuple(sorted(set(ks)))
    if any(k < 1 for k in ks):
        raise CwaError(f"every K must be at least 1, got {list(ks)}.")
    if single < 0:
        raise CwaError(f"single must be 0 or more, got {single}.")
    if not ks and not single:
        raise CwaError("nothing to perturb: give ks or single.")
    if heldout_samples is not None and heldout_samples < 1:
        raise CwaError("the held-out split is empty (heldout_samples < 1); evaluate at least one block.")
    if not 0 < confidence < 1:
        raise CwaError(f"confidence must be between 0 and 1, got {confidence}.")
    if (run is None) == (fit_config is None):
        raise CwaError("give exactly one of --run (a fit-sensitivity run directory) and --fit_config.")

    timings: dict[str, float] = {}
    if fit_config is not None:
        start = time.perf_counter()
        run = str(run_fit_sensitivity(fit_config, list(fit_args or [])))
        timings["fit_sensitivity_s"] = time.perf_counter() - start
    the_run = load_run(run)
    topk = the_run.topk
    from cwa.models import torch_dtype

    run_dtype = torch_dtype(the_run.summary.get("dtype") or the_run.model.get("dtype") or "float32")
    for p in perturbations:
        p.validate(run_dtype)  # a bad bit index fails before the model is loaded
    longest = max([*ks, single])
    if longest > len(topk):
        raise CwaError(
            f"K={longest} is larger than the run's top-K list ({len(topk)} weights); lower ks/single or rerun "
            "fit-sensitivity with a larger model.k."
        )

    from cwa.models import load_model

    start = time.perf_counter()
    model_cfg = the_run.model
    dtype = the_run.summary.get("dtype") or model_cfg.get("dtype") or "float32"
    model = load_model(
        model_cfg.get("pretrained", "smollm2-135m"),
        dtype,
        attn_implementation=model_cfg.get("attn_implementation"),
        trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
        revision=model_cfg.get("revision"),
    )
    target_device = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    model.to(target_device).requires_grad_(False)
    all_params = dict(model.named_parameters())
    unknown = [n for n in topk.names if n not in all_params]
    if unknown:
        raise CwaError(f"the run's top-K list names '{unknown[0]}', which this model does not have.")
    params = {n: all_params[n].data for n in topk.names}
    for p in perturbations:
        for dtype_ in {t.dtype for t in params.values()}:
            p.validate(dtype_)
    timings["load_model_s"] = time.perf_counter() - start

    start = time.perf_counter()
    data = build_data(the_run, heldout_samples, batch_size)
    blocks = data.heldout
    if blocks is None or blocks.shape[0] == 0:
        raise CwaError("the held-out split is empty; raise heldout_fraction or use a longer corpus.")
    if heldout_tokens is not None:
        if heldout_tokens < 2:
            raise CwaError(
                f"heldout_tokens must be at least 2 (a sequence predicts its next tokens), got {heldout_tokens}."
            )
        blocks = blocks[:, :heldout_tokens].contiguous()
    timings["data_s"] = time.perf_counter() - start
    notes: list[str] = []
    run_fingerprint = (the_run.summary.get("data") or {}).get("heldout_fingerprint")
    if heldout_samples is None and run_fingerprint and run_fingerprint != data.fingerprint("heldout"):
        notes.append("the held-out blocks differ from the run's (its heldout_fingerprint does not match).")

    # -- the conditions -------------------------------------------------------------------------
    bottom: TopK | None = None
    if "bottomk" in controls and ks:
        if the_run.scores_path.exists():
            from safetensors.torch import load_file

            start = time.perf_counter()
            scores = load_file(str(the_run.scores_path))
            bottom = bottomk({n: scores[n] for n in topk.names if n in scores}, max(ks))
            del scores
            timings["bottomk_select_s"] = time.perf_counter() - start
        else:
            notes.append("bottom-K skipped: the run has no scores.safetensors.")
    bins: MagnitudeBins | None = None
    if "magnitude_matched" in controls and ks:
        start = time.perf_counter()
        bins = MagnitudeBins(params, magnitude_bins)
        timings["magnitude_bins_s"] = time.perf_counter() - start

    conditions: list[Condition] = []
    for p in perturbations:
        for k in ks:
            conditions.append(Condition(p, "topk", k, select=lambda k=k: topk_prefix(topk, k)))
            for control in controls:
                if control == "bottomk":
                    if bottom is not None:
                        conditions.append(Condition(p, control, k, select=lambda k=k: topk_prefix(bottom, k)))
                    continue
                for s in seeds:
                    if control == "random_matched":
                        select = lambda k=k, s=s: random_matched(params, topk_prefix(topk, k), _seeded(s, k, 1))  # noqa: E731
                    else:
                        select = lambda k=k, s=s: bins.matched(topk_prefix(topk, k), _seeded(s, k, 2))  # noqa: E731
                    conditions.append(Condition(p, control, k, seed=s, select=select))
        for rank in range(1, single + 1):
            sel = lambda r=rank: selection_from(topk.names, topk.param[r - 1 : r], topk.index[r - 1 : r])  # noqa: E731
            conditions.append(Condition(p, "single", rank=rank, select=sel))

    # -- evaluate ---------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    eval_batch = batch_size or int(the_run.data.get("batch_size") or 4)
    checksums = ChecksumCache(params) if verify else None
    shapes = {n: tuple(t.shape) for n, t in params.items()}
    layout = the_run.summary.get("layout") or {}
    noise_seed = seeds[0] if seeds else 0
    results: list[Result] = []
    with tqdm(total=len(conditions) + 1, desc="cwa perturb", unit="condition", file=sys.stderr) as bar:
        baseline = Result(None, evaluate(model, blocks, eval_batch, target_device), 0)
        bar.update(1)
        for cond in conditions:
            bar.set_postfix_str(cond.name, refresh=False)
            start = time.perf_counter()
            try:
                selection = cond.select()
            except ControlUnavailable as exc:
                notes.append(f"{cond.name} skipped: {exc}")
                bar.update(1)
                continue
            select_s = time.perf_counter() - start
            start = time.perf_counter()
            generator = _seeded(cond.seed if cond.seed is not None else noise_seed, cond.k or 0, cond.rank or 0, 3)
            with perturbed(params, selection, cond.perturbation, generator, checksums):
                evaluation = evaluate(model, blocks, eval_batch, target_device)
            apply_restore_s = time.perf_counter() - start - evaluation.seconds
            where = _where(topk, cond.rank, layout, shapes) if cond.rank else ""
            results.append(Result(cond, evaluation, selection_size(selection), apply_restore_s, select_s, where))
            bar.update(1)

    # -- statistics and outputs -------------------------------------------------------------------
    weights = bootstrap_weights(len(baseline.evaluation.stats), bootstrap, seed=0)
    rows = [_row(baseline, baseline, weights, confidence, permutations, None)]
    topk_results = {(r.condition.perturbation.kind, r.condition.k): r for r in results if r.condition.target == "topk"}
    for result in results:
        reference = None
        if result.condition.target not in ("topk", "single"):
            reference = topk_results.get((result.condition.perturbation.kind, result.condition.k))
        rows.append(_row(result, baseline, weights, confidence, permutations, reference))

    run_dir = the_run.path
    write_perturb_csv(run_dir / "perturb.csv", rows)
    evals = [r.evaluation.seconds for r in results]
    overhead = [r.apply_restore_s for r in results]
    base_stats = baseline.evaluation.stats
    tm_gap = abs(baseline.evaluation.perplexity - base_stats.perplexity) / base_stats.perplexity
    timings.update(
        baseline_eval_s=baseline.evaluation.seconds,
        conditions=len(results),
        mean_eval_s_per_condition=sum(evals) / max(1, len(evals)),
        mean_apply_restore_s_per_condition=sum(overhead) / max(1, len(overhead)),
        max_apply_restore_s=max(overhead, default=0.0),
        mean_select_s_per_condition=sum(r.select_s for r in results) / max(1, len(results)),
    )
    if figures:
        from cwa import perturb_figures

        start = time.perf_counter()
        title = f"{the_run.summary.get('model', model_cfg.get('pretrained', ''))} · {_metric_name(the_run)}"
        if ks:
            perturb_figures.dose_response(rows, title, run_dir / "figures" / "perturb_dose_response.png")
        if single:
            where = {r.condition.name: r.where for r in results}
            perturb_figures.single_weight(rows, where, title, run_dir / "figures" / "perturb_single_weight.png")
        timings["figures_s"] = time.perf_counter() - start
    if tensorboard:
        _tensorboard(run_dir, rows)
    timings["total_s"] = time.perf_counter() - started
    from cwa.environment import environment, peak_memory

    settings.update(
        run=str(run_dir),
        ks=list(ks),
        controls=list(controls),
        seeds=list(seeds),
        perturbation=kinds,
        fit_args=list(fit_args or []),
    )
    write_json(
        run_dir / "perturb.json",
        {
            "status": "complete",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "settings": settings,
            "perturbations": [p.describe() for p in perturbations],
            "run": {
                "model": the_run.summary.get("model", model_cfg.get("pretrained")),
                "dtype": dtype,
                "metric": _metric_name(the_run),
                "mode": the_run.summary.get("mode", model_cfg.get("mode")),
                "topk_rows": len(topk),
            },
            "heldout": {
                "sequences": len(base_stats),
                "tokens": int(base_stats.tokens.sum()),
                "seq_len": int(blocks.shape[1]),
                "block_len": data.seq_len,
                "fingerprint": data.fingerprint("heldout"),
                "run_fingerprint": run_fingerprint,
                "calibration_fingerprint": data.fingerprint("calibration"),
            },
            "baseline": {
                **base_stats.values(),
                "torchmetrics_perplexity": baseline.evaluation.perplexity,
                "torchmetrics_relative_gap": tm_gap,
            },
            "device": str(target_device),
            "timings": {k: round(v, 4) if isinstance(v, float) else v for k, v in timings.items()},
            "memory": peak_memory(),
            "notes": notes,
            "environment": environment(),
        },
    )
    print_table(rows, the_run, base_stats, timings, notes, run_dir)
    return run_dir


def _metric_name(run: Run) -> str:
    metric = run.summary.get("metric")
    if isinstance(metric, dict):
        return str(metric.get("name", ""))
    metric = run.model.get("metric", "")
    return metric if isinstance(metric, str) else str((metric or {}).get("class_path", "")).rpartition(".")[2]


def _row(
    result: Result, baseline: Result, weights: Tensor, confidence: float, permutations: int, reference: Result | None
) -> dict:
    cond = result.condition
    stats = result.evaluation.stats
    deltas = bootstrap_deltas(baseline.evaluation.stats, stats, weights, confidence)
    row = {
        "condition": "baseline" if cond is None else cond.name,
        "perturbation": "" if cond is None else cond.perturbation.kind,
        "target": "baseline" if cond is None else cond.target,
        "k": None if cond is None else cond.k,
        "rank": None if cond is None else cond.rank,
        "seed": None if cond is None else cond.seed,
        "n_weights": result.n_weights,
        "perplexity": result.evaluation.perplexity,
        "nll": stats.mean_nll,
        "accuracy": stats.accuracy,
    }
    for metric in ("perplexity", "nll", "accuracy"):
        delta, low, high = deltas[metric]
        row[f"delta_{metric}"], row[f"delta_{metric}_low"], row[f"delta_{metric}_high"] = delta, low, high
    if cond is None:
        row["p_value"], row["p_value_vs"] = None, ""
    elif cond.target in ("topk", "single"):
        row["p_value"] = paired_sign_flip_test(stats, baseline.evaluation.stats, permutations)
        row["p_value_vs"] = "baseline"
    else:
        row["p_value"] = (
            None if reference is None else paired_sign_flip_test(reference.evaluation.stats, stats, permutations)
        )
        row["p_value_vs"] = "topk" if reference is not None else ""
    return row


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.9g}"
    return str(value)


def write_perturb_csv(path: Path, rows: list[dict]) -> None:
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PERTURB_COLUMNS)
        for row in rows:
            writer.writerow([_fmt(row[c]) for c in PERTURB_COLUMNS])


def _tensorboard(run_dir: Path, rows: list[dict]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        base = rows[0]
        writer.add_scalar("perturb/baseline_perplexity", base["perplexity"], 0)
        grouped: dict[tuple[str, str, int], list[float]] = {}
        for row in rows[1:]:
            if row["target"] == "single":
                writer.add_scalar(
                    f"perturb_{row['perturbation']}/single_delta_perplexity", row["delta_perplexity"], row["rank"]
                )
            else:
                grouped.setdefault((row["perturbation"], row["target"], row["k"]), []).append(row["delta_perplexity"])
        for (kind, target, k), values in grouped.items():
            # Random controls: the mean over seeds, one scalar per K.
            writer.add_scalar(f"perturb_{kind}/delta_perplexity/{target}", sum(values) / len(values), k)
    finally:
        writer.close()


def _signed(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:+.{digits}g}"


def _p(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else (f"{value:.3g}" if value >= 1e-3 else "<1e-3")


def print_table(
    rows: list[dict], run: Run, base: SequenceStats, timings: dict, notes: list[str], run_dir: Path
) -> None:
    """The concise summary a user reads at the end: Δ perplexity per K for top-K and each control."""
    print()
    print(
        f"cwa perturb: {run.summary.get('model', '')} · {_metric_name(run)} top-K · {len(base)} held-out "
        f"sequences ({int(base.tokens.sum()):,} tokens)"
    )
    print(f"  baseline: perplexity {base.perplexity:.4g}, NLL {base.mean_nll:.4f}, accuracy {base.accuracy:.4f}")
    kinds = list(dict.fromkeys(r["perturbation"] for r in rows[1:]))
    targets = [t for t in ("random_matched", "magnitude_matched", "bottomk") if any(r["target"] == t for r in rows)]
    short = {"random_matched": "random", "magnitude_matched": "magnitude", "bottomk": "bottom-K"}
    for kind in kinds:
        mine = [r for r in rows[1:] if r["perturbation"] == kind]
        ks = sorted({r["k"] for r in mine if r["target"] == "topk"})
        if ks:
            print(f"  {kind}: Δ perplexity [95% CI]; controls: mean Δ over seeds (largest p of top-K vs control)")
            header = f"  {'K':>6}  {'top-K':>28}" + "".join(f"  {short[t]:>22}" for t in targets)
            print(header)
            for k in ks:
                top = next(r for r in mine if r["target"] == "topk" and r["k"] == k)
                line = (
                    f"  {k:>6}  {_signed(top['delta_perplexity']):>9} "
                    f"[{_signed(top['delta_perplexity_low'])}, {_signed(top['delta_perplexity_high'])}]"
                )
                line = f"{line:<38}"
                for t in targets:
                    ctl = [r for r in mine if r["target"] == t and r["k"] == k]
                    if not ctl:
                        line += f"  {'-':>22}"
                        continue
                    mean = sum(r["delta_perplexity"] for r in ctl) / len(ctl)
                    ps = [r["p_value"] for r in ctl if r["p_value"] is not None]
                    cell = f"{_signed(mean)} (p {_p(max(ps)) if ps else '-'})"
                    line += f"  {cell:>22}"
                print(line)
        singles = [r for r in mine if r["target"] == "single"]
        if singles:
            print(f"  {kind}, each of the top {len(singles)} weights alone: Δ perplexity [95% CI] (p vs baseline)")
            for r in singles:
                print(
                    f"  {r['rank']:>6}  {_signed(r['delta_perplexity']):>9} [{_signed(r['delta_perplexity_low'])}, "
                    f"{_signed(r['delta_perplexity_high'])}]  (p {_p(r['p_value'])})"
                )
    for note in notes:
        print(f"  note: {note}")
    per = timings.get("mean_eval_s_per_condition", 0.0)
    print(
        f"  {timings.get('conditions', 0)} conditions, {per:.2f} s per condition (evaluation), "
        f"{timings.get('mean_apply_restore_s_per_condition', 0.0) * 1000:.1f} ms perturb+restore; "
        f"total {timings.get('total_s', 0.0):.1f} s"
    )
    print(f"  results: {run_dir / 'perturb.csv'}")


def main(argv: list[str]) -> int:
    """``cwa perturb ARGS``: parse the signature-driven configuration and run :func:`perturb`."""
    from jsonargparse import CLI

    CLI(perturb, args=list(argv), as_positional=False, prog="cwa perturb")
    return 0

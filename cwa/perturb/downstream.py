"""Downstream accuracy through lm-evaluation-harness (the optional ``cwa[eval]`` extra).

:class:`DownstreamTasks` runs ``lm_eval.simple_evaluate`` on the live, in-memory model (``HFLM(pretrained=
model)``: no copy, no save), so ``--tasks`` measures each condition with its perturbation (``cwa perturb``),
pruning (``cwa prune``) or stress (``cwa protect``) written into the weights in place; the three commands
share this module (:func:`tasks_from_option`, :meth:`DownstreamTasks.run`). ``log_samples=True`` gives each
item's correctness, so a condition is compared with the baseline item by item (:func:`downstream_rows`).

cwa ships one local task that runs offline, ``cwa_pydoc_lastword`` (LAMBADA-style last-word prediction built
from the run's *held-out* text, never from calibration text; see :func:`lastword_items`). It is written at run
time into a temporary directory (a task YAML and a JSON-lines file) and found through lm-eval's
``TaskManager(include_path=...)``. Hub tasks (hellaswag, arc_easy, piqa, winogrande, lambada) pass straight
through to lm-eval; they need the Hugging Face Hub or its local cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cwa.ablation.stats import bootstrap_weights, mcnemar_exact, mean_over_seeds, paired_mean_interval
from cwa.common import format as fmt
from cwa.common.errors import CwaError
from cwa.rundir import ConditionKind, DownstreamRow

LOCAL_TASK = "cwa_pydoc_lastword"
MAX_ITEMS = 500
"""Items of the local task: at most this many, spread evenly over the held-out text (deterministic)."""
MIN_CONTEXT_WORDS = 8
"""An item's context has at least this many words, so the last word is predictable from it."""
INSTALL = "install the eval extra: pip install 'cwa[eval]'"

_SENTENCE_END = re.compile(r"(?<=\S) ([A-Za-z]+)[.!?](?= |$)")


def tasks_from_option(
    tasks: str | list[str] | None, limit: int | None = None, batch_size: int = 8
) -> DownstreamTasks | None:
    """The lm-eval tasks of ``--tasks`` (None without it; a list or a comma-separated string), with the
    ``--tasks_limit`` and ``--tasks_batch_size`` options; a missing lm-eval fails here, before any work."""
    if tasks is None:
        return None
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    return DownstreamTasks([t for t in names if t], limit, batch_size)


def task_settings(tasks: DownstreamTasks | None) -> dict:
    """The ``--tasks`` options as a command's json records them under ``settings``."""
    return {
        "tasks": tasks.tasks if tasks else None,
        "tasks_limit": tasks.limit if tasks else None,
        "tasks_batch_size": tasks.batch_size if tasks else None,
    }


def task_meta(tasks: DownstreamTasks | None, seconds_per_perplexity_condition: float) -> dict | None:
    """What a command's json records under ``downstream`` (None without ``--tasks``): the tasks, the local
    task's items and fingerprint, and an lm-eval pass's time beside a held-out pass's."""
    if tasks is None:
        return None
    return {**tasks.describe(), "seconds_per_perplexity_condition": seconds_per_perplexity_condition}


def require_lm_eval() -> None:
    """Raise one CwaError sentence when lm-evaluation-harness is not installed."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        missing = exc.name or "lm_eval"
        if missing.split(".")[0] != "lm_eval":  # installed, but one of its dependencies is not
            raise CwaError(f"lm-evaluation-harness cannot import '{missing}'; re{INSTALL}.") from None
        raise CwaError(f"--tasks needs lm-evaluation-harness; {INSTALL}.") from None


# -- the local task's items ------------------------------------------------------------------------
def heldout_pieces(
    texts: list[str], tokenizer, seq_len: int, heldout_fraction: float, prefix_len: int = 0
) -> list[str]:
    """The text of the documents inside the held-out blocks of :class:`cwa.fit.data.CalibrationData`.

    The token stream is laid out as :func:`cwa.fit.data.tokenize_stream` does (each document, then EOS); the
    held-out blocks are the last ``round(n_blocks · heldout_fraction)`` blocks of ``seq_len`` tokens, each
    ``prefix_len`` special tokens and then ``seq_len - prefix_len`` tokens of the stream. A
    document cut by the start or end of that region keeps only its paragraphs wholly inside it (the
    token offsets of a fast tokenizer map the cut back to characters); no calibration block ever holds
    a returned character.

    Args:
        texts: the corpus documents, in order.
        tokenizer: the run's (fast) tokenizer.
        seq_len: tokens per block.
        heldout_fraction: share of the blocks held out.
        prefix_len: special tokens at the start of each block (``CalibrationData.prefix``).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise CwaError(f"the local task {LOCAL_TASK} needs a fast tokenizer (its offsets map tokens to text).")
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    eos = 1 if tokenizer.eos_token_id is not None else 0
    lengths = [len(ids) + eos for ids in encoded["input_ids"]]
    content = seq_len - prefix_len
    n_blocks = sum(lengths) // content
    first = (n_blocks - int(round(n_blocks * heldout_fraction))) * content
    end = n_blocks * content
    pieces, start = [], 0
    for text, offsets, length in zip(texts, encoded["offset_mapping"], lengths, strict=True):
        lo, hi = max(first - start, 0), min(end - start, length - eos)
        start += length
        if lo >= hi:
            continue
        piece = text[offsets[lo][0] : offsets[hi - 1][1]]
        paragraphs = re.split(r"\n\s*\n", piece)
        if lo > 0:  # the region starts inside this document: its first paragraph is cut
            paragraphs = paragraphs[1:]
        if hi < length - eos:  # ... or ends inside it
            paragraphs = paragraphs[:-1]
        pieces.append("\n\n".join(paragraphs))
    return [p for p in pieces if p.strip()]


def lastword_items(pieces: list[str], max_items: int = MAX_ITEMS) -> list[dict[str, str]]:
    """LAMBADA-style items: each sentence of a paragraph that ends in an alphabetic word (then ``.``, ``!``
    or ``?``) gives the context (the paragraph up to that word, whitespace runs joined into one space, at
    least :data:`MIN_CONTEXT_WORDS` words) and the target ``" " + word``; at most ``max_items``, spread
    evenly over the candidates in corpus order.

    Args:
        pieces: held-out text (from :func:`heldout_pieces`).
        max_items: at most this many items.
    """
    candidates = []
    for piece in pieces:
        for paragraph in re.split(r"\n\s*\n", piece):
            flat = " ".join(paragraph.split())
            for match in _SENTENCE_END.finditer(flat):
                context = flat[: match.start()]
                if len(context.split()) >= MIN_CONTEXT_WORDS:
                    candidates.append({"context": context, "target": " " + match.group(1)})
    if len(candidates) <= max_items:
        return candidates
    return [candidates[i * len(candidates) // max_items] for i in range(max_items)]


def local_items(data, tokenizer, max_items: int = MAX_ITEMS) -> list[dict[str, str]]:
    """The local task's items from a set-up :class:`cwa.fit.data.CalibrationData`'s held-out text.

    Args:
        data: the run's data module (its source, ``seq_len`` and ``heldout_fraction``).
        tokenizer: the run's tokenizer.
        max_items: at most this many items.
    """
    pieces = heldout_pieces(
        data.source.load(), tokenizer, data.seq_len, data.heldout_fraction, len(getattr(data, "prefix", []))
    )
    return lastword_items(pieces, max_items)


def items_fingerprint(items: list[dict[str, str]]) -> str:
    """sha256 (first 16 hex digits) of the items as canonical JSON lines."""
    text = "\n".join(json.dumps(item, sort_keys=True, ensure_ascii=False) for item in items)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def write_local_task(items: list[dict[str, str]], directory: Path) -> Path:
    """Write the local task (``<name>.yaml`` and ``<name>.jsonl``) into ``directory``; return it."""
    data = directory / f"{LOCAL_TASK}.jsonl"
    data.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    config = {
        "task": LOCAL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{target}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (directory / f"{LOCAL_TASK}.yaml").write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return directory


# -- running lm-eval -------------------------------------------------------------------------------
@dataclass
class TaskResult:
    """One task under one condition: per-item correctness (0/1, by lm-eval's doc id) and wall time."""

    correct: Tensor
    seconds: float

    @property
    def accuracy(self) -> float:
        return float(self.correct.double().mean()) if self.correct.numel() else math.nan


class DownstreamTasks:
    """lm-eval tasks evaluated on a live model, the local task built from the run's held-out text.

    Args:
        tasks: lm-eval task names (``cwa_pydoc_lastword`` and/or hub tasks).
        limit: evaluate at most this many items per task (None: all).
        batch_size: lm-eval batch size.
        max_items: items of the local task (at most).
    """

    def __init__(
        self, tasks: list[str], limit: int | None = None, batch_size: int = 8, max_items: int = MAX_ITEMS
    ) -> None:
        require_lm_eval()
        if not tasks:
            raise CwaError("--tasks names no task.")
        if limit is not None and limit < 1:
            raise CwaError(f"tasks_limit must be at least 1, got {limit}.")
        if batch_size < 1:
            raise CwaError(f"tasks_batch_size must be at least 1, got {batch_size}.")
        self.tasks, self.limit, self.batch_size, self.max_items = list(tasks), limit, batch_size, max_items
        self.items: list[dict[str, str]] = []
        self.timings: dict[str, float] = {}
        self.conditions: list[str] = []
        self.correct: dict[str, dict[str, Tensor]] = {}  # per condition (baseline first), per task: 0/1 per item
        self.add_bos_token: bool | None = None
        self._directory: tempfile.TemporaryDirectory | None = None

    def setup(self, data, trust_remote_code: bool = False) -> None:
        """Load the run's tokenizer, build the local task from the run's held-out text (when asked for) and
        load every task (:meth:`prepare`).

        Args:
            data: the run's set-up :class:`cwa.fit.data.CalibrationData`.
            trust_remote_code: passed to the tokenizer.
        """
        from cwa.model.loading import load_tokenizer

        start = time.perf_counter()
        self.tokenizer = load_tokenizer(data.tokenizer_name, trust_remote_code=trust_remote_code)
        # lm-eval scores each item the way the run's blocks start: as the tokenizer starts a text (None: its
        # defaults), or with no special token for runs on the raw stream.
        self.add_bos_token = None if getattr(data, "block_start", "none") == "tokenizer" else False
        self.prepare(local_items(data, self.tokenizer) if LOCAL_TASK in self.tasks else None)
        self.timings["prepare_s"] = time.perf_counter() - start

    def run(
        self,
        model: torch.nn.Module,
        conditions: list[tuple[str, Callable[[], AbstractContextManager]]],
        resamples: int = 2000,
        confidence: float = 0.95,
        command: str = "cwa perturb",
    ) -> list[DownstreamRow]:
        """Every task on the baseline, then under each condition, and the rows of ``downstream.csv``.

        Args:
            model: the live model (after :meth:`setup`); conditions write into its weights in place.
            conditions: (name, a function returning the context manager that applies the condition's
                perturbation and restores it on exit).
            resamples: bootstrap resamples of the intervals.
            confidence: their coverage.
            command: the progress bar's label.
        """
        from tqdm.auto import tqdm

        results = []
        try:
            baseline = self.evaluate(model, self.tokenizer)
            bar = tqdm(conditions, desc=f"{command}: lm-eval", unit="condition", file=sys.stderr)
            for name, perturbation in bar:
                with perturbation():
                    results.append((name, self.evaluate(model, self.tokenizer)))
        finally:
            self.close()
        seconds = [sum(r.seconds for r in result.values()) for _, result in results]
        self.timings["baseline_s"] = sum(r.seconds for r in baseline.values())
        self.timings["mean_s_per_condition"] = sum(seconds) / max(1, len(seconds))
        self.conditions = [name for name, _ in results]
        for name, result in [(ConditionKind.BASELINE.value, baseline), *results]:
            self.correct[name] = {task: r.correct for task, r in result.items()}
        return downstream_rows(baseline, results, resamples, confidence)

    def prepare(self, items: list[dict[str, str]] | None = None) -> None:
        """Write the local task (when asked for) and check that every task loads, before any evaluation.

        Args:
            items: the local task's items (from :func:`local_items`); needed when it is among the tasks.
        """
        from lm_eval.tasks import TaskManager

        self._directory = tempfile.TemporaryDirectory(prefix="cwa-tasks-")
        if LOCAL_TASK in self.tasks:
            if not items:
                raise CwaError(f"the held-out text yields no {LOCAL_TASK} items; raise data.heldout_fraction.")
            self.items = list(items)
            write_local_task(self.items, Path(self._directory.name))
        # indexing lm-eval's own tasks takes half a minute: only when a hub task is asked for
        hub = any(task != LOCAL_TASK for task in self.tasks)
        if hub:
            _check_hub_tasks([task for task in self.tasks if task != LOCAL_TASK])
        with quiet_lm_eval():
            self.manager = TaskManager(include_path=self._directory.name, include_defaults=hub)
            for task in self.tasks:
                self._load(task)

    def _load(self, task: str) -> None:
        from lm_eval.tasks import get_task_dict

        if task not in self.manager.all_tasks:
            raise CwaError(f"lm-eval has no task '{task}' (`lm_eval --tasks list` lists them).")
        try:
            get_task_dict([task], self.manager)
        except Exception as exc:
            raise CwaError(
                f"lm-eval cannot load the task '{task}' ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                f"hub tasks need the Hugging Face Hub or its cache, {LOCAL_TASK} runs offline."
            ) from None

    def evaluate(self, model: torch.nn.Module, tokenizer) -> dict[str, TaskResult]:
        """Each task on ``model`` as it is now (in place, nothing copied): per-item correctness and time.

        Args:
            model: a Hugging Face causal LM (on its device).
            tokenizer: its tokenizer.
        """
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        with quiet_lm_eval():  # it warns that a live model, not a name, was passed: what cwa means to do
            lm = HFLM(
                pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, add_bos_token=self.add_bos_token
            )
        out = {}
        for task in self.tasks:
            start = time.perf_counter()
            with quiet_lm_eval():
                results = simple_evaluate(
                    model=lm,
                    tasks=[task],
                    task_manager=self.manager,
                    limit=self.limit,
                    log_samples=True,
                    bootstrap_iters=0,
                )
            seconds = time.perf_counter() - start
            samples = results["samples"]  # a group (``lambada``) gives one entry per member task
            for name in sorted(samples):
                out[name] = TaskResult(_correct(name, samples[name]), seconds / len(samples))
        return out

    def describe(self) -> dict:
        """The task settings (recorded in perturb.json)."""
        local = {"items": len(self.items), "fingerprint": items_fingerprint(self.items)} if self.items else None
        return {
            "tasks": self.tasks,
            "limit": self.limit,
            "batch_size": self.batch_size,
            "conditions": self.conditions,
            "seconds_per_lm_eval_condition": self.timings.get("mean_s_per_condition"),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            LOCAL_TASK: local and {**local, "max_items": self.max_items, "min_context_words": MIN_CONTEXT_WORDS},
        }

    def close(self) -> None:
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None


_LM_EVAL_PROGRESS = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")
"""lm-eval modules whose per-request progress bars would interleave with cwa's own bar of conditions."""


def _check_hub_tasks(tasks: list[str]) -> None:
    """Hub tasks with the hub unreachable (and HF_HUB_OFFLINE unset): one sentence before lm-eval indexes its
    tasks, instead of the datasets library's retries."""
    from huggingface_hub import constants

    from cwa.model.hub import unreachable

    reason = None if constants.HF_HUB_OFFLINE else unreachable()
    if reason is not None:
        raise CwaError(
            f"lm-eval cannot load the task '{tasks[0]}': the Hugging Face Hub at {constants.ENDPOINT} is unreachable "
            f"from here ({reason}); hub tasks need the hub, or HF_HUB_OFFLINE=1 and the task's data in the cache, "
            f"{LOCAL_TASK} runs offline."
        )


def _silent_tqdm(*args, **kwargs):
    """tqdm with its bar off, whatever ``disable`` the caller passes."""
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval as a library, without its chatter: its log lines below errors, Python warnings, its progress
    bars and those of ``datasets`` while it builds the local task, and the git-hash probe whose ``git describe``
    prints ``fatal: not a git repository`` outside a repository (cwa records its own commit in the summary).
    Everything is swapped in memory and put back on exit; lm-eval's files are not touched."""
    from datasets.utils import logging as datasets_logging
    from lm_eval import evaluator

    logger = logging.getLogger("lm_eval")
    saved = [(evaluator, "get_git_commit_hash", evaluator.get_git_commit_hash)]
    saved += [
        (m, "tqdm", m.tqdm) for m in map(sys.modules.get, _LM_EVAL_PROGRESS) if m is not None and hasattr(m, "tqdm")
    ]
    level, bars = logger.level, datasets_logging.is_progress_bar_enabled()
    try:
        logger.setLevel(logging.ERROR)
        evaluator.get_git_commit_hash = lambda: None
        for module, _, _ in saved[1:]:
            module.tqdm = _silent_tqdm
        datasets_logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        logger.setLevel(level)
        if bars:
            datasets_logging.enable_progress_bar()


def _correct(task: str, samples: list[dict]) -> Tensor:
    """Per-item ``acc`` (0/1) of lm-eval's logged samples, in doc-id order."""
    if any("acc" not in sample for sample in samples):
        raise CwaError(f"lm-eval's task '{task}' reports no per-item accuracy (acc); choose a task that does.")
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    return torch.tensor([float(sample["acc"]) for sample in ordered], dtype=torch.float64)


def downstream_rows(
    baseline: dict[str, TaskResult],
    conditions: list[tuple[str, dict[str, TaskResult]]],
    resamples: int = 2000,
    confidence: float = 0.95,
) -> list[DownstreamRow]:
    """``downstream.csv``'s rows: the baseline, then each condition's accuracy change on the same items
    with a paired studentized bootstrap interval over items and McNemar's exact p-value.

    Args:
        baseline: per task, the unperturbed model's result.
        conditions: (condition name, per task its result), in order.
        resamples: bootstrap resamples (one matrix per task, shared by every condition).
        confidence: coverage of the intervals.
    """
    rows = []
    weights = {task: bootstrap_weights(len(base.correct), resamples) for task, base in baseline.items()}
    for task, base in baseline.items():
        baseline_row = (ConditionKind.BASELINE.value, task, len(base.correct), base.accuracy, 0.0, 0.0, 0.0, None)
        rows.append(DownstreamRow(*baseline_row, base.seconds))
    for name, results in conditions:
        for task, result in results.items():
            base = baseline[task].correct
            if result.correct.shape != base.shape:
                raise CwaError(f"task {task} gave {len(result.correct)} items under {name}, {len(base)} at baseline.")
            delta, low, high = paired_mean_interval(base, result.correct, weights[task], confidence)
            p = mcnemar_exact(base, result.correct)
            rows.append(DownstreamRow(name, task, len(base), result.accuracy, delta, low, high, p, result.seconds))
    return rows


def seed_means(groups: dict[str, list[DownstreamRow]], confidence: float = 0.95) -> list[DownstreamRow]:
    """Per group of conditions that differ only in their seed (``{mean row's name: its members}``) and per
    task, the row of the mean over the seeds: mean accuracy and change with a Student-t interval over the
    seeds, no p-value; a group of one seed gives none.

    Args:
        groups: the members' rows (every task of every member), keyed by the name of their mean.
        confidence: coverage of the intervals.
    """
    out = []
    for name, members in groups.items():
        for task in dict.fromkeys(r.task for r in members):
            rows = [r for r in members if r.task == task]
            if len(rows) < 2:
                continue
            accuracy = mean_over_seeds(torch.tensor([r.accuracy for r in rows]), confidence)[0]
            mean, low, high = mean_over_seeds(torch.tensor([r.delta_accuracy for r in rows]), confidence)
            base = rows[0].accuracy - rows[0].delta_accuracy  # an accuracy's change cannot leave [−base, 1 − base]
            delta = (mean, max(low, -base), min(high, 1.0 - base)) if math.isfinite(low) else (mean, low, high)
            seconds = sum(r.seconds for r in rows)
            out.append(DownstreamRow(name, task, rows[0].items, accuracy, *delta, None, seconds, len(rows), "seeds"))
    return out


def format_downstream(rows: list[DownstreamRow], confidence: float = 0.95) -> list[str]:
    """A small console table: per condition, each task's accuracy and its change [interval] and p."""
    if not rows:
        return []
    width = max(len(r.condition) for r in rows)
    lines = [f"  downstream accuracy (lm-eval; Δ vs baseline [{fmt.percent(confidence)} CI], McNemar p):"]
    for r in rows:
        change = ""
        if r.condition != ConditionKind.BASELINE:
            delta = fmt.interval(r.delta_accuracy, r.delta_accuracy_low, r.delta_accuracy_high, fmt.effect)
            test = f"mean of {r.seeds} seeds" if r.over == "seeds" else f"p={fmt.p_value(r.p_value)}"
            change = f"  Δ {delta}  {test}"
        head = f"  {r.condition:<{width}}  {r.task}  n={fmt.count(r.items)}  acc={fmt.number(r.accuracy)}"
        lines.append(f"{head}{change}  {r.seconds:.1f}s")
    return lines

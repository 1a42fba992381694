"""``cwa compare RUN RUN ...``: how far runs agree on which weights are critical.

For two or more fit-sensitivity runs of one model (different metrics, seeds, calibration subsets or settings;
runs of several models are refused, see ``cwa.compare.models``) this computes, from the runs' artifacts only
(the model is never loaded):

- top-K overlap (Jaccard and overlap coefficient) of the global top-K sets at several K;
- Spearman and Kendall rank correlation of |score| over the union of two runs' top-K sets and over a
  uniform random sample of all weights (the same sample for every run);
- where each run's global top-K live (layers, module types);
- stability: runs that differ only in their calibration seed, with the mean pairwise Jaccard at each K
  and a run-bootstrap 95% interval.

It prints a table and writes ``compare.json`` and figures to the output directory.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from cwa.common import format as fmt
from cwa.common.errors import CwaError
from cwa.common.io import os_error, write_json
from cwa.compare.models import require_one_model
from cwa.compare.result import (
    Comparison,
    Correlations,
    Overlap,
    RankCorrelation,
    RunEntry,
    SampleCorrelations,
    Stability,
    StabilityGroup,
)
from cwa.rundir import Key, Run, load_runs, unique_names
from cwa.rundir.files import FIGURES, PERTURB, PROTECT, PRUNE
from cwa.rundir.outputs import OutputSet, set_dirs
from cwa.scoring import agreement

EXPERIMENT_KINDS = (PERTURB, PRUNE, PROTECT)  # the sets a run directory can hold, listed in compare.json
DEFAULT_KS = (10, 100, 1000)
DEFAULT_SAMPLE = 1_000_000


# -- which parameters and which K are comparable ---------------------------------------------------
def common_parameters(runs: list[Run]) -> tuple[list[str], str]:
    """Parameters every run scored with the same shape (in the first run's order), and a note when the
    runs' parameter sets differ (then only these are compared); refused in one sentence when there are none
    (runs of unrelated models), rather than reporting an overlap of zero that was never measurable."""
    first = runs[0].shapes
    common = [n for n, shape in first.items() if all(r.shapes.get(n) == shape for r in runs[1:])]
    if all(list(r.shapes) == list(first) and r.shapes == first for r in runs[1:]):
        return common, ""
    if not common:
        models = sorted({str(r.model) for r in runs})
        raise CwaError(
            "the runs score no parameter in common (same name and shape)"
            + (f": they are runs of {' and '.join(repr(m) for m in models)}" if len(models) > 1 else "")
            + ", so nothing in them can be compared; compare runs of one model, or of models of one architecture."
        )
    total = {r.name: len(r.shapes) for r in runs}
    return common, (
        f"the runs score different parameters ({', '.join(f'{n}: {c} tensors' for n, c in total.items())}); "
        f"scores are compared on the {len(common)} tensors all of them score with the same shape, and top-K "
        "sets selected over different parameter sets are not strictly comparable"
    )


def available_ks(runs: list[Run], ks: list[int]) -> list[int]:
    """The requested K that at least two runs can give exactly."""
    out = []
    for k in sorted(set(ks)):
        if sum(r.max_global_k >= k for r in runs) >= 2:
            out.append(k)
    return out


def topk_sets(runs: list[Run], ks: list[int]) -> dict[int, list[set[Key] | None]]:
    """Each run's exact global top-K as a set of (parameter, flat index), None where it cannot give it."""
    out = {}
    for k in ks:
        out[k] = []
        for run in runs:
            keys = run.topk_keys(k)
            out[k].append(None if keys is None else set(keys))
    return out


def overlap_matrices(sets: list[set[Key] | None]) -> tuple[np.ndarray, np.ndarray]:
    """(Jaccard, overlap coefficient) matrices; NaN for a run without that K."""
    n = len(sets)
    jac, ovl = np.full((n, n), np.nan), np.full((n, n), np.nan)
    for i, j in itertools.product(range(n), range(n)):
        if sets[i] is not None and sets[j] is not None:
            jac[i, j] = agreement.jaccard(sets[i], sets[j])
            ovl[i, j] = agreement.overlap_coefficient(sets[i], sets[j])
    return jac, ovl


# -- scores at chosen weights --------------------------------------------------------------------
def random_sample(runs: list[Run], names: list[str], size: int, seed: int) -> dict[str, np.ndarray]:
    """A uniform random sample (without replacement) of ``size`` weights of the ``names`` tensors."""
    numels = np.array([runs[0].infos[n].numel for n in names], dtype=np.int64)
    total = int(numels.sum())
    size = min(size, total)
    if size <= 0:
        return {}
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(total, size=size, replace=False))
    offsets = np.concatenate([[0], np.cumsum(numels)])
    param = np.searchsorted(offsets, flat, side="right") - 1
    return {names[p]: flat[param == p] - offsets[p] for p in np.unique(param)}


class ScoreTable:
    """One run's |score| at a fixed set of weights, read in one pass over its scores file.

    Without scores.safetensors the values come from topk.csv and every weight outside it reads 0: a
    censored value, tied below the run's own cutoff, which keeps rank correlations meaningful only over
    the top of the ranking (``exact`` is False then).
    """

    def __init__(self, run: Run, wanted: dict[str, np.ndarray]) -> None:
        self.index = {n: np.unique(i) for n, i in wanted.items() if len(i)}
        self.exact = run.has_scores
        if self.exact:
            self.values = run.scores_at(self.index)
        else:
            known: dict[str, dict[int, float]] = defaultdict(dict)
            top = run.topk
            for p, i, score in zip(top.param.tolist(), top.index.tolist(), top.score.abs().tolist(), strict=True):
                known[top.names[p]][i] = score
            self.values = {
                n: np.array([known[n].get(int(i), 0.0) for i in idx], dtype=np.float32) for n, idx in self.index.items()
            }

    def lookup(self, keys: list[Key]) -> np.ndarray:
        out = np.empty(len(keys), dtype=np.float64)
        by_name: dict[str, list[int]] = defaultdict(list)
        for pos, (name, _) in enumerate(keys):
            by_name[name].append(pos)
        for name, positions in by_name.items():
            want = np.array([keys[p][1] for p in positions], dtype=np.int64)
            where = np.searchsorted(self.index[name], want)
            out[positions] = self.values[name][where]
        return out


def _keys_of(wanted: dict[str, np.ndarray]) -> list[Key]:
    return [(n, int(i)) for n, idx in wanted.items() for i in idx]


def correlation_matrices(tables: list[ScoreTable], keys_for_pair) -> Correlations:
    """Spearman and Kendall matrices; ``keys_for_pair(i, j)`` gives the weights a pair is compared on."""
    n = len(tables)
    out = Correlations([[None] * n for _ in range(n)], [[None] * n for _ in range(n)])
    for i, j in itertools.combinations(range(n), 2):
        keys = keys_for_pair(i, j)
        if not keys:
            continue
        x, y = tables[i].lookup(keys), tables[j].lookup(keys)
        for matrix, fn in ((out.spearman, agreement.spearman), (out.kendall, agreement.kendall)):
            matrix[i][j] = matrix[j][i] = RankCorrelation.of(fn(x, y))
    return out


# -- where the top-K live ------------------------------------------------------------------------
def locations(run: Run, k: int) -> dict:
    """Counts of the run's global top-k by layer and by module type (tensors outside layers by name)."""
    top = run.global_topk(k)
    if top is None:
        return {}
    by_layer: Counter = Counter()
    by_module: Counter = Counter()
    for p in top.param.tolist():
        info = run.infos[top.names[p]]
        by_layer["outside" if info.layer is None else str(info.layer)] += 1
        by_module[info.module] += 1
    return {"k": k, "by_layer": dict(by_layer), "by_module": dict(by_module.most_common())}


# -- stability over calibration seeds ------------------------------------------------------------
def stability_groups(runs: list[Run], sets: dict[int, list[set[Key] | None]], seed: int) -> list[StabilityGroup]:
    """Groups of runs with identical settings but different calibration seeds, with their agreement.

    A second run with a seed already in its group repeats a calibration subset rather than drawing a new
    one; it would inflate the agreement, so only the first run of each seed counts (repeats are listed).
    """
    groups: dict[tuple, dict[int | None, int]] = defaultdict(dict)
    repeats: dict[tuple, list[str]] = defaultdict(list)
    for i, run in enumerate(runs):
        by_seed = groups[run.settings_key()]
        if run.seed in by_seed:
            repeats[run.settings_key()].append(run.name)
        else:
            by_seed[run.seed] = i
    out = []
    for key, by_seed in groups.items():
        members = list(by_seed.values())
        if len(members) < 2:
            continue
        entry = StabilityGroup(
            runs=[runs[i].name for i in members],
            seeds=[runs[i].seed for i in members],
            label=f"{runs[members[0]].model} · {runs[members[0]].label.rsplit(' seed=', 1)[0]}",
            repeats_left_out=repeats.get(key, []),
        )
        for k, per_run in sets.items():
            group_sets = [per_run[i] for i in members]
            if any(s is None for s in group_sets):
                continue
            jac, _ = overlap_matrices(group_sets)
            entry.by_k[k] = Stability(**agreement.stability(jac, seed=seed))
        out.append(entry)
    return out


# -- the whole comparison ------------------------------------------------------------------------
def compare_runs(runs: list[Run], ks: list[int], sample: int = DEFAULT_SAMPLE, seed: int = 0) -> Comparison:
    """Every statistic of ``cwa compare`` (matrices indexed like ``runs``)."""
    if len(runs) < 2:
        raise CwaError("compare needs at least two run directories.")
    notes = []
    names = unique_names(runs)
    require_one_model(runs, names)
    common, note = common_parameters(runs)
    if note:
        notes.append(note)
    usable = available_ks(runs, ks)
    dropped = sorted(set(ks) - set(usable))
    if dropped:
        notes.append(
            f"K={', '.join(map(str, dropped))} dropped: fewer than two runs hold an exact global top-K that large "
            "(no scores.safetensors and a shorter topk.csv)"
        )
    sets = topk_sets(runs, usable)
    result = Comparison(
        runs=[_run_entry(name, r, usable) for name, r in zip(names, runs, strict=True)],
        ks=usable,
        stability=stability_groups(runs, sets, seed),
        notes=notes,
    )
    tied = [
        f"{names[i]} at K={k} ({n} weights)"
        for i, r in enumerate(result.runs)
        for k, n in r.ties_at_cutoff.items()
        if n
    ]
    if tied:
        notes.append(
            "some top-K end in a tie with the first weight left out, so their membership is decided by the "
            f"tie-break (earlier parameter, lower index), not by the scores: {'; '.join(tied)}"
        )
    for k in usable:
        jac, ovl = overlap_matrices(sets[k])
        result.overlap[k] = Overlap(_matrix(jac), _matrix(ovl))
    missing = [r.name for r in runs if not r.has_scores]
    if missing:
        notes.append(
            f"{', '.join(missing)} saved no scores.safetensors: their correlations use topk.csv scores, with every "
            "weight outside topk.csv tied below it, and they are left out of the random-sample correlation"
        )
    if common:
        result.topk_union, result.random_sample = correlations(runs, common, sets, sample if not missing else 0, seed)
    for i, run in enumerate(runs):
        fits = [k for k in usable if run.max_global_k >= k]
        if fits:
            result.locations[names[i]] = locations(run, fits[-1])
    return result


def _run_entry(name: str, r: Run, ks: list[int]) -> RunEntry:
    ties = {k: r.cutoff_tie(k) for k in ks if r.max_global_k >= k}
    experiments = [
        {"experiment": s.label, "path": str(s.path)} for kind in EXPERIMENT_KINDS for s in set_dirs(r.path, kind)
    ]
    return RunEntry(
        name, str(r.path), r.model, r.metric, r.mode, r.k, r.samples, r.seed, r.has_scores,
        r.summary.data_fingerprint, ties, experiments,
    )  # fmt: skip


def correlations(
    runs: list[Run], common: list[str], sets: dict[int, list[set[Key] | None]], sample: int, seed: int
) -> tuple[dict[int, Correlations], SampleCorrelations | None]:
    """Spearman and Kendall matrices over each K's top-K union (the K whose sets lie in the ``common``
    tensors) and over a uniform random sample of ``sample`` weights of them (None when 0); each run's
    scores are read in one pass over the union of all those weights."""
    common_set = set(common)
    usable_union = [
        k for k, per_run in sets.items() if all(s is None or all(n in common_set for n, _ in s) for s in per_run)
    ]
    union_all: dict[str, set[int]] = defaultdict(set)
    for k in usable_union:
        for s in sets[k]:
            for name, index in s or ():
                union_all[name].add(index)
    sampled = random_sample(runs, common, sample, seed) if sample > 0 else {}
    wanted = {
        n: np.array(sorted(union_all.get(n, set()) | set(sampled.get(n, np.empty(0)).tolist())), dtype=np.int64)
        for n in set(union_all) | set(sampled)
    }
    tables = [ScoreTable(r, wanted) for r in runs]
    union: dict[int, Correlations] = {}
    for k in usable_union:

        def pair_keys(i: int, j: int, k: int = k) -> list[Key]:
            a, b = sets[k][i], sets[k][j]
            return sorted(a | b) if a is not None and b is not None else []

        union[k] = correlation_matrices(tables, pair_keys)
    if not sampled:
        return union, None
    sample_keys = _keys_of(sampled)
    matrices = correlation_matrices(tables, lambda i, j: sample_keys)
    return union, SampleCorrelations(matrices.spearman, matrices.kendall, size=len(sample_keys), seed=seed)


def _matrix(m: np.ndarray) -> list[list[float | None]]:
    return [[None if not math.isfinite(v) else round(float(v), 6) for v in row] for row in m]


# -- output --------------------------------------------------------------------------------------
def _value(c: RankCorrelation | None) -> float | None:
    return None if c is None else c.value


def format_table(result: Comparison) -> str:
    """The pairwise table printed to the terminal (one line per pair of runs)."""
    names = [r.name for r in result.runs]
    lines = ["runs:"]
    for i, r in enumerate(result.runs):
        lines.append(f"  [{i}] {names[i]}: {r.model} · {r.metric} {r.mode} k={r.k} n={r.samples} seed={r.seed}")
    header = "  pair    " + "".join(f"  J@{k:<6} O@{k:<6}" for k in result.ks)
    lines += ["", header + "  rho(top-K∪)  tau(top-K∪)  rho(sample)"]
    largest = result.largest_k
    union = result.topk_union.get(largest) if largest else None
    for i, j in itertools.combinations(range(len(names)), 2):
        cells = []
        for k in result.ks:
            ov = result.overlap[k]
            cells.append(f"  {fmt.number(ov.jaccard[i][j]):<8} {fmt.number(ov.overlap_coefficient[i][j]):<8}")
        rho = _value(union.spearman[i][j]) if union else None
        tau = _value(union.kendall[i][j]) if union else None
        srho = _value(result.sample_spearman(i, j))
        correlations = f"  {fmt.number(rho):>11}  {fmt.number(tau):>11}  {fmt.number(srho):>11}"
        lines.append(f"  {i}-{j:<5}" + "".join(cells) + correlations)
    if largest:
        lines.append(
            f"  J = Jaccard, O = overlap coefficient of the global top-K; correlations of |score| at K={largest}."
        )
    for group in result.stability:
        lines += ["", f"stability over calibration seeds {group.seeds}: {group.label}"]
        for k, s in group.by_k.items():
            interval = f"[{fmt.number(s.low)}, {fmt.number(s.high)}]" if s.low is not None else f"({s.note})"
            lines.append(f"  K={k}: mean pairwise Jaccard {fmt.number(s.mean)} {interval} over {s.runs} runs")
    for note in result.notes:
        lines += ["", f"note: {note}."]
    return "\n".join(lines)


def figure_drawings(result: Comparison) -> dict[str, Callable[[Path], None]]:
    """Compare's figures, ``{file name under figures/: function drawing into a given path}``."""
    from cwa.report import figures as report_figures

    names = [r.name for r in result.runs]
    drawings: dict[str, Callable[[Path], None]] = {}
    if result.largest_k:
        k = result.largest_k
        matrix = np.array(result.overlap[k].jaccard, dtype=float)
        title = f"Jaccard overlap of the global top-{k}"
        drawings[f"overlap_jaccard_k{k}.png"] = partial(report_figures.overlap_heatmap, matrix, names, title)
    if result.locations:
        located = {f"[{names.index(n)}] {n}": loc for n, loc in result.locations.items()}
        drawings["topk_by_layer.png"] = partial(report_figures.layer_distribution, located)
        drawings["topk_by_module.png"] = partial(report_figures.module_distribution, located)
    return drawings


def write_outputs(result: Comparison, out: Path, figures: bool) -> None:
    """``compare.json`` and ``figures/`` as one set (:class:`~cwa.rundir.outputs.OutputSet`): all of them, or
    after any failure (a full disk) or interrupt none of the new files, and a directory this call made is
    removed again. A figure that fails to draw for another reason becomes a note in ``compare.json``. An
    operating-system error ends in one sentence."""
    made = not out.exists()
    outputs = OutputSet(out)
    try:
        drawings = figure_drawings(result) if figures else {}
        result.notes += outputs.draw(drawings, FIGURES)
        result.figures = [f"{FIGURES}/{name}" for name, _ in drawings.items() if f"{FIGURES}/{name}" in outputs]
        write_json(outputs.stage("compare.json"), result.to_json())
        outputs.commit()
    except BaseException as exc:
        outputs.discard()
        if made:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError):
            raise os_error(exc, out) from None
        raise


def parse_ks(ks: str | Sequence[int]) -> list[int]:
    """K values from a list or a comma-separated string such as ``10,100,1000`` (sorted, unique, ≥ 1)."""
    try:
        if isinstance(ks, str):
            values = {int(float(x)) for x in ks.strip("[]").split(",") if x.strip()}
        else:
            values = {int(k) for k in ks}
    except (TypeError, ValueError):
        raise CwaError(f"--ks must be integers such as [10,100,1000] (or 10,100,1000), not '{ks}'.") from None
    out = sorted(values)
    if not out or out[0] < 1:
        raise CwaError(f"--ks needs positive integers, got '{ks}'.")
    return out


def default_output(runs: list[Run]) -> Path:
    """``<lightning_logs>/compare/<timestamp>`` beside the first run's experiment folder."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return runs[0].path.resolve().parent.parent / "compare" / stamp


def load_complete_runs(paths: Sequence[str | Path]) -> tuple[list[Run], list[str]]:
    """The complete runs among ``paths``; each directory that is not one (a failed or running run matched by a
    glob) is skipped with a printed note. One CwaError sentence when none is complete."""
    runs, notes = load_runs(paths, skip_incomplete=True)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return runs, notes


def compare(
    runs: list[str],
    ks: Sequence[int] | str = DEFAULT_KS,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    output: Path | None = None,
    figures: bool = True,
) -> Path:
    """Agreement between fit-sensitivity runs: top-K overlap, rank correlations of the scores, where the top-K
    live, and stability over calibration seeds. Reads the runs' files only; prints a table and writes
    ``compare.json`` and ``figures/``.

    Args:
        runs: run directories (``lightning_logs/NAME/version_N``), two or more, of one model (runs of several
            models are refused: use ``cwa report``); a directory that is not a complete run (a failed or running
            one matched by a glob) is skipped with a note.
        ks: K of the top-K overlaps, e.g. ``[10,100,1000]`` (a comma string ``10,100,1000`` works too); a K
            that fewer than two runs can give exactly (no scores file and a shorter topk.csv) is dropped
            with a note.
        sample: size of the uniform random sample of weights for the rank correlation over all weights
            (0 skips it).
        seed: seed of the random sample and of the bootstraps.
        output: directory for ``compare.json`` and ``figures/`` (default:
            ``<lightning_logs>/compare/<timestamp>`` beside the first run).
        figures: draw the figures.

    Returns:
        The output directory.
    """
    k_values = parse_ks(ks)
    if sample < 0:
        raise CwaError(f"--sample must be 0 or more, got {sample}.")
    loaded, skipped = load_complete_runs(runs)
    if len(loaded) < 2:
        raise CwaError("compare needs at least two different complete run directories.")
    result = compare_runs(loaded, k_values, int(sample), seed)
    result.skipped = skipped
    out = Path(output) if output is not None else default_output(loaded)
    write_outputs(result, out, figures)
    print(format_table(result))
    print(f"\ncompare.json and figures in {out}")
    return out

"""``--tasks`` on ``cwa prune`` and ``cwa protect``: lm-eval's per-item accuracy under a pruned or quantized
model against the same transform made by hand, the rows in the set of prune.csv / protect.csv (means over seeds
as protect.csv has them), the restore, the report, and the errors. Offline, on tiny models built in code."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from conftest import make_tokenizer, tiny_llama  # noqa: E402
from test_downstream import _greedy_match, _items_half_right, needs_lm_eval  # noqa: E402
from test_interventions import hand_rtn, reference_row_mask  # noqa: E402
from test_perturb import make_run, tiny_dir  # noqa: E402, F401  (tiny_dir is a fixture)
from test_prune_protect import LINEAR, QUICK  # noqa: E402

from cwa.ablation.stats import mcnemar_exact  # noqa: E402
from cwa.common.errors import CwaError  # noqa: E402
from cwa.rundir import DownstreamRow  # noqa: E402
from cwa.rundir.interventions import read_intervention, read_intervention_downstream  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LOCAL = "cwa_pydoc_lastword"


@pytest.fixture(scope="module")
def word_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a 250-word vocabulary, so that its greedy next word can be a real word, and linear
    weights large enough (std 0.5) that pruning or quantizing them changes what it predicts."""
    path = tmp_path_factory.mktemp("tiny-llama-words")
    model = tiny_llama(seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.weight"):
                param.mul_(25.0)
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


@pytest.fixture
def half_right(word_dir: Path, monkeypatch) -> list[dict[str, str]]:
    """The local task's items replaced by eight held-out items half of which the dense model gets right, so
    that a transform that changes the model changes some items."""
    from cwa.fit.data import PydocCorpus
    from cwa.model.loading import load_model, load_tokenizer

    items = _items_half_right(load_model(str(word_dir)), load_tokenizer(str(word_dir)), PydocCorpus().load())
    monkeypatch.setattr("cwa.perturb.downstream.local_items", lambda data, tokenizer, max_items=500: items)
    return items


def _hand(model, word_dir: Path, items: list[dict[str, str]]) -> list[float]:
    from cwa.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(word_dir))
    return [float(_greedy_match(model, tokenizer, i["context"], i["target"])) for i in items]


def _fresh(model_dir: Path):
    from cwa.model.loading import load_model

    return load_model(str(model_dir))


def _restored(model, model_dir: Path) -> bool:
    fresh = dict(_fresh(model_dir).named_parameters())
    return all(torch.equal(p.view(torch.int32), fresh[n].view(torch.int32)) for n, p in model.named_parameters())


def _check_row(row: DownstreamRow, base: list[float], under: list[float]) -> None:
    """A condition's row against its per-item correctness and the baseline's, computed by hand."""
    assert row.items == len(base) and row.accuracy == pytest.approx(sum(under) / len(under))
    assert row.delta_accuracy == pytest.approx((sum(under) - sum(base)) / len(base))
    assert row.p_value == pytest.approx(mcnemar_exact(torch.tensor(base), torch.tensor(under)))
    assert row.delta_accuracy_low <= row.delta_accuracy <= row.delta_accuracy_high


@needs_lm_eval
def test_prune_tasks_equal_a_hand_pruned_model(word_dir: Path, half_right, tmp_path: Path, capsys) -> None:
    from cwa.prune.recipe import PruneRecipe

    run = make_run(tmp_path, word_dir, include=LINEAR, heldout_fraction=0.3)
    recipe = PruneRecipe(
        run=[str(run)], sparsity=(0.5,), groups=("row",), structure=("unstructured",), tasks=LOCAL,
        tasks_batch_size=3, **QUICK,
    )  # fmt: skip
    recipe.run()
    rows, meta = read_intervention(run, "prune")
    tasks = read_intervention_downstream(run, "prune", meta)
    assert [r.condition for r in tasks] == ["baseline", f"magnitude/{rows[1].run}/unstructured/row/sparsity=0.5"]
    assert rows[1].condition == tasks[1].condition and all(r.task == LOCAL and r.over == "items" for r in tasks)
    # the same cut by hand: Wanda's per-row rule on |w|, then LAMBADA's greedy last-word match
    model = _fresh(word_dir)
    dense = _hand(model, word_dir, half_right)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.weight"):
                param[reference_row_mask(param.abs(), 0.5)] = 0.0
    pruned = _hand(model, word_dir, half_right)
    assert dense == [1.0, 0.0] * 4 and pruned != dense  # the pruning changes some items
    correct = recipe.downstream.correct
    assert correct["baseline"][LOCAL].tolist() == dense and correct[tasks[1].condition][LOCAL].tolist() == pruned
    assert tasks[0].accuracy == 0.5 and tasks[0].p_value is None
    _check_row(tasks[1], dense, pruned)
    assert _restored(recipe.session.model, word_dir)  # restored bit for bit after the tasks too
    assert meta["settings"]["tasks"] == [LOCAL] and meta["downstream"][LOCAL]["items"] == 8
    assert meta["downstream"]["seconds_per_lm_eval_condition"] > 0
    assert "downstream accuracy" in capsys.readouterr().out
    assert (run / "prune" / "1" / "figures" / "prune.png").stat().st_size > 1000
    # a later prune without --tasks is a new set without task rows; the first keeps its own
    PruneRecipe(run=[str(run)], sparsity=(0.5,), structure=("unstructured",), figures=False, **QUICK).run()
    assert not (run / "prune" / "2" / "prune_downstream.csv").exists()
    assert (run / "prune" / "1" / "prune_downstream.csv").is_file()
    assert read_intervention_downstream(run, "prune", read_intervention(run, "prune")[1]) is None


@needs_lm_eval
def test_protect_rtn_tasks_equal_a_hand_quantized_model(word_dir: Path, half_right, tmp_path: Path) -> None:
    from cwa.protect.recipe import ProtectRecipe
    from cwa.rundir import Run

    run = make_run(tmp_path, word_dir, include=LINEAR, heldout_fraction=0.3)
    recipe = ProtectRecipe(
        run=str(run), stress="rtn", levels=(2,), protect_k=(0, 5), controls=("random_matched",), seeds=(0, 1),
        symmetric=False, tasks=[LOCAL], **QUICK,
    )  # fmt: skip
    recipe.run()
    rows, meta = read_intervention(run, "protect")
    tasks = read_intervention_downstream(run, "protect", meta)
    prefix = "rtn/bits=2/"
    assert [r.condition for r in tasks] == ["baseline"] + [
        prefix + c
        for c in (
            "none/weight/k=0",
            "topk/weight/k=5",
            "random_matched/weight/k=5/set_seed=0",
            "random_matched/weight/k=5/set_seed=1",
            "random_matched/weight/k=5/mean",
        )
    ]
    assert {r.condition for r in rows} == {r.condition for r in tasks}  # one task row per protect.csv row
    # the top-5 condition by hand: per-row min-max 2-bit RTN with the top-5 weights kept and out of the ranges
    topk = Run.load(run).topk
    protected = {(topk.names[int(p)], int(i)) for p, i in zip(topk.param[:5], topk.index[:5], strict=True)}
    model = _fresh(word_dir)
    dense = _hand(model, word_dir, half_right)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.weight"):
                cols = param.shape[1]
                for r in range(param.shape[0]):
                    keep = [(name, r * cols + c) in protected for c in range(cols)]
                    param[r] = torch.tensor(hand_rtn(param[r].tolist(), keep, 2, False))
    quantized = _hand(model, word_dir, half_right)
    assert quantized != dense
    assert recipe.downstream.correct[prefix + "topk/weight/k=5"][LOCAL].tolist() == quantized
    _check_row(tasks[2], dense, quantized)
    seeds, mean = tasks[3:5], tasks[5]
    assert mean.over == "seeds" and mean.seeds == 2 and mean.p_value is None
    assert mean.accuracy == pytest.approx((seeds[0].accuracy + seeds[1].accuracy) / 2)
    assert mean.delta_accuracy == pytest.approx((seeds[0].delta_accuracy + seeds[1].delta_accuracy) / 2)
    assert _restored(recipe.session.model, word_dir)
    assert meta["settings"]["tasks"] == [LOCAL] and meta["downstream"]["conditions"] == [
        r.condition for r in tasks[1:5]
    ]


@needs_lm_eval
def test_protect_random_stress_runs_each_seed_and_their_mean(word_dir: Path, half_right, tmp_path: Path) -> None:
    from scipy import stats

    from cwa.protect.recipe import ProtectRecipe

    run = make_run(tmp_path, word_dir, include=LINEAR, heldout_fraction=0.3)
    recipe = ProtectRecipe(
        run=str(run), stress="noise", levels=(0.5,), protect_k=(0,), controls=(), seeds=(0, 1, 2), tasks=LOCAL,
        figures=False, **QUICK,
    )  # fmt: skip
    recipe.run()
    rows, meta = read_intervention(run, "protect")
    tasks = read_intervention_downstream(run, "protect", meta)
    names = [r.condition for r in tasks]
    assert names == ["baseline"] + [f"noise/sigma=0.5/none/weight/k=0/seed={s}" for s in range(3)] + [
        "noise/sigma=0.5/none/weight/k=0/mean"
    ]
    deltas = torch.tensor([r.delta_accuracy for r in tasks[1:4]], dtype=torch.float64)
    assert bool((deltas != 0).any())  # the tasks ran under the noise
    mean = tasks[4]
    half = stats.t.ppf(0.975, 2) * float(deltas.std()) / 3**0.5
    assert mean.delta_accuracy == pytest.approx(float(deltas.mean()))
    if half > 0:
        assert (mean.delta_accuracy_low, mean.delta_accuracy_high) == pytest.approx(
            (
                max(float(deltas.mean()) - half, -tasks[0].accuracy),
                min(float(deltas.mean()) + half, 1 - tasks[0].accuracy),
            )
        )
    # the tasks saw each seed's own noise, the same as its held-out pass: rerunning a seed reproduces it
    condition, tasks_again = recipe.conditions[1], recipe.downstream
    tasks_again.prepare(half_right)
    try:
        with recipe._stressed(condition):
            again = tasks_again.evaluate(recipe.session.model, tasks_again.tokenizer)
    finally:
        tasks_again.close()
    assert condition.seed == 1 and again[LOCAL].correct.tolist() == recipe.downstream.correct[names[2]][LOCAL].tolist()
    assert _restored(recipe.session.model, word_dir)


def test_the_report_shows_task_accuracy_beside_the_table(tmp_path: Path) -> None:
    from test_compare import make_run as make_fit_run
    from test_compare import random_scores

    from cwa.report.recipe import report
    from cwa.rundir.interventions import PruneRow, write_intervention

    run = make_fit_run(tmp_path, "d", random_scores(1), k=10)
    zero = {f"delta_{m}{s}": 0.0 for m in ("perplexity", "nll", "accuracy") for s in ("", "_low", "_high")}
    dense = PruneRow("dense", "", "", "", 0.0, 100, 0, 5.0, 1.6, 0.3, **zero, p_value=None, broken_fraction=0.0)
    pruned = PruneRow(**{**dense.as_dict(), "metric": "wanda", "run": "v0", "structure": "unstructured"})
    pruned = PruneRow(**{**pruned.as_dict(), "group": "row", "sparsity": 0.5, "removed": 50, "perplexity": 9.0})
    tasks = [
        DownstreamRow("baseline", LOCAL, 142, 0.41, 0.0, 0.0, 0.0, None, 3.0),
        DownstreamRow(pruned.condition, LOCAL, 142, 0.12, -0.29, -0.36, -0.22, 1.5e-9, 3.1),
    ]
    write_intervention(run, "prune", [dense, pruned], {"model": "tiny"}, downstream=tasks)
    output = report([str(run)], tmp_path / "out" / "report.md", ks=[10], sample=2000, figures=False)
    text = output.read_text()
    section = text[text.index("### Pruning and protection") :]
    assert f"| {LOCAL} acc | Δacc [95% CI] |" in section
    assert "| 0.120 | -0.29 [-0.36, -0.22] |" in section and "| 0.410 |  |" in section
    # a task file that does not match its prune.json stops the report in one sentence
    (run / "prune" / "1" / "prune_downstream.csv").write_text("condition,task\nx,y\n")
    with pytest.raises(CwaError, match="does not match its prune.json"):
        report([str(run)], tmp_path / "out" / "again.md", ks=[10], sample=2000, figures=False)


def test_without_lm_eval_tasks_end_in_one_sentence(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    from cwa.protect.recipe import ProtectRecipe
    from cwa.prune.recipe import PruneRecipe

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    run = make_run(tmp_path, tiny_dir, include=LINEAR)
    for make in (lambda: PruneRecipe(run=[str(run)], tasks=LOCAL), lambda: ProtectRecipe(run=str(run), tasks=LOCAL)):
        with pytest.raises(CwaError) as caught:
            make()
        message = str(caught.value)
        assert message.endswith("install the eval extra: pip install 'cwa[eval]'.") and message.count(". ") == 0
    PruneRecipe(run=[str(run)])  # no --tasks: no lm-eval needed
    ProtectRecipe(run=str(run))


@needs_lm_eval
def test_an_unknown_task_stops_before_any_pass_and_keeps_the_set(tiny_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    from cwa.cli import main

    run = make_run(tmp_path, tiny_dir, include=LINEAR)
    args = ["prune", str(run), "--sparsity", "[0.5]", "--structure", "[unstructured]", "--figures", "false"]
    args += ["--bootstrap", "20", "--permutations", "20", "--heldout_tokens", "8"]
    assert main(args) == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*args, "--tasks", "no_such_task"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "cwa: error: lm-eval has no task 'no_such_task' (`lm_eval --tasks list` lists them)."
    assert "Traceback" not in "\n".join(err) and "cwa prune:" not in "\n".join(err)  # stopped before any pass
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not list(run.rglob("*.tmp")) and not list(run.rglob("prune_downstream.csv"))

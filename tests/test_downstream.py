"""Downstream accuracy through lm-evaluation-harness: the local last-word task from held-out text, per-item
accuracy on a live model against a hand computation, in-place perturbation, the paired statistics, and
``downstream.csv`` in perturb's output set. Everything offline, on tiny models built in code."""

from __future__ import annotations

import builtins
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from conftest import make_tokenizer, tiny_llama  # noqa: E402
from test_perturb import make_run, tiny_dir  # noqa: E402, F401

from cwa.ablation.stats import bootstrap_weights, mcnemar_exact, paired_mean_interval  # noqa: E402
from cwa.common.errors import CwaError  # noqa: E402

needs_lm_eval = pytest.mark.skipif(
    __import__("importlib").util.find_spec("lm_eval") is None, reason="the cwa[eval] extra is not installed"
)


# -- statistics --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("only_a", "only_b", "same"), [(0, 0, 10), (3, 0, 5), (7, 2, 30), (12, 13, 1), (1, 9, 0)])
def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_items(only_a: int, only_b: int, same: int) -> None:
    from scipy.stats import binomtest

    a = torch.tensor([1] * only_a + [0] * only_b + [1] * same + [0] * same)
    b = torch.tensor([0] * only_a + [1] * only_b + [1] * same + [0] * same)
    n = only_a + only_b
    expected = 1.0 if n == 0 else binomtest(only_a, n, 0.5).pvalue
    assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(b, a) == pytest.approx(expected, rel=1e-12)


def test_paired_interval_equals_a_hand_written_bootstrap_loop() -> None:
    g = torch.Generator().manual_seed(3)
    a = (torch.rand(60, generator=g) < 0.6).double()
    b = torch.where(torch.rand(60, generator=g) < 0.25, 1 - a, a)  # a quarter of the items flip
    weights = bootstrap_weights(60, 400, seed=1)
    delta, low, high = paired_mean_interval(a, b, weights, 0.9)

    d = (b - a).numpy()
    estimate = d.mean()
    se = np.sqrt(((d - estimate) ** 2).sum()) / len(d)
    roots = []
    for w in weights.numpy():
        mean = (w * d).sum() / w.sum()
        spread = np.sqrt((w * (d - mean) ** 2).sum()) / w.sum()
        roots.append((mean - estimate) / spread)
    q_low, q_high = np.quantile(roots, [0.05, 0.95])
    assert delta == pytest.approx(estimate, abs=1e-12)
    assert low == pytest.approx(estimate - q_high * se, rel=1e-9)
    assert high == pytest.approx(estimate - q_low * se, rel=1e-9)
    assert low < delta < high


# -- the local task's items --------------------------------------------------------------------------
def test_items_come_only_from_the_heldout_blocks(tiny_llama_dir: Path) -> None:
    from cwa.fit.data import CalibrationData, PydocCorpus, tokenize_stream
    from cwa.model.loading import load_tokenizer
    from cwa.perturb.downstream import MIN_CONTEXT_WORDS, heldout_pieces, items_fingerprint, lastword_items

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    data = CalibrationData("pydoc", str(tiny_llama_dir), seq_len=32, num_samples=4, heldout_samples=None)
    data.setup()
    texts = PydocCorpus().load()
    items = lastword_items(heldout_pieces(texts, tokenizer, 32, 0.1), max_items=10_000)
    assert len(items) > 100
    # WhitespaceSplit tokens do not see the whitespace the items collapse: each item's tokens (the word with
    # the sentence's end) must be a run of the held-out token stream (calibration blocks come from before it).
    heldout = "," + ",".join(map(str, data.heldout.flatten().tolist())) + ","
    everything = "," + ",".join(map(str, tokenize_stream(texts, tokenizer).tolist())) + ","
    for item in items:
        assert item["target"].startswith(" ") and item["target"][1:].isalpha()
        assert len(item["context"].split()) >= MIN_CONTEXT_WORDS
        runs = []
        for end in ".!?":
            ids = tokenizer(item["context"] + item["target"] + end, add_special_tokens=False)["input_ids"]
            runs.append("," + ",".join(map(str, ids)) + ",")
        assert any(run in heldout for run in runs), item
    # ... and the choice is a real restriction: a run from the corpus's start is not there
    first = lastword_items(heldout_pieces(texts, tokenizer, 32, 0.999), max_items=5)[0]
    first_ids = "," + ",".join(map(str, tokenizer(first["context"])["input_ids"])) + ","
    assert first_ids in everything and first_ids not in heldout
    few = lastword_items(heldout_pieces(texts, tokenizer, 32, 0.1), max_items=7)
    assert len(few) == 7 and few[0] == items[0] and items_fingerprint(few) != items_fingerprint(items)


# -- lm-eval on a live model -------------------------------------------------------------------------
def _greedy_match(model, tokenizer, context: str, target: str) -> bool:
    """LAMBADA's acc by hand: every target token is the argmax after the tokens before it."""
    whole = tokenizer(context + target, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0]
    return all(int(logits[n_context - 1 + j].argmax()) == whole[n_context + j] for j in range(len(whole) - n_context))


def _items_half_right(model, tokenizer, texts: list[str]) -> list[dict[str, str]]:
    """Eight held-out items; every other one gets the model's own greedy next word as its target."""
    from cwa.perturb.downstream import heldout_pieces, lastword_items

    vocab = {i: w for w, i in tokenizer.get_vocab().items()}
    items = []
    for item in lastword_items(heldout_pieces(texts, tokenizer, 32, 0.1), max_items=60):
        ids = tokenizer(item["context"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            guess = vocab[int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
        if len(items) % 2 == 0 and guess.isalpha():
            items.append({"context": item["context"], "target": " " + guess})
        elif len(items) % 2 == 1 and guess != item["target"][1:]:
            items.append(item)
        if len(items) == 8:
            return items
    raise AssertionError("too few items")


@needs_lm_eval
def test_lm_eval_accuracy_is_greedy_last_word_match_on_the_live_model(tmp_path: Path) -> None:
    from cwa.ablation.perturbations import ChecksumCache, Zero, perturbed, selection_from
    from cwa.fit.data import PydocCorpus
    from cwa.perturb.downstream import LOCAL_TASK, DownstreamTasks

    tokenizer = make_tokenizer(tmp_path)
    model = tiny_llama(seed=1)
    items = _items_half_right(model, tokenizer, PydocCorpus().load())
    hand = [float(_greedy_match(model, tokenizer, i["context"], i["target"])) for i in items]
    assert hand == [1.0, 0.0] * 4  # the construction, checked independently

    tasks = DownstreamTasks([LOCAL_TASK], batch_size=3)
    tasks.prepare(items)
    try:
        baseline = tasks.evaluate(model, tokenizer)[LOCAL_TASK]
        assert baseline.correct.tolist() == hand and baseline.accuracy == 0.5
        # in place, no copy: lm-eval sees a perturbation written into the live weights, and not after it
        params = {"lm_head.weight": model.lm_head.weight.data}
        selection = selection_from(["lm_head.weight"], torch.zeros(252 * 8, dtype=torch.long), torch.arange(252 * 8))
        before = model.lm_head.weight.detach().clone()
        with perturbed(params, selection, Zero(), None, ChecksumCache(params)):
            broken = tasks.evaluate(model, tokenizer)[LOCAL_TASK]
            hand_broken = [float(_greedy_match(model, tokenizer, i["context"], i["target"])) for i in items]
        assert broken.correct.tolist() == hand_broken != hand
        assert torch.equal(model.lm_head.weight.view(torch.int32), before.view(torch.int32))
        assert tasks.evaluate(model, tokenizer)[LOCAL_TASK].correct.tolist() == hand
    finally:
        tasks.close()
    described = tasks.describe()[LOCAL_TASK]
    assert described["items"] == 8 and len(described["fingerprint"]) == 16


def test_per_item_correctness_is_in_doc_order_and_needs_acc() -> None:
    from cwa.perturb.downstream import _correct

    samples = [{"doc_id": 2, "acc": 1.0}, {"doc_id": 0, "acc": 0.0}, {"doc_id": 1, "acc": 1}]
    assert _correct("t", samples).tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(CwaError, match="task 't' reports no per-item accuracy"):
        _correct("t", [{"doc_id": 0, "exact_match": 1.0}])


@needs_lm_eval
def test_perturb_with_tasks_writes_downstream_csv(tiny_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    from cwa.model.loading import load_model
    from cwa.perturb.downstream import LOCAL_TASK
    from cwa.perturb.recipe import PerturbRecipe
    from cwa.rundir import DownstreamRow, Run

    run = make_run(tmp_path, tiny_dir, heldout_fraction=0.3)
    recipe = PerturbRecipe(
        run=str(run), ks=(2,), single=1, seeds=(0,), controls=("random_matched",), bootstrap=50,
        figures=False, tensorboard=False, tasks=LOCAL_TASK, tasks_limit=6, tasks_batch_size=4,
    )  # fmt: skip
    recipe.run()
    fresh = load_model(str(tiny_dir))
    for name, param in fresh.named_parameters():  # every condition restored bit for bit
        assert torch.equal(param.view(torch.int32), recipe.model.get_parameter(name).view(torch.int32)), name
    perturbation = Run.load(run).perturbation
    rows = perturbation.downstream
    assert [r.condition for r in rows] == ["baseline", "zero/topk/k=2", "zero/single/rank=1"]  # no control
    assert all(isinstance(r, DownstreamRow) and r.task == LOCAL_TASK and r.items == 6 for r in rows)
    base = rows[0]
    assert base.delta_accuracy == 0.0 and base.p_value is None and 0 <= base.accuracy <= 1
    for row in rows[1:]:
        assert row.delta_accuracy == pytest.approx(row.accuracy - base.accuracy)
        assert row.delta_accuracy_low <= row.delta_accuracy <= row.delta_accuracy_high
        assert 0 < row.p_value <= 1 and row.seconds > 0
    meta = perturbation.meta
    assert meta["settings"]["tasks"] == [LOCAL_TASK] and meta["settings"]["tasks_limit"] == 6
    local = meta["downstream"][LOCAL_TASK]
    assert local["items"] >= 6 and len(local["fingerprint"]) == 16
    assert meta["downstream"]["seconds_per_lm_eval_condition"] > 0
    assert meta["downstream"]["seconds_per_perplexity_condition"] > 0
    assert "downstream accuracy" in capsys.readouterr().out
    quick = {"ks": (2,), "single": 0, "seeds": (0,), "bootstrap": 50, "figures": False, "tensorboard": False}
    PerturbRecipe(
        run=str(run), controls=("random_matched",), tasks=[LOCAL_TASK], tasks_limit=3, tasks_on_controls=True, **quick
    ).run()
    names = [r.condition for r in Run.load(run).perturbation.downstream]
    assert names == ["baseline", "zero/topk/k=2", "zero/random_matched/k=2/seed=0"]
    # a later perturb without tasks is a new set without downstream.csv; the earlier sets keep theirs
    PerturbRecipe(run=str(run), controls=(), **quick).run()
    experiments = Run.load(run).perturbations
    assert [e.downstream is None for e in experiments] == [False, False, True]
    assert not (run / "perturb" / "3" / "downstream.csv").exists()


def test_a_downstream_csv_that_does_not_match_its_json_is_refused(tmp_path: Path) -> None:
    from cwa.rundir import DownstreamRow, read_perturbation, write_perturbation

    rows = [DownstreamRow("baseline", "t", 4, 0.75, 0.0, 0.0, 0.0, None, 1.5)]
    written, _ = write_perturbation(tmp_path, [], {"settings": {}}, downstream=rows)
    assert read_perturbation(tmp_path).downstream == rows
    (written / "downstream.csv").write_text("condition,task\nx,y\n")
    with pytest.raises(CwaError, match="does not match its perturb.json"):
        read_perturbation(tmp_path)


def test_the_report_shows_the_downstream_table(tmp_path: Path) -> None:
    from test_compare import make_run as make_fit_run
    from test_compare import random_scores

    from cwa.report.recipe import report
    from cwa.rundir import DownstreamRow, read_perturbation, write_perturbation

    run = make_fit_run(tmp_path, "d", random_scores(1), k=10)
    rows = [
        DownstreamRow("baseline", "cwa_pydoc_lastword", 200, 0.41, 0.0, 0.0, 0.0, None, 3.0),
        DownstreamRow("zero/topk/k=10", "cwa_pydoc_lastword", 200, 0.12, -0.29, -0.36, -0.22, 1.5e-9, 3.1),
    ]
    write_perturbation(run, [], {"settings": {}}, downstream=rows)
    output = report([str(run)], tmp_path / "out" / "report.md", ks=[10], sample=2000, figures=False)
    text = output.read_text()
    section = text[text.index("### Downstream accuracy") :]
    assert "| zero/topk/k=10 | cwa_pydoc_lastword | 200 | 0.120 | -0.29 [-0.36, -0.22] | 1.5e-09 |" in section
    assert "| baseline | cwa_pydoc_lastword | 200 | 0.410 |  |  |" in section
    saved = json.loads(output.with_suffix(".json").read_text())
    assert saved["perturbation"]["d/version_0"][0]["downstream"][1]["delta_accuracy"] == -0.29
    assert read_perturbation(run).downstream == rows
    without = make_fit_run(tmp_path, "e", random_scores(1), k=10)
    assert (
        "Downstream accuracy"
        not in report([str(without)], tmp_path / "r.md", ks=[10], sample=2000, figures=False).read_text()
    )


# -- without lm-eval ---------------------------------------------------------------------------------
def test_without_lm_eval_tasks_end_in_one_sentence(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    from cwa.perturb.recipe import PerturbRecipe

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    run = make_run(tmp_path, tiny_dir)
    with pytest.raises(CwaError) as caught:
        PerturbRecipe(run=str(run), tasks="cwa_pydoc_lastword")
    message = str(caught.value)
    assert message.endswith("install the eval extra: pip install 'cwa[eval]'.") and message.count(". ") == 0
    PerturbRecipe(run=str(run), ks=(2,), single=0, controls=())  # no --tasks: no lm-eval needed


@pytest.mark.slow  # a fresh interpreter importing every command (about 6 s)
def test_cwa_imports_no_lm_eval() -> None:
    code = (
        "import sys, cwa, cwa.perturb.recipe, cwa.perturb.downstream, cwa.prune.recipe, cwa.protect.recipe, "
        "cwa.report.recipe, cwa.cli; "
        "assert 'lm_eval' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.slow
@needs_lm_eval
def test_a_hub_task_that_cannot_load_offline_is_named(monkeypatch) -> None:
    from cwa.perturb.downstream import DownstreamTasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = DownstreamTasks(["arc_easy"])
    try:
        with pytest.raises(CwaError, match="cannot load the task 'arc_easy'"):
            tasks.prepare()
        with pytest.raises(CwaError, match="no task 'no_such_task'"):
            tasks.tasks = ["no_such_task"]
            tasks._load("no_such_task")
    finally:
        tasks.close()


@needs_lm_eval
def test_perturb_tasks_output_is_cwa_only(tiny_dir: Path, tmp_path: Path, capfd, caplog, monkeypatch) -> None:  # noqa: F811
    """lm-eval's log lines and warnings, and the stderr of its git-hash probe (``fatal: not a git repository``
    outside a repository), stay out of cwa's output; cwa's own progress and results stay in."""
    from cwa.cli import main

    run = make_run(tmp_path, tiny_dir, heldout_fraction=0.3)
    outside = tmp_path / "not-a-repository"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git never finds a repository above it
    capfd.readouterr()
    caplog.set_level(logging.DEBUG)
    args = ["perturb", "--run", str(run), "--ks", "[2]", "--single", "1", "--seeds", "[0]", "--controls", "[]"]
    options = ["--bootstrap", "50", "--figures", "false", "--tensorboard", "false", "--tasks", "cwa_pydoc_lastword"]
    assert main([*args, *options, "--tasks_limit", "4", "--tasks_batch_size", "2"]) == 0
    out, err = capfd.readouterr()
    assert "downstream accuracy" in out and "cwa perturb: lm-eval" in err  # cwa's results and progress
    assert "fatal" not in err and "not a git repository" not in err
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")]
    foreign = ("Tokenizing inputs", "Running loglikelihood", "Generating test split", "Warning", "WARNING")
    assert not [line for line in (out + err).splitlines() if any(word in line for word in foreign)]

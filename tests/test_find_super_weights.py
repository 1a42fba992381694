"""``cwa find-super-weights`` end to end on tiny models with a planted super weight: the run directory,
the recovered coordinates, the ablation against a hand computation, the verdict rule."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import make_tokenizer
from test_super_weights import COL, LAYER, ROW, _planted_gpt2, _planted_llama

from cwa.cli import main
from cwa.common import format as fmt
from cwa.common.errors import CwaError
from cwa.rundir import Run, load_runs


def _model_dir(tmp_path, make):
    path = tmp_path / "model"
    make().save_pretrained(path)
    make_tokenizer(path)
    return path


def _find(tmp_path, model_dir, *extra):
    return main(
        [
            "find-super-weights",
            f"--model.pretrained={model_dir}",
            "--data.seq_len=32",
            "--data.num_samples=8",
            "--data.heldout_fraction=0.3",
            "--data.batch_size=4",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            "--trainer.logger.init_args.name=sw",
            "--super_weights.bootstrap=300",
            "--super_weights.permutations=300",
            *extra,
        ]
    )


@pytest.mark.parametrize("make", [_planted_llama, _planted_gpt2])
def test_find_super_weights_writes_its_run_directory(tmp_path, make, capsys):
    model_dir = _model_dir(tmp_path, make)
    assert _find(tmp_path, model_dir) == 0
    run = tmp_path / "logs" / "sw" / "version_0"
    for name in ("config.yaml", "super_weights.csv", "summary.json", "figures/activation_spikes.png"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*")) and not list(run.rglob("*.tmp"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["kind"] == "find-super-weights"
    top = summary["candidates"][0]
    assert (top["rank"], top["layer"], top["row"], top["col"]) == (1, LAYER, ROW, COL)
    assert top["verdict"] in ("super_weight", "damaging", "activation_only") and "ablation" in top
    with open(run / "super_weights.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and rows[LAYER]["candidate_rank"] == "1" and rows[LAYER]["verdict"] == top["verdict"]
    out = capsys.readouterr().out
    assert f"layer   {LAYER} [{ROW}, {COL}]" in out and "run directory" in out
    # It is not a fit-sensitivity run: readers of those refuse it in one sentence, globs skip it.
    with pytest.raises(CwaError, match="is a find-super-weights run"):
        Run.load(run)
    with pytest.raises(CwaError, match="none of the given directories"):
        load_runs([run], skip_incomplete=True)


def test_ablation_equals_zeroing_the_weight_by_hand(tmp_path):
    from transformers import AutoModelForCausalLM

    from cwa.fit.data import CalibrationData
    from cwa.perturb.evaluate import evaluate

    model_dir = _model_dir(tmp_path, _planted_llama)
    assert _find(tmp_path, model_dir) == 0
    summary = json.loads((tmp_path / "logs" / "sw" / "version_0" / "summary.json").read_text())
    ablation = summary["candidates"][0]["ablation"]
    data = CalibrationData(
        source="pydoc", tokenizer=str(model_dir), seq_len=32, num_samples=8, heldout_fraction=0.3, batch_size=4,
        heldout_samples=24,  # find-super-weights' default
    )  # fmt: skip
    data.setup()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    before = evaluate(model, data.heldout, 4, torch.device("cpu")).stats.perplexity
    with torch.no_grad():
        model.model.layers[LAYER].mlp.down_proj.weight[ROW, COL] = 0.0
    after = evaluate(model, data.heldout, 4, torch.device("cpu")).stats.perplexity
    assert summary["heldout"]["perplexity"] == pytest.approx(before, rel=1e-5)
    assert ablation["delta_perplexity"] == pytest.approx(after - before, rel=1e-4, abs=1e-6)


def test_verdicts_follow_the_stated_rule():
    from cwa.find_super_weights.recipe import FindSuperWeights
    from cwa.rundir import PerturbRow

    def row(rank, ppl, low, p):
        return PerturbRow(
            "c",
            "zero",
            "single",
            None,
            rank,
            None,
            1,
            ppl,
            0,
            0,
            ppl - 10,
            low,
            ppl - 9,
            0,
            0,
            0,
            0,
            0,
            0,
            p,
            "baseline",
        )

    recipe = FindSuperWeights(min_increase=0.5)
    recipe.rows = [row(None, 10.0, 0, None), row(1, 40.0, 20.0, 0.001), row(2, 12.0, 1.0, 0.01), row(3, 30.0, -1, 0.3)]
    verdicts = {rank: v for rank, (v, _) in recipe.verdicts().items()}
    assert verdicts == {1: "super_weight", 2: "damaging", 3: "activation_only"}


def test_bad_settings_are_one_sentence(tmp_path, capsys):
    model_dir = _model_dir(tmp_path, _planted_llama)
    assert _find(tmp_path, model_dir, "--super_weights.threshold=0.5") == 1
    assert _find(tmp_path, model_dir, "--super_weights.projections=(") == 1
    assert _find(tmp_path, model_dir, "--super_weights.projections=nothing\\.matches") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cwa")]
    assert len(err) == 3 and all(line.startswith("cwa: error: ") for line in err), err
    assert not (tmp_path / "logs" / "sw").exists() or not any((tmp_path / "logs" / "sw").iterdir())


def test_too_few_held_out_sequences_are_refused_before_any_verdict(tmp_path, capsys):
    """With 4 held-out sequences no candidate can reach p < 0.05 (the test's floor is 2^(1-n) = 0.125): a weight
    that costs hundreds of perplexity points was labelled activation_only; now the run is refused in one sentence."""
    model_dir = _model_dir(tmp_path, _planted_llama)
    assert _find(tmp_path, model_dir, "--super_weights.heldout_samples=4") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cwa")]
    assert len(err) == 1 and "4 held-out sequences cannot reach 0.95 confidence" in err[0], err
    assert "evaluate at least 6" in err[0]
    assert not list((tmp_path / "logs").rglob("super_weights.csv"))
    # a looser interval does not loosen the verdicts' p < 0.05: 5 sequences still cannot reach it
    assert _find(tmp_path, model_dir, "--super_weights.heldout_samples=5", "--super_weights.confidence=0.9") == 1
    assert "evaluate at least 6" in capsys.readouterr().err


def test_the_held_out_baseline_and_its_sequences_are_printed_and_recorded(tmp_path, capsys):
    """Issue 20: the verdicts' baseline and the number of sequences behind them, on the console and in
    summary.json; the default held-out size is the README's (24 blocks)."""
    import inspect

    from cwa.find_super_weights.recipe import FindSuperWeights

    assert inspect.signature(FindSuperWeights).parameters["heldout_samples"].default == 24
    model_dir = _model_dir(tmp_path, _planted_llama)
    assert _find(tmp_path, model_dir, "--data.heldout_samples=64") == 0
    heldout = json.loads((tmp_path / "logs" / "sw" / "version_0" / "summary.json").read_text())["heldout"]
    assert heldout["sequences"] > 6 and heldout["tokens"] == heldout["sequences"] * 31
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "held-out baseline" in line)
    assert f"over {heldout['sequences']} sequences" in line and f"{heldout['perplexity']:.4g}"[:4] in line


def test_the_report_has_a_section_for_find_super_weights_runs(tmp_path, capsys):
    """Issue 20: a find-super-weights run given to cwa report is reported, not skipped: candidates with their
    spikes, verdicts, Δ perplexity with its interval, the held-out baseline and the row test."""
    from cwa.report.recipe import report

    model_dir = _model_dir(tmp_path, _planted_llama)
    assert _find(tmp_path, model_dir, "--super_weights.row_test=true") == 0
    run = tmp_path / "logs" / "sw" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    text = report([str(run)], tmp_path / "out" / "r.md", ks=[10], sample=200).read_text()
    section = text[text.index("### Super weights (`cwa find-super-weights`)") :]
    top = summary["candidates"][0]
    ablation = top["ablation"]
    delta = fmt.interval(
        ablation["delta_perplexity"], ablation["delta_perplexity_low"], ablation["delta_perplexity_high"], fmt.effect
    )
    line = next(line for line in section.splitlines() if line.startswith(f"| 1 | {LAYER} | [{ROW}, {COL}] |"))
    assert delta in line and top["verdict"].replace("_", " ") in line and "×" in line
    assert f"over {summary['heldout']['sequences']} sequences" in section
    assert "Row test" in section and "G = R − median control R" in section
    assert "activation_spikes.png" in section
    assert "## Key Findings" not in text  # no empty fit-sensitivity sections around it
    saved = json.loads((tmp_path / "out" / "r.json").read_text())["super_weights"]
    assert next(iter(saved.values()))["candidates"][0]["rank"] == 1

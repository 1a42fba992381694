"""The command line, in process: every artifact of a run, every config parses, clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import fit, latest_run
from safetensors.torch import load_file

from cwa.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _fit(tmp_path, model_dir, *extra):
    return fit(model_dir, tmp_path / "logs", *extra, accelerator=None)


def _run_dir(tmp_path) -> Path:
    return latest_run(tmp_path / "logs")


@pytest.mark.parametrize("metric", ["magnitude", "grad_x_weight", "grad_squared", "hutchinson_diag"])
def test_fit_sensitivity_writes_every_artifact(tmp_path, tiny_gpt2_dir, metric, capsys):
    assert _fit(tmp_path, tiny_gpt2_dir, f"--model.metric={metric}", "--model.k=25") == 0
    run = _run_dir(tmp_path)
    for name in (
        "config.yaml",
        "scores.safetensors",
        "topk.csv",
        "summary.json",
        "figures/score_histogram.png",
        "figures/layer_module_heatmap.png",
        "figures/topk_locations.png",
    ):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    assert not list(run.rglob("*.tmp")), "a temporary file was left behind"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["metric"]["name"] == metric
    assert summary["tokens"] == 6 * 31 and summary["samples"] == 6
    assert summary["data_fingerprint"] and summary["environment"]["versions"]["torch"]
    scores = load_file(run / "scores.safetensors")
    assert "lm_head.weight" not in scores  # tied to wte: scored once
    rows = list(csv.DictReader((run / "topk.csv").read_text().splitlines()))
    assert len(rows) == 25 and [int(r["rank"]) for r in rows] == list(range(1, 26))
    flat = torch.cat([s.reshape(-1).abs() for s in scores.values()])
    assert abs(float(rows[-1]["score"])) == pytest.approx(float(torch.topk(flat, 25).values[-1]), rel=1e-6)
    for row in rows[:5]:
        assert float(row["score"]) == pytest.approx(float(scores[row["parameter"]].reshape(-1)[int(row["index"])]))
    out = capsys.readouterr().out
    assert "run directory" in out and metric in out


def test_per_layer_mode_and_include(tmp_path, tiny_llama_dir):
    assert _fit(tmp_path, tiny_llama_dir, "--model.mode=per_layer", "--model.k=3", "--model.include=[mlp]") == 0
    rows = list(csv.DictReader((_run_dir(tmp_path) / "topk.csv").read_text().splitlines()))
    params = {r["parameter"] for r in rows}
    assert len(rows) == 3 * len(params) == 3 * 6 and all(".mlp." in p for p in params)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.pretrained=/nonexistent/model"], "does not exist"),
        (["--model.metric=fisher"], "unknown metric 'fisher'"),
        (["--model.k=0"], "k must be at least 1"),
        (["--model.k=100000000"], "larger than the"),
        (["--model.include=[attention_nothing]"], "select no parameter"),
        (["--data.num_samples=100000"], "num_samples=100000"),
    ],
)
def test_bad_input_is_one_sentence_and_nonzero(tmp_path, tiny_llama_dir, capsys, args, message):
    code = _fit(tmp_path, tiny_llama_dir, *args)
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for run in (tmp_path / "logs").rglob("version_*"):
        assert not (run / "summary.json").exists(), "a failed run must not look complete"


def test_hub_unreachable_is_explained(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["fit-sensitivity", "--model.pretrained=gpt2", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1 and "unreachable" in err and "directory" in err


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses_and_names_its_command(config, capsys):
    first = config.read_text().splitlines()[0]
    assert first.startswith("# cwa "), f"{config.name} must start with the command that runs it"
    verb = first.split()[2]
    if verb != "fit-sensitivity":
        pytest.skip(f"{verb} configs are parsed by that command's tests")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit-sensitivity", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "pretrained" in capsys.readouterr().out


def test_help_lists_commands_and_options(capsys):
    assert main([]) == 0
    assert "fit-sensitivity" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit-sensitivity", "-h"])
    out = capsys.readouterr().out
    for option in (
        "--model.pretrained",
        "--model.metric",
        "--model.k",
        "--model.mode",
        "--model.include",
        "--data.seq_len",
        "--data.num_samples",
        "--data.batch_size",
        "--data.source",
    ):
        assert option in out

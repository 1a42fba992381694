"""``CWA_SMOKE=1`` (``cwa.common.smoke``): caps only lower sizes, apply to every command in one place, are
announced once and recorded in what a command writes; unset, nothing changes."""

from __future__ import annotations

import json

import pytest
from jsonargparse import Namespace

from cwa.common import smoke
from tests.helpers import fit, latest_run


@pytest.fixture
def smoke_on(monkeypatch):
    monkeypatch.setenv(smoke.ENV, "1")
    monkeypatch.setattr(smoke, "_announced", False)


def _options(**values) -> Namespace:
    config = Namespace()
    for key, value in values.items():
        config[key.replace("__", ".")] = value
    return config


def test_caps_lower_sizes_and_fill_unset_ones(smoke_on, capsys):
    config = smoke.shrink(
        _options(
            data__num_samples=32,
            data__seq_len=16,
            heldout_samples=None,
            bootstrap=2000,
            seeds=[2, 0, 1],
            k=10_000,
            controls=("random_matched", "bottomk"),
        )
    )
    assert config["data.num_samples"] == smoke.CAPS["data.num_samples"]
    assert config["data.seq_len"] == 16  # already below its cap
    assert config["heldout_samples"] == 6  # None means all of them: capped, and cwa accepts no fewer
    assert config["bootstrap"] == smoke.CAPS["bootstrap"] and config["seeds"] == [2]
    assert config["controls"] == ("random_matched",)  # the first given
    assert config["k"] == 10_000  # not a size of the work: untouched
    smoke.shrink(_options(bootstrap=5000))
    assert capsys.readouterr().err == smoke.MESSAGE + "\n"  # said once per process


def test_unset_or_zero_changes_nothing(monkeypatch, capsys):
    for value in ("", "0"):
        monkeypatch.setenv(smoke.ENV, value)
        config = smoke.shrink(_options(bootstrap=2000, heldout_samples=None, seeds=[0, 1, 2]))
        assert config["bootstrap"] == 2000 and config["heldout_samples"] is None and config["seeds"] == [0, 1, 2]
        assert smoke.bound_ks((1, 10, 100, 1000), 50) == (1, 10, 100, 1000)
    assert capsys.readouterr().err == ""


def test_ks_bounded_by_the_run(smoke_on):
    assert smoke.bound_ks((1, 10, 100, 1000, 10_000), 5) == (1,)
    assert smoke.bound_ks((1, 10, 100, 1000), 5000) == (1, 10)  # at most MAX_KS
    assert smoke.bound_ks((1000,), 100) == (100,)  # none fits: the run's whole list
    assert smoke.bound_ks((1, 10, 100), 100, required=(3,)) == (1, 3, 10)  # a leave-one-out set's K stays


def test_a_smoke_fit_is_shrunk_and_says_so(smoke_on, tmp_path, tiny_llama_dir, capsys):
    assert fit(tiny_llama_dir, tmp_path, num_samples=8, batch_size=4, figures=False) == 0
    summary = json.loads((latest_run(tmp_path) / "summary.json").read_text())
    assert summary["smoke"] is True and summary["environment"]["smoke"] is True
    assert summary["data"]["num_samples"] == 4 and summary["data"]["batch_size"] == 2
    assert smoke.MESSAGE in capsys.readouterr().err


def test_a_real_fit_says_it_is_not_smoke(monkeypatch, tmp_path, tiny_llama_dir):
    monkeypatch.delenv(smoke.ENV, raising=False)
    assert fit(tiny_llama_dir, tmp_path, num_samples=8, batch_size=4, figures=False) == 0
    summary = json.loads((latest_run(tmp_path) / "summary.json").read_text())
    assert summary["smoke"] is False and summary["environment"]["smoke"] is False
    assert summary["data"]["num_samples"] == 8


def test_the_report_says_which_runs_were_smoke_runs(tmp_path, capsys):
    from cwa.cli import main
    from tests.test_compare import make_run, random_scores

    real = make_run(tmp_path, "real", random_scores(0))
    shrunk = make_run(tmp_path, "shrunk", random_scores(1))
    summary = json.loads((shrunk / "summary.json").read_text())
    (shrunk / "summary.json").write_text(json.dumps({**summary, "smoke": True}))
    output = tmp_path / "report.md"
    assert main(["report", str(real), str(shrunk), "--output", str(output), "--figures", "false"]) == 0
    warning = "1 of the 2 runs were made with CWA_SMOKE (sizes shrunk): not measurements."
    assert output.read_text().startswith(f"> **Note:** {warning}")
    assert f"note: {warning}" in capsys.readouterr().err


def test_only_the_first_two_blocks_are_scored(smoke_on):
    """The README's fit-sensitivity commands keep their own exclusions, and score blocks 0 and 1 only (no embedding,
    no later block): every later command then transforms and checksums a few tensors, not 134M weights."""
    from cwa.model.params import _matches, compile_patterns

    config = smoke.shrink(_options(model__include=None, model__exclude=["bias"]))
    patterns = compile_patterns(config["model.exclude"], "exclude")
    assert config["model.exclude"][0] == "bias"
    excluded = {
        "model.layers.2.mlp.down_proj.weight": True,
        "model.layers.11.self_attn.q_proj.weight": True,
        "model.embed_tokens.weight": True,
        "transformer.wte.weight": True,
        "model.layers.1.mlp.down_proj.weight": False,
        "transformer.h.0.attn.c_attn.weight": False,
        "model.norm.weight": False,
    }
    assert {name: any(_matches(name, p) for p in patterns) for name in excluded} == excluded

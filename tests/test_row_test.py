"""The census-comparable row test of ``cwa find-super-weights`` on tiny models with a planted super weight:
R and G against a hand computation (own forward pass and cross-entropy), the seeded controls, the intervals."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import torch
import torch.nn.functional as F
from test_find_super_weights import _find, _model_dir
from test_super_weights import LAYER, ROW, _planted_gpt2, _planted_llama

from cwa.ablation.row_test import control_rows, gap, row_indices


def _mean_nll(model, blocks) -> float:
    """Token-weighted mean next-token NLL, computed here without cwa's evaluation loop."""
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1].double()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)))


def _zero_row(model, row: int) -> None:
    with torch.no_grad():
        if hasattr(model, "transformer"):  # GPT-2 Conv1D stores (in, out): output row = column
            model.transformer.h[LAYER].mlp.c_proj.weight[:, row] = 0.0
        else:
            model.model.layers[LAYER].mlp.down_proj.weight[row, :] = 0.0


@pytest.mark.parametrize("make", [_planted_llama, _planted_gpt2])
def test_row_test_matches_a_hand_computation(tmp_path, make, capsys):
    from transformers import AutoModelForCausalLM

    from cwa.fit.data import CalibrationData

    model_dir = _model_dir(tmp_path, make)
    assert _find(tmp_path, model_dir, "--super_weights.row_test=true", "--super_weights.verify=false") == 0
    run = tmp_path / "logs" / "sw" / "version_0"
    summary = json.loads((run / "summary.json").read_text())["row_test"]
    with open(run / "row_test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["role"] for r in rows] == ["candidate"] + ["control"] * 5
    assert int(rows[0]["row"]) == ROW and int(rows[0]["layer"]) == LAYER
    controls = [int(r["row"]) for r in rows[1:]]
    assert ROW not in controls and len(set(controls)) == 5

    data = CalibrationData(
        source="pydoc", tokenizer=str(model_dir), seq_len=32, num_samples=8, heldout_fraction=0.3, batch_size=4,
        heldout_samples=24,  # find-super-weights' default
    )  # fmt: skip
    data.setup()
    base = _mean_nll(AutoModelForCausalLM.from_pretrained(model_dir).eval(), data.heldout)
    relative = []
    for row in [ROW, *controls]:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        _zero_row(model, row)
        relative.append((_mean_nll(model, data.heldout) - base) / base)
    measured = [float(r["r"]) for r in rows]
    assert measured == pytest.approx(relative, rel=1e-4, abs=1e-6)
    g = relative[0] - statistics.median(relative[1:])
    assert summary["g"]["value"] == pytest.approx(g, rel=1e-4, abs=1e-6)
    assert float(rows[0]["g"]) == pytest.approx(g, rel=1e-4, abs=1e-6)
    assert summary["base_nll"] == pytest.approx(base, rel=1e-5)
    assert summary["g"]["low"] <= summary["g"]["value"] <= summary["g"]["high"]
    for r in rows:
        assert float(r["r_low"]) <= float(r["r"]) <= float(r["r_high"])
    # a random tiny model has no loss to protect, so only the size of the planted row's effect is checked
    assert abs(relative[0]) > 10 * max(abs(r) for r in relative[1:])
    out = capsys.readouterr().out
    assert f"row test: layer {LAYER} row {ROW}" in out and "G = R - median control R" in out


def test_controls_are_seeded_distinct_and_never_the_candidate():
    first = control_rows(10, 3, 5, seed=0)
    assert first == control_rows(10, 3, 5, seed=0) and 3 not in first and len(set(first)) == 5
    assert control_rows(10, 3, 9, seed=1) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError):
        control_rows(4, 0, 4, seed=0)


def test_row_indices_follow_each_layout():
    linear = torch.arange(12).view(3, 4)
    assert row_indices((3, 4), (1, 2), 0, 1, 2).tolist() == linear[2].tolist()
    conv1d = torch.arange(12).view(4, 3)  # (in, out)
    assert row_indices((4, 3), (2, 1), 1, 0, 0).tolist() == conv1d[:, 0].tolist()
    experts = torch.arange(24).view(2, 3, 4)
    assert row_indices((2, 3, 4), (1, 0, 0), 1, 2, 2).tolist() == experts[1, 2].tolist()


def test_gap_uses_the_median_of_the_controls_on_each_resample():
    candidate = torch.tensor([1.0, 1.1, 0.9, 1.0])  # full sample, then three resamples
    controls = [torch.tensor([0.1, 0.2, 0.0, 0.1]), torch.tensor([0.3, 0.1, 0.1, 0.2]), torch.tensor([0.2] * 4)]
    g, low, high = gap(candidate, controls, confidence=0.5)
    assert g == pytest.approx(1.0 - 0.2)
    resampled = torch.tensor([1.1 - 0.2, 0.9 - 0.1, 1.0 - 0.2], dtype=torch.float64)
    expected = torch.quantile(resampled, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert (low, high) == pytest.approx(expected.tolist())


def test_row_controls_below_one_is_one_sentence():
    from cwa.common.errors import CwaError
    from cwa.find_super_weights.recipe import FindSuperWeights

    with pytest.raises(CwaError, match=r"^row_controls must be at least 1, got 0\.$"):
        FindSuperWeights(row_controls=0)

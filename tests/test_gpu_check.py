"""``scripts/gpu_check.sh --tiny``: the prepared GPU check runs end to end on the CPU at a tiny shape."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # the whole script end to end: several cwa processes, about 10 s idle
def test_gpu_check_tiny_runs_every_step(tmp_path):
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python")))
    if not Path(env["PYTHON"]).exists():
        env["PYTHON"] = "python3"
    out = tmp_path / "check.json"
    command = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--tiny", "--json", str(out), "--work", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {row["step"].split(":")[0].split(" (")[0]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == [
        "write random bf16 weights",
        "seed experiment",
        "find-super-weights",
        "wanda",
        "obs",
        "hutchinson_diag, 1 autograd probe",
        "perturb",
    ]
    assert all(row["seconds"] and row["seconds"] > 0 for row in rows.values())
    assert rows["seed experiment"]["reference"] > 0 and rows["find-super-weights"]["reference"] > 0
    assert all(rows[m]["predicted_gib"] > 0 for m in ("seed experiment", "wanda", "obs"))
    # The model was written as several safetensors shards and the seed run loaded them shard-only.
    assert len(list((tmp_path / "model").glob("model-*-of-*.safetensors"))) > 1
    seed = next((tmp_path / "logs" / "seed").glob("version_*"))
    summary = json.loads((seed / "summary.json").read_text())
    assert summary["strategy"] == "ModelParallelStrategy" and summary["dtype"] == "bfloat16"
    assert summary["samples"] == 8 and summary["mode"] == "per_layer"
    assert "| step | seconds |" in result.stdout

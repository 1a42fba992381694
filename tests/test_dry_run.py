"""``cwa fit-sensitivity --dry_run``: per-rank memory from config.json alone, checked by hand and against
``scripts/sizing.py`` on Llama-3.1-8B's published shape; tiny models through the command line."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from cwa.cli import main
from cwa.fit.module import SensitivityModule
from cwa.fit.trainer import dry_run_fit_sensitivity
from cwa.scoring.saliency import OBS
from cwa.scoring.sizing import gib, model_layout, plan_memory, shard_numel

ROOT = Path(__file__).resolve().parent.parent

# Llama-3.1-8B by hand: embedding and untied LM head 128256 x 4096; per layer q, o 4096 x 4096, k, v 1024 x 4096
# (8 key-value heads of 128), gate, up, down 14336 x 4096, two RMSNorm scales; one final norm.
VOCAB, HIDDEN, FFN, LAYERS, KV = 128256, 4096, 14336, 32, 1024
EMBED = VOCAB * HIDDEN
LAYER = 2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN + 3 * FFN * HIDDEN + 2 * HIDDEN
ROOT_UNIT = 2 * EMBED + HIDDEN
TOTAL = LAYERS * LAYER + ROOT_UNIT


def _sizing_script():
    spec = importlib.util.spec_from_file_location("sizing_script", ROOT / "scripts" / "sizing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sizing():
    return _sizing_script()


@pytest.fixture(scope="module")
def llama8b(sizing):
    return sizing.build_meta_model("llama-3.1-8b", "bfloat16")


@pytest.fixture(scope="module")
def llama8b_dir(tmp_path_factory, sizing) -> Path:
    """What a user without the weights has: a directory holding only Llama-3.1-8B's config.json."""
    from transformers import LlamaConfig

    values = {k: v for k, v in sizing.PRESETS["llama-3.1-8b"].items() if k != "model_type"}
    path = tmp_path_factory.mktemp("llama-3.1-8b-config")
    LlamaConfig(**values).save_pretrained(path)
    assert [p.name for p in path.iterdir()] == ["config.json"]
    return path


def test_parameter_counts_by_hand(llama8b):
    assert TOTAL == 8_030_261_248  # the published parameter count
    layout = model_layout(llama8b, dict(llama8b.named_parameters()), 8, sharded=True)
    assert layout.total == layout.scored == TOTAL
    assert layout.rank_total == TOTAL // 8  # every row count divides by 8
    assert layout.largest_scored == EMBED and layout.rank_largest_scored == EMBED // 8
    assert layout.largest_unit == layout.largest_unit_scored == ROOT_UNIT  # larger than a layer's LAYER
    assert next(llama8b.parameters()).device.type == "meta"


def test_sizing_grad_x_weight_bf16_on_8_ranks_by_hand(sizing, llama8b):
    memory = sizing.estimate(llama8b, "bfloat16", "grad_x_weight", 8)
    assert memory.weights == TOTAL * 2 // 8 + ROOT_UNIT * 2  # shards + the root unit unsharded while it runs
    assert memory.gradients == ROOT_UNIT * 2 + EMBED * 2 // 8  # one unit's gradients + one consumed shard
    assert memory.accumulators == TOTAL * 4 // 8
    assert memory.extras == {"writing scores: one whole score tensor": EMBED * 4}


def test_sizing_hutchinson_float32_on_8_ranks_by_hand(sizing, llama8b):
    memory = sizing.estimate(llama8b, "bfloat16", "hutchinson_diag", 8)  # finite differences: float32
    shard = TOTAL * 4 // 8
    assert memory.weights == shard + ROOT_UNIT * 4
    assert memory.gradients == shard + ROOT_UNIT * 4
    assert memory.accumulators == shard
    draw = -(-EMBED // 8) + EMBED + 4 * EMBED  # random bytes, bits, the whole float32 probe
    assert memory.extras == {
        "weight backup (finite differences)": shard,
        "float32 probes": shard,
        "drawing one whole probe": draw,
        "float32 unperturbed gradient (forward scheme)": shard,  # the default scheme holds g(w) per batch
        "writing scores: one whole score tensor": EMBED * 4,
    }


def test_dry_run_equals_sizing_exactly(sizing, llama8b, llama8b_dir, capsys):
    module = SensitivityModule(pretrained=str(llama8b_dir), dtype="bfloat16", metric="grad_x_weight")
    memory = dry_run_fit_sensitivity(module, world_size=8, sharded=True)
    assert memory == sizing.estimate(llama8b, "bfloat16", "grad_x_weight", 8)
    assert "8,030,261,248 of 8,030,261,248 parameters scored" in capsys.readouterr().out


def _printed(out: str) -> dict[str, str]:
    return {m.group(1).strip(): m.group(2) for m in re.finditer(r"^(\S.*?)\s{3,}(\d+\.\d\d)$", out, re.M)}


def test_cli_dry_run_of_the_8b_config(sizing, llama8b, llama8b_dir, tmp_path, monkeypatch, capsys):
    """The shipped config (8 GPUs, FSDP2, bf16) planned here, without GPUs, weights or a tokenizer."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(ROOT / "configs" / "llama-3.1-8b.yaml"), f"--model.pretrained={llama8b_dir}"]
    assert main(["fit-sensitivity", *args, "--dry_run"]) == 0
    out = capsys.readouterr().out
    memory = sizing.estimate(llama8b, "bfloat16", "grad_x_weight", 8)
    printed = _printed(out)
    assert printed["weights"] == gib(memory.weights) == "3.83"
    assert printed["gradients"] == gib(memory.gradients)
    assert printed["accumulators (float32)"] == gib(memory.accumulators)
    assert printed["total"] == gib(memory.total)
    assert "8 process(es), FSDP2" in out and "Not counted: activations" in out
    assert list(tmp_path.iterdir()) == []  # no lightning_logs/version_N, no config.yaml


def test_cli_dry_run_refuses_what_the_run_would(llama8b_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(ROOT / "configs" / "llama-3.1-8b.yaml"), f"--model.pretrained={llama8b_dir}"]
    assert main(["fit-sensitivity", *args, "--model.metric=hutchinson_diag", "--dry_run"]) == 1
    assert "needs hvp: finite_difference" in capsys.readouterr().err
    fd = ["--model.metric=cwa.scoring.scorers.HutchinsonDiag", "--model.metric.hvp=finite_difference"]
    assert main(["fit-sensitivity", *args, *fd, "--dry_run"]) == 1
    assert "needs float32 weights" in capsys.readouterr().err


def test_shards_round_rows_up():
    assert shard_numel((5, 3), 2) == 9  # rank 0 holds ceil(5 / 2) = 3 rows
    assert shard_numel((4,), 8) == 1 and shard_numel((), 4) == 1


def test_obs_extras_equal_the_scorer_on_the_real_model(tiny_llama_dir):
    """The input groups found on the meta device are those the real scorer allocates."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    params = {n: p for n, p in model.named_parameters() if ".mlp." in n}
    scorer = OBS()
    scorer.bind(params)
    scorer.attach(model)
    module = SensitivityModule(pretrained=str(tiny_llama_dir), metric="obs", include="mlp")
    memory = dry_run_fit_sensitivity(module, world_size=1, sharded=False)
    assert memory.extras["X^T X per distinct layer input"] == scorer.memory_bytes()["accumulators"]
    assert memory.extras["X^T X per distinct layer input"] == sum(t.numel() * 8 for t in scorer.acc.values() if t.dim())
    assert memory.accumulators == sum(p.numel() * 4 for p in params.values())
    assert memory.weights == sum(p.numel() * 4 for p in model.parameters())
    assert memory.gradients == 0


def test_cli_dry_run_of_a_tiny_model(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """Through cwa.cli.main: FSDP2 over 2 CPU processes planned from one, nothing tokenized or written."""
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    monkeypatch.chdir(tmp_path)
    args = [
        "fit-sensitivity",
        f"--model.pretrained={config_only}",  # no tokenizer: the data module must not be set up
        "--model.metric=grad_squared",
        "--model.exclude=embed_tokens",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=fsdp2",
        "--data.seq_len=32",
        "--data.num_samples=4",
        "--data.batch_size=2",
        "--dry_run=true",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    model = _tiny_meta(tiny_llama_dir)
    scored = {n: p for n, p in model.named_parameters() if "embed_tokens" not in n}
    layout = model_layout(model, scored, 2, sharded=True)
    memory = plan_memory(layout, SensitivityModule(metric="grad_squared").scorer, "float32")
    assert layout.scored == sum(p.numel() for p in scored.values()) < layout.total
    assert _printed(out)["total"] == gib(memory.total, 2**20)
    assert "2 process(es), FSDP2" in out and "MiB" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config-only"]
    assert main([*args[:-1], "--trainer.devices=3", "--dry_run=true"]) == 1  # 3 processes, 2 batches
    assert "processes but only" in capsys.readouterr().err


def _tiny_meta(model_dir: Path) -> torch.nn.Module:
    from cwa.model.loading import build_meta_model

    return build_meta_model(str(model_dir))


SIZING_COMMAND = "`python scripts/sizing.py llama-3.1-8b --dtype bfloat16`"


def _table_after(text: str, marker: str) -> list[list[str]]:
    """The cells of the body rows of the first Markdown table after ``marker``."""
    lines = text[text.index(marker) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_docs_sizing_tables_are_what_the_sizing_code_computes(sizing):
    """docs/scale.md prints scripts/sizing.py's table for Llama-3.1-8B in bf16 and the README rounds its totals:
    every row is recomputed here, so a change to the memory model cannot leave either stale."""
    text, _ = sizing.table("llama-3.1-8b", "bfloat16", [1, 2, 4, 8])
    body = [line for line in text.splitlines() if line.startswith("| ") and "**" in line]
    computed = {line.split("|")[1].strip(): line for line in body}
    assert set(computed) == set(sizing.METRICS)
    docs = (ROOT / "docs" / "scale.md").read_text()
    rows = _table_after(docs, SIZING_COMMAND)
    assert [row[0] for row in rows] == list(sizing.METRICS)
    for row in rows:
        assert "| " + " | ".join(row) + " |" == computed[row[0]], f"docs/scale.md's {row[0]} row is stale"
    totals = {m: re.findall(r"\*\*([\d.]+)\*\*", line) for m, line in computed.items()}
    readme = (ROOT / "README.md").read_text()
    rows = _table_after(readme, SIZING_COMMAND)
    named = 0
    for row in rows:
        for metric in (m for m in re.findall(r"`(\w+)`", row[0]) if m in totals):
            named += 1
            expected = [f"{float(total):.1f}" for total in totals[metric]]
            assert row[1:] == expected, f"the README's sizing row for {metric} is stale: {row[1:]} != {expected}"
    assert named == len(sizing.METRICS)

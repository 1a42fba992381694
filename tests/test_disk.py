"""``save_scores`` and the dry run's disk figures: planned bytes against the files a small run writes, and
what bfloat16 scores change for the readers (ties and ranks), measured on a tiny model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cwa import rundir
from cwa.cli import main
from cwa.fit.module import SensitivityModule
from cwa.fit.trainer import plan_run_disk
from cwa.rundir.disk import safetensors_bytes
from cwa.scoring.topk import rank_order


def _fit(model_dir: Path, save_dir: Path, *extra: str) -> Path:
    args = [
        "fit-sensitivity",
        f"--model.pretrained={model_dir}",
        "--data.seq_len=32",
        "--data.num_samples=4",
        "--data.batch_size=2",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.logger.init_args.name=run",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=cwa.fit.callbacks.ScoreFigures",
        "--trainer.callbacks.enabled=false",
        *extra,
    ]
    assert main(args) == 0
    return sorted((save_dir / "run").glob("version_*"))[-1]


def test_safetensors_bytes_equal_a_written_file(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a.weight": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16), "c": torch.zeros(())}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "cwa-scores/1", "model": "ü"})
    planned = safetensors_bytes(
        {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, {"format": "cwa-scores/1", "model": "ü"}
    )
    assert planned == (tmp_path / "x.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("metric", "save_scores", "mode"),
    [("grad_x_weight", "bfloat16", "per_layer"), ("grad_x_weight", "float32", "global"), ("wanda", "off", "global")],
)
def test_dry_run_disk_figures_match_a_small_run(tiny_llama_dir, tmp_path, metric, save_scores, mode):
    extra = [f"--model.metric={metric}", f"--model.save_scores={save_scores}", f"--model.mode={mode}", "--model.k=7"]
    extra += ["--model.checkpoint_every=1", "--model.keep_checkpoints=true"]
    run = _fit(tiny_llama_dir, tmp_path, *extra)
    module = SensitivityModule(
        pretrained=str(tiny_llama_dir), metric=metric, k=7, mode=mode, save_scores=save_scores, checkpoint_every=1
    )
    plan = plan_run_disk(module, world_size=1, sharded=False)
    scores = run / rundir.SCORES
    if save_scores == "off":
        assert rundir.SCORES not in plan.files and not scores.exists()
    else:
        # Exact but for the header's digits: safetensors orders the tensors its own way.
        assert abs(plan.files[rundir.SCORES] - scores.stat().st_size) <= 64
    topk = (run / rundir.TOPK).stat().st_size
    if mode == "per_layer":
        assert topk <= plan.files[rundir.TOPK] <= 1.6 * topk  # an upper bound, not a loose one
    else:
        assert 0.6 * topk <= plan.files[rundir.TOPK] <= 1.6 * topk
    written = sum(p.stat().st_size for p in (run / rundir.ACCUMULATORS).iterdir())
    # The checkpoint's data fingerprint is estimated: a few hundred bytes either way.
    assert abs(plan.files["accumulators/"] - written) <= 512 + 0.001 * written


def test_dry_run_prints_the_disk_table(tiny_llama_dir, capsys):
    from cwa.fit.trainer import dry_run_fit_sensitivity

    module = SensitivityModule(pretrained=str(tiny_llama_dir), metric="grad_x_weight", save_scores="bfloat16")
    dry_run_fit_sensitivity(module, world_size=2, sharded=True)
    out = capsys.readouterr().out
    assert "scores.safetensors" in out and "bfloat16, exact" in out and "topk.csv" in out
    assert "only written with checkpoint_every" in out


def test_sharded_checkpoints_hold_row_shards(tiny_llama_dir):
    """Under FSDP2 the accumulators of all ranks together are one copy of every scored tensor."""
    one = plan_run_disk(SensitivityModule(pretrained=str(tiny_llama_dir)), world_size=1, sharded=False)
    two = plan_run_disk(SensitivityModule(pretrained=str(tiny_llama_dir)), world_size=2, sharded=True)
    ddp = plan_run_disk(SensitivityModule(pretrained=str(tiny_llama_dir)), world_size=2, sharded=False)
    data = one.files["accumulators/"]
    assert abs(two.files["accumulators/"] - data) < 4096  # one more header
    assert abs(ddp.files["accumulators/"] - 2 * data) < 64


def _bf16_reference(scores: dict[str, torch.Tensor], names: list[str], k: int) -> list[tuple[str, int]]:
    """The global top-k of bfloat16-rounded |scores| by the one tie rule (|score|, then parameter order, then
    flat index), computed over the concatenation."""
    keys = torch.cat([scores[n].reshape(-1).to(torch.bfloat16).float().abs() for n in names])
    param = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    index = torch.cat([torch.arange(scores[n].numel()) for n in names])
    order = rank_order(keys, param, index)[:k]
    return [(names[int(param[o])], int(index[o])) for o in order]


def test_bfloat16_scores_change_ties_and_ranks_only_by_rounding(tiny_llama_dir, tmp_path, capsys):
    """Readers work from a bfloat16 scores file: its global top-K is the rounded scores' (checked against the
    concatenation), and the measured change against float32 is what rounding to 8 significant bits gives."""
    from scipy.stats import spearmanr

    full = _fit(tiny_llama_dir, tmp_path / "f32", "--model.k=10")
    half = tmp_path / "bf16" / full.name
    shutil.copytree(full, half)
    exact = {n: t.clone() for n, t in rundir.LazyScores(full / rundir.SCORES).items()}
    rundir.write_scores(half / rundir.SCORES, exact, "bfloat16", rundir.scores_metadata("grad_x_weight", "tiny"))
    a, b = rundir.Run.load(full), rundir.Run.load(half)
    k = 500  # beyond topk.csv: both select from their scores file
    got = b.topk_keys(k)
    assert got == _bf16_reference(exact, list(b.infos), k)
    reference = a.topk_keys(k)
    overlap = len(set(got) & set(reference)) / k
    flat = torch.cat([t.reshape(-1).abs() for t in exact.values()])
    rounded = flat.to(torch.bfloat16).float()
    tied = 1.0 - torch.unique(rounded[flat > 0]).numel() / int((flat > 0).sum())
    rho = spearmanr(flat.numpy(), rounded.numpy()).statistic
    with capsys.disabled():
        print(
            f"\nbfloat16 scores: top-{k} overlap {overlap:.3f}, cutoff ties {b.cutoff_tie(k)} (float32 "
            f"{a.cutoff_tie(k)}), {tied:.1%} of nonzero scores share a value, Spearman {rho:.6f}"
        )
    assert overlap >= 0.95 and rho > 0.999
    assert a.topk.names == b.topk.names and len(a.topk) == len(b.topk)  # topk.csv is written from float32


def test_readers_work_from_bfloat16_scores_and_without_scores(tiny_llama_dir, tmp_path):
    """compare and report accept a bfloat16 run beside one that saved no scores, saying what the latter lacks."""
    half = _fit(tiny_llama_dir, tmp_path / "bf16", "--model.save_scores=bfloat16", "--model.k=20")
    none = _fit(tiny_llama_dir, tmp_path / "off", "--model.save_scores=off", "--model.k=20", "--data.seed=1")
    assert rundir.Run.load(half).has_scores and not rundir.Run.load(none).has_scores
    out = tmp_path / "compare"
    assert main(["compare", str(half), str(none), "--ks", "5,10", "--sample", "300", "--output", str(out)]) == 0
    text = " ".join(p.read_text() for p in out.rglob("*.json"))
    assert "saved no scores.safetensors" in text
    report = tmp_path / "report.md"
    assert main(["report", str(half), str(none), "--output", str(report), "--ks", "5,10", "--sample", "300"]) == 0
    assert "scores.safetensors" in report.read_text()  # the report says which findings the scoreless run lacks

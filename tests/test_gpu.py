"""The CUDA / NCCL path (marker ``gpu``): run with ``pytest -m gpu`` wherever a GPU is present.

Skipped without CUDA (and the 2-GPU tests without 2 GPUs). What they check:

* bf16 fit-sensitivity of the embedded SmolLM2-135M on one GPU: float32 scores without NaN or Inf, the
  same mean loss as a float32 CPU run within 3%, the same top weights within bf16 noise, peak CUDA memory
  recorded in the summary;
* DDP and FSDP2 (NCCL, shard-only loading) on 2 GPUs equal 1 GPU for a linear metric and a turn-taking
  one, and shard-only loading equals loading the whole checkpoint bit for bit on the GPUs too;
* ``scripts/benchmark.py --device cuda`` runs and reports peak CUDA memory.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import fit_args, latest_run
from safetensors.torch import load_file
from test_distributed import METRICS, _args, _assert_same_run, _env, _run_dir, _run_workers

from cwa.cli import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
ROOT = Path(__file__).resolve().parent.parent
GPU_METRICS = ("grad_x_weight", "grad_squared")


def _embedded_args(save_dir: Path, name: str, *extra: str) -> list[str]:
    settings = {"name": name, "seq_len": 128, "num_samples": 8, "k": 50, "accelerator": None, "figures": False}
    return fit_args(None, save_dir, *extra, **settings)


def _top(run: Path) -> list[tuple[str, str]]:
    return [(r["parameter"], r["index"]) for r in csv.DictReader((run / "topk.csv").read_text().splitlines())]


@pytest.mark.slow
def test_bf16_fit_sensitivity_on_one_gpu(tmp_path):
    gpu_args = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--model.dtype=bfloat16"]
    assert main(_embedded_args(tmp_path, "gpu", *gpu_args)) == 0
    assert main(_embedded_args(tmp_path, "cpu", "--trainer.accelerator=cpu", "--model.dtype=float32")) == 0
    gpu, cpu = _run_dir_named(tmp_path, "gpu"), _run_dir_named(tmp_path, "cpu")
    summary = json.loads((gpu / "summary.json").read_text())
    reference = json.loads((cpu / "summary.json").read_text())
    assert summary["tokens"] == reference["tokens"]
    assert summary["mean_loss"] == pytest.approx(reference["mean_loss"], rel=0.03)
    assert summary["memory"]["peak_cuda_allocated_mib"] > 250  # the bf16 weights alone are 257 MiB
    scores = load_file(gpu / "scores.safetensors")
    assert all(s.dtype == torch.float32 and bool(torch.isfinite(s).all()) for s in scores.values())
    overlap = len(set(_top(gpu)) & set(_top(cpu)))
    assert overlap >= 25, f"bf16 on the GPU shares only {overlap} of the float32 CPU run's top 50"


def test_every_artifact_of_a_gpu_run(tiny_llama_dir, tmp_path):
    """The scores stay on the GPU until written: the figures, histograms and statistics read them there."""
    gpu = ("--trainer.accelerator=gpu", "--trainer.devices=1")
    args = fit_args(tiny_llama_dir, tmp_path, *gpu, batch_size=None, k=10, accelerator=None)
    assert main(args) == 0
    run = _run_dir_named(tmp_path, "tiny")
    for name in ("scores.safetensors", "topk.csv", "summary.json", "figures/score_histogram.png"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    assert json.loads((run / "summary.json").read_text())["tensors"]


def _run_dir_named(save_dir: Path, name: str) -> Path:
    return latest_run(save_dir, name)


@pytest.fixture(scope="module")
def one_gpu_references(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for metric in GPU_METRICS:
        save_dir = tmp_path_factory.mktemp(f"gpu1-{metric}")
        args = _args(tiny_llama_dir, save_dir, "--trainer.accelerator=gpu", "--trainer.devices=1", *METRICS[metric])
        assert main(args) == 0
        out[metric] = _run_dir(save_dir)
    return out


@pytest.fixture(scope="module")
def two_gpu_runs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Every 2-GPU job, in one pair of NCCL worker processes (tests/dist_worker.py)."""
    base = tmp_path_factory.mktemp("gpu2")
    jobs, dirs = [], {}

    def add(key: str, *extra: str) -> None:
        dirs[key] = base / key
        args = _args(tiny_llama_dir, dirs[key], "--trainer.accelerator=gpu", "--trainer.devices=2", *extra)
        jobs.append({"args": args, "expect": 0})

    for strategy in ("ddp", "fsdp2"):
        for metric in GPU_METRICS:
            add(f"{strategy}-{metric}", f"--trainer.strategy={strategy}", *METRICS[metric])
    add("fsdp2-full-grad_x_weight", "--trainer.strategy=fsdp2", "--model.shard_loading=false")
    _run_workers(jobs, base)
    return dirs


@two_gpus
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("metric", GPU_METRICS)
def test_two_gpus_equal_one(one_gpu_references, two_gpu_runs, strategy, metric):
    run = _run_dir(two_gpu_runs[f"{strategy}-{metric}"])
    _assert_same_run(one_gpu_references[metric], run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert all("peak_cuda_allocated_mib" in rank for rank in summary["memory_ranks"])


@two_gpus
@pytest.mark.distributed
def test_two_gpus_shard_loading_equals_full_loading(two_gpu_runs):
    a, b = _run_dir(two_gpu_runs["fsdp2-grad_x_weight"]), _run_dir(two_gpu_runs["fsdp2-full-grad_x_weight"])
    scores_a, scores_b = load_file(a / "scores.safetensors"), load_file(b / "scores.safetensors")
    assert all(torch.equal(scores_a[name], scores_b[name]) for name in scores_a)
    assert (a / "topk.csv").read_text() == (b / "topk.csv").read_text()


@pytest.mark.slow  # the embedded SmolLM2-135M
def test_benchmark_on_cuda():
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--device", "cuda", "--metrics", "grad_x_weight"]
    cmd += ["--reps", "1", "--topk", "0", "--hvp-accuracy", "0", "--batch", "2", "--seq-len", "128"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| grad_x_weight |" in result.stdout
    assert "peak CUDA memory allocated (MiB): bare" in result.stdout

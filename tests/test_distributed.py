"""DDP and FSDP2 (ModelParallelStrategy) on 2 CPU processes (gloo) equal one process, and resume works.

Each 2-process case runs the real CLI. To pay for process start-up and imports once, the 2-process jobs
run in one pair of worker processes (``dist_worker.py``, joined by Lightning as torchrun ranks would be);
one test also goes through Lightning's own subprocess launcher, as a user's ``--trainer.devices=2`` does.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, tiny_llama
from crash import crash_after
from helpers import fit_args, latest_run
from safetensors.torch import load_file

from cwa.cli import main

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
METRICS = {
    "magnitude": ["--model.metric=magnitude"],
    "grad_x_weight": ["--model.metric=grad_x_weight"],
    "grad_squared": ["--model.metric=grad_squared"],
    "hutchinson_diag": [
        "--model.metric=cwa.scoring.scorers.HutchinsonDiag",
        "--model.metric.probes=2",
        "--model.metric.hvp=finite_difference",
    ],
    "wanda": ["--model.metric=wanda"],
    "obs": ["--model.metric=obs"],
    "obd": ["--model.metric=obd"],
}
# 5 blocks in batches of 2, 2, 1: over 2 ranks, rank 0 gets batches 0 and 2, rank 1 batch 1 (and, when
# sharded, one filler step).
NUM_SAMPLES, BATCH = 5, 2


def _args(model_dir: Path, save_dir: Path, *extra: str) -> list[str]:
    settings = {"name": "run", "num_samples": NUM_SAMPLES, "batch_size": BATCH, "k": 20, "figures": False}
    return fit_args(model_dir, save_dir, *extra, **settings)


def _run_dir(save_dir: Path) -> Path:
    return latest_run(save_dir, "run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=path)
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GLOBAL_RANK"):
        env.pop(key, None)
    return env


def _run_workers(jobs: list[dict], tmp_path: Path, world: int = 2, timeout: int = 600) -> None:
    job_file = tmp_path / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = _env() | {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
        }
        log = open(tmp_path / f"worker{rank}.log", "w")  # noqa: SIM115 - closed after wait below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(ROOT / "tests" / "dist_worker.py"), str(job_file)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    if any(codes):
        logs = "\n".join((tmp_path / f"worker{r}.log").read_text()[-4000:] for r in range(world))
        pytest.fail(f"worker exit codes {codes}:\n{logs}")


def _assert_same_run(reference: Path, other: Path, signed: bool = False) -> None:
    a, b = load_file(reference / "scores.safetensors"), load_file(other / "scores.safetensors")
    assert set(a) == set(b)  # save_file orders keys by name, the streamed file by model order
    for name in a:
        scale = float(a[name].abs().max()) or 1.0
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    rows_a = list(csv.DictReader((reference / "topk.csv").read_text().splitlines()))
    rows_b = list(csv.DictReader((other / "topk.csv").read_text().splitlines()))
    assert len(rows_a) == len(rows_b)
    picked_a = [(r["parameter"], r["index"]) for r in rows_a]
    picked_b = [(r["parameter"], r["index"]) for r in rows_b]
    if picked_a != picked_b:
        # Only scores tied within float tolerance at the cutoff may swap.
        cutoff = abs(float(rows_a[-1]["score"]))
        differ = set(picked_a) ^ set(picked_b)
        flat = {(r["parameter"], r["index"]): abs(float(r["score"])) for r in rows_a + rows_b}
        assert all(abs(flat[p] - cutoff) <= 1e-5 * cutoff for p in differ), (picked_a, picked_b)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        if (ra["parameter"], ra["index"]) == (rb["parameter"], rb["index"]):
            assert float(ra["weight"]) == float(rb["weight"])
            assert float(rb["score"]) == pytest.approx(float(ra["score"]), rel=1e-4, abs=1e-12)
    sa = json.loads((reference / "summary.json").read_text())
    sb = json.loads((other / "summary.json").read_text())
    assert sa["tokens"] == sb["tokens"] == NUM_SAMPLES * 31  # every block once: none lost, none twice
    assert sb["mean_loss"] == pytest.approx(sa["mean_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def references(tiny_llama_dir, tiny_tied_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Single-process runs, in process."""
    out = {}
    for metric, extra in METRICS.items():
        save_dir = tmp_path_factory.mktemp(f"single-{metric}")
        assert main(_args(tiny_llama_dir, save_dir, *extra)) == 0
        out[metric] = _run_dir(save_dir)
    save_dir = tmp_path_factory.mktemp("single-per-layer")
    assert main(_args(tiny_llama_dir, save_dir, "--model.mode=per_layer", "--model.k=2")) == 0
    out["per_layer"] = _run_dir(save_dir)
    save_dir = tmp_path_factory.mktemp("single-tied")
    assert main(_args(tiny_tied_llama_dir, save_dir)) == 0
    out["tied"] = _run_dir(save_dir)
    return out


@pytest.fixture(scope="module")
def tiny_llama_bin_dir(tmp_path_factory) -> Path:
    """tiny_llama_dir's weights as a pytorch_model.bin (no safetensors): FSDP2 loads it whole."""
    path = tmp_path_factory.mktemp("tiny-llama-bin")
    model = tiny_llama()
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def two_process_runs(tiny_llama_dir, tiny_tied_llama_dir, tiny_llama_bin_dir, tmp_path_factory) -> dict[str, Path]:
    """Every 2-process job, run by one pair of worker processes."""
    base = tmp_path_factory.mktemp("two")
    jobs, dirs = [], {}

    def add(key: str, *extra: str, expect: int = 0, model_dir: Path = tiny_llama_dir) -> None:
        dirs[key] = base / key
        jobs.append(
            {
                "args": _args(model_dir, dirs[key], "--trainer.devices=2", *extra),
                "expect": expect,
            }
        )

    for strategy in ("ddp", "fsdp2"):
        for metric, extra in METRICS.items():
            add(f"{strategy}-{metric}", f"--trainer.strategy={strategy}", *extra)
    add("fsdp2-per_layer", "--trainer.strategy=fsdp2", "--model.mode=per_layer", "--model.k=2")
    # Shard-only loading (the default) against every rank loading the whole checkpoint, untied and tied.
    add("fsdp2-full-grad_x_weight", "--trainer.strategy=fsdp2", "--model.shard_loading=false")
    add("fsdp2-tied", "--trainer.strategy=fsdp2", model_dir=tiny_tied_llama_dir)
    add("fsdp2-tied-full", "--trainer.strategy=fsdp2", "--model.shard_loading=false", model_dir=tiny_tied_llama_dir)
    add("fsdp2-bin", "--trainer.strategy=fsdp2", model_dir=tiny_llama_bin_dir)  # no safetensors: full load
    add("fsdp2-autograd", "--trainer.strategy=fsdp2", "--model.metric=cwa.scoring.scorers.HutchinsonDiag", expect=1)
    # Kill after one batch per rank with a checkpoint every batch, then resume from the checkpoints.
    for strategy, metric in (("ddp", "grad_x_weight"), ("fsdp2", "grad_squared")):
        key = f"{strategy}-killed-{metric}"
        add(
            key,
            f"--trainer.strategy={strategy}",
            *METRICS[metric],
            "--model.checkpoint_every=1",
            *crash_after(1),
            expect=-1,
        )
        add(
            f"{strategy}-resumed-{metric}",
            f"--trainer.strategy={strategy}",
            *METRICS[metric],
            f"--model.resume_from={dirs[key] / 'run' / 'version_0'}",
        )
    _run_workers(jobs, base)
    return dirs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("metric", list(METRICS))
def test_two_processes_equal_one(references, two_process_runs, strategy, metric):
    run = _run_dir(two_process_runs[f"{strategy}-{metric}"])
    _assert_same_run(references[metric], run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(summary["memory_ranks"]) == 2
    if strategy == "fsdp2":
        assert summary["strategy"] == "ModelParallelStrategy"
        assert summary["tensors"], "per-tensor statistics are read back from the streamed file"


def test_sharded_per_layer_top_k(references, two_process_runs):
    _assert_same_run(references["per_layer"], _run_dir(two_process_runs["fsdp2-per_layer"]))


@pytest.mark.parametrize(
    ("shard_loaded", "full_loaded", "reference"),
    [
        ("fsdp2-grad_x_weight", "fsdp2-full-grad_x_weight", "grad_x_weight"),
        ("fsdp2-tied", "fsdp2-tied-full", "tied"),
    ],
)
def test_shard_loading_equals_full_loading(references, two_process_runs, shard_loaded, full_loaded, reference):
    """Loading each rank's rows only gives the same bits as loading the whole checkpoint on every rank."""
    a, b = _run_dir(two_process_runs[shard_loaded]), _run_dir(two_process_runs[full_loaded])
    scores_a, scores_b = load_file(a / "scores.safetensors"), load_file(b / "scores.safetensors")
    assert list(scores_a) == list(scores_b)
    assert all(torch.equal(scores_a[name], scores_b[name]) for name in scores_a)
    assert (a / "topk.csv").read_text() == (b / "topk.csv").read_text()
    _assert_same_run(references[reference], a)


def test_checkpoint_without_safetensors_is_loaded_whole(references, two_process_runs):
    _assert_same_run(references["grad_x_weight"], _run_dir(two_process_runs["fsdp2-bin"]))


def test_sharded_autograd_hutchinson_is_refused(two_process_runs):
    runs = list((two_process_runs["fsdp2-autograd"] / "run").glob("version_*/summary.json"))
    assert not runs


@pytest.mark.parametrize(("strategy", "metric"), [("ddp", "grad_x_weight"), ("fsdp2", "grad_squared")])
def test_kill_and_resume_equals_uninterrupted(references, two_process_runs, strategy, metric):
    killed = two_process_runs[f"{strategy}-killed-{metric}"] / "run" / "version_0"
    assert not (killed / "summary.json").exists()
    assert sorted(p.name for p in (killed / "accumulators").iterdir()) == [
        "rank0-of-2-batch1.safetensors",
        "rank1-of-2-batch1.safetensors",
    ]
    resumed = _run_dir(two_process_runs[f"{strategy}-resumed-{metric}"])
    _assert_same_run(references[metric], resumed)
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == 1


def test_lightning_launcher_ddp_odd_blocks(references, tiny_llama_dir, tmp_path):
    """The user's command: Lightning starts the second process itself."""
    args = _args(tiny_llama_dir, tmp_path, "--trainer.devices=2", "--trainer.strategy=ddp")
    result = subprocess.run(
        [sys.executable, "-m", "cwa", *args], env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    _assert_same_run(references["grad_x_weight"], _run_dir(tmp_path))


def test_resume_in_one_process(tiny_llama_dir, tmp_path, references):
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(
            _args(
                tiny_llama_dir,
                tmp_path / "a",
                *METRICS["hutchinson_diag"],
                "--model.checkpoint_every=1",
                *crash_after(2),
            )
        )
    killed = _run_dir(tmp_path / "a")
    assert (
        main(_args(tiny_llama_dir, tmp_path / "b", *METRICS["hutchinson_diag"], f"--model.resume_from={killed}")) == 0
    )
    _assert_same_run(references["hutchinson_diag"], _run_dir(tmp_path / "b"))
    # Different settings are refused in one sentence.
    assert (
        main(_args(tiny_llama_dir, tmp_path / "c", "--model.metric=grad_x_weight", f"--model.resume_from={killed}"))
        == 1
    )

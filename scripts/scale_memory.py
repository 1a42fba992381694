"""Per-rank peak resident memory of fit-sensitivity on the embedded SmolLM2-135M: one process against
2-process CPU FSDP2, before shard-only loading (every rank loads the whole checkpoint, then shards it:
``--model.shard_loading=false``) and after (each rank reads its own rows of the safetensors file).

    python scripts/scale_memory.py                          # 3 runs, a few minutes on 2 cores
    python scripts/scale_memory.py --samples 4 --seq-len 256 --json memory.json

Every run is a real ``python -m cwa fit-sensitivity`` (configs/smollm2-135m.yaml, and
configs/smollm2-135m-fsdp2.yaml for the two FSDP2 runs; Lightning launches the second rank) with
``grad_x_weight`` on a few batches, figures off. A callback in this file (:class:`PeakMemory`) records in
every rank process its peak resident set size (``ru_maxrss``) twice: when scoring starts (the model is
loaded and sharded, no batch has run: the loading peak) and at teardown (the whole run's peak, scores
written). Each rank's numbers are its own process's: rank 1 is a separate process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "1 process": ["--config", "configs/smollm2-135m.yaml", "--trainer.accelerator=cpu"],
    "FSDP2, 2 processes, whole checkpoint on every rank (before)": [
        "--config",
        "configs/smollm2-135m-fsdp2.yaml",
        "--model.checkpoint_every=null",
        "--model.shard_loading=false",
    ],
    "FSDP2, 2 processes, shard-only loading (after)": [
        "--config",
        "configs/smollm2-135m-fsdp2.yaml",
        "--model.checkpoint_every=null",
    ],
}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory(Callback):
    """Writes ``rank<r>.json`` in ``out``: this process's peak RSS when scoring starts and at teardown.

    Args:
        out: the directory the files go to.
    """

    def __init__(self, out: str) -> None:
        self.out, self.loaded = Path(out), None

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: D102
        self.loaded = _peak_mib()

    def teardown(self, trainer, pl_module, stage: str) -> None:  # noqa: D102
        record = {"rank": trainer.global_rank, "after_loading_mib": self.loaded, "whole_run_mib": _peak_mib()}
        record["load_model_s"] = getattr(pl_module, "timings", {}).get("load_model_s")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run(name: str, extra: list[str], args: argparse.Namespace, work: Path) -> list[dict]:
    out = work / f"run{list(RUNS).index(name)}"
    cmd = [sys.executable, "-m", "cwa", "fit-sensitivity", *extra]
    cmd += [
        f"--data.num_samples={args.samples}",
        f"--data.batch_size={args.batch}",
        f"--data.seq_len={args.seq_len}",
        "--model.metric=grad_x_weight",
        f"--trainer.logger.init_args.save_dir={out / 'logs'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=cwa.fit.callbacks.ScoreFigures",
        "--trainer.callbacks.enabled=false",
        "--trainer.callbacks+=scale_memory.PeakMemory",
        f"--trainer.callbacks.out={out / 'memory'}",
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "scripts")]), HF_HUB_OFFLINE="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{result.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted((out / "memory").glob("rank*.json"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4, help="calibration blocks")
    parser.add_argument("--batch", type=int, default=1, help="blocks per batch")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="cwa-scale-memory-") as work:
        for name, extra in RUNS.items():
            results[name] = run(name, extra, args, Path(work))
            print(f"  done: {name}", file=sys.stderr, flush=True)
    print(
        f"SmolLM2-135M (float32), grad_x_weight, {args.samples} blocks of {args.seq_len} tokens in batches of "
        f"{args.batch}, CPU, {os.cpu_count()} cores. Peak RSS per rank process (MiB):\n"
    )
    print("| run | rank | peak after loading | peak over the run | load_model_s |")
    print("|---|---:|---:|---:|---:|")
    for name, ranks in results.items():
        for r in ranks:
            print(
                f"| {name} | {r['rank']} | {r['after_loading_mib']:.0f} | {r['whole_run_mib']:.0f} | "
                f"{r['load_model_s']:.1f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

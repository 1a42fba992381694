"""Two nodes of one process each, on this machine: ``torchrun --nnodes 2 --nproc_per_node 1`` started twice
with a c10d rendezvous on 127.0.0.1 (gloo, CPU), as two machines of a cluster would start it. Lightning sees
TorchElastic's environment (``GROUP_RANK`` is the node rank) and ``trainer.num_nodes=2``; scores and top-K
must equal a single-process run for DDP and FSDP2.

One pair of agents runs both strategies (``dist_worker.py``'s job list): the processes and their imports
are paid for once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import METRICS, ROOT, _args, _assert_same_run, _env, _free_port, _run_dir

from cwa.cli import main

pytestmark = pytest.mark.distributed

CASES = {"ddp-grad_x_weight": ("ddp", "grad_x_weight"), "fsdp2-grad_squared": ("fsdp2", "grad_squared")}


def _torchrun(node: int, port: int, job_file: Path, log: Path) -> tuple[subprocess.Popen, object]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=cwa-two-nodes",
        # The first agent hosts the rendezvous store; the second only connects (both match 127.0.0.1).
        f"--rdzv_conf=is_host={int(node == 0)}",
        "--local_addr=127.0.0.1",
        "--max_restarts=0",
        str(ROOT / "tests" / "dist_worker.py"),
        str(job_file),
    ]
    env = _env() | {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    handle = open(log, "w")  # noqa: SIM115 - closed by the caller after wait
    return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT), handle


def test_two_nodes_equal_one_process(tiny_llama_dir, tmp_path):
    jobs, dirs = [], {}
    for key, (strategy, metric) in CASES.items():
        dirs[key] = tmp_path / key
        extra = ["--trainer.num_nodes=2", "--trainer.devices=1", f"--trainer.strategy={strategy}", *METRICS[metric]]
        jobs.append({"args": _args(tiny_llama_dir, dirs[key], *extra)})
    job_file = tmp_path / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    port = _free_port()
    agents = [_torchrun(node, port, job_file, tmp_path / f"node{node}.log") for node in range(2)]
    codes = []
    for proc, handle in agents:
        try:
            codes.append(proc.wait(timeout=300))
        finally:
            if proc.poll() is None:
                proc.kill()
            handle.close()
    if any(codes):
        logs = "\n".join((tmp_path / f"node{n}.log").read_text()[-4000:] for n in range(2))
        pytest.fail(f"torchrun exit codes {codes}:\n{logs}")
    for key, (strategy, metric) in CASES.items():
        reference = tmp_path / f"single-{key}"
        assert main(_args(tiny_llama_dir, reference, *METRICS[metric])) == 0
        run = _run_dir(dirs[key])
        _assert_same_run(_run_dir(reference), run)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["world_size"] == 2 and len(summary["memory_ranks"]) == 2
        assert summary["strategy"] == ("ModelParallelStrategy" if strategy == "fsdp2" else "DDPStrategy")

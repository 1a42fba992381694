"""One rank of a 2-process group that runs several ``cwa fit-sensitivity`` invocations in a row.

Spawning processes and importing torch, transformers and Lightning dominates a tiny run's time, so
``test_distributed.py`` starts two of these once (as torchrun would: RANK, WORLD_SIZE, MASTER_ADDR ...
in the environment, so Lightning joins them instead of launching its own) and each runs every job of a
JSON list: ``{"args": [...], "expect": 0}``. Exits non-zero if any job's exit code
differs from what it expects.
"""

from __future__ import annotations

import json
import sys
import traceback

from cwa.cli import main


def run_jobs(path: str) -> int:
    with open(path) as handle:
        jobs = json.load(handle)
    failures = 0
    for job in jobs:
        try:
            code = main(job["args"])
        except Exception:  # the simulated crash (tests/crash.py): Lightning re-raises it
            traceback.print_exc()
            code = -1
        if code != job.get("expect", 0):
            print(f"job {job['args']} exited {code}, expected {job.get('expect', 0)}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_jobs(sys.argv[1]))

"""Resumable accumulation: each process saves its accumulators, counters and position in the data.

A checkpoint is one file per process, ``rank<r>-of-<world>-batch<n>.pt`` (written atomically) holding
that process's float32 accumulators (its row shards under FSDP2), the counters, how many of its batches
it has seen, and a fingerprint of the settings. The previous file is kept until the next one is on disk,
so a kill at any moment leaves a usable checkpoint. On resume each process loads the latest batch count
that every process has (sharded processes step together, so they must agree on it), and the module skips
those batches. Probes are seeded by global batch index, so the resumed run adds exactly what the
uninterrupted run would have added.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cwa.errors import CwaError
from cwa.io import atomic_path
from cwa.scorers import Scorer
from cwa.sharding import all_gather_objects

_NAME = re.compile(r"rank(\d+)-of-(\d+)-batch(\d+)\.pt$")


def _path(directory: Path, rank: int, world: int, batches: int) -> Path:
    return directory / f"rank{rank}-of-{world}-batch{batches}.pt"


def _saved(directory: Path, rank: int, world: int) -> list[int]:
    found = []
    for path in directory.glob(f"rank{rank}-of-{world}-batch*.pt"):
        match = _NAME.search(path.name)
        if match:
            found.append(int(match.group(3)))
    return sorted(found)


def save(directory: Path, scorer: Scorer, batches: int, fingerprint: dict, trainer) -> Path:
    """Save this process's state after ``batches`` of its batches; keep only the previous file besides."""
    rank, world = trainer.global_rank, trainer.world_size
    directory.mkdir(parents=True, exist_ok=True)
    path = _path(directory, rank, world, batches)
    state = {"scorer": scorer.state_dict(), "batches": batches, "fingerprint": fingerprint}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for older in _saved(directory, rank, world)[:-2]:
        _path(directory, rank, world, older).unlink(missing_ok=True)
    return path


def load(location: str | Path, scorer: Scorer, fingerprint: dict, trainer) -> int:
    """Load the latest usable checkpoint into ``scorer``; returns how many batches it covers."""
    rank, world = trainer.global_rank, trainer.world_size
    directory = Path(location).expanduser()
    if (directory / "accumulators").is_dir():
        directory = directory / "accumulators"
    if not directory.is_dir():
        raise CwaError(f"resume_from '{location}' is not a directory of cwa checkpoints.")
    mine = _saved(directory, rank, world)
    everyone = all_gather_objects(mine)
    if scorer.sharded:
        # Sharded processes run their steps together: all must resume from the same position.
        common = set(everyone[0]).intersection(*map(set, everyone[1:]))
        batches = max(common) if common else None
    else:
        batches = mine[-1] if mine else None
    if batches is None:
        others = sorted({p.name for p in directory.glob("rank*-of-*-batch*.pt")})
        raise CwaError(
            f"'{directory}' has no checkpoint for process {rank} of {world}"
            + (f" (it has {others[0]}...; resume with the same number of processes)." if others else ".")
        )
    state = torch.load(_path(directory, rank, world, batches), map_location="cpu", weights_only=False)
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise CwaError(
            f"the checkpoint in '{directory}' was made with different settings ({', '.join(changed)}); "
            "resume with the settings of the interrupted run."
        )
    scorer.load_state_dict(state["scorer"])
    return int(state["batches"])

"""Resumable accumulation: each process saves its accumulators, counters and position in the data.

A checkpoint is one safetensors file per process, ``rank<r>-of-<world>-batch<n>.safetensors`` (written
atomically): that process's float32 accumulators (its row shards under FSDP2) and float64 counters as
tensors, and how many of its batches it has seen and a fingerprint of the settings as JSON in the file's
metadata, with a checksum over all of it (an edited accumulator or batch count is refused on resume).
Nothing in it is ever unpickled, so a file planted in the directory cannot run code: safetensors reads a
JSON header and raw tensor bytes only.

While running only the newest checkpoint is kept: the new file is on disk before the older one is removed
(under sharding, only after every process has written its new file, so they always share a position), so
a kill at any moment leaves a usable checkpoint. ``finish`` removes them once the run has completed. On
resume each process loads the latest batch count that every process has (sharded processes step together,
so they must agree on it), and the module skips those batches. Probes are seeded by global batch index,
so the resumed run adds exactly what the uninterrupted run would have added.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

import torch

from cwa.common.errors import CwaError
from cwa.common.io import atomic_path, save_safetensors
from cwa.model.sharding import all_gather_objects
from cwa.scoring.scorers import Scorer

SUFFIX = ".safetensors"
_NAME = re.compile(r"rank(\d+)-of-(\d+)-batch(\d+)\.safetensors$")
_ACC = "acc."
_COUNTERS = "counters"
_META = "cwa_checkpoint"


def _path(directory: Path, rank: int, world: int, batches: int) -> Path:
    return directory / f"rank{rank}-of-{world}-batch{batches}{SUFFIX}"


def _saved(directory: Path, rank: int, world: int) -> list[int]:
    found = []
    for path in directory.glob(f"rank{rank}-of-{world}-batch*{SUFFIX}"):
        match = _NAME.search(path.name)
        if match:
            found.append(int(match.group(3)))
    return sorted(found)


def _jsonable(fingerprint: dict) -> dict:
    """The fingerprint as it reads back from JSON (tuples become lists), so comparisons are like for like."""
    return json.loads(json.dumps(fingerprint))


def save(directory: Path, scorer: Scorer, batches: int, fingerprint: dict, trainer) -> Path:
    """Save this process's state after ``batches`` of its batches, then remove its older checkpoints.

    Args:
        directory: the checkpoint directory (created if missing).
        scorer: the scorer whose accumulators and counters are saved.
        batches: how many of this process's batches the state covers.
        fingerprint: the settings the state is only valid for (JSON-serializable).
        trainer: gives the process's rank and the number of processes.
    """
    rank, world = trainer.global_rank, trainer.world_size
    path = _path(directory, rank, world, batches)
    state = scorer.state_dict()
    tensors = {f"{_ACC}{name}": t.detach().cpu().contiguous() for name, t in state["acc"].items()}
    tensors[_COUNTERS] = state["counters"].detach().cpu().contiguous()
    digest = _digest(tensors, batches, _jsonable(fingerprint))
    metadata = {_META: json.dumps({"batches": batches, "fingerprint": fingerprint, "digest": digest})}
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata)
    if scorer.sharded and world > 1:
        # Sharded processes resume from a position they all have: nobody drops its older file before
        # everyone has written the new one.
        all_gather_objects(batches)
    for older in _saved(directory, rank, world):
        if older != batches:
            _path(directory, rank, world, older).unlink(missing_ok=True)
    return path


def _digest(tensors: dict[str, torch.Tensor], batches: int, fingerprint: dict) -> str:
    """A checksum over the batch count, the settings and every tensor's bytes: an accumulator edited by hand
    (scaled, a NaN planted) or a batch count raised would otherwise be resumed as if it were the run's."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps({"batches": batches, "fingerprint": fingerprint}, sort_keys=True).encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a checkpoint file, or one sentence saying it is not a cwa checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = json.loads((handle.metadata() or {})[_META])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
        if not isinstance(meta, dict) or "batches" not in meta or "fingerprint" not in meta:
            raise ValueError("incomplete metadata")
    except OSError as exc:
        raise CwaError(f"cannot read the checkpoint '{path}': {exc.strerror or exc}.") from None
    except Exception:  # safetensors raises its own error type for a file that is not safetensors
        raise CwaError(
            f"'{path}' is not a cwa checkpoint (not a safetensors file with cwa's metadata); "
            "remove it or resume from another directory."
        ) from None
    return tensors, meta


def load(location: str | Path, scorer: Scorer, fingerprint: dict, trainer, max_batches: int | None = None) -> int:
    """Load the latest usable checkpoint into ``scorer``; returns how many batches it covers.

    Args:
        location: a checkpoint directory, or a run directory holding ``accumulators/``.
        scorer: the bound scorer to load the accumulators and counters into.
        fingerprint: this run's settings; the checkpoint must have been made with the same.
        trainer: gives the process's rank and the number of processes.
        max_batches: how many batches this process has in the run (a checkpoint claiming more is refused).
    """
    rank, world = trainer.global_rank, trainer.world_size
    directory = Path(location).expanduser()
    if not directory.is_dir():
        what = "does not exist" if not directory.exists() else "is a file, not a directory"
        raise CwaError(f"resume_from '{location}' {what}; give the interrupted run's directory.")
    nested = directory / "accumulators"
    if nested.exists() or nested.is_symlink():
        if not nested.is_dir():
            raise CwaError(f"'{nested}' is not a directory of checkpoints; resume from another directory.")
        directory = nested
    mine = _saved(directory, rank, world)
    everyone = all_gather_objects(mine)
    if scorer.sharded:
        # Sharded processes run their steps together: all must resume from the same position.
        common = set(everyone[0]).intersection(*map(set, everyone[1:]))
        batches = max(common) if common else None
    else:
        batches = mine[-1] if mine else None
    if batches is None:
        raise _no_checkpoint(directory, rank, world)
    path = _path(directory, rank, world, batches)
    tensors, meta = _read(path)
    if meta["fingerprint"] != _jsonable(fingerprint):
        stored = meta["fingerprint"] if isinstance(meta["fingerprint"], dict) else {}
        changed = sorted(k for k in fingerprint if stored.get(k) != _jsonable(fingerprint)[k])
        raise CwaError(
            f"the checkpoint in '{directory}' was made with different settings ({', '.join(changed)}); "
            "resume with the settings of the interrupted run."
        )
    _check_integrity(path, tensors, meta, batches, max_batches)
    acc = {key[len(_ACC) :]: t for key, t in tensors.items() if key.startswith(_ACC)}
    expected = scorer.state_dict()
    shapes = {name: tuple(t.shape) for name, t in expected["acc"].items()}
    if _COUNTERS not in tensors or {n: tuple(t.shape) for n, t in acc.items()} != shapes:
        raise CwaError(f"'{path}' does not hold the accumulators of this run; resume from another directory.")
    scorer.load_state_dict({"acc": acc, "counters": tensors[_COUNTERS]})
    return int(meta["batches"])


def _check_integrity(path: Path, tensors: dict[str, torch.Tensor], meta: dict, batches: int, limit: int | None) -> None:
    """One sentence naming what is wrong with a checkpoint file that does not hold what cwa wrote."""
    claimed = meta["batches"]
    if not isinstance(claimed, int) or isinstance(claimed, bool) or claimed != batches:
        raise CwaError(
            f"'{path}' claims {claimed!r} batches but its name says {batches}; the checkpoint was edited, so "
            "resume from another directory or rerun from the start."
        )
    if limit is not None and batches > limit:
        raise CwaError(
            f"'{path}' claims {batches} batches but this process has only {limit} in this run; the checkpoint "
            "was edited or belongs to another run, so resume from another directory or rerun from the start."
        )
    if meta.get("digest") != _digest(tensors, claimed, meta["fingerprint"]):
        raise CwaError(
            f"'{path}' does not match the checksum cwa wrote with it: its accumulators, counters or batch count "
            "were edited or damaged, so resume from another directory or rerun from the start."
        )


def _no_checkpoint(directory: Path, rank: int, world: int) -> CwaError:
    legacy = sorted(p.name for p in directory.glob("*.pt"))
    if legacy:
        return CwaError(
            f"'{directory}' holds {legacy[0]}, a checkpoint format cwa no longer reads (pickle files can run "
            "code when loaded); rerun the analysis from the start."
        )
    others = sorted(p.name for p in directory.glob(f"rank*-of-*-batch*{SUFFIX}"))
    return CwaError(
        f"'{directory}' has no checkpoint for process {rank} of {world}"
        + (f" (it has {others[0]}...; resume with the same number of processes)." if others else ".")
    )


def finish(directory: str | Path | None, keep: bool = False) -> None:
    """After a completed run: remove its checkpoints (and the directory, once empty) unless ``keep``.

    Args:
        directory: the run's checkpoint directory; None or a missing directory is a no-op.
        keep: keep the checkpoints (``keep_checkpoints``).
    """
    if keep or directory is None:
        return
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in directory.glob(f"rank*-of-*-batch*{SUFFIX}"):
        if _NAME.search(path.name):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()  # only when nothing else is in it

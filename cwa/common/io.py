"""Atomic file writes: a temporary name in the same directory, then ``os.replace``.

An interrupted run therefore never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cwa.common.errors import CwaError

_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")  # what atomic_path's mkstemp names look like


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it is renamed to ``path`` only if the block succeeds.

    An operating-system error (no permission, a parent that is a file, a full disk) becomes one
    ``CwaError`` sentence naming ``path``, and the temporary file is removed whatever happens.

    Args:
        path: the file to create or replace.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise os_error(exc, path) from None
        raise


def os_error(exc: OSError, path: str | os.PathLike) -> CwaError:
    """One sentence for an operating-system error while writing or reading ``path``.

    Args:
        exc: the error.
        path: the file or directory the user asked for (named in the sentence).
    """
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the file system is read-only",
        errno.ENOTDIR: "a parent of it is a file, not a directory",
        errno.EEXIST: "a file of that name is in the way",
        errno.EISDIR: "it is a directory",
        errno.ENAMETOOLONG: "the name is too long",
    }
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    return CwaError(f"cannot write '{path}': {reason}.")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporary files (``.NAME.XXXXXX.tmp``) that a killed writer left in ``directory``.

    Only the top level of ``directory`` and its direct subdirectories are searched (where cwa writes).
    Call it only where no other process is writing into ``directory``.

    Args:
        directory: a run directory (a missing one is a no-op).

    Returns:
        The files removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for folder in [directory, *(p for p in directory.iterdir() if p.is_dir())]:
        for candidate in folder.iterdir():
            if candidate.is_file() and _TEMPORARY.match(candidate.name):
                with contextlib.suppress(FileNotFoundError):
                    candidate.unlink()
                    removed.append(candidate)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a file for writing that appears under ``path`` only once it is closed successfully."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=2, default=_json_default)
        handle.write("\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")

"""Atomic file writes: a temporary name in the same directory, then ``os.replace``.

An interrupted run therefore never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
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


def read_regular(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.

    A FIFO would block the reader forever and a symlink to ``/dev/zero`` never ends, so anything that is
    not a regular file (after following links) is refused before it is opened, and at most ``limit`` + 1
    bytes are read even when the file grows while it is read.

    Args:
        path: the file to read.
        limit: the largest size accepted, in bytes.
        what: what the file is, for the sentence (``summary.json``, ``data file``).
    """
    path = Path(path)
    try:
        status = os.stat(path)
    except OSError as exc:
        raise CwaError(f"cannot read {what} '{path}': {exc.strerror or exc}.") from None
    check_regular(path, status, limit, what)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise CwaError(f"cannot read {what} '{path}': {exc.strerror or exc}.") from None
    if len(data) > limit:
        raise CwaError(f"{what} '{path}' is larger than {limit:,} bytes; it is not one cwa wrote.")
    return data


def check_regular(path: Path, status: os.stat_result, limit: int | None, what: str) -> None:
    """One sentence when ``status`` (of ``path``) is not a regular file, or is larger than ``limit`` bytes."""
    import stat

    if not stat.S_ISREG(status.st_mode):
        kind = "a directory" if stat.S_ISDIR(status.st_mode) else "a FIFO" if stat.S_ISFIFO(status.st_mode) else None
        kind = kind or ("a device" if stat.S_ISCHR(status.st_mode) or stat.S_ISBLK(status.st_mode) else "a socket")
        raise CwaError(f"{what} '{path}' is {kind}, not a regular file; cwa reads only regular files.")
    if limit is not None and status.st_size > limit:
        raise CwaError(f"{what} '{path}' is larger than {limit:,} bytes; it is not one cwa wrote.")


def inside(root: str | os.PathLike, relative: str) -> Path:
    """``root / relative``, refused in one sentence when a folder on the way (or the file) is a symbolic link:
    a ``figures`` link planted in a run directory must not make cwa write somewhere else.

    Args:
        root: the directory cwa owns (a run directory).
        relative: the path inside it.
    """
    root = Path(root)
    current = root
    for part in Path(relative).parts:
        current = current / part
        if current.is_symlink():
            raise CwaError(
                f"'{current}' is a symbolic link; cwa writes only inside the run directory '{root}', so remove it."
            )
    return current


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` whose I/O failures are ``OSError``\\ s (safetensors reports a full disk
    as its own error type, which ``atomic_path`` would not turn into a sentence).

    Args:
        tensors: name -> contiguous CPU tensor.
        path: the file to write (normally ``atomic_path``'s temporary).
        metadata: the file's string metadata.
    """
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as exc:
        code = re.search(r"(?:code: |os error )(\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None


def draw_or_note(name: str, draw: Callable[[], object]) -> str | None:
    """Draw one figure; a failure becomes a one-line note instead of costing the results written beside it.

    Args:
        name: the figure's file name, for the note.
        draw: draws and saves the figure.

    Returns:
        None when drawn, else the note (``figure NAME was not drawn: ...``).

    Raises:
        OSError: the disk (or the quota) is full.
    """
    try:
        draw()
    except Exception as exc:  # any figure failure (matplotlib's ValueError, a font) is only a figure ...
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            plt.close("all")
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # ... but a full disk is not: what is written beside the figure would not fit either
        return f"figure {name} was not drawn ({type(exc).__name__}: {exc})"
    return None

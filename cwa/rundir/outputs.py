"""Files that change together or not at all (perturb's csv, figures and json; a super-weight scan's csv,
figures and summary), the checksum that lets a reader detect a set split by a hard kill, and the numbered set
directories (``perturb/1/``, ``prune/2/``...) that keep every experiment of a run directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cwa.common.errors import CwaError
from cwa.common.io import draw_or_note, inside, os_error


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a few renames run, so an interrupt cannot split a set of outputs."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    except (AttributeError, ValueError, OSError):  # not the main thread, or no pthread_sigmask
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class OutputSet:
    """Files that must change together or not at all: each is written under a temporary name by
    ``stage``; ``commit`` renames them all, the marker file last, with interrupts held. An exception
    before the commit removes the temporaries and leaves the previous set untouched."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._staged: list[tuple[Path, Path]] = []
        self._removed: list[Path] = []

    def stage(self, relative: str) -> Path:
        """A temporary path whose file will become ``directory / relative`` at the commit."""
        final = inside(self.directory, relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.staged.tmp")
        self._staged.append((tmp, final))
        return tmp

    def remove(self, relative: str) -> None:
        """Delete ``directory / relative`` (if it exists) at the commit, before the staged files land: a file
        of the previous set that the new set does not have."""
        self._removed.append(self.directory / relative)

    def __contains__(self, relative: str) -> bool:
        """Whether ``directory / relative`` is staged for the commit."""
        return any(final == self.directory / relative for _, final in self._staged)

    def draw(self, figures: Mapping[str, Callable[[Path], None]] | None, folder: str) -> list[str]:
        """Stage each figure under ``folder``; one that fails to draw is left out of the set (the previous
        set's file of that name is removed at the commit) and returned as a note, never raised: a figure must
        not cost the results."""
        notes = []
        for name, draw in (figures or {}).items():
            relative = f"{folder}/{name}"
            tmp = self.stage(relative)
            note = draw_or_note(name, partial(draw, tmp))
            if note is not None:
                self._staged.pop()
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                self.remove(relative)
                notes.append(note)
        return notes

    def commit(self) -> None:
        with _signals_deferred():
            for path in self._removed:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            for tmp, final in self._staged:
                os.replace(tmp, final)
        self._staged, self._removed = [], []

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._staged = []


# -- numbered sets: one directory per experiment ---------------------------------------------------
WRITER = ".writer"
"""The file in a set directory that names its writer (host and process id) until the set is complete."""


@dataclass(frozen=True)
class SetDir:
    """Where one experiment's set lives: ``<root>/<kind>/<number>/`` (``number`` from 1, in the order the sets
    were started), or ``number`` 0 for a set written by an earlier cwa straight into ``<root>``."""

    kind: str
    number: int
    path: Path

    @property
    def label(self) -> str:
        """``perturb/2``, or ``perturb.csv`` for the root-level set of an earlier version."""
        return f"{self.kind}.csv" if self.number == 0 else f"{self.kind}/{self.number}"


def check_name(name: str | None) -> str | None:
    """An experiment's ``--name`` (a label recorded in its json), refused in one sentence when unusable."""
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip() or len(name) > 100 or not name.isprintable():
        raise CwaError(f"--name must be a short printable label (1 to 100 characters), got {name!r}.")
    return name.strip()


def set_dirs(root: Path, kind: str) -> list[SetDir]:
    """The sets of ``kind`` under ``root``, oldest first: the root-level set of an earlier version (when its csv
    or json is there), then every numbered set whose json (written last) is there. A set still being written,
    or left by a killed writer, has no json yet and is not listed."""
    root = Path(root)
    found = []
    if (root / f"{kind}.csv").exists() or (root / f"{kind}.json").exists():
        found.append(SetDir(kind, 0, root))
    for number, path in _numbered(root / kind):
        if (path / f"{kind}.json").exists():
            found.append(SetDir(kind, number, path))
    return found


def _numbered(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    numbered = [(int(p.name), p) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()]
    return sorted(numbered)


@contextlib.contextmanager
def new_set(root: Path, kind: str) -> Iterator[OutputSet]:
    """A fresh set directory ``<root>/<kind>/<n>/`` for one experiment, as an :class:`OutputSet`.

    The number is claimed with ``os.mkdir``, which fails when the directory exists, so two writers running at
    once never share one; the set is never replaced by a later one. The caller stages its files and commits,
    the json last. Any exception before the commit removes the directory with whatever was staged in it."""
    folder = inside(root, kind)  # a planted ``perturb`` link must not send the set elsewhere
    try:
        directory = _claim(folder, kind)
    except OSError as exc:
        raise os_error(exc, folder) from None
    outputs = OutputSet(directory)
    try:
        yield outputs
    except BaseException as exc:
        outputs.discard()
        shutil.rmtree(directory, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, a read-only file system: one sentence
            raise os_error(exc, directory) from None
        raise
    with contextlib.suppress(FileNotFoundError):
        (directory / WRITER).unlink()


def _claim(folder: Path, kind: str) -> Path:
    """Make ``folder/<n>/`` with the next free number (``os.mkdir`` fails when another writer made it first:
    then the next), and name this process as its writer."""
    folder.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(folder, f"{kind}.json")
    number = max((n for n, _ in _numbered(folder)), default=0) + 1
    while True:
        try:
            os.mkdir(folder / str(number))
            break
        except FileExistsError:
            number += 1
    directory = folder / str(number)
    (directory / WRITER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return directory


def _remove_abandoned(folder: Path, marker: str) -> None:
    """Remove the set directories whose writer, a process of this host, died before the set was complete (a
    live writer's, or another host's, stay)."""
    for _, path in _numbered(folder):
        if (path / marker).exists():
            continue
        try:
            writer = json.loads((path / WRITER).read_text())
            host, pid = writer["host"], int(writer["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host == socket.gethostname() and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True

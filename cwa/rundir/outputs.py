"""Files that change together or not at all (perturb's csv, figures and json; a super-weight scan's csv,
figures and summary), and the checksum that lets a reader detect a set split by a hard kill."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path

from cwa.common.io import draw_or_note, inside


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

"""What a run needs to be reproduced: library versions, git commit, peak memory."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in ("cwa", "torch", "lightning", "transformers", "datasets", "safetensors", "torchmetrics"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def git_commit() -> str | None:
    """The commit of the cwa checkout (with ``+dirty`` when it has uncommitted changes), if any."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def peak_memory() -> dict[str, float]:
    """Peak resident set size of this process (and peak CUDA memory when a GPU was used), in MiB."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 32 << 20  # the ceiling glibc's own adaptive mmap threshold rises to on 64-bit Linux
_KEEP_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (a C int)
_USUAL_TRIM_THRESHOLD = 2 * _MMAP_THRESHOLD  # where glibc's own adaptive trim threshold ends up
_kept = False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, with the signatures of the two calls used here; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc and cwa may tune it (not with ``CWA_MALLOC_TRIM=default``)."""
    return None if os.environ.get("CWA_MALLOC_TRIM", "").lower() == "default" else _libc()


def keep_freed_memory() -> bool:
    """Let glibc keep freed heap memory for the next pass instead of handing it back to the kernel.

    For estimators that run several forward+backward passes per batch (finite-difference Hutchinson).
    Each pass allocates and frees the same activations and gradients; with glibc's defaults the free
    memory at the top of the heap goes back to the kernel and is faulted in again, zero-filled, by the
    next pass. Measured on SmolLM2-135M (4 probes, batch 4 x 256, 2 CPU cores): about 2 million page
    faults (8 GB of zero-filled pages) per batch, and passes 1.2 to 1.8 times slower than alone. Kept (trim
    threshold 2 GiB; the mmap threshold pinned at the 32 MiB ceiling it adapts to, since setting the trim
    threshold stops that adapting), the passes reuse it. :func:`release_freed_memory` ends it. Not for
    single-pass metrics: what the heap keeps then only adds to the peak (``grad_squared``: +0.6 GB).
    Process-wide; Linux with glibc only. Returns whether the setting is in effect.
    """
    global _kept
    libc = _glibc()
    if libc is not None and not _kept:
        _kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD)
        )
    return _kept


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the kernel (``malloc_trim``) when the passes are over, and end
    :func:`keep_freed_memory` (the trim threshold returns to the 64 MiB glibc's adaptation reaches): what
    comes next (score tensors, their file, figures) has other sizes, and kept memory would only add to the
    run's peak. Linux with glibc only."""
    global _kept
    libc = _glibc()
    if libc is None:
        return
    if _kept:
        libc.mallopt(_M_TRIM_THRESHOLD, _USUAL_TRIM_THRESHOLD)
        _kept = False
    libc.malloc_trim(0)


def environment() -> dict:
    from cwa.common import smoke

    return {
        "versions": versions(),
        "git_commit": git_commit(),
        "device_count": torch.cuda.device_count(),
        "smoke": smoke.active(),  # CWA_SMOKE shrank the sizes: not a measurement
    }


def torch_device(name: str) -> torch.device:
    """The device a ``--device`` option names (``auto``: CUDA where available, else the CPU), refused in one
    sentence when it is malformed or not present in this torch build or on this machine.

    Args:
        name: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``...
    """
    from cwa.common.errors import CwaError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CwaError(f"device '{name}' is not a device name; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise CwaError(f"device '{name}' is not available: {build}; use --device cpu (or auto).")
        if device.index is not None and device.index >= count:
            raise CwaError(f"device '{name}' is not available: only {count} CUDA device(s) here (0..{count - 1}).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CwaError(f"device '{name}' is not available here; use --device cpu (or auto).")
    elif device.type not in ("cpu", "meta", "mps"):
        raise CwaError(f"device '{name}' is not supported by cwa; use auto, cpu, cuda or cuda:N.")
    return device

"""What a run needs to be reproduced: library versions, git commit, peak memory."""

from __future__ import annotations

import ctypes
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
_MMAP_THRESHOLD = 32 << 20  # the ceiling glibc's own dynamic threshold rises to on 64-bit Linux
_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (a C int)
_kept_freed_memory: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc keep freed heap memory for the next batch instead of handing it back to the kernel.

    Every batch of a pass allocates and frees the same activations and gradients. With glibc's defaults
    the free memory at the top of the heap is returned to the kernel (above a threshold that adapts to
    the sizes seen) and faulted in again, zero-filled, by the next batch: measured on SmolLM2-135M with
    finite-difference Hutchinson (4 probes, batch 4 x 256, 2 CPU cores), about 2 million page faults,
    8 GB of zero-filled pages, per batch. Keeping it (trim threshold 2 GiB, and the mmap threshold pinned
    at the 32 MiB ceiling it would adapt to, since setting the trim threshold stops that adapting)
    cuts that several-fold. The peak resident memory does not grow: freed memory is reused, not
    added to. Linux with glibc only (elsewhere, and with ``CWA_MALLOC_TRIM=default``, nothing changes);
    process-wide and idempotent. Returns whether the setting is in effect.
    """
    global _kept_freed_memory
    if _kept_freed_memory is None:
        _kept_freed_memory = False
        if sys.platform.startswith("linux") and os.environ.get("CWA_MALLOC_TRIM", "").lower() != "default":
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _kept_freed_memory = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
                mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
            )
    return _kept_freed_memory


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the kernel (glibc ``malloc_trim``) when a pass is over.

    :func:`keep_freed_memory` keeps it for the next batch; after the last batch what comes next (score
    tensors, their serialised file, figures) has other sizes, and the kept memory would only add to the
    run's peak. Linux with glibc only; elsewhere nothing happens."""
    if not keep_freed_memory():
        return
    try:
        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)


def environment() -> dict:
    return {"versions": versions(), "git_commit": git_commit(), "device_count": torch.cuda.device_count()}

"""``scores.safetensors``: every score tensor, written whole or streamed one tensor at a time, read lazily."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cwa.common.errors import CwaError
from cwa.common.io import atomic_open, atomic_path, check_regular, save_safetensors
from cwa.rundir.files import SCORES_FORMAT
from cwa.rundir.validate import check_score_shapes

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _score_dtype(dtype: str) -> torch.dtype:
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def scores_metadata(metric: str, model: str) -> dict[str, str]:
    return {"metric": metric, "model": model, "format": SCORES_FORMAT}


def write_scores(path: Path, scores: Mapping[str, Tensor], dtype: str, metadata: dict[str, str]) -> None:
    """All score tensors in one safetensors file (``dtype``: ``float32`` or ``bfloat16``)."""
    target = _score_dtype(dtype)
    tensors = {n: s.detach().to("cpu", target).contiguous() for n, s in scores.items()}
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata)


def stream_scores(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    tensors: Iterator[tuple[str, Tensor]],
    dtype: str,
    metadata: dict[str, str],
    write: bool = True,
) -> None:
    """Write a safetensors file one tensor at a time: the header is known from the shapes alone, then
    each tensor's bytes are appended as ``tensors`` yields it (in the order of ``shapes``). Only the
    tensor being written is ever in memory. With ``write=False`` the iterator is only drained (the
    other ranks of a collective gather)."""
    target = _score_dtype(dtype)
    size = torch.tensor([], dtype=target).element_size()
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[target],
            "shape": list(shape),
            "data_offsets": [offset, offset + n * size],
        }
        offset += n * size
    if not write:
        for _ in tensors:
            pass
        return
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with atomic_open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for (name, tensor), expected in zip(tensors, shapes, strict=True):
            if name != expected or tuple(tensor.shape) != tuple(shapes[name]):
                raise RuntimeError(f"stream_scores got '{name}' {tuple(tensor.shape)}, expected '{expected}'")
            data = tensor.detach().to("cpu", target).contiguous().reshape(-1)
            handle.write(data.view(torch.uint8).numpy().tobytes())


class UnreadableScores(CwaError):
    """A scores file that is truncated or not safetensors: a run without scores, where that is enough."""


class LazyScores(Mapping[str, Tensor]):
    """A read-only ``{parameter: float32 score tensor}`` over a ``scores.safetensors`` that loads one
    tensor per access (the last one is cached), so a whole run's scores are never in memory at once."""

    def __init__(
        self, path: Path, names: list[str] | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None
    ) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        try:
            check_regular(self.path, os.stat(self.path), None, "scores file")
            with safe_open(str(self.path), framework="pt") as handle:
                stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except CwaError:
            raise
        except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
            raise UnreadableScores(f"'{self.path}' is not a readable safetensors file ({exc}).") from None
        self.names = list(stored) if names is None else list(names)
        missing = [n for n in self.names if n not in stored]
        if missing:
            raise CwaError(f"'{self.path}' has no scores for '{missing[0]}'; rerun fit-sensitivity for it.")
        check_score_shapes(self.path, stored, shapes or {})
        self._cached: tuple[str, Tensor] | None = None

    def __getitem__(self, name: str) -> Tensor:
        if self._cached is not None and self._cached[0] == name:
            return self._cached[1]
        if name not in self.names:
            raise KeyError(name)
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            tensor = handle.get_tensor(name).float()
        # A score is never NaN or infinite (scorers refuse to finish with one): a NaN here would rank
        # arbitrarily and make two runs agree perfectly.
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CwaError(
                f"'{self.path}' holds {bad} non-finite scores in '{name}', which cwa never writes; the file was "
                "altered or damaged, so rerun fit-sensitivity for this run."
            )
        self._cached = (name, tensor)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

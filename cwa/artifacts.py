"""Writing a fit-sensitivity run directory: top-K table, scores, figures, TensorBoard, summary.

Every file is written under a temporary name and renamed; ``summary.json`` is written last, so a
run directory with a summary is complete.

In sharded runs (FSDP2) no rank ever holds every score: ``scores.safetensors`` is streamed tensor by
tensor (each tensor assembled from its row shards, written, freed), and the statistics, figures and
TensorBoard histograms then read the finished file lazily through ``open_scores``.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from cwa.environment import environment, peak_memory
from cwa.io import atomic_open, atomic_path, write_json
from cwa.params import ParamInfo
from cwa.topk import TopK, select_topk, select_topk_sharded

TOPK_COLUMNS = ["rank", "parameter", "layer", "module", "row", "col", "index", "score", "weight"]


def write_topk_csv(path: Path, topk: TopK, infos: Mapping[str, ParamInfo], weights: Mapping[str, Tensor]) -> None:
    """One row per selected weight, best first. ``row``/``col`` are (output unit, input unit) for 2-D
    tensors (also for GPT-2's transposed Conv1D); ``index`` is the flat index into the stored tensor."""
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TOPK_COLUMNS)
        for rank, (p, index, score) in enumerate(
            zip(topk.param.tolist(), topk.index.tolist(), topk.score.tolist(), strict=True), start=1
        ):
            name = topk.names[p]
            info = infos[name]
            rc = info.row_col(torch.tensor(index))
            row, col = ("", "") if rc is None else (int(rc[0]), int(rc[1]))
            if topk.weight is not None:
                weight = float(topk.weight[rank - 1])
            else:
                weight = float(weights[name].detach().reshape(-1)[index])
            writer.writerow(
                [
                    rank,
                    name,
                    "" if info.layer is None else info.layer,
                    info.module,
                    row,
                    col,
                    index,
                    f"{score:.9g}",
                    f"{weight:.9g}",
                ]
            )


def read_topk_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_scores(path: Path, scores: Mapping[str, Tensor], dtype: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    target = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    tensors = {n: s.detach().to("cpu", target).contiguous() for n, s in scores.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


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
    target = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    size = torch.tensor([], dtype=target).element_size()
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
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


class LazyScores(Mapping):
    """Read-only mapping name -> score tensor over a ``scores.safetensors``, loading one tensor per access."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt")
        self._names = list(self._file.keys())

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._file.get_tensor(name).float()

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def open_scores(run_dir: str | Path) -> LazyScores:
    """The scores of a finished run, keyed by parameter name, loaded lazily tensor by tensor."""
    return LazyScores(Path(run_dir) / "scores.safetensors")


def tensor_statistics(scores: Mapping[str, Tensor], topk: TopK) -> dict[str, dict]:
    counts = torch.bincount(topk.param, minlength=len(topk.names)).tolist()
    stats = {}
    for i, (name, s) in enumerate(scores.items()):
        a = s.detach().double()
        stats[name] = {
            "shape": list(s.shape),
            "numel": s.numel(),
            "mean": float(a.mean()),
            "std": float(a.std()) if s.numel() > 1 else 0.0,
            "min": float(a.min()),
            "max": float(a.max()),
            "abs_sum": float(a.abs().sum()),
            "zeros": int((a == 0).sum()),
            "topk_count": counts[i],
        }
    return stats


def tensorboard_histograms(experiment, scores: Mapping[str, Tensor], mean_loss: float) -> None:
    """log10|score| histogram per tensor (the scores span many decades) and the calibration loss."""
    for name, s in scores.items():
        a = s.detach().abs().reshape(-1).float()
        pos = a[a > 0].log10()
        if pos.numel() == 0:
            continue
        lo, hi = float(pos.min()), float(pos.max())
        bins = 64
        counts = torch.histc(pos, bins=bins, min=lo, max=hi if hi > lo else lo + 1e-6)
        limits = torch.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)[1:]
        experiment.add_histogram_raw(
            f"log10_score/{name}",
            min=lo,
            max=hi,
            num=int(pos.numel()),
            sum=float(pos.sum()),
            sum_squares=float(pos.double().pow(2).sum()),
            bucket_limits=limits.tolist(),
            bucket_counts=counts.tolist(),
            global_step=0,
        )
    if mean_loss == mean_loss:
        experiment.add_scalar("calibration/mean_nll", mean_loss, 0)
    experiment.flush()


class RunArtifacts(L.Callback):
    """Turns the module's final scores into the run directory's files (on the global-zero process).

    Args:
        figures: write the PNG figures.
        tensorboard: write per-tensor log10-score histograms to the TensorBoard logger.
    """

    def __init__(self, figures: bool = True, tensorboard: bool = True) -> None:
        self.figures, self.tensorboard = figures, tensorboard
        self.run_dir: Path | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if not pl_module.scores:
            return
        start = time.perf_counter()
        sharded = pl_module.scorer.sharded
        if sharded:
            pl_module.topk = select_topk_sharded(pl_module.scores, pl_module.scorer.params, pl_module.k, pl_module.mode)
        else:
            pl_module.topk = select_topk(pl_module.scores, pl_module.k, pl_module.mode)
        pl_module.timings["topk_s"] = time.perf_counter() - start
        # trainer.log_dir is a collective (a broadcast) in distributed runs: every rank asks for it.
        self.run_dir = pl_module.run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        scores = pl_module.scores
        if sharded:
            # Every rank takes part in assembling each tensor; only global zero writes it.
            start = time.perf_counter()
            self._stream_sharded_scores(trainer, pl_module, self.run_dir)
            pl_module.timings["write_scores_s"] = time.perf_counter() - start
            scores = open_scores(self.run_dir) if pl_module.save_scores != "off" and trainer.is_global_zero else {}
        self._write(trainer, pl_module, self.run_dir, scores)

    @staticmethod
    def _stream_sharded_scores(trainer: L.Trainer, module, run_dir: Path) -> None:
        if module.save_scores == "off":
            return
        from cwa.distributed import full_tensor

        params = module.scorer.params
        shapes = {n: tuple(params[n].shape) for n in module.scores}
        tensors = ((n, full_tensor(s, params[n])) for n, s in module.scores.items())
        metadata = {"metric": module.scorer.name, "model": module.pretrained, "format": "cwa-scores/1"}
        stream_scores(
            run_dir / "scores.safetensors", shapes, tensors, module.save_scores, metadata, write=trainer.is_global_zero
        )

    @rank_zero_only
    def _write(self, trainer: L.Trainer, module, run_dir: Path, scores: Mapping[str, Tensor]) -> None:
        start = time.perf_counter()
        weights = {n: p for n, p in module.model.named_parameters() if n in module.selected}
        write_topk_csv(run_dir / "topk.csv", module.topk, module.selected, weights)
        scorer = module.scorer
        if module.save_scores != "off" and not scorer.sharded:
            write_scores(
                run_dir / "scores.safetensors",
                scores,
                module.save_scores,
                {"metric": scorer.name, "model": module.pretrained, "format": "cwa-scores/1"},
            )
        module.timings["write_s"] = time.perf_counter() - start
        title = f"{module.pretrained} · {scorer.name}"
        # Sharded runs with save_scores off have no place to read whole score tensors from.
        whole = bool(scores)
        if self.figures and whole:
            from cwa import figures

            start = time.perf_counter()
            fig_dir = run_dir / "figures"
            figures.score_histogram(scores, module.topk, title, fig_dir / "score_histogram.png")
            figures.layer_module_heatmap(scores, module.selected, title, fig_dir / "layer_module_heatmap.png")
            figures.topk_locations(
                module.topk, module.selected, f"{title} · {module.mode}", fig_dir / "topk_locations.png"
            )
            module.timings["figures_s"] = time.perf_counter() - start
        if self.tensorboard and whole and trainer.logger is not None and hasattr(trainer.logger, "experiment"):
            experiment = trainer.logger.experiment
            if hasattr(experiment, "add_histogram_raw"):
                tensorboard_histograms(experiment, scores, scorer.mean_loss)
        datamodule = trainer.datamodule
        data = datamodule.describe() if datamodule is not None and hasattr(datamodule, "describe") else {}
        n_params = sum(p.numel() for p in module.model.parameters())  # DTensor numel is the global size
        summary = {
            "status": "complete",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": module.pretrained,
            "model_class": type(module.model).__name__,
            "dtype": module.dtype_name,
            "num_parameters": n_params,
            "num_scored": sum(info.numel for info in module.selected.values()),
            "scored_tensors": len(module.selected),
            "metric": {"name": scorer.name, "signed": scorer.signed, **scorer.settings()},
            "mode": module.mode,
            "k": module.k,
            "topk_rows": len(module.topk),
            "include": module.include,
            "exclude": module.exclude,
            "samples": data.get("num_samples"),
            "tokens": int(scorer.tokens),
            "mean_loss": scorer.mean_loss,
            "perplexity": float(torch.tensor(scorer.mean_loss).exp()),
            "seed": data.get("seed"),
            "data": data,
            "data_fingerprint": data.get("calibration_fingerprint"),
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "timings": {k: round(v, 4) for k, v in module.timings.items()},
            "memory": peak_memory(),
            "memory_ranks": getattr(module, "rank_memory", None),
            "resumed_from": getattr(module, "resumed_batches", 0),
            "environment": environment(),
            "tensors": tensor_statistics(scores, module.topk) if whole else {},
            "layout": {
                n: {"layer": i.layer, "module": i.module, "transposed": i.transposed}
                for n, i in module.selected.items()
            },
        }
        write_json(run_dir / "summary.json", summary)

"""What ``cwa perturb`` sets up before any condition: the run (running fit-sensitivity first when asked), the
model with the ranked tensors' layouts, and the held-out blocks. Each step is timed and notes what differs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cwa.common.environment import torch_device
from cwa.common.errors import CwaError
from cwa.fit.data import CalibrationData
from cwa.perturb.run_data import build_data
from cwa.rundir import Run


def fit_sensitivity_first(fit_config: str, fit_args: list[str]) -> Path:
    """Run ``cwa fit-sensitivity --config fit_config *fit_args`` and return its one run directory."""
    from cwa.fit.trainer import run_fit_sensitivity

    if not Path(fit_config).expanduser().is_file():
        raise CwaError(f"fit config '{fit_config}' does not exist.")
    run_dir = run_fit_sensitivity(["--config", str(fit_config), *fit_args])
    if run_dir is None:
        raise CwaError(f"`cwa fit-sensitivity --config {fit_config}` wrote no run directory.")
    if isinstance(run_dir, list):
        raise CwaError(
            f"the fit config '{fit_config}' names several metrics and wrote one run per metric "
            f"({', '.join(str(d) for d in run_dir)}); perturb one of them with --run."
        )
    return Path(run_dir)


@dataclass
class LoadedModel:
    """The run's model on its device, its ranked tensors (the model's own storage) and their layouts.

    Args:
        model: the model, gradients off.
        device: where it runs.
        params: ranked parameter name -> the model's tensor (written in place by the conditions).
        shapes: ranked parameter name -> shape.
        transposed: ranked parameter name -> True for a (in, out) layout (GPT-2 ``Conv1D``).
        notes: what the layout means for the chosen units, one sentence each.
    """

    model: torch.nn.Module
    device: torch.device
    params: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    transposed: dict[str, bool]
    notes: list[str] = field(default_factory=list)


def load_run_model(run: Run, dtype: str, device: str, trust_remote_code: bool, units: tuple[str, ...]) -> LoadedModel:
    """The run's model (its config.yaml's model settings, never its code) with the tensors its top-K list ranks.

    Args:
        run: the run.
        dtype: the dtype to load in.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        trust_remote_code: let the model's own code run (from the command only).
        units: the perturbed units (a 1-D tensor has no rows or columns: noted when one is not ``weight``).
    """
    from cwa.model.loading import load_model
    from cwa.model.params import select_parameters

    settings = dict(run.config.get("model") or {})
    model = load_model(
        settings.get("pretrained") or run.model,
        dtype,
        attn_implementation=settings.get("attn_implementation"),
        trust_remote_code=trust_remote_code,
        revision=settings.get("revision"),
    )
    where = torch_device(device)
    model = model.to(where).requires_grad_(False)
    named = dict(model.named_parameters())
    unknown = [n for n in run.topk.names if n not in named]
    if unknown:
        raise CwaError(f"the run's top-K list names '{unknown[0]}', which this model does not have.")
    params = {n: named[n].data for n in run.topk.names}
    infos = {n: info for n, (_, info) in select_parameters(model).items()}
    shapes = {n: tuple(t.shape) for n, t in params.items()}
    transposed = {n: bool(infos[n].transposed) if n in infos else False for n in params}
    loaded = LoadedModel(model, where, params, shapes, transposed)
    flat = [n for n, shape in shapes.items() if len(shape) == 1]
    if flat and any(u != "weight" for u in units):
        loaded.notes.append(
            f"{len(flat)} ranked 1-D tensors (norms, biases; e.g. '{flat[0]}') have no rows or columns: "
            "their unit is the weight itself."
        )
    return loaded


@dataclass
class Heldout:
    """The run's data module and the held-out blocks to evaluate.

    Args:
        data: the run's data module, set up.
        blocks: (sequences, tokens) held-out token ids, cut to ``heldout_tokens``.
        run_fingerprint: the held-out fingerprint the run recorded (None when it recorded none).
        notes: what differs from the run, one sentence each.
    """

    data: CalibrationData
    blocks: torch.Tensor
    run_fingerprint: str | None
    notes: list[str] = field(default_factory=list)


def load_heldout(run: Run, samples: int | None, batch_size: int | None, tokens: int | None) -> Heldout:
    """The run's held-out blocks (at most ``samples`` of them, each cut to its first ``tokens``)."""
    data = build_data(run, samples, batch_size)
    blocks = data.heldout
    if blocks is None or blocks.shape[0] == 0:
        raise CwaError("the held-out split is empty; raise heldout_fraction or use a longer corpus.")
    if tokens is not None:
        blocks = blocks[:, :tokens].contiguous()
    heldout = Heldout(data, blocks, run.summary.data.get("heldout_fingerprint"))
    if samples is None and heldout.run_fingerprint not in (None, "", data.fingerprint("heldout")):
        heldout.notes.append("the held-out blocks differ from the run's (its heldout_fingerprint does not match).")
    return heldout

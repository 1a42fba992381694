"""Memory per device of ``cwa fit-sensitivity``: weights, gradients, accumulators and extras per metric.

    python scripts/sizing.py llama-3.1-8b --dtype bfloat16 --devices 1 2 4 8
    python scripts/sizing.py smollm2-135m --check lightning_logs/smollm2-135m/version_0

The model is built on the meta device from its configuration (no weights are read), so every count is
exact for the architecture. The memory model is ``cwa.scoring.sizing`` (its docstring says what is counted), the
same function ``cwa fit-sensitivity --dry_run`` prints for one configured run; here every parameter is
scored, and D devices mean FSDP2 (``--trainer.strategy=fsdp2``) row shards over D ranks. DDP (and one
device) replicates everything: the D = 1 column. ``hutchinson_diag`` is the finite-difference estimator in
float32 (what the sharded path needs); ``obd`` uses the Fisher. Activations (batch x seq_len dependent)
and the framework's own memory (CPU: ~0.5-1 GB for Python, torch and transformers) come on top; with
``--check`` the estimate is compared to the peak RSS a finished run measured.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

from cwa.common.errors import CwaError
from cwa.scoring.sizing import DTYPE_BYTES, GIB, Memory, model_layout, plan_memory

PRESETS = {
    # meta-llama/Llama-3.1-8B config.json (the hub model is gated; the architecture is public).
    "llama-3.1-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    },
}
METRICS = ("magnitude", "grad_x_weight", "grad_squared", "hutchinson_diag", "wanda", "obs", "obd")
OPTIONS = {"hutchinson_diag": {"hvp": "finite_difference"}}
"""Options of the table's metrics beyond their defaults: finite differences are the sharded Hutchinson."""


def build_meta_model(name: str, dtype: str = "float32") -> torch.nn.Module:
    """A preset, the embedded model, a local directory (config.json is enough) or a hub name, on meta."""
    if name not in PRESETS:
        from cwa.model.loading import build_meta_model as build

        return build(name, dtype)
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    values = dict(PRESETS[name])
    config = CONFIG_MAPPING[values.pop("model_type")](**values)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))


def make_metric(name: str, settings: dict | None = None):
    """A scorer from its name and the settings a summary records (keys it does not take are ignored)."""
    from cwa.scoring.metrics import make_scorer

    cls = type(make_scorer(name))
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in {**OPTIONS.get(name, {}), **(settings or {})}.items() if k in accepted})


def estimate(model: torch.nn.Module, dtype: str, metric: str, devices: int, settings: dict | None = None) -> Memory:
    """Bytes per device with every parameter selected, sharded over ``devices`` (> 1) or replicated (1).

    Args:
        model: the model on the meta device.
        dtype: the model's dtype (``hutchinson_diag`` with finite differences is counted in float32).
        metric: the metric's name.
        devices: FSDP2 ranks; 1 is one process (and DDP).
        settings: the metric's options.
    """
    scorer = make_metric(metric, settings)
    dtype = planned_dtype(scorer, dtype, devices > 1)
    scored, widths = scorer.plan_scored(model, dict(model.named_parameters()))
    layout = model_layout(model, scored, devices, sharded=devices > 1, input_widths=widths)
    return plan_memory(layout, scorer, dtype)


def planned_dtype(scorer, dtype: str, sharded: bool) -> str:
    """``dtype``, or float32 for a metric that refuses 16-bit weights (finite differences), as it would run."""
    try:
        scorer.check_plan(dtype, sharded)
    except CwaError:
        scorer.check_plan("float32", sharded)  # anything else it refuses is refused here too
        return "float32"
    return dtype


def table(name: str, dtype: str, devices: list[int]) -> tuple[str, torch.nn.Module]:
    model = build_meta_model(name, dtype)
    one = model_layout(model, dict(model.named_parameters()), 1, sharded=False)
    lines = [
        f"{name}: {one.total / 1e9:.3g}B parameters ({dtype}), largest tensor {one.largest_scored / 1e6:.3g}M, "
        f"largest FSDP unit {one.largest_unit / 1e6:.3g}M. GiB per device (weights + gradients + accumulators + "
        "extras = total; activations not included; 1 device = DDP; hutchinson_diag by finite differences in "
        "float32, which they need; obd from the Fisher):",
        "",
        "| metric | " + " | ".join(f"{d} device{'s' if d > 1 else ''}" for d in devices) + " |",
        "|---|" + "---|" * len(devices),
    ]
    for metric in METRICS:
        cells = []
        for d in devices:
            m = estimate(model, dtype, metric, d)
            cells.append(
                f"{m.weights / GIB:.2f} + {m.gradients / GIB:.2f} + {m.accumulators / GIB:.2f} + "
                f"{sum(m.extras.values()) / GIB:.2f} = **{m.total / GIB:.2f}**"
            )
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines), model


def check(run_dir: Path, model: torch.nn.Module) -> str:
    summary = json.loads((run_dir / "summary.json").read_text())
    metric, dtype = summary["metric"]["name"], summary["dtype"]
    world = summary.get("world_size", 1)
    sharded = summary.get("strategy") == "ModelParallelStrategy"
    settings = summary["metric"]  # flat: make_metric keeps the keys the metric takes as options
    estimated = estimate(model, dtype, metric, world if sharded else 1, settings).total / 2**20
    ranks = summary.get("memory_ranks") or [summary["memory"]]
    measured = max(r["peak_rss_mib"] for r in ranks)
    return (
        f"{run_dir}: {metric} {dtype} on {world} process(es) ({summary.get('strategy')}): estimate "
        f"{estimated:.0f} MiB for weights + gradients + accumulators + extras; measured peak RSS {measured:.0f} MiB "
        f"(the difference is activations, the interpreter and libraries)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="preset (llama-3.1-8b), smollm2-135m, or a local model directory")
    parser.add_argument("--dtype", choices=list(DTYPE_BYTES), default="float32", help="model weight dtype")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8], help="device counts")
    parser.add_argument("--check", type=Path, nargs="*", default=[], help="finished run directories to compare")
    args = parser.parse_args(argv)
    text, model = table(args.model, args.dtype, args.devices)
    print(text)
    for run_dir in args.check:
        print()
        print(check(run_dir, model))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory per device of ``cwa fit-sensitivity``: weights, gradients and score accumulators per metric.

    python scripts/sizing.py llama-3.1-8b --dtype bfloat16 --devices 1 2 4 8
    python scripts/sizing.py smollm2-135m --check lightning_logs/smollm2-135m/version_0

The model is built on the meta device from its configuration (no weights are read), so every count is
exact for the architecture. Per device, under FSDP2 (``--trainer.strategy=fsdp2``) with D devices:

* weights: N x dtype bytes / D (row shards) plus one unsharded FSDP unit while it runs (the largest
  of: a decoder layer; the root's own parameters, i.e. embeddings, final norm and an untied LM head).
* gradients: ``grad_x_weight`` and ``grad_squared`` consume each gradient in a hook and free it, so at
  most one FSDP unit's unsharded gradients plus one tensor's shard are alive; ``hutchinson_diag``
  (finite differences) keeps every scored tensor's gradient shard over two backward passes.
* accumulators: float32, one per scored weight, sharded: S x 4 / D (``magnitude`` has none, but its
  float32 scores take the same room at the end). ``hutchinson_diag`` also keeps a copy of the scored
  weights (to restore them bit for bit), int8 probes for every scored shard and one whole-tensor int8
  probe while it is drawn.

DDP (and one device) replicates everything: the D = 1 column. Activations (batch x seq_len dependent)
and the framework's own memory (CPU: ~0.5-1 GB for Python, torch and transformers) come on top; with
``--check`` the estimate is compared to the peak RSS a finished run measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
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
        "tie_word_embeddings": False,
    },
}
METRICS = ("magnitude", "grad_x_weight", "grad_squared", "hutchinson_diag")


def build_meta_model(name: str) -> torch.nn.Module:
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    if name in PRESETS:
        values = dict(PRESETS[name])
        config = CONFIG_MAPPING[values.pop("model_type")](**values)
    else:
        from cwa.models import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(name))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def layout(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: total, largest tensor, largest FSDP unit (a decoder layer or the root's own)."""
    from cwa.sharding import decoder_layers

    params = dict(model.named_parameters())  # tied weights once
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() for p in params.values() if id(p) not in in_layers)
    largest_layer = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    return {
        "total": sum(p.numel() for p in params.values()),
        "largest_tensor": max(p.numel() for p in params.values()),
        "largest_unit": max(root, largest_layer),
    }


def per_device(sizes: dict[str, int], dtype: str, metric: str, devices: int) -> dict[str, float]:
    """Bytes per device for weights, gradients and accumulators (everything scored)."""
    n, big, unit = sizes["total"], sizes["largest_tensor"], sizes["largest_unit"]
    # Finite-difference HVPs refuse 16-bit weights (the step is below their resolution).
    b = BYTES["float32" if metric == "hutchinson_diag" else dtype]
    sharded = devices > 1
    weights = n * b / devices + (unit * b if sharded else 0)
    if metric == "magnitude":
        grads, acc = 0.0, n * 4 / devices
    elif metric in ("grad_x_weight", "grad_squared"):
        grads = (unit * b + big * b / devices) if sharded else big * b
        acc = n * 4 / devices
    else:  # hutchinson_diag, finite differences (autograd also holds a double-backward graph: not sharded)
        grads = n * b / devices + (unit * b if sharded else 0)
        acc = n * 4 / devices + n * b / devices + n / devices + big  # + backup, int8 probes, one whole probe
    return {"weights": weights, "gradients": grads, "accumulators": acc, "total": weights + grads + acc}


def table(name: str, dtype: str, devices: list[int]) -> tuple[str, dict]:
    sizes = layout(build_meta_model(name))
    lines = [
        f"{name}: {sizes['total'] / 1e9:.3g}B parameters ({dtype}), largest tensor "
        f"{sizes['largest_tensor'] / 1e6:.3g}M, largest FSDP unit {sizes['largest_unit'] / 1e6:.3g}M. GiB per device "
        "(weights + gradients + accumulators = total; activations not included; 1 device = DDP; hutchinson_diag "
        "in float32, which finite differences need):",
        "",
        "| metric | " + " | ".join(f"{d} device{'s' if d > 1 else ''}" for d in devices) + " |",
        "|---|" + "---|" * len(devices),
    ]
    for metric in METRICS:
        cells = []
        for d in devices:
            m = per_device(sizes, dtype, metric, d)
            cells.append(
                f"{m['weights'] / GIB:.2f} + {m['gradients'] / GIB:.2f} + {m['accumulators'] / GIB:.2f} "
                f"= **{m['total'] / GIB:.2f}**"
            )
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines), sizes


def check(run_dir: Path, sizes: dict[str, int]) -> str:
    summary = json.loads((run_dir / "summary.json").read_text())
    metric, dtype = summary["metric"]["name"], summary["dtype"]
    world = summary.get("world_size", 1)
    sharded = summary.get("strategy") == "ModelParallelStrategy"
    estimate = per_device(sizes, dtype, metric, world if sharded else 1)["total"] / 2**20
    ranks = summary.get("memory_ranks") or [summary["memory"]]
    measured = max(r["peak_rss_mib"] for r in ranks)
    return (
        f"{run_dir}: {metric} {dtype} on {world} process(es) ({summary.get('strategy')}): estimate "
        f"{estimate:.0f} MiB for weights + gradients + accumulators; measured peak RSS {measured:.0f} MiB "
        f"(the difference is activations, the interpreter and libraries)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="preset (llama-3.1-8b), smollm2-135m, or a local model directory")
    parser.add_argument("--dtype", choices=list(BYTES), default="float32", help="model weight dtype")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8], help="device counts")
    parser.add_argument("--check", type=Path, nargs="*", default=[], help="finished run directories to compare")
    args = parser.parse_args(argv)
    text, sizes = table(args.model, args.dtype, args.devices)
    print(text)
    for run_dir in args.check:
        print()
        print(check(run_dir, sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

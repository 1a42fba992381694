"""One prepared check of cwa at Llama-3.1-8B's published shape on one GPU, and its tiny twin on a CPU.

    bash scripts/gpu_check.sh                 # CUDA present: the 8B shape; otherwise the tiny shape
    bash scripts/gpu_check.sh --tiny          # the tiny shape anywhere (CI runs it; seconds on a CPU)
    bash scripts/gpu_check.sh --json out.json

No hub is reachable from a GPU lease and timings do not depend on weight values, so the model is built from
Llama-3.1-8B's config.json alone (``scripts/sizing.py``'s preset) with random bfloat16 weights, written as
sharded safetensors beside a word-level tokenizer over the pydoc corpus. Every step then runs through
``cwa.cli.main`` in this one process:

1. the seed experiment: ``grad_x_weight``, per-layer top-100, 100 blocks of 512 tokens, bf16 weights loaded
   shard-only (FSDP2 over this one device: each rank reads only its rows of the safetensors shards);
2. a bare forward+backward over the same blocks (same process, same data order): the ratio's denominator;
3. ``find-super-weights``, scan only (``verify: false``), against a bare forward over its blocks;
4. ``wanda`` (every Linear weight), ``obs`` on the 14,336-wide input of the first two layers' ``mlp.down_proj``,
   ``hutchinson_diag`` with one double-backward probe on the last layer (finite differences need float32);
5. one ``perturb`` condition: the seed run's top-100 zeroed, no controls.

For each fit-sensitivity step the peak GPU memory allocated is set beside the dry run's prediction for the
same settings (weights, gradients, accumulators, extras; activations are not in the prediction).
Issue 21's targets on one H200: seed experiment under 2 minutes after loading, ``grad_x_weight`` at most
1.15x the bare pass, the scan at most 1.2x a bare forward, memory within 15% of the dry run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from sizing import PRESETS  # noqa: E402

TINY = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 224,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Plan:
    """The sizes of one check: the 8B one or its tiny twin."""

    shape: dict
    blocks: int  # the seed experiment's calibration blocks
    seq_len: int
    scan_blocks: int
    other_blocks: int  # wanda, obs, Hutchinson
    heldout: int  # perturb's held-out blocks
    shard_bytes: int  # safetensors shard size
    obs_include: str
    hutchinson_include: str
    k: int  # per-layer top-K of the seed experiment


PLANS = {
    "llama-3.1-8b": Plan(
        PRESETS["llama-3.1-8b"], 100, 512, 8, 8, 8, 4 * 2**30, r"layers\.[01]\.mlp\.down_proj", "layers.31", 100
    ),
    "tiny": Plan(TINY, 8, 64, 4, 4, 6, 2**17, r"layers\.[01]\.mlp\.down_proj", "layers.1", 16),
}


@dataclass
class Row:
    step: str
    seconds: float | None = None  # the scoring loop (summary timings) or the command's wall time
    reference: float | None = None  # the bare pass it is compared with
    peak_gib: float | None = None
    predicted_gib: float | None = None
    notes: list[str] = field(default_factory=list)


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the most common pydoc words (the model's vocabulary is never exceeded)."""
    from collections import Counter
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for text in topics.values() for w in text.split())
    vocab = {"<unk>": 0, "<eos>": 1}
    for word, _ in counts.most_common(vocab_size - len(vocab)):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(directory)


def write_random_model(directory: Path, plan: Plan, device: str) -> float:
    """config.json, tokenizer and random bf16 weights as sharded safetensors with an index; returns seconds."""
    from safetensors.torch import save_file
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    start = time.perf_counter()
    values = dict(plan.shape)
    config = CONFIG_MAPPING[values.pop("model_type")](**values)
    config.save_pretrained(directory)
    write_tokenizer(directory, config.vocab_size)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, param in meta.state_dict().items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            drawn = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
            tensor = drawn.mul_(0.02).to("cpu", torch.bfloat16)
        nbytes = tensor.numel() * 2
        if size and size + nbytes > plan.shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
        total += sum(t.numel() * 2 for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return time.perf_counter() - start


def _peak_reset(device: str) -> None:
    import gc

    gc.collect()  # the previous step's model and trainer, so that each peak is the step's own
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _cli(argv: list[str]) -> None:
    from cwa.cli import main

    code = main(argv)
    if code:
        raise SystemExit(f"gpu_check: `cwa {' '.join(argv)}` exited {code}")


def _run_dir(logs: Path, name: str) -> Path:
    return sorted((logs / name).glob("version_*"))[-1]


def fit_args(model_dir: Path, logs: Path, name: str, plan: Plan, device: str, blocks: int, *extra: str) -> list[str]:
    return [
        "fit-sensitivity",
        f"--model.pretrained={model_dir}",
        "--model.dtype=bfloat16",
        f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        "--trainer.devices=1",
        f"--data.seq_len={plan.seq_len}",
        f"--data.num_samples={blocks}",
        "--data.batch_size=1",
        f"--trainer.logger.init_args.save_dir={logs}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=cwa.fit.callbacks.ScoreFigures",
        "--trainer.callbacks.enabled=false",
        *extra,
    ]


def predicted_gib(argv: list[str]) -> float:
    """The dry run's per-rank total for the same command line, read from its printed memory table."""
    from cwa.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*argv, "--dry_run=true"])
    if code:
        raise SystemExit(f"gpu_check: the dry run of `cwa {' '.join(argv)}` exited {code}")
    lines = out.getvalue().splitlines()
    unit = next(line.split()[-1] for line in lines if line.startswith("per rank"))
    total = float(next(line.split()[-1] for line in lines if line.startswith("total")))
    return total if unit == "GiB" else total / 1024


def fit_step(label: str, argv: list[str], logs: Path, name: str, device: str) -> Row:
    """One fit-sensitivity command: its scoring loop's seconds and peak memory against the dry run."""
    row = Row(label, predicted_gib=predicted_gib(argv))
    _peak_reset(device)
    _cli(argv)
    row.peak_gib = _peak_gib(device)
    summary = json.loads((_run_dir(logs, name) / "summary.json").read_text())
    row.seconds = summary["timings"].get("accumulate_s")
    timings = summary["timings"]
    after = sum(v for k, v in timings.items() if k != "load_model_s")
    row.notes.append(f"loaded in {timings.get('load_model_s', float('nan')):.1f} s, {after:.1f} s after loading")
    return row


def bare_seconds(model_dir: Path, plan: Plan, device: str, blocks: int, backward: bool) -> float:
    """A bare forward (+backward of the mean NLL) over the calibration blocks a fit step scores, timed."""
    from cwa.fit.data import CalibrationData
    from cwa.model.loading import load_model
    from cwa.model.loss import next_token_nll

    model = load_model(str(model_dir), "bfloat16").to(device)
    data = CalibrationData(tokenizer=str(model_dir), seq_len=plan.seq_len, num_samples=blocks, batch_size=1)
    data.setup("validate")
    batches = [{k: v.to(device) for k, v in b.items()} for b in data.val_dataloader()]
    model.requires_grad_(backward)

    def step(batch: dict) -> None:
        with torch.set_grad_enabled(backward):
            nll, tokens = next_token_nll(model, batch)
        if backward:
            (nll / tokens).backward()
            model.zero_grad(set_to_none=True)

    step(batches[0])  # kernel selection and allocator warm-up, which the scoring loop has paid by then too
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def scan_step(model_dir: Path, logs: Path, plan: Plan, device: str) -> Row:
    argv = [
        "find-super-weights",
        f"--model.pretrained={model_dir}",
        "--model.dtype=bfloat16",
        f"--data.seq_len={plan.seq_len}",
        f"--super_weights.blocks={plan.scan_blocks}",
        "--super_weights.verify=false",
        "--super_weights.figures=false",
        "--super_weights.tensorboard=false",
        f"--trainer.logger.init_args.save_dir={logs}",
        "--trainer.logger.init_args.name=scan",
    ]
    _peak_reset(device)
    start = time.perf_counter()
    _cli(argv)
    row = Row("find-super-weights (scan only)", seconds=time.perf_counter() - start, peak_gib=_peak_gib(device))
    row.reference = bare_seconds(model_dir, plan, device, plan.scan_blocks, backward=False)
    row.notes.append("wall time including the model load, against a bare forward without it")
    return row


def perturb_step(run: Path, logs: Path, plan: Plan, device: str) -> Row:
    argv = [
        "perturb",
        f"--run={run}",
        "--ks=[100]",
        "--controls=[]",
        "--single=0",
        f"--heldout_samples={plan.heldout}",
        "--bootstrap=200",
        "--permutations=200",
        "--figures=false",
        "--tensorboard=false",
        f"--device={device}",
    ]
    _peak_reset(device)
    start = time.perf_counter()
    _cli(argv)
    return Row(
        "perturb (top-100 zeroed, one condition)", seconds=time.perf_counter() - start, peak_gib=_peak_gib(device)
    )


def run_check(name: str, work: Path, device: str) -> tuple[list[Row], str]:
    plan = PLANS[name]
    model_dir, logs = work / "model", work / "logs"
    model_dir.mkdir(parents=True, exist_ok=True)
    written = write_random_model(model_dir, plan, device)
    rows = [Row("write random bf16 weights (sharded safetensors)", seconds=written)]
    seed = fit_args(model_dir, logs, "seed", plan, device, plan.blocks, "--model.metric=grad_x_weight")
    seed += [
        "--model.mode=per_layer",
        f"--model.k={plan.k}",
        "--trainer.strategy=fsdp2",
        "--model.save_scores=bfloat16",
    ]
    label = f"seed experiment: grad_x_weight, per_layer top-{plan.k} (FSDP2, shard-only load)"
    row = fit_step(label, seed, logs, "seed", device)
    row.reference = bare_seconds(model_dir, plan, device, plan.blocks, backward=True)
    rows.append(row)
    rows.append(scan_step(model_dir, logs, plan, device))
    others = {
        "wanda (every Linear weight)": ["--model.metric=wanda"],
        f"obs ({plan.obs_include})": ["--model.metric=obs", f"--model.include={plan.obs_include}"],
        f"hutchinson_diag, 1 autograd probe ({plan.hutchinson_include})": [
            "--model.metric=cwa.scoring.scorers.HutchinsonDiag",
            "--model.metric.probes=1",
            "--model.metric.hvp=autograd",
            f"--model.include={plan.hutchinson_include}",
        ],
    }
    for i, (label, extra) in enumerate(others.items()):
        argv = fit_args(
            model_dir, logs, f"other{i}", plan, device, plan.other_blocks, "--model.save_scores=off", *extra
        )
        rows.append(fit_step(label, argv, logs, f"other{i}", device))
    rows.append(perturb_step(_run_dir(logs, "seed"), logs, plan, device))
    title = (
        f"{name} shape (1 device: {_device_name(device)}), bfloat16 random weights; seed experiment "
        f"{plan.blocks} blocks of {plan.seq_len} tokens, batch 1; other metrics {plan.other_blocks} blocks."
    )
    return rows, title


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "CPU"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row], title: str) -> str:
    lines = [title, "", "| step | seconds | bare | ratio | peak GiB | dry run GiB | peak / dry run | notes |"]
    lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ratio = r.seconds / r.reference if r.seconds and r.reference else None
        memory = r.peak_gib / r.predicted_gib if r.peak_gib and r.predicted_gib else None
        lines.append(
            f"| {r.step} | {_fmt(r.seconds)} | {_fmt(r.reference)} | {_fmt(ratio)} | {_fmt(r.peak_gib)} | "
            f"{_fmt(r.predicted_gib)} | {_fmt(memory)} | {'; '.join(r.notes)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny shape (the default without CUDA)")
    parser.add_argument("--work", help="keep the model and runs here (default: a temporary directory)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    sys.argv[1:] = []  # the CLI steps below get their arguments from this script, never from its own
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = "tiny" if args.tiny or device == "cpu" else "llama-3.1-8b"
    with tempfile.TemporaryDirectory(prefix="cwa-gpu-check-") as scratch:
        rows, title = run_check(name, Path(args.work or scratch), device)
    print(table(rows, title), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "rows": [r.__dict__ for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

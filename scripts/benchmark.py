"""Speed and memory of each metric against a bare forward+backward on the embedded SmolLM2-135M.

    python scripts/benchmark.py                 # all metrics, batch 4 x 256 tokens, fp32, CPU
    python scripts/benchmark.py --metrics grad_x_weight --reps 3
    python scripts/benchmark.py --metrics hutchinson_diag/finite_difference --topk 0   # both FD schemes
    python scripts/benchmark.py --device cuda --metrics grad_x_weight --topk 0 --hvp-accuracy 0   # on a GPU
    python scripts/benchmark.py --metrics bare --topk 0 --hvp-accuracy 0 --downstream 500   # lm-eval vs perplexity

The finite-difference rows are followed by the error of their HVPs against double backward on one batch.
``--downstream N`` (needs the ``cwa[eval]`` extra) times one ``cwa perturb --tasks`` condition, lm-eval's
cwa_pydoc_lastword on N items, against one perplexity condition (the README run's 32 held-out blocks of 256
tokens), interleaved in one process.

Every configuration runs in its own process (peak RSS is per process). Inside a process the peak is
reset after the model is loaded (Linux ``/proc/self/clear_refs``), the configuration runs twice for
the memory peak, and then its batches are timed interleaved with bare forward+backward batches of
the same data, so each time ratio comes from one process on one (noisy) machine. With ``--device cuda``
the model and batches live on the GPU, each timed step ends with a synchronize, and the peak CUDA memory
allocated (reset with the RSS peak) is reported beside the RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "bare": {},
    "magnitude": {"metric": "magnitude"},
    "grad_x_weight": {"metric": "grad_x_weight"},
    "grad_squared": {"metric": "grad_squared"},
    "hutchinson_diag/finite_difference central (1 probe)": {
        "metric": "hutchinson_diag",
        "hvp": "finite_difference",
        "fd_scheme": "central",
        "probes": 1,
    },
    "hutchinson_diag/finite_difference forward (4 probes)": {
        "metric": "hutchinson_diag",
        "hvp": "finite_difference",
        "fd_scheme": "forward",
        "probes": 4,
    },
    "hutchinson_diag/autograd (4 probes)": {"metric": "hutchinson_diag", "hvp": "autograd", "probes": 4},
    # One shared pass for several metrics (cwa.scoring.shared_pass), also timed against grad_x_weight alone.
    "shared pass: magnitude, grad_x_weight, grad_squared, wanda": {
        "metric": ["magnitude", "grad_x_weight", "grad_squared", "wanda"],
        "compare": "grad_x_weight",
    },
    "shared pass: magnitude, grad_x_weight, grad_squared, wanda, obd": {
        "metric": ["magnitude", "grad_x_weight", "grad_squared", "wanda", "obd"],
        "compare": "grad_x_weight",
    },
    # Forward-only analyses: their ratio is against a bare forward pass (no backward) of the same batch.
    "wanda": {"metric": "wanda", "forward_only": True},
    "obs": {"metric": "obs", "forward_only": True},
    "find_super_weights": {"metric": "find_super_weights", "forward_only": True},
}


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cuda_peak_mib(device: str, reset: bool = False) -> float | None:
    """Peak CUDA memory allocated since the last reset (None off the GPU); reset it when asked."""
    import torch

    if not device.startswith("cuda"):
        return None
    peak = torch.cuda.max_memory_allocated() / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def worker(name: str, batch: int, seq_len: int, reps: int, device: str = "cpu") -> dict:
    import torch

    from cwa.ablation.super_weights import find_super_weights
    from cwa.common.environment import keep_freed_memory
    from cwa.fit.data import PydocCorpus, tokenize_stream
    from cwa.model.loading import load_model, load_tokenizer
    from cwa.model.loss import next_token_nll
    from cwa.scoring.metrics import make_scorer
    from cwa.scoring.saliency import OBS, Wanda
    from cwa.scoring.scorers import GradSquared, GradXWeight, HutchinsonDiag, Magnitude

    torch.manual_seed(0)
    spec = CONFIGS[name]
    attn = "eager" if spec.get("hvp") == "autograd" else None
    model = load_model("smollm2-135m", "float32", attn_implementation=attn).to(device)
    stream = tokenize_stream(PydocCorpus().load(), load_tokenizer("smollm2-135m"))
    ids = stream[: batch * seq_len].view(batch, seq_len).to(device)
    data = {"input_ids": ids}
    params = dict(model.named_parameters())

    def bare() -> None:
        if spec.get("forward_only"):
            with torch.no_grad():
                next_token_nll(model, data)
            return
        nll, tokens = next_token_nll(model, data)
        (nll / tokens).backward()
        for p in params.values():
            p.grad = None

    extra: dict = {}
    if name == "bare":
        step = bare
    elif spec["metric"] == "find_super_weights":

        def step() -> None:
            find_super_weights(model, [data])
    elif isinstance(spec["metric"], list):
        metric = "shared_pass"
        scorer = make_scorer(spec["metric"])
        scorer.bind(params)
        scorer.attach(model)

        def step() -> None:
            scorer.update(data, lambda b: next_token_nll(model, b))
    else:
        metric = spec["metric"]
        scorer = {
            "magnitude": lambda: Magnitude(),
            "grad_x_weight": lambda: GradXWeight(),
            "grad_squared": lambda: GradSquared(),
            "hutchinson_diag": lambda: HutchinsonDiag(
                probes=spec["probes"], hvp=spec["hvp"], fd_scheme=spec.get("fd_scheme", "forward")
            ),
            "wanda": lambda: Wanda(),
            "obs": lambda: OBS(),
        }[metric]()
        scorer.bind(params)
        scorer.attach(model)
        if scorer.repeats_passes:
            keep_freed_memory()  # as the fit loop does for such scorers
        if metric == "obs":
            extra["obs_bound_mib"] = scorer.memory_bytes()["peak"] / 2**20

        def step() -> None:
            scorer.update(data, lambda b: next_token_nll(model, b))

    bare()  # the first pass's one-time allocations are not the analysis's
    _reset_peak()
    rss_before = _rss_mib("VmRSS")  # the model and data only: obs's accumulators are measured from here
    step()  # warm-up: allocator, kernels, accumulators
    _sync(device)
    _reset_peak()
    _cuda_peak_mib(device, reset=True)
    base_rss = _rss_mib("VmRSS")
    step()
    step()
    _sync(device)
    peak = _rss_mib("VmHWM")
    if device.startswith("cuda"):
        extra["peak_cuda_mib"] = _cuda_peak_mib(device)
    compare = None
    if spec.get("compare"):  # bound after the memory peak: its accumulators are not this row's
        other = make_scorer(spec["compare"])
        other.bind(params)

        def compare() -> None:
            other.update(data, lambda b: next_token_nll(model, b))

        compare()  # warm-up
    times, bare_times, compare_times = [], [], []
    for _ in range(reps):
        start = time.perf_counter()
        bare()
        _sync(device)
        bare_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        if compare is not None:
            start = time.perf_counter()
            compare()
            compare_times.append(time.perf_counter() - start)
    if compare_times:
        extra["compare"] = spec["compare"]
        extra["compare_seconds_per_batch"] = statistics.median(compare_times)
    if metric_needs_compute(name):
        start = time.perf_counter()
        scorer.compute()
        extra["compute_s"] = time.perf_counter() - start
        extra["peak_rss_after_compute_mib"] = _rss_mib("VmHWM")
    return {
        **extra,
        "config": name,
        "rss_before_mib": rss_before,
        "seconds_per_batch": statistics.median(times),
        "bare_seconds_per_batch": statistics.median(bare_times),
        "peak_rss_mib": peak,
        "rss_after_warmup_mib": base_rss,
    }


def metric_needs_compute(name: str) -> bool:
    """obs inverts its X^T X at compute time: its memory bound covers that step, so the row measures it."""
    return name == "obs"


def hvp_accuracy(batch: int, seq_len: int) -> dict:
    """Finite-difference HVPs against double backward on one batch and one probe v (eager attention for
    both). Each scorer's scores after one update are v * (H v) / tokens for the same v (same seed and batch
    index; finite differences divided by their applied step), so their sum is v^T H v / tokens and their
    norm that of H v / tokens: the relative errors do not depend on the common denominator."""
    import torch

    from cwa.fit.data import PydocCorpus, tokenize_stream
    from cwa.model.loading import load_model, load_tokenizer
    from cwa.model.loss import next_token_nll
    from cwa.scoring.scorers import HutchinsonDiag

    model = load_model("smollm2-135m", "float32", attn_implementation="eager")
    stream = tokenize_stream(PydocCorpus().load(), load_tokenizer("smollm2-135m"))
    data = {"input_ids": stream[: batch * seq_len].view(batch, seq_len)}
    params = dict(model.named_parameters())

    def products(**options: str) -> tuple[torch.Tensor, HutchinsonDiag]:
        scorer = HutchinsonDiag(probes=1, seed=0, **options)
        scorer.bind(params)
        scorer.update(data, lambda b: next_token_nll(model, b))
        scores = scorer.compute()  # v * (H v) over the batch's tokens: the same denominator for every scheme
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        scorer.acc = {}
        return flat, scorer

    exact, _ = products(hvp="autograd")
    result = {"weights": int(exact.numel()), "vHv_autograd": float(exact.double().sum())}
    for scheme in ("forward", "central"):
        approx, scorer = products(hvp="finite_difference", fd_scheme=scheme)
        result[scheme] = {
            "hvp_relative_error": float((approx - exact).double().norm() / exact.double().norm()),
            "vHv_relative_error": float(abs(approx.double().sum() - exact.double().sum()) / abs(exact.double().sum())),
            "zero_step_weights": sum(scorer.zero_steps.values()),
        }
    return result


def topk_benchmark(k: int) -> dict:
    """Global top-K over all 134.5M |w| of the embedded model (real, heavy-tailed values)."""
    import torch

    from cwa.model.loading import load_model
    from cwa.scoring.topk import select_topk

    model = load_model("smollm2-135m", "float32")
    scores = {n: p.detach().abs().clone() for n, p in model.named_parameters()}
    del model
    select_topk({"warm": torch.rand(1000)}, 10)
    _reset_peak()
    before = _rss_mib("VmRSS")
    start = time.perf_counter()
    top = select_topk(scores, k, "global")
    seconds = time.perf_counter() - start
    extra = _rss_mib("VmHWM") - before
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    start = time.perf_counter()
    reference = torch.topk(flat, k).values
    concat_seconds = time.perf_counter() - start
    assert torch.equal(top.score.abs(), reference), "global top-K disagrees with torch.topk"
    return {
        "k": k,
        "weights": int(flat.numel()),
        "seconds": seconds,
        "extra_mib": extra,
        "torch_topk_on_concatenation_seconds": concat_seconds,
    }


def downstream_benchmark(items: int, reps: int, batch_size: int = 8) -> dict:
    """One lm-eval condition (cwa_pydoc_lastword, ``items`` items) against one perplexity condition (32
    held-out blocks of 256 tokens, batch 4: configs/perturb-smollm2.yaml), same model, same process."""
    import torch

    from cwa.fit.data import CalibrationData
    from cwa.model.loading import load_model, load_tokenizer
    from cwa.perturb.downstream import LOCAL_TASK, DownstreamTasks, local_items
    from cwa.perturb.evaluate import evaluate

    model = load_model("smollm2-135m", "float32").requires_grad_(False)
    tokenizer = load_tokenizer("smollm2-135m")
    data = CalibrationData("pydoc", "smollm2-135m", seq_len=256, num_samples=32, heldout_samples=32)
    data.setup()
    tasks = DownstreamTasks([LOCAL_TASK], limit=items, batch_size=batch_size)
    tasks.prepare(local_items(data, tokenizer))
    perplexity, lm_eval, accuracy = [], [], 0.0
    try:
        for _ in range(reps):
            perplexity.append(evaluate(model, data.heldout, 4, torch.device("cpu")).seconds)
            result = tasks.evaluate(model, tokenizer)[LOCAL_TASK]
            lm_eval.append(result.seconds)
            accuracy = result.accuracy
    finally:
        tasks.close()
    return {
        "items": int(len(result.correct)),
        "local_task_items": len(tasks.items),
        "accuracy": accuracy,
        "batch_size": batch_size,
        "heldout_blocks": int(data.heldout.shape[0]),
        "lm_eval_seconds": statistics.median(lm_eval),
        "perplexity_seconds": statistics.median(perplexity),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", nargs="*", default=list(CONFIGS), help="configurations to run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=2, help="timed batches per configuration")
    parser.add_argument("--topk", type=int, default=100_000, help="k of the global top-K benchmark (0 skips it)")
    parser.add_argument(
        "--hvp-accuracy", type=int, default=1, help="compare finite-difference HVPs with double backward (0 skips it)"
    )
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda or cuda:N")
    parser.add_argument(
        "--downstream", type=int, default=0, help="items of the lm-eval condition timed against perplexity (0 skips it)"
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        if args.worker == "topk":
            result = topk_benchmark(args.topk)
        elif args.worker == "hvp_accuracy":
            result = hvp_accuracy(args.batch, args.seq_len)
        elif args.worker == "downstream":
            result = downstream_benchmark(args.downstream, args.reps)
        else:
            result = worker(args.worker, args.batch, args.seq_len, args.reps, args.device)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device is available here.", file=sys.stderr)
        return 1
    where = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"{torch.get_num_threads()} threads"
    )
    print(
        f"cwa benchmark: SmolLM2-135M, fp32, batch {args.batch} x {args.seq_len} tokens, "
        f"{args.device} ({where}), torch {torch.__version__}",
        flush=True,
    )
    results = {}
    names = ["bare"] + [m for m in args.metrics if m != "bare"]
    extra = (
        ["topk"] * bool(args.topk) + ["hvp_accuracy"] * bool(args.hvp_accuracy) + ["downstream"] * bool(args.downstream)
    )
    names += extra
    for name in names:
        matches = [c for c in CONFIGS if c.startswith(name)] if name not in extra else [name]
        for config in matches:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                config,
                "--batch",
                str(args.batch),
                "--seq-len",
                str(args.seq_len),
                "--reps",
                str(args.reps),
                "--topk",
                str(args.topk),
                "--device",
                args.device,
                "--downstream",
                str(args.downstream),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                print(f"{config}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[config] = json.loads(line[0][7:])
            print(f"  done: {config}", flush=True)
    bare = results["bare"]
    print()
    print("| metric | s / batch | time vs bare fwd+bwd (same process) | per probe | peak RSS MiB | RSS vs bare |")
    print("|---|---:|---:|---:|---:|---:|")
    forward_only = [c for c in results if c not in extra and CONFIGS[c].get("forward_only")]
    for config, r in results.items():
        if config in extra or config in forward_only:
            continue
        ratio = r["seconds_per_batch"] / r["bare_seconds_per_batch"]
        probes = CONFIGS[config].get("probes")
        per_probe = f"{ratio / probes:.2f}x" if probes else ""
        print(
            f"| {config} | {r['seconds_per_batch']:.2f} | {ratio:.2f}x | {per_probe} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_rss_mib'] / bare['peak_rss_mib']:.2f}x |"
        )
    cuda = {c: r["peak_cuda_mib"] for c, r in results.items() if isinstance(r, dict) and "peak_cuda_mib" in r}
    if cuda:
        print("\npeak CUDA memory allocated (MiB): " + ", ".join(f"{c} {v:.0f}" for c, v in cuda.items()))
    if forward_only:
        print(
            "\n| forward-only analysis | s / batch | time vs bare forward (same process) | peak RSS MiB | "
            "RSS growth over model+data MiB | stated bound MiB |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for config in forward_only:
            r = results[config]
            peak = max(r["peak_rss_mib"], r.get("peak_rss_after_compute_mib", 0.0))
            bound = f"{r['obs_bound_mib']:.0f}" if "obs_bound_mib" in r else ""
            ratio = r["seconds_per_batch"] / r["bare_seconds_per_batch"]
            growth = peak - r["rss_before_mib"]
            print(f"| {config} | {r['seconds_per_batch']:.2f} | {ratio:.2f}x | {peak:.0f} | {growth:.0f} | {bound} |")
    shared = [c for c in results if c not in extra and "compare_seconds_per_batch" in results[c]]
    for config in shared:
        r = results[config]
        print(
            f"\n{config}: {r['seconds_per_batch'] / r['compare_seconds_per_batch']:.2f}x the time of "
            f"{r['compare']} alone (interleaved in the same process: {r['compare_seconds_per_batch']:.2f} s / batch)"
        )
    if "topk" in results:
        t = results["topk"]
        print(
            f"\nglobal top-{t['k']:,} over {t['weights']:,} scores: {t['seconds']:.2f} s, "
            f"{t['extra_mib']:.0f} MiB beyond the scores (torch.topk on the concatenation: "
            f"{t['torch_topk_on_concatenation_seconds']:.2f} s plus a {t['weights'] * 4 / 2**20:.0f} MiB copy)"
        )
    if "hvp_accuracy" in results:
        h = results["hvp_accuracy"]
        print(f"\nfinite-difference HVPs against double backward (one batch, one probe, {h['weights']:,} weights):")
        for scheme in ("forward", "central"):
            r = h[scheme]
            print(
                f"  {scheme}: |Hv - Hv_autograd| / |Hv_autograd| = {r['hvp_relative_error']:.2e}, "
                f"v^T H v relative error {r['vHv_relative_error']:.2e}, "
                f"{r['zero_step_weights']} weights with a zero step"
            )
    if "downstream" in results:
        d = results["downstream"]
        print(
            f"\none lm-eval condition (cwa_pydoc_lastword, {d['items']} of {d['local_task_items']} items, batch "
            f"{d['batch_size']}, accuracy {d['accuracy']:.3f}): {d['lm_eval_seconds']:.2f} s; one perplexity condition "
            f"({d['heldout_blocks']} held-out blocks x 256 tokens, batch 4): {d['perplexity_seconds']:.2f} s "
            f"({d['lm_eval_seconds'] / d['perplexity_seconds']:.2f}x)"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

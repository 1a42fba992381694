"""Time one shared-pass update (``[grad_x_weight, grad_squared]``) with both per-sequence paths.

    python scripts/per_sequence_timing.py                      # the embedded SmolLM2-135M, 4 x 256 tokens
    python scripts/per_sequence_timing.py --tiny --seq-lens 32 128 256 --rows 8

``backward`` is one backward per sequence, ``vmap`` the ``torch.func`` path (``cwa.scoring.per_sequence``);
the paths alternate and each keeps its best of ``--reps`` rounds. The README's CPU numbers come from here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from cwa.model.loss import next_token_nll
from cwa.scoring.scorers import GradSquared, GradXWeight
from cwa.scoring.shared_pass import SharedPass


def model_for(tiny: bool) -> torch.nn.Module:
    if not tiny:
        from cwa.model.loading import load_model

        return load_model("smollm2-135m")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import tiny_llama

    return tiny_llama()


def best_seconds(model: torch.nn.Module, batch: dict, reps: int, device: str) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(reps):
        for mode in ("backward", "vmap"):
            scorer = SharedPass(
                [GradXWeight(), GradSquared()], per_sequence=mode, vmap_chunk=batch["input_ids"].shape[0]
            )
            scorer.bind(dict(model.named_parameters()))
            scorer.attach(model)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            scorer.update(batch, lambda b: next_token_nll(model, b))
            if device == "cuda":
                torch.cuda.synchronize()
            best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the 2-layer test Llama instead of SmolLM2-135M")
    parser.add_argument("--rows", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model = model_for(args.tiny).to(args.device)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    for seq_len in args.seq_lens:
        batch = {"input_ids": torch.randint(0, vocab, (args.rows, seq_len), generator=generator).to(args.device)}
        best = best_seconds(model, batch, args.reps, args.device)
        ratio = best["vmap"] / best["backward"]
        print(f"{args.rows} x {seq_len}: backward {best['backward']:.2f} s, vmap {best['vmap']:.2f} s ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

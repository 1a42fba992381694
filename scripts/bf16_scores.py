"""What storing a run's scores in bfloat16 changes: distinct values, rank correlation, global top-K.

    python scripts/bf16_scores.py lightning_logs/smollm2-135m/version_0

Reads a float32 ``scores.safetensors`` and compares it with the same scores rounded to bfloat16 (what
``save_scores: bfloat16`` writes): distinct nonzero |score| values, the Spearman correlation over a random
sample of weights, and for each K the share of the global top-K kept, the share at the same rank, and how
many bfloat16 scores tie with the (K+1)-th (their membership is decided by the tie rule, not the data).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cwa.rundir import SCORES, LazyScores
from cwa.scoring.topk import select_topk


def top_keys(top, k: int) -> list[tuple[int, int]]:
    return list(zip(top.param[:k].tolist(), top.index[:k].tolist(), strict=True))


def main() -> int:
    from scipy.stats import spearmanr

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory with a float32 scores.safetensors")
    parser.add_argument("--ks", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    parser.add_argument("--sample", type=int, default=2_000_000, help="weights in the Spearman sample")
    args = parser.parse_args()
    lazy = LazyScores(Path(args.run) / SCORES)
    exact = {name: lazy[name].clone() for name in lazy}
    rounded = {name: t.to(torch.bfloat16).float() for name, t in exact.items()}
    flat = torch.cat([t.reshape(-1).abs() for t in exact.values()])
    half = flat.to(torch.bfloat16).float()
    nonzero = flat > 0
    print(f"{flat.numel():,} weights, {int(nonzero.sum()):,} nonzero scores")
    print(
        f"distinct nonzero |score|: {torch.unique(flat[nonzero]).numel():,} float32, "
        f"{torch.unique(half[nonzero]).numel():,} bfloat16"
    )
    sample = torch.randint(0, flat.numel(), (args.sample,), generator=torch.Generator().manual_seed(0))
    print(f"Spearman over {args.sample:,} weights: {spearmanr(flat[sample], half[sample]).statistic:.7f}")
    for k in args.ks:
        a, b = select_topk(exact, k + 1, "global"), select_topk(rounded, k + 1, "global")
        kept = len(set(top_keys(a, k)) & set(top_keys(b, k))) / k
        same = sum(x == y for x, y in zip(top_keys(a, k), top_keys(b, k), strict=True)) / k
        ties = int((b.score.abs()[:k] == b.score.abs()[k]).sum())
        print(f"top-{k}: {kept:.4f} kept, {same:.4f} at the same rank, {ties} bfloat16 ties at the cutoff")
    return 0


if __name__ == "__main__":
    sys.exit(main())

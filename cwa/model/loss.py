"""The calibration loss of the metric contract (docs/design.md): next-token NLL over counted tokens, in plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CPU_CHUNK_BYTES = 16 << 20
"""On the CPU the cross-entropy runs over blocks of positions whose float32 logits take at most this many
bytes: each block's log-softmax and gradient then come from (and go back to) the reusable heap, where one
call over the whole batch allocates several logits-sized temporaries (200 MB each for SmolLM2 at 4 x 256
tokens) that the allocator maps fresh, page-faulting every one of their pages, on every pass. A GPU's caching
allocator keeps its blocks: there one call is fastest."""


def next_token_nll(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """(sum of next-token NLL over counted tokens, number of counted tokens); padding never counts."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    # Position t predicts token t + 1; the last position predicts nothing (-100). Labelling every position
    # lets the logits be read in place: no shifted copy of them, and none of their gradient.
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    if mask is not None:
        labels[:, :-1].masked_fill_(mask[:, 1:] == 0, -100)
    flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    rows = flat.shape[0]
    if flat.device.type == "cpu":
        rows = max(1, CPU_CHUNK_BYTES // (4 * flat.shape[1]))
    # split (not slicing) so that backward assembles the logits' gradient in one tensor.
    parts = [
        F.cross_entropy(x.float(), y, ignore_index=-100, reduction="sum")
        for x, y in zip(flat.split(rows), targets.split(rows), strict=True)
    ]
    nll = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
    return nll, int((labels != -100).sum())

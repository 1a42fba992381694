"""The calibration loss of the metric contract (DESIGN.md): next-token NLL over counted tokens, in plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def next_token_nll(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """(sum of next-token NLL over counted tokens, number of counted tokens); padding never counts."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    labels = input_ids[:, 1:]
    if mask is not None:
        labels = labels.masked_fill(mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return nll, int((labels != -100).sum())

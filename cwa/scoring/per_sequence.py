"""Per-micro-batch gradients of the calibration loss with ``torch.func``: one vectorised backward for many.

``grad_squared`` and ``obd``'s Fisher square the gradient of each micro-batch's mean loss, which the plain
path gets from one forward and backward per micro-batch: many small passes that leave a GPU mostly idle.
Here ``torch.func.vmap`` of ``torch.func.grad`` over the micro-batches computes those gradients together;
the caller bounds memory by handing over a few micro-batches at a time (their stacked gradients of the
scored tensors come on top of the activations). The loss is the metric contract's (``cwa.model.loss``):
next-token NLL summed over counted tokens; the token counts are fixed before the vectorised call, since a
data-dependent ``int`` cannot be taken inside vmap.

Not for sharded (FSDP2) parameters: ``functional_call`` replaces whole tensors and DTensor row shards are
not that. Faster than the per-micro-batch backward on the CPU too (README, "Per-sequence gradients"), but
equal to it only to float rounding, so ``SharedPass`` uses it by default on CUDA only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def next_token_labels(input_ids: Tensor) -> Tensor:
    """Labels of the metric contract for unpadded blocks: position t predicts token t + 1, the last nothing."""
    labels = torch.full_like(input_ids, -100)
    labels[..., :-1] = input_ids[..., 1:]
    return labels


def micro_batch_gradients(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Mapping[str, Tensor],
    microbatch: int,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The gradient of each micro-batch's mean next-token NLL with respect to ``params``, vectorised.

    Args:
        model: the causal LM ``params`` belong to (its other parameters are held fixed).
        params: the parameters to differentiate, by name as ``model.named_parameters()`` gives them.
        batch: ``input_ids`` of B sequences, B a multiple of ``microbatch``; an ``attention_mask`` must be all
            ones (Transformers builds its attention mask with data-dependent branches, which vmap cannot trace).
        microbatch: sequences per micro-batch.

    Returns:
        (gradients: name -> [B / microbatch, *shape] in the parameter's dtype, summed NLL per micro-batch,
        counted tokens per micro-batch).
    """
    from torch.func import functional_call, grad, vmap

    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("micro_batch_gradients takes unpadded blocks; padded batches need one backward each.")
    mask = None  # all ones: the same as none, and Transformers' mask builder branches on its values
    groups = input_ids.shape[0] // microbatch
    labels = next_token_labels(input_ids)
    tokens = (labels != -100).reshape(groups, -1).sum(1)
    shape = (groups, microbatch, input_ids.shape[-1])
    fixed = {n: p.detach() for n, p in params.items()}

    def mean_nll(weights: dict[str, Tensor], ids: Tensor, target: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        logits = functional_call(model, weights, args=(), kwargs={"input_ids": ids}, strict=False).logits
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum")
        return nll / count, nll.detach()

    per_group = vmap(grad(mean_nll, has_aux=True), in_dims=(None, 0, 0, 0))
    grads, nll = per_group(fixed, input_ids.reshape(shape), labels.reshape(shape), tokens)
    return grads, nll, tokens

"""Per-micro-batch gradients from ``torch.func`` (vmap over sequences) equal one backward per micro-batch."""

from __future__ import annotations

import pytest
import torch

from cwa.model.loss import next_token_nll
from cwa.scoring.metrics import make_scorer
from cwa.scoring.per_sequence import micro_batch_gradients
from cwa.scoring.saliency import OBD, Wanda
from cwa.scoring.scorers import GradSquared, GradXWeight, Magnitude
from cwa.scoring.shared_pass import SharedPass
from tests.conftest import tiny_llama


def _batch(rows: int, seq_len: int = 20, padded: bool = False) -> dict:
    generator = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, 252, (rows, seq_len), generator=generator)}
    if padded:  # the second sequence ends early, the last one is all padding (no loss, no gradient)
        mask = torch.ones(rows, seq_len, dtype=torch.long)
        mask[1, seq_len // 2 :] = 0
        mask[-1] = 0
        batch["attention_mask"] = mask
    return batch


@pytest.mark.parametrize(("microbatch", "masked"), [(1, False), (2, False), (1, True)])
def test_vmap_gradients_equal_one_backward_per_micro_batch(microbatch, masked):
    model = tiny_llama()
    params = dict(model.named_parameters())
    batch = _batch(4)
    if masked:  # an all-ones mask is no mask
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    grads, nll, tokens = micro_batch_gradients(model, params, batch, microbatch)
    for m in range(4 // microbatch):
        micro = {k: v[m * microbatch : (m + 1) * microbatch] for k, v in batch.items()}
        expected_nll, expected_tokens = next_token_nll(model, micro)
        assert int(tokens[m]) == expected_tokens
        torch.testing.assert_close(nll[m], expected_nll.detach(), rtol=1e-5, atol=1e-5)
        model.zero_grad(set_to_none=True)
        (expected_nll / expected_tokens).backward()
        for name, param in params.items():
            scale = float(param.grad.abs().max()) or 1.0
            torch.testing.assert_close(grads[name][m], param.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_padded_blocks_are_refused():
    with pytest.raises(ValueError, match="unpadded"):
        micro_batch_gradients(tiny_llama(), {}, _batch(2, padded=True), 1)


def _shared(per_sequence: str, batches: list[dict], microbatch: int = 1, chunk: int = 4) -> tuple[dict, float]:
    model = tiny_llama()
    members = [Magnitude(), GradXWeight(), GradSquared(microbatch), Wanda(), OBD(fisher_microbatch=microbatch)]
    scorer = SharedPass(members, per_sequence=per_sequence, vmap_chunk=chunk)
    scorer.bind(dict(model.named_parameters()))
    scorer.attach(model)
    for step, batch in enumerate(batches):
        scorer.set_step(step)
        scorer.update(batch, lambda b: next_token_nll(model, b))
    return scorer.compute_each(), scorer.tokens


@pytest.mark.parametrize(("microbatch", "chunk"), [(1, 2), (2, 1)])
def test_shared_pass_vmap_equals_backward(microbatch, chunk, monkeypatch):
    """Every member of a shared pass gets the same scores from both paths. A batch of 5 with micro-batches of
    2 leaves a remainder for the per-micro-batch backward; a padded batch takes that path whole."""
    from cwa.scoring import per_sequence

    calls = []
    original = per_sequence.micro_batch_gradients
    monkeypatch.setattr(per_sequence, "micro_batch_gradients", lambda *a: calls.append(1) or original(*a))
    batches = [_batch(5), _batch(3, padded=True), _batch(4)]
    vmapped, tokens_v = _shared("vmap", batches, microbatch, chunk)
    assert len(calls) == sum(-(-(n - n % microbatch) // (microbatch * chunk)) for n in (5, 4))
    plain, tokens_p = _shared("backward", batches, microbatch, chunk)
    assert tokens_v == tokens_p
    for metric, scores in plain.items():
        for name, expected in scores.items():
            scale = float(expected.abs().max()) or 1.0
            torch.testing.assert_close(vmapped[metric][name], expected, rtol=1e-4, atol=1e-5 * scale, msg=metric)


def test_auto_uses_backward_on_the_cpu_and_for_shards():
    scorer = make_scorer(["grad_x_weight", "grad_squared"])
    assert scorer.per_sequence == "auto"
    scorer._model = torch.nn.Linear(1, 1)
    assert not scorer._vectorised({"input_ids": torch.zeros(1, 2, dtype=torch.long)})
    scorer.per_sequence = "vmap"
    assert scorer._vectorised({"input_ids": torch.zeros(1, 2, dtype=torch.long)})
    scorer.sharded = True
    assert not scorer._vectorised({"input_ids": torch.zeros(1, 2, dtype=torch.long)})

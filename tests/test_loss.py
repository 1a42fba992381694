"""The calibration loss: next-token NLL summed over counted tokens, in blocks on the CPU, and the allocator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import random_blocks, tiny_llama

import cwa.model.loss
from cwa.model.loss import next_token_nll


def _reference(model, ids, mask):
    """The textbook form: logits of positions 0..T-2 against tokens 1..T-1, padding excluded."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, int((labels != -100).sum())


@pytest.mark.parametrize(
    "chunk_bytes", [cwa.model.loss.CPU_CHUNK_BYTES, 3 * 4 * 252, 4 * 252]
)  # 1 block, 3 rows, 1 row
def test_blocked_nll_and_its_gradient_equal_the_textbook_loss(monkeypatch, chunk_bytes):
    model = tiny_llama(vocab_size=252)
    ids = random_blocks(3, 11, vocab=252, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded tail
    mask[2, :] = 0  # a sequence with nothing counted
    monkeypatch.setattr(cwa.model.loss, "CPU_CHUNK_BYTES", chunk_bytes)
    nll, tokens = next_token_nll(model, {"input_ids": ids, "attention_mask": mask})
    (grad,) = torch.autograd.grad(nll, [model.model.embed_tokens.weight])
    ref, ref_tokens = _reference(model, ids, mask)
    (ref_grad,) = torch.autograd.grad(ref, [model.model.embed_tokens.weight])
    assert tokens == ref_tokens == 10 + 6
    assert float(nll) == pytest.approx(float(ref), rel=1e-6)  # float32: only the summation order differs
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_unmasked_batch_counts_every_next_token():
    model = tiny_llama(vocab_size=252)
    ids = random_blocks(2, 9, vocab=252, seed=2)
    nll, tokens = next_token_nll(model, {"input_ids": ids})
    ref, ref_tokens = _reference(model, ids, torch.ones_like(ids))
    assert tokens == ref_tokens == 2 * 8
    assert float(nll) == pytest.approx(float(ref), rel=1e-5)


_FAULTS = """
import resource, torch
from cwa.common.environment import keep_freed_memory
kept = keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(8):
    if i == 2:
        start = faults()
    blocks = [torch.ones(5 << 18) for _ in range(30)]  # 30 x 5 MiB, every page written, then freed
    del blocks
print(kept, faults() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_kept_for_the_next_pass():
    """Kept, later passes reuse the 150 MiB (38k pages) instead of faulting it in again. glibc's defaults
    give it back after a pass in some processes and not in others (small blocks left at the top of the
    heap pin it), so only the kept side is asserted."""

    def run(setting: str) -> tuple[str, int]:
        env = dict(os.environ, CWA_MALLOC_TRIM=setting)
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        kept, faults = out.stdout.split()
        return kept, int(faults)

    kept, faults = run("keep")
    assert kept == "True"
    assert faults < 38_000 / 10, faults
    assert run("default")[0] == "False"


def test_only_estimators_that_repeat_passes_keep_freed_memory():
    from cwa.scoring.metrics import make_scorer
    from cwa.scoring.saliency import OBD
    from cwa.scoring.scorers import HutchinsonDiag

    assert HutchinsonDiag(hvp="finite_difference").repeats_passes
    assert not HutchinsonDiag(hvp="autograd").repeats_passes
    assert OBD(hessian="hutchinson", hvp="finite_difference").repeats_passes
    for metric in ("magnitude", "grad_x_weight", "grad_squared", "wanda", "obd", ["grad_x_weight", "grad_squared"]):
        assert not make_scorer(metric).repeats_passes, metric

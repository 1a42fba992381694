"""Pruning masks, RTN, bit errors and noise against independent computations; in-place changes restored exactly."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_blocks, tiny_gpt2, tiny_llama
from test_saliency import _layer_inputs
from test_scorers import _bind, _run

from cwa.ablation.faults import draw_bit_errors, field_bits
from cwa.ablation.interventions import RTN, BitErrors, Noise, Prune, StressContext, intervened
from cwa.ablation.perturbations import ChecksumCache, tensor_checksum
from cwa.ablation.pruning import global_masks, prune_key, tensor_mask
from cwa.ablation.quantize import rtn
from cwa.common.errors import CwaError
from cwa.scoring.saliency import Wanda

pytestmark = pytest.mark.usefixtures("one_thread")


# -- independent reference implementations (loops over plain Python numbers) ----------------------
def reference_row_mask(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's rule, written out: in each output row remove the int(d_in · sparsity) inputs of smallest metric."""
    out = torch.zeros(metric.shape, dtype=torch.bool)
    rows = metric.tolist()
    for i, row in enumerate(rows):
        order = sorted(range(len(row)), key=lambda j: (row[j], j))
        for j in order[: int(len(row) * sparsity)]:
            out[i, j] = True
    return out


def reference_nm_mask(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M written out: in each row, of every M consecutive inputs remove the N of smallest metric."""
    out = torch.zeros(metric.shape, dtype=torch.bool)
    for i, row in enumerate(metric.tolist()):
        for start in range(0, len(row), m):
            block = sorted(range(start, start + m), key=lambda j: (row[j], j))
            for j in block[:n]:
                out[i, j] = True
    return out


def hand_rtn(row: list[float], keep: list[bool], bits: int, symmetric: bool) -> list[float]:
    """One group of RTN by hand: the range over the unprotected weights, protected ones unchanged."""
    free = [v for v, k in zip(row, keep, strict=True) if not k]
    levels = 2**bits - 1
    if symmetric:
        scale, zero = max(abs(v) for v in free) / (2 ** (bits - 1) - 1), 2 ** (bits - 1)
    else:
        high, low = max(max(free), 0.0), min(min(free), 0.0)
        scale = (high - low) / levels
        zero = round(-low / scale)
    return [
        v if k else (min(max(round(v / scale) + zero, 0), levels) - zero) * scale
        for v, k in zip(row, keep, strict=True)
    ]


def _zeroed_by(stress: Prune, params: dict, scores: dict, transposed: dict | None = None, protected=None) -> dict:
    """The weights ``stress`` sets to zero, read from the edited tensors themselves; checks the exact restore."""
    before = {n: tensor_checksum(p) for n, p in params.items()}
    context = StressContext(params, protected or {}, transposed or {}, scores=lambda name: scores[name])
    with intervened(stress, context, ChecksumCache(params)):
        zeroed = {n: (p == 0) for n, p in params.items()}
    assert {n: tensor_checksum(p) for n, p in params.items()} == before
    return zeroed


# -- pruning ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_wanda_per_row_masks_match_the_published_rule(make, structure) -> None:
    model = make()
    blocks = random_blocks(4, 12, seed=3)
    scorer = Wanda()
    params = _bind(scorer, model)
    scorer.attach(model)
    scores = _run(scorer, model, blocks, batch_size=2)
    inputs = _layer_inputs(model, blocks)
    chosen = {n: params[n].detach() for n in scorer.targets}
    transposed = {n: t.transposed for n, t in scorer.targets.items()}
    zeroed = _zeroed_by(Prune(0.5, "row", structure), chosen, scores, transposed)
    for name, target in scorer.targets.items():
        module = dict(model.named_modules())[target.module]
        weight = module.weight.detach().double()
        weight = weight.T if target.transposed else weight  # (out, in)
        x = inputs[target.module]
        scaler_row = x.pow(2).sum(0) / x.shape[0]  # the published statistic: ||X_j||² / n_samples
        metric = weight.abs() * scaler_row.sqrt()[None, :]
        expected = reference_row_mask(metric, 0.5) if structure == "unstructured" else reference_nm_mask(metric, 2, 4)
        got = zeroed[name].T if target.transposed else zeroed[name]
        assert torch.equal(got, expected), name
        assert int(expected.sum()) == weight.numel() // 2


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_magnitude_per_row_masks_match_the_published_rule(structure) -> None:
    torch.manual_seed(0)
    params = {"a": torch.randn(6, 16), "b": torch.randn(3, 8)}
    scores = {n: p.abs() for n, p in params.items()}
    zeroed = _zeroed_by(Prune(0.5, "row", structure), params, scores)
    for name, weight in params.items():
        metric = weight.abs().double()
        expected = reference_row_mask(metric, 0.5) if structure == "unstructured" else reference_nm_mask(metric, 2, 4)
        assert torch.equal(zeroed[name], expected)


def test_ties_go_to_the_lower_index_and_seventy_percent_rounds_down() -> None:
    key = torch.tensor([[1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0]])
    mask = tensor_mask(key, 0.7, "row")  # int(11 · 0.7) = 7: the 0.5, then the first six 1.0
    assert mask.tolist() == [[True, True, True, True, True, True, True, False, False, False, False]]


def test_tensor_and_global_groups_match_a_sort_of_the_concatenation() -> None:
    torch.manual_seed(1)
    params = {"a": torch.randn(4, 8), "b": torch.randn(5, 4), "c": torch.randn(3, 6)}
    params["b"][0, :3] = params["a"][0, 0]  # ties across tensors: the earlier tensor loses first
    keys = {n: prune_key(p) for n, p in params.items()}
    flat = torch.cat([k.reshape(-1) for k in keys.values()])
    order = sorted(range(flat.numel()), key=lambda i: (float(flat[i]), i))
    removed = torch.zeros(flat.numel(), dtype=torch.bool)
    removed[order[: int(flat.numel() * 0.6)]] = True
    got = torch.cat([m.reshape(-1) for m in global_masks(keys, 0.6).values()])
    assert torch.equal(got, removed)
    for key in keys.values():
        values = key.reshape(-1).tolist()
        ranked = sorted(range(len(values)), key=lambda i: (values[i], i))[: int(len(values) * 0.6)]
        expected = torch.zeros(len(values), dtype=torch.bool)
        expected[ranked] = True
        assert torch.equal(tensor_mask(key, 0.6, "tensor").reshape(-1), expected)


@pytest.mark.parametrize(
    ("group", "structure", "sparsity"),
    [("row", "unstructured", 0.5), ("tensor", "unstructured", 0.7), ("global", "unstructured", 0.9), ("row", "2:4", 0)],
)
def test_prune_never_removes_a_protected_weight(group, structure, sparsity) -> None:
    torch.manual_seed(2)
    params = {"a": torch.randn(8, 16), "b": torch.randn(4, 8)}
    scores = {n: p.abs() for n, p in params.items()}
    # Protect the smallest weights (those pruned first) and one whole 2:4 block of each row of "b".
    protected = {n: torch.topk(s.reshape(-1), 12, largest=False).indices.sort().values for n, s in scores.items()}
    protected["b"] = torch.unique(torch.cat([protected["b"], torch.arange(0, 32, 8), torch.arange(1, 32, 8)]))
    protected["b"] = torch.unique(torch.cat([protected["b"], torch.arange(2, 32, 8)]))
    zeroed = _zeroed_by(Prune(sparsity, group, structure), params, scores, protected=protected)
    for name, index in protected.items():
        assert not zeroed[name].reshape(-1)[index].any()
    total = sum(int(z.sum()) for z in zeroed.values())
    if group == "global":
        unprotected = sum(p.numel() for p in params.values()) - sum(i.numel() for i in protected.values())
        assert total == min(int(160 * sparsity), unprotected) == unprotected  # capped: every unprotected weight
    elif structure == "2:4":  # a block with 3 protected weights loses only 1
        assert int(zeroed["b"][:, :4].sum(1).max()) == 1
        assert (zeroed["a"].reshape(8, 4, 4).sum(-1) <= 2).all()


def test_bad_pruning_settings_are_one_sentence() -> None:
    for bad in (lambda: Prune(1.0), lambda: Prune(0.5, "layer"), lambda: Prune(0.5, "global", "2:4")):
        with pytest.raises(CwaError):
            bad()
    with pytest.raises(CwaError, match="divisible by 4"):
        tensor_mask(torch.rand(2, 6), structure="2:4")


# -- RTN -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("group_size", "transposed"), [(4, False), (None, False), (4, True)])
def test_rtn_matches_a_hand_written_quantizer(symmetric, group_size, transposed) -> None:
    torch.manual_seed(3)
    out_in = torch.randn(3, 8)
    out_in[1, 5] = 9.0  # the outlier that sets its group's range
    stored = out_in.T.contiguous() if transposed else out_in
    protected_at = (5 * 3 + 1) if transposed else (1 * 8 + 5)
    for protect in (False, True):
        index = torch.tensor([protected_at]) if protect else None
        got = rtn(stored, 3, group_size, symmetric, index, transposed)
        got = got.T if transposed else got
        size = 8 if group_size is None else group_size
        for i in range(3):
            for start in range(0, 8, size):
                row = out_in[i, start : start + size].tolist()
                keep = [protect and (i, j) == (1, 5) for j in range(start, start + size)]
                expected = hand_rtn(row, keep, 3, symmetric)
                assert got[i, start : start + size].tolist() == pytest.approx(expected, abs=1e-6)
        if protect:
            assert got[1, 5] == 9.0  # exact, and no longer part of the range


@pytest.mark.parametrize("symmetric", [True, False])
def test_protecting_the_maximum_of_a_group_changes_the_others(symmetric) -> None:
    torch.manual_seed(4)
    w = torch.randn(2, 16) * 0.1
    w[0, 3] = 2.0
    plain = rtn(w, 4, 8, symmetric)
    protected = rtn(w, 4, 8, symmetric, torch.tensor([3]))
    others = torch.ones(2, 16, dtype=torch.bool)
    others[0, 3] = False
    changed = (plain != protected) & others
    assert changed[0, :8].sum() >= 4  # the group the maximum was in: a finer grid for its other weights
    assert not changed[:, 8:].any() and not changed[1].any()  # other groups untouched
    assert (protected - w)[0, :8][others[0, :8]].abs().max() < (plain - w)[0, :8][others[0, :8]].abs().max()


def test_rtn_through_intervened_restores_every_bit() -> None:
    torch.manual_seed(5)
    params = {"a": torch.randn(4, 8), "b": torch.randn(8, 4).to(torch.bfloat16)}
    before = {n: tensor_checksum(p) for n, p in params.items()}
    protected = {"a": torch.tensor([0, 9])}
    kept = params["a"].view(-1)[protected["a"]].clone()
    context = StressContext(params, protected)
    with intervened(RTN(2, None, False), context, ChecksumCache(params)) as applied:
        assert torch.equal(params["a"].view(-1)[protected["a"]], kept)
        assert applied.changed > 0 and applied.tensors == 2
    assert {n: tensor_checksum(p) for n, p in params.items()} == before


# -- bit errors and noise ----------------------------------------------------------------------------
def _flipped_bits(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """(weight, bit) of every differing storage bit, by testing each bit position in turn."""
    width = {torch.float32: (torch.int32, 32), torch.bfloat16: (torch.int16, 16), torch.float16: (torch.int16, 16)}
    int_dtype, bits = width[old.dtype]
    xor = (old.view(int_dtype).long() ^ new.view(int_dtype).long()) & ((1 << bits) - 1)
    return torch.stack([(xor >> b) & 1 for b in range(bits)], dim=-1).bool()


@pytest.mark.parametrize(
    ("dtype", "field", "p"),
    [(torch.float32, "all", 2e-4), (torch.bfloat16, "exponent", 1e-3), (torch.float16, "sign", 5e-3)],
)
def test_bit_error_rates_are_binomial_and_restored_exactly(dtype, field, p) -> None:
    torch.manual_seed(6)
    params = {"w": torch.randn(400, 250).to(dtype)}
    protected = {"w": torch.arange(0, 100_000, 7)}
    original = params["w"].clone()
    allowed = field_bits(dtype, field)
    eligible = (100_000 - protected["w"].numel()) * len(allowed)
    counts = []
    for seed in range(4):
        context = StressContext(params, protected, generator=torch.Generator().manual_seed(seed))
        with intervened(BitErrors(p, field), context, ChecksumCache(params)):
            flips = _flipped_bits(original.view(-1), params["w"].view(-1))
        assert not flips[protected["w"]].any()
        outside = torch.ones(flips.shape[-1], dtype=torch.bool)
        outside[allowed] = False
        assert not flips[:, outside].any()
        counts.append(int(flips.sum()))
        assert torch.equal(
            params["w"].view(torch.int16 if dtype != torch.float32 else torch.int32),
            original.view(torch.int16 if dtype != torch.float32 else torch.int32),
        )
    mean, sd = eligible * p, math.sqrt(eligible * p * (1 - p))
    for count in counts:
        assert abs(count - mean) < 5 * sd
    assert abs(sum(counts) / 4 - mean) < 5 * sd / 2


def test_bit_error_draws_cover_every_eligible_bit() -> None:
    index, masks = draw_bit_errors(10, torch.float32, 1.0, "all", torch.tensor([3, 4]))
    assert index.tolist() == [0, 1, 2, 5, 6, 7, 8, 9] and (masks == -1).all()


def test_noise_is_relative_to_the_unprotected_rms() -> None:
    torch.manual_seed(7)
    params = {"w": torch.randn(300, 300) * 0.02}
    params["w"][0, 0] = 100.0  # protected: it must not inflate the noise
    original = params["w"].clone()
    free = original.reshape(-1)[1:]
    rms = free.square().mean().sqrt()
    context = StressContext(params, {"w": torch.tensor([0])}, generator=torch.Generator().manual_seed(0))
    with intervened(Noise(0.5), context, ChecksumCache(params)):
        delta = (params["w"] - original).reshape(-1)
    assert delta[0] == 0
    assert float(delta[1:].std() / rms) == pytest.approx(0.5, rel=0.02)
    assert torch.equal(params["w"], original)


def test_a_failing_block_still_restores() -> None:
    params = {"w": torch.randn(4, 8)}
    original = params["w"].clone()
    with pytest.raises(RuntimeError, match="boom"), intervened(Prune(0.5), StressContext(params)):
        raise RuntimeError("boom")
    assert torch.equal(params["w"], original)

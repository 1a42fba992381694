"""Each metric against an independent computation on tiny random models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_blocks, tiny_gpt2, tiny_llama

from cwa.common.errors import CwaError
from cwa.model.loss import next_token_nll
from cwa.model.params import select_parameters
from cwa.scoring.hvp import CentralDifference, DoubleBackward, ForwardDifference
from cwa.scoring.metrics import make_scorer
from cwa.scoring.scorers import GradSquared, GradXWeight, HutchinsonDiag, Magnitude


def _bind(scorer, model, include=None):
    chosen = select_parameters(model, include)
    for p in model.parameters():
        p.requires_grad_(False)
    for p, _ in chosen.values():
        p.requires_grad_(True)
    scorer.bind({n: p for n, (p, _) in chosen.items()})
    return {n: p for n, (p, _) in chosen.items()}


def _run(scorer, model, blocks, batch_size):
    for start in range(0, blocks.shape[0], batch_size):
        scorer.update({"input_ids": blocks[start : start + batch_size]}, lambda b: next_token_nll(model, b))
    return scorer.compute()


def _mean_loss(model, blocks):
    logits = model(input_ids=blocks).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_grad_x_weight_matches_hand_written_autograd(make):
    model = make()
    blocks = random_blocks(5, 12)
    params = _bind(GradXWeight(), model)
    scorer = GradXWeight()
    scorer.bind(params)
    scores = _run(scorer, model, blocks, batch_size=2)  # uneven batches: 2, 2, 1
    grads = torch.autograd.grad(_mean_loss(model, blocks), list(params.values()))
    for (name, p), g in zip(params.items(), grads, strict=True):
        expected = (g * p).abs()
        torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-9, msg=name)
    assert scorer.tokens == 5 * 11
    assert scorer.mean_loss == pytest.approx(float(_mean_loss(model, blocks)), rel=1e-5)


@pytest.mark.parametrize("microbatch", [1, 2])
def test_grad_squared_is_mean_of_squared_microbatch_gradients(microbatch):
    model = tiny_llama()
    blocks = random_blocks(4, 10, seed=1)
    params = _bind(GradSquared(microbatch), model)
    scorer = GradSquared(fisher_microbatch=microbatch)
    scorer.bind(params)
    scores = _run(scorer, model, blocks, batch_size=4)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    chunks = list(range(0, 4, microbatch))
    for start in chunks:
        grads = torch.autograd.grad(_mean_loss(model, blocks[start : start + microbatch]), list(params.values()))
        for name, g in zip(params, grads, strict=True):
            expected[name] += g**2 / len(chunks)
    for name in params:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-4, atol=1e-12, msg=name)
    # The square of the summed gradient is not the Fisher: make sure the two differ here.
    total = torch.autograd.grad(_mean_loss(model, blocks), [params["model.norm.weight"]])[0]
    assert not torch.allclose(scores["model.norm.weight"], total**2, rtol=1e-2)


def test_grad_squared_does_not_count_microbatches_without_predicted_tokens():
    model = tiny_llama()
    blocks = random_blocks(4, 10, seed=6)
    mask = torch.ones_like(blocks)
    mask[1, 6:] = 0  # right padding: 5 predicted tokens
    mask[2, 1:] = 0  # one real token: nothing to predict
    params = _bind(GradSquared(), model)
    scorer = GradSquared(fisher_microbatch=1)
    scorer.bind(params)
    scorer.update({"input_ids": blocks, "attention_mask": mask}, lambda b: next_token_nll(model, b))
    scores = scorer.compute()
    assert float(scorer.counters[2]) == 3
    # Independent: the real tokens of each sequence alone (right padding under a causal mask).
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for row, length in ((0, 10), (1, 6), (3, 10)):
        grads = torch.autograd.grad(_mean_loss(model, blocks[row : row + 1, :length]), list(params.values()))
        for name, g in zip(params, grads, strict=True):
            expected[name] += g**2 / 3
    for name in params:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-4, atol=1e-12, msg=name)


def _exact_hessian_diagonal(model, blocks, names):
    """Diagonal of the Hessian of the mean loss w.r.t. the named tensors, column by column (exact)."""
    params = dict(model.named_parameters())
    targets = [params[n] for n in names]
    grads = torch.autograd.grad(_mean_loss(model, blocks), targets, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    n = flat_grad.numel()
    rows = []
    for i in range(n):
        row = torch.autograd.grad(flat_grad[i], targets, retain_graph=True)
        rows.append(torch.cat([r.reshape(-1) for r in row]))
    hessian = torch.stack(rows)
    torch.testing.assert_close(hessian, hessian.T, rtol=1e-3, atol=1e-5)  # sanity: symmetric
    return hessian


@pytest.mark.parametrize(
    ("hvp", "fd_scheme"), [("autograd", "forward"), ("finite_difference", "forward"), ("finite_difference", "central")]
)
def test_hutchinson_matches_exact_hessian_diagonal(hvp, fd_scheme):
    model = tiny_llama(layers=1)
    model.set_attn_implementation("eager")
    names = ["model.layers.0.self_attn.v_proj.weight", "model.layers.0.post_attention_layernorm.weight"]
    blocks = random_blocks(3, 10, seed=2)
    hessian = _exact_hessian_diagonal(model, blocks, names)
    exact = hessian.diagonal()
    probes = 200
    scorer = HutchinsonDiag(probes=probes, hvp=hvp, fd_eps=1e-3, seed=0, fd_scheme=fd_scheme)
    _bind(scorer, model, include=[n.replace(".", r"\.") for n in names])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = _run(scorer, model, blocks, batch_size=3)
    estimate = torch.cat([scores[n].reshape(-1) for n in names])
    # Var[v_i (Hv)_i] = sum_{j != i} H_ij^2 for Rademacher v: the estimator's standard error per entry.
    off = hessian.pow(2).sum(1) - exact.pow(2)
    se = (off / probes).sqrt()
    z = (estimate - exact).abs() / (se + 1e-8)
    assert z.max() < 5.5, f"worst deviation {z.max():.2f} standard errors"
    assert (z < 2).float().mean() > 0.9
    # A wrong estimator (e.g. missing the 1/tokens scaling, or a factor 2) would be far off:
    assert torch.corrcoef(torch.stack([estimate, exact]))[0, 1] > 0.9
    for n, p in model.named_parameters():  # finite differences restore the weights bit for bit
        assert torch.equal(p.detach(), before[n]), n


def _rademacher(generator, shape):
    """A probe as documented for ``HutchinsonDiag.probe``: sign 8 j + k is +1 where bit k of random byte j is set."""
    n = math.prod(shape)
    octets = torch.randint(0, 256, ((n + 7) // 8,), generator=generator, dtype=torch.uint8)
    bits = (octets[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return (bits.reshape(-1)[:n].float() * 2 - 1).view(shape)


def test_hutchinson_probes_share_one_forward_pass():
    """Four probes cost one forward pass, and each still gets its own exact H v: the estimate equals the
    mean of v * (H v) over the same four probes, each computed from a forward pass and double backward of
    its own."""
    probes, seed, step = 4, 3, 5
    model = tiny_llama(layers=1)
    model.set_attn_implementation("eager")
    scorer = HutchinsonDiag(probes=probes, hvp="autograd", seed=seed)
    params = _bind(scorer, model)
    batch = {"input_ids": random_blocks(2, 8)}
    calls = []

    def loss_fn(batch):
        calls.append(1)
        return next_token_nll(model, batch)

    scorer.set_step(step)
    scorer.update(batch, loss_fn)
    assert len(calls) == 1
    scores = scorer.compute()

    # Independent: the same probes redrawn from the documented seed and bit layout, one pass per probe.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    drawn = [[_rademacher(generator, p.shape) for p in params.values()] for _ in range(probes)]
    assert not torch.equal(drawn[0][0], drawn[1][0])  # the probes differ: sharing is not reusing one
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    for vs in drawn:
        nll, tokens = next_token_nll(model, batch)
        grads = torch.autograd.grad(nll, list(params.values()), create_graph=True)
        hvs = torch.autograd.grad(grads, list(params.values()), grad_outputs=vs, allow_unused=True)
        for name, v, hv in zip(params, vs, hvs, strict=True):
            if hv is not None:
                expected[name] += v * hv / (tokens * probes)
    for name in params:  # float rounding only: summed in another order, divided once instead of per probe
        atol = 1e-6 * float(expected[name].abs().max())
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-5, atol=atol, msg=name)
    # Signed, as the estimate of a Hessian diagonal must be (a |.| would hide the negative curvature).
    assert any(bool((s < 0).any()) for s in scores.values())


@pytest.mark.parametrize(("fd_scheme", "gradients"), [("forward", 4 + 1), ("central", 2 * 4)])
def test_finite_difference_gradients_per_batch(fd_scheme, gradients):
    model = tiny_llama(layers=1)
    scorer = HutchinsonDiag(probes=4, hvp="finite_difference", fd_scheme=fd_scheme)
    _bind(scorer, model)
    calls = []

    def loss_fn(batch):
        calls.append(1)
        return next_token_nll(model, batch)

    scorer.update({"input_ids": random_blocks(2, 8)}, loss_fn)
    assert len(calls) == gradients
    # The forward scheme's loss for the summary is the unperturbed one.
    if fd_scheme == "forward":
        with torch.no_grad():
            nll, tokens = next_token_nll(model, {"input_ids": random_blocks(2, 8)})
        assert scorer.mean_loss == pytest.approx(float(nll) / tokens, rel=1e-6)


class _Quadratic(torch.nn.Module):
    """L(w) = 0.5 * sum(h * w^2): Hessian diag(h), exact in float32 for h a power of two."""

    def __init__(self, n: int = 1_000_000, planted: int = 100, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, generator=g) * 0.02
        # Weights from 10x to 100x the tensor's rms (about 0.023), both signs, where super weights live.
        big = torch.empty(planted).uniform_(0.2, 2.4, generator=g) * torch.randint(0, 2, (planted,), generator=g).mul(
            2
        ).sub(1)
        self.where = torch.randperm(n, generator=g)[:planted]
        w[self.where] = big
        self.w = torch.nn.Parameter(w)
        self.h = 2.0 ** torch.randint(-2, 3, (n,), generator=g).float()

    def loss(self, batch):
        return 0.5 * (self.h * self.w * self.w).sum(), 1


@pytest.mark.parametrize("fd_scheme", ["forward", "central"])
def test_finite_difference_divides_by_the_applied_step(fd_scheme):
    model = _Quadratic()
    w = model.w.detach().clone()
    rms = float(w.double().pow(2).mean().sqrt())
    assert float(w.abs().max()) / rms > 95
    for fd_eps in (1e-4, 1e-6):
        scorer = HutchinsonDiag(probes=3, hvp="finite_difference", fd_eps=fd_eps, fd_scheme=fd_scheme)
        scorer.bind({"w": model.w})
        scorer.update({"input_ids": torch.zeros(1, 1, dtype=torch.long)}, model.loss)
        scores = scorer.compute()["w"]
        assert torch.equal(model.w.detach(), w)  # restored bit for bit
        # Independent: IEEE float32 rounding in numpy of w +- eps.
        x = w.numpy()
        eps = np.float32(fd_eps * rms)
        up, down = x + eps, x - eps
        zero = torch.from_numpy((up == down) if fd_scheme == "central" else (up == x) | (down == x))
        # Weights near a power of two, where the two signs of v round to different steps, are in the data.
        assert int(((up - x != x - down) & ~zero.numpy()).sum()) > 0
        assert scorer.zero_steps == {"w": int(zero.sum())}
        assert scorer.facts()["fd_zero_steps"] == ({"w": int(zero.sum())} if zero.any() else {})
        # The diagonal is exact wherever float32 can move the weight, whatever the step's rounding.
        torch.testing.assert_close(scores[~zero], model.h[~zero], rtol=1e-6, atol=0)
        assert torch.equal(scores[zero], torch.zeros(int(zero.sum())))
        if fd_eps == 1e-4:
            # No weight is stuck, and the planted ones (rounded steps up to ~15% off eps) are exact too.
            assert not zero.any()
            torch.testing.assert_close(scores[model.where], model.h[model.where], rtol=1e-6, atol=0)
        else:
            assert zero[model.where].sum() > 50 and not zero.all()  # every weight above 0.5 is stuck here


@pytest.mark.parametrize("shape", [(64, 32), (7, 5), (3,)])
def test_probe_signs_are_the_generator_bits(shape):
    """Sign 8 j + k is +1 exactly where bit k of random byte j is set, whatever the tensor's size, with or
    without a buffer to write into; the bytes are those torch.randint draws from the same generator."""
    scorer = HutchinsonDiag(hvp="finite_difference")
    like = torch.zeros(shape)
    scorer.bind({"w": torch.nn.Parameter(like.clone())})
    n = like.numel()
    octets = torch.randint(0, 256, ((n + 7) // 8,), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    bits = [(int(octets[i // 8]) >> (i % 8)) & 1 for i in range(n)]
    expected = torch.tensor([2.0 * b - 1.0 for b in bits]).view(shape)
    for out in (None, torch.full(shape, 7.0)):
        scorer.generator.manual_seed(5)
        v = scorer.probe(like, out=out)
        assert v.dtype == torch.float32 and torch.equal(v, expected)
        if out is not None:
            assert torch.equal(out, expected)


@pytest.mark.parametrize(
    ("options", "strategy", "settings"),
    [
        ({}, DoubleBackward, {"probes": 1, "hvp": "autograd", "fd_eps": 1e-4, "seed": 0}),
        ({"hvp": "autograd", "fd_scheme": "central"}, DoubleBackward, {"hvp": "autograd"}),
        ({"hvp": "finite_difference"}, ForwardDifference, {"hvp": "finite_difference", "fd_scheme": "forward"}),
        ({"hvp": "finite_difference", "fd_scheme": "central", "fd_eps": 1e-3}, CentralDifference, {"fd_eps": 1e-3}),
    ],
)
def test_the_hvp_options_choose_the_strategy(options, strategy, settings):
    """The options of older configs and command lines select one strategy class each, and the settings the
    summary records are what they were."""
    import cwa.scorers

    scorer = cwa.scorers.HutchinsonDiag(**options)  # the class_path of configs written before the sub-packages
    assert type(scorer) is HutchinsonDiag and type(scorer.strategy) is strategy
    assert settings.items() <= scorer.settings().items()
    assert ("fd_scheme" in scorer.settings()) == (strategy is not DoubleBackward)
    assert scorer.required_attn_implementation() == ("eager" if strategy is DoubleBackward else None)
    assert scorer.repeats_passes == (strategy is not DoubleBackward)
    with pytest.raises(CwaError, match="unknown hvp backend 'exact'"):
        HutchinsonDiag(**{**options, "hvp": "exact"})


def test_finite_difference_refuses_16_bit_weights():
    model = tiny_llama().to(torch.bfloat16)
    with pytest.raises(CwaError, match="float32"):
        _bind(HutchinsonDiag(hvp="finite_difference"), model)


def test_magnitude_is_absolute_weight():
    model = tiny_gpt2()
    scorer = Magnitude()
    params = _bind(scorer, model)
    scorer.update({"input_ids": random_blocks(2, 8)}, lambda b: next_token_nll(model, b))
    scores = scorer.compute()
    for name, p in params.items():
        assert torch.equal(scores[name], p.detach().abs())


def test_nan_gradient_names_the_tensor():
    model = tiny_llama()
    scorer = GradXWeight()
    params = _bind(scorer, model)
    target = params["model.layers.1.mlp.up_proj.weight"]

    def loss_fn(batch):
        nll, tokens = next_token_nll(model, batch)
        # sqrt(0) is finite but its derivative is inf: an Inf gradient under a finite loss.
        return nll + torch.sqrt(target - target.detach()).sum(), tokens

    scorer.update({"input_ids": random_blocks(2, 8)}, loss_fn)
    with pytest.raises(CwaError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        scorer.compute()


def test_unknown_metric_and_bad_options():
    with pytest.raises(CwaError, match="unknown metric 'fisher'.*magnitude"):
        make_scorer("fisher")
    with pytest.raises(CwaError):
        HutchinsonDiag(probes=0)
    with pytest.raises(CwaError):
        GradSquared(fisher_microbatch=0)
    assert math.isnan(GradXWeight().mean_loss)


@pytest.mark.parametrize("metric", [GradXWeight, lambda: GradSquared(2)])
def test_bfloat16_weights_accumulate_in_float32(metric):
    reference, model = tiny_llama(), tiny_llama().to(torch.bfloat16)
    blocks = random_blocks(4, 12, seed=3)
    scorers = []
    for m in (reference, model):
        scorer = metric()
        _bind(scorer, m)
        assert all(a.dtype == torch.float32 for a in scorer.acc.values())
        scorers.append(_run(scorer, m, blocks, batch_size=2))
    for name, expected in scorers[0].items():
        got = scorers[1][name]
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        # bf16 has 8 mantissa bits: the scores agree in bulk, not to float32 precision.
        cosine = F.cosine_similarity(got.reshape(1, -1).double(), expected.reshape(1, -1).double())
        assert float(cosine) > 0.95, name


def test_float16_overflow_is_reported_with_the_tensor_and_a_remedy():
    model = tiny_llama().to(torch.float16)
    scorer = GradXWeight()
    _bind(scorer, model)

    def loss_fn(batch):
        nll, tokens = next_token_nll(model, batch)
        return nll * 1e30, tokens  # every float16 gradient overflows to Inf

    with pytest.raises(CwaError, match=r"overflowed.*float16.*bfloat16"):
        scorer.update({"input_ids": random_blocks(2, 8)}, loss_fn)
        scorer.compute()

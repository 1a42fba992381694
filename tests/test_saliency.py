"""wanda, obs and obd against independent computations on tiny random models."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import random_blocks, tiny_gpt2, tiny_llama, tiny_opt
from helpers import fit, latest_run
from safetensors.torch import load_file
from test_scorers import _bind, _exact_hessian_diagonal, _mean_loss, _run

from cwa.common.errors import CwaError
from cwa.fit.module import next_token_nll
from cwa.scoring.metrics import make_scorer
from cwa.scoring.saliency import OBD, OBS, Wanda, inverse_diagonal, obs_memory_bytes
from cwa.scoring.scorers import HutchinsonDiag


def _attached(scorer, model, include=None):
    params = _bind(scorer, model, include)
    scorer.attach(model)
    return params


def _layer_inputs(model, blocks, mask=None):
    """Every Linear / Conv1D input over the batch, (tokens, d_in) float64, padding removed: by hand."""
    inputs: dict[str, list[torch.Tensor]] = {}

    def hook_for(name):
        def hook(_module, args):
            x = args[0].detach()
            x = x[mask.bool()] if mask is not None else x.reshape(-1, x.shape[-1])
            inputs.setdefault(name, []).append(x.double())

        return hook

    handles = [
        m.register_forward_pre_hook(hook_for(n))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    ]
    with torch.no_grad():
        model(input_ids=blocks, attention_mask=mask)
    for h in handles:
        h.remove()
    return {n: torch.cat(xs) for n, xs in inputs.items()}


def _as_out_in(model, module_name):
    module = dict(model.named_modules())[module_name]
    w = module.weight.detach().double()
    return w.T if type(module).__name__ == "Conv1D" else w


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_wanda_matches_input_norms_computed_by_hand(make):
    model = make()
    blocks = random_blocks(5, 12, seed=4)
    scorer = Wanda()
    params = _attached(scorer, model)
    scores = _run(scorer, model, blocks, batch_size=2)
    inputs = _layer_inputs(model, blocks)
    assert set(scores) == set(scorer.targets) and scores
    for name, target in scorer.targets.items():
        norm = inputs[target.module].pow(2).sum(0).sqrt()
        expected = _as_out_in(model, target.module).abs() * norm[None, :]  # (out, in)
        if target.transposed:  # GPT-2 Conv1D: scores in the weight's own (in, out) storage layout
            expected = expected.T
        assert scores[name].shape == params[name].shape
        torch.testing.assert_close(scores[name].double(), expected, rtol=1e-5, atol=1e-9, msg=name)
    # Every selected tensor is either scored or listed with its reason, never both.
    assert set(scorer.unscored) | set(scores) == set(params) and not set(scorer.unscored) & set(scores)
    assert scorer.tokens == 5 * 11


def test_wanda_orientation_and_unscored_tensors_on_gpt2():
    model = tiny_gpt2()
    scorer = Wanda()
    _attached(scorer, model)
    c_fc = scorer.targets["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.transposed and c_fc.width == 16  # stored (16, 64): input width is the first dimension
    assert scorer.targets["transformer.wte.weight"].module == "lm_head"  # tied: scored through the head
    assert "embedding" in scorer.unscored["transformer.wpe.weight"]
    assert "bias" in scorer.unscored["transformer.h.0.mlp.c_fc.bias"]
    assert "LayerNorm" in scorer.unscored["transformer.h.0.ln_1.weight"]
    assert "unscored" in scorer.facts() and "unscored" not in scorer.settings()


def test_layers_reading_one_input_share_one_accumulator():
    model = tiny_llama()
    scorer = OBS()
    _attached(scorer, model)
    groups = {tuple(m.split(".")[-1] for m in members) for members in scorer.groups.values()}
    assert groups == {
        ("q_proj", "k_proj", "v_proj"),
        ("o_proj",),
        ("gate_proj", "up_proj"),
        ("down_proj",),
        ("lm_head",),
    }
    assert len(scorer.groups) == 2 * 4 + 1
    assert scorer.unscored["model.embed_tokens.weight"].startswith("embedding")


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
@pytest.mark.parametrize("metric", [Wanda, OBS])
def test_input_statistics_exclude_padding(make, metric):
    """OPT flattens its hidden states to (batch·tokens, d) before fc1 / fc2: the padding there counts too."""
    model = make()
    blocks = random_blocks(2, 10, seed=5)
    mask = torch.ones_like(blocks)
    mask[1, 6:] = 0  # right padding: the first 6 tokens of sequence 1 are unchanged by it
    scorer = metric()
    _attached(scorer, model)
    scorer.update({"input_ids": blocks, "attention_mask": mask}, lambda b: next_token_nll(model, b))
    padded = scorer.compute()
    reference = metric()
    _attached(reference, model)
    for row, length in ((0, 10), (1, 6)):
        reference.update({"input_ids": blocks[row : row + 1, :length]}, lambda b: next_token_nll(model, b))
    for name, expected in reference.compute().items():
        torch.testing.assert_close(padded[name], expected, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_obs_matches_explicit_inverse(make):
    model = make()
    blocks = random_blocks(4, 12, seed=6)
    scorer = OBS(damping=0.05)
    _attached(scorer, model)
    scores = _run(scorer, model, blocks, batch_size=3)
    inputs = _layer_inputs(model, blocks)
    for name, target in scorer.targets.items():
        x = inputs[target.module]
        hessian = 2.0 / x.shape[0] * x.T @ x
        hessian += 0.05 * hessian.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)
        expected = _as_out_in(model, target.module).pow(2) / torch.linalg.inv(hessian).diagonal()[None, :]
        if target.transposed:
            expected = expected.T
        torch.testing.assert_close(scores[name].double(), expected, rtol=1e-4, atol=1e-9, msg=name)
    assert not scorer.acc or all(k.endswith("#tokens") for k in scorer.acc)  # every H freed after use


def test_obs_memory_bound():
    bound = obs_memory_bytes([14336])
    assert bound["accumulators"] == 14336**2 * 4 and 0.76 < bound["accumulators"] / 2**30 < 0.77
    assert obs_memory_bytes([576, 576])["accumulators"] == 2 * 576**2 * 8  # narrow inputs in float64
    scorer = OBS()
    _attached(scorer, tiny_llama())
    held = sum(t.numel() * t.element_size() for k, t in scorer.acc.items() if not k.endswith("#tokens"))
    assert scorer.memory_bytes()["accumulators"] == held
    assert scorer.facts()["memory_bound_mib"] == pytest.approx(scorer.memory_bytes()["peak"] / 2**20, abs=1e-3)


def test_obs_raises_damping_when_cholesky_fails():
    hessian = torch.diag(torch.tensor([1.0, -0.5], dtype=torch.float64))  # not positive semi-definite
    raised: dict[str, float] = {}
    with pytest.warns(UserWarning, match="damping raised to 10"):
        diag = inverse_diagonal({"h": hessian.clone()}, "h", 0.01, 0.25, raised)
    assert raised == {"h": pytest.approx(10.0)}
    expected = torch.linalg.inv(hessian + 10.0 * 0.25 * torch.eye(2, dtype=torch.float64)).diagonal()
    torch.testing.assert_close(diag.double(), expected, rtol=1e-6, atol=0)
    with pytest.raises(CwaError, match="not positive definite"):
        inverse_diagonal({"h": torch.diag(torch.tensor([1.0, -1e9]))}, "h", 0.01, 0.25, {})


@pytest.mark.parametrize("metric", [Wanda, OBS])
def test_split_over_processes_and_resume_equal_one_run(metric):
    """Two processes' halves summed by ``reduce`` (a DDP all-reduce), and a resumed run, equal one run."""
    model = tiny_llama()
    blocks = random_blocks(6, 10, seed=7)
    full = metric()
    _attached(full, model)
    expected = _run(full, model, blocks, batch_size=2)
    first, second = metric(), metric()
    for scorer, part in ((first, blocks[:2]), (second, blocks[2:])):
        _attached(scorer, model)
        _run_updates(scorer, model, part)
    kept: list[torch.Tensor] = []
    first.reduce(kept.append)
    others = iter(kept)
    second.reduce(lambda t: t.add_(next(others)))
    resumed = metric()
    _attached(resumed, model)
    resumed.load_state_dict(_copy(first.state_dict()))
    _run_updates(resumed, model, blocks[2:])
    for got in (second.compute(), resumed.compute()):
        for name, score in expected.items():
            torch.testing.assert_close(got[name], score, rtol=1e-5, atol=1e-8, msg=name)
    assert second.tokens == full.tokens == 6 * 9


def _run_updates(scorer, model, blocks):
    for start in range(0, blocks.shape[0], 2):
        scorer.update({"input_ids": blocks[start : start + 2]}, lambda b: next_token_nll(model, b))


def _copy(state):
    return {"acc": {k: v.clone() for k, v in state["acc"].items()}, "counters": state["counters"].clone()}


def test_obd_fisher_is_half_fisher_times_weight_squared():
    model = tiny_llama()
    blocks = random_blocks(4, 10, seed=8)
    for signed in (False, True):
        scorer = OBD(hessian="fisher", signed_taylor=signed)
        params = _bind(scorer, model)
        scores = _run(scorer, model, blocks, batch_size=2)
        names = list(params)
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        for i in range(4):  # per-sequence gradients of each sequence's mean loss: the Fisher definition
            grads = torch.autograd.grad(_mean_loss(model, blocks[i : i + 1]), list(params.values()))
            for n, g in zip(names, grads, strict=True):
                fisher[n] += g**2 / 4
        total = dict(zip(names, torch.autograd.grad(_mean_loss(model, blocks), list(params.values())), strict=True))
        for n, p in params.items():
            expected = 0.5 * fisher[n] * p.detach() ** 2 - (total[n] * p.detach() if signed else 0)
            scale = float(expected.abs().max())
            torch.testing.assert_close(scores[n], expected, rtol=1e-4, atol=1e-6 * scale, msg=n)
        assert scorer.signed == signed
        assert scorer.tokens == 4 * 9


def test_obd_hutchinson_matches_exact_hessian_diagonal_in_expectation():
    model = tiny_llama(layers=1)
    model.set_attn_implementation("eager")
    names = ["model.layers.0.self_attn.v_proj.weight", "model.layers.0.post_attention_layernorm.weight"]
    blocks = random_blocks(3, 10, seed=2)
    hessian = _exact_hessian_diagonal(model, blocks, names)
    probes = 200
    scorer = OBD(hessian="hutchinson", probes=probes, hvp="autograd", seed=0)
    _bind(scorer, model, include=[n.replace(".", r"\.") for n in names])
    scores = _run(scorer, model, blocks, batch_size=3)
    weights = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])
    estimate = torch.cat([scores[n].reshape(-1) for n in names])
    exact = 0.5 * hessian.diagonal() * weights**2
    off = hessian.pow(2).sum(1) - hessian.diagonal().pow(2)
    se = 0.5 * weights**2 * (off / probes).sqrt()  # Hutchinson's standard error, scaled like the score
    z = (estimate - exact).abs() / (se + 1e-10)
    assert z.max() < 5.5, f"worst deviation {z.max():.2f} standard errors"
    assert (z < 2).float().mean() > 0.9
    # Exactly 1/2 * w^2 times HutchinsonDiag's estimate with the same probes (tested against the exact diagonal
    # in test_scorers, where its scale is pinned down).
    reference = HutchinsonDiag(probes=probes, hvp="autograd", seed=0)
    _bind(reference, model, include=[n.replace(".", r"\.") for n in names])
    diag = torch.cat([d.reshape(-1) for d in _run(reference, model, blocks, batch_size=3).values()])
    torch.testing.assert_close(estimate, 0.5 * diag * weights**2, rtol=1e-5, atol=1e-12)
    assert scorer.signed and scorer.required_attn_implementation() == "eager"


def test_short_names_and_bad_options():
    assert isinstance(make_scorer("wanda"), Wanda) and isinstance(make_scorer("obs"), OBS)
    assert isinstance(make_scorer("obd"), OBD)
    with pytest.raises(CwaError, match="unknown metric.*wanda"):
        make_scorer("sparsegpt")
    with pytest.raises(CwaError, match="damping"):
        OBS(damping=0)
    with pytest.raises(CwaError, match="hessian"):
        OBD(hessian="gauss_newton")
    scorer = Wanda()
    _bind(scorer, tiny_llama())
    with pytest.raises(CwaError, match="attach"):
        scorer.update({"input_ids": random_blocks(1, 4)}, lambda b: (torch.zeros(()), 0))
    only_norms = Wanda()
    with pytest.raises(CwaError, match="Linear or Conv1D"):
        _attached(only_norms, tiny_llama(), include=[r".*norm.*"])


@pytest.mark.parametrize("metric", ["wanda", "obs", "obd"])
def test_fit_sensitivity_cli_writes_a_complete_run(tmp_path, tiny_gpt2_dir, metric):
    assert fit(tiny_gpt2_dir, tmp_path / "logs", f"--model.metric={metric}", k=25, accelerator=None) == 0
    run = latest_run(tmp_path / "logs")
    for name in ("config.yaml", "scores.safetensors", "topk.csv", "summary.json", "figures/score_histogram.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["metric"]["name"] == metric
    scores = load_file(run / "scores.safetensors")
    rows = list(csv.DictReader((run / "topk.csv").read_text().splitlines()))
    assert len(rows) == 25
    flat = torch.cat([s.reshape(-1).abs() for s in scores.values()])
    assert abs(float(rows[-1]["score"])) == pytest.approx(float(torch.topk(flat, 25).values[-1]), rel=1e-6)
    if metric != "obd":  # embeddings, norms and biases are listed, not scored
        unscored = summary["metric"]["unscored"]
        assert "transformer.wpe.weight" in unscored and "transformer.wpe.weight" not in scores
        assert not {r["parameter"] for r in rows} & set(unscored)

"""find_super_weights recovers planted super weights on tiny Llama and GPT-2 models; published coordinates."""

from __future__ import annotations

import pytest
import torch
from conftest import random_blocks, tiny_gpt2, tiny_llama, tiny_opt

from cwa.ablation.published import PUBLISHED, published_super_weights
from cwa.ablation.super_weights import (
    Candidate,
    LayerSpikes,
    Spike,
    SuperWeightScan,
    find_super_weights,
    mlp_output_projections,
    recovered_published,
)
from cwa.common.errors import CwaError

LAYER, ROW, COL = 1, 5, 7


def _batches(n=4, seq_len=12, batch_size=2):
    blocks = random_blocks(n, seq_len, seed=11)
    return [{"input_ids": blocks[i : i + batch_size]} for i in range(0, n, batch_size)]


def _planted_llama():
    """Input channel COL of layer LAYER's down_proj is driven large (up_proj row scaled), and the weight at
    (ROW, COL) is large: together they write a massive activation into residual channel ROW."""
    model = tiny_llama(layers=3)
    mlp = model.model.layers[LAYER].mlp
    with torch.no_grad():
        mlp.up_proj.weight[COL] *= 60.0
        mlp.gate_proj.weight[COL] = mlp.gate_proj.weight[COL].abs().sign() * 0.5  # silu(gate) mostly positive
        mlp.down_proj.weight[ROW, COL] = 3.0
    return model


def _planted_gpt2():
    model = tiny_gpt2(layers=3)
    mlp = model.transformer.h[LAYER].mlp
    with torch.no_grad():
        mlp.c_fc.bias[COL] = 20.0  # gelu(~20) = ~20 at every token: the input channel spikes
        mlp.c_proj.weight[COL, ROW] = 3.0  # Conv1D stores (in, out): this is W[row=ROW, col=COL]
    return model


def _planted_opt():
    """OPT's decoder layer flattens hidden states to (batch·tokens, d) before fc1 / fc2."""
    model = tiny_opt(layers=3)
    layer = model.model.decoder.layers[LAYER]
    with torch.no_grad():
        layer.fc1.bias[COL] = 20.0  # relu(~20) = ~20 at every token: the input channel spikes
        layer.fc2.weight[ROW, COL] = 3.0
    return model


@pytest.mark.parametrize("make", [_planted_llama, _planted_gpt2, _planted_opt])
def test_planted_super_weight_is_recovered_at_rank_one(make):
    model = make()
    scan = find_super_weights(model, _batches(), threshold=10.0)
    assert len(scan.layers) == 3 and scan.blocks == 4 and scan.tokens == 4 * 12
    top = scan.candidates[0]
    assert (top.rank, top.layer, top.row, top.col) == (1, LAYER, ROW, COL)
    assert top.weight == pytest.approx(3.0) and top.weight_rank == 1
    projection = mlp_output_projections(model)[LAYER]
    weight = dict(model.named_parameters())[projection.parameter]
    assert float(weight[top.storage_index]) == pytest.approx(3.0)
    assert top.storage_index == ((COL, ROW) if projection.transposed else (ROW, COL))
    assert projection.transposed == (make is _planted_gpt2)
    record = scan.layers[LAYER]
    assert record.input.ratio >= 10 and record.output.ratio >= 10
    assert record.input.ratio > max(r.input.ratio for i, r in enumerate(scan.layers) if i != LAYER)


@pytest.mark.parametrize("make", [_planted_llama, _planted_opt])
def test_spike_location_matches_a_manual_forward_pass(make):
    model = make()
    batches = _batches()
    scan = find_super_weights(model, batches)
    seen = []
    module = dict(model.named_modules())[mlp_output_projections(model)[LAYER].module]

    def keep(_module, args, out, shape):  # OPT's fc2 sees (batch·tokens, d): back to (batch, tokens, d)
        seen.append((args[0].detach().reshape(*shape, -1), out.detach().reshape(*shape, -1)))

    with torch.no_grad():
        for batch in batches:
            handle = module.register_forward_hook(lambda m, a, o, s=batch["input_ids"].shape: keep(m, a, o, s))
            model(**batch)
            handle.remove()
    inputs = torch.cat([x for x, _ in seen]).abs()
    outputs = torch.cat([y for _, y in seen]).abs()
    ids = torch.cat([b["input_ids"] for b in batches])
    for spike, acts in ((scan.layers[LAYER].input, inputs), (scan.layers[LAYER].output, outputs)):
        block, position, channel = torch.unravel_index(acts.argmax(), acts.shape)
        assert (spike.block, spike.position, spike.channel) == (int(block), int(position), int(channel))
        assert spike.token == int(ids[block, position]) and spike.value == pytest.approx(float(acts.max()))
        typical = acts.amax(dim=(0, 1)).median()
        assert spike.ratio == pytest.approx(float(acts.max() / typical), rel=1e-5)


@pytest.mark.parametrize("make", [_planted_llama, _planted_opt])
def test_padding_never_counts(make):
    model = make()
    ids = random_blocks(2, 12, seed=11)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    padded = find_super_weights(model, [{"input_ids": ids, "attention_mask": mask}])
    alone = find_super_weights(model, [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :4]}])
    assert padded.tokens == 16
    for a, b in zip(padded.layers, alone.layers, strict=True):
        assert a.output.value == pytest.approx(b.output.value, rel=1e-5)
        assert a.output.ratio == pytest.approx(b.output.ratio, rel=1e-5)


def test_projection_roles_and_pattern_override():
    assert [p.module for p in mlp_output_projections(tiny_llama())] == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    gpt2 = mlp_output_projections(tiny_gpt2())
    assert [p.module for p in gpt2] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert all(p.transposed for p in gpt2)  # not attn.c_proj
    only = mlp_output_projections(tiny_llama(), r"model\.layers\.1\.mlp\.up_proj")
    assert [(p.layer, p.module) for p in only] == [(1, "model.layers.1.mlp.up_proj")]
    with pytest.raises(CwaError, match="no MLP output projection"):
        mlp_output_projections(tiny_llama(), r".*\.nothing")
    with pytest.raises(CwaError, match="not a valid regular expression"):
        mlp_output_projections(tiny_llama(), "(")


@pytest.mark.parametrize(
    ("name", "modules"),
    [
        ("OPTForCausalLM", "model.decoder.layers.0.fc2"),
        ("GPTNeoXForCausalLM", "gpt_neox.layers.0.mlp.dense_4h_to_h"),
        ("FalconForCausalLM", "transformer.h.0.mlp.dense_4h_to_h"),
        ("GPTJForCausalLM", "transformer.h.0.mlp.fc_out"),
        ("Phi3ForCausalLM", "model.layers.0.mlp.down_proj"),
    ],
)
def test_role_rule_covers_other_families(name, modules):
    model = torch.nn.Module()
    parent = model
    parts = modules.split(".")
    for part in parts[:-1]:
        child = torch.nn.ModuleList() if part == "layers" or part == "h" else torch.nn.Module()
        if isinstance(parent, torch.nn.ModuleList):
            parent.append(child)
        else:
            parent.add_module(part, child)
        parent = child
    parent.add_module(parts[-1], torch.nn.Linear(4, 2))
    parent.add_module("up", torch.nn.Linear(2, 4))
    assert [p.module for p in mlp_output_projections(model)] == [modules], name


def _fake_scan(*coordinates):
    spike = Spike(1.0, 0, 0, 0, 0, 1.0)
    layers = [LayerSpikes(layer, "m", "m.weight", spike, spike) for layer, _, _ in coordinates]
    candidates = [
        Candidate(i + 1, layer, "m.weight", row, col, (row, col), 1.0, 1, 100.0, 100.0)
        for i, (layer, row, col) in enumerate(coordinates)
    ]
    return SuperWeightScan(10.0, 1, 1, layers, candidates)


def test_recovered_published_coordinates():
    scan = _fake_scan((1, 788, 2427), (1, 9, 9))
    result = recovered_published(scan, "meta-llama/Meta-Llama-3-8B")
    assert [(p.row, c is not None) for p, c in result] == [(788, True), (1384, False), (4062, False)]
    assert result[0][1].rank == 1 and "arXiv:2411.07191" in result[0][0].source
    assert recovered_published(_fake_scan((2, 3968, 7003)), "/models/llama-7b")[0][1] is not None
    assert recovered_published(scan, "gpt2") == []
    assert len(published_super_weights("allenai/OLMo-7B-0724-hf")) == 4
    assert {p.model for v in PUBLISHED.values() for p in v} == {
        "Llama-7B",
        "Llama-13B",
        "Mistral-7B-v0.1",
        "Meta-Llama-3-8B",
        "OLMo-7B-0724",
    }


def test_to_rows_has_one_row_per_layer():
    model = _planted_gpt2()
    scan = find_super_weights(model, _batches())
    rows = scan.to_rows()
    assert len(rows) == 3 and {"input_channel", "output_ratio", "candidate_rank", "weight_rank"} <= set(rows[0])
    assert rows[LAYER]["candidate_rank"] == 1 and (rows[LAYER]["row"], rows[LAYER]["col"]) == (ROW, COL)
    assert len(scan.candidates) == 1 and all(r["candidate_rank"] == "" for i, r in enumerate(rows) if i != LAYER)


def test_random_model_has_no_candidate():
    scan = find_super_weights(tiny_llama(layers=3), _batches())
    assert scan.candidates == [] and max(r.output.ratio for r in scan.layers) < 10
    with pytest.raises(CwaError, match="threshold"):
        find_super_weights(tiny_llama(), _batches(), threshold=0)

"""Packed experts (cwa.ablation.experts): planted super experts and in-expert super weights are recovered at
rank 1 with their (layer, expert, row, column) on tiny Mixtral, OLMoE and Qwen-MoE models."""

from __future__ import annotations

import pytest
import torch
from conftest import random_blocks, tiny_moe

from cwa.ablation.experts import ExpertSpikes, packed_experts, scan_experts, super_experts

LAYER, EXPERT, ROW, COL = 1, 2, 5, 7


def _batches(n=4, seq_len=12, batch_size=2):
    blocks = random_blocks(n, seq_len, seed=11)
    return [{"input_ids": blocks[i : i + batch_size]} for i in range(0, n, batch_size)]


def _planted(family: str):
    """Expert EXPERT of layer LAYER: input channel COL of its down-projection driven large (its up row scaled,
    its gate row positive) and down_proj[EXPERT, ROW, COL] large: a super weight inside a super expert."""
    model = tiny_moe(family, layers=3)
    block = packed_experts(model)[LAYER]
    experts = dict(model.named_modules())[block.module]
    inner = experts.down_proj.shape[2]
    with torch.no_grad():
        experts.gate_up_proj[EXPERT, COL] = experts.gate_up_proj[EXPERT, COL].abs().sign() * 0.5
        experts.gate_up_proj[EXPERT, inner + COL] *= 60.0
        experts.down_proj[EXPERT, ROW, COL] = 3.0
    return model


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_planted_super_expert_and_weight_are_recovered_at_rank_one(family):
    model = _planted(family)
    blocks = packed_experts(model)
    assert [b.layer for b in blocks] == [0, 1, 2] and all(b.experts == 4 for b in blocks)
    scan = scan_experts(model, _batches())
    assert len(scan.experts) == 12 and sum(e.tokens for e in scan.experts) == 2 * 48 * 3  # top-2 routing
    top = scan.super_experts[0]
    assert (top.layer, top.expert) == (LAYER, EXPERT)
    candidate = scan.candidates[0]
    assert (candidate.rank, candidate.layer, candidate.expert, candidate.row, candidate.col) == (
        1,
        LAYER,
        EXPERT,
        ROW,
        COL,
    )
    assert candidate.storage_index == (EXPERT, ROW, COL) and candidate.weight == pytest.approx(3.0)
    weight = dict(model.named_parameters())[candidate.parameter]
    assert float(weight[candidate.storage_index]) == pytest.approx(3.0)


def test_scan_matches_a_forward_pass_by_hand():
    """Each expert's largest |output| against the Mixtral block recomputed by hand from its router."""
    model = tiny_moe("mixtral", layers=2)
    batches = _batches()
    scan = scan_experts(model, batches)
    moe = model.model.layers[0].mlp
    seen = []
    handle = moe.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, 16)))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    x = torch.cat(seen)
    logits = x @ moe.gate.weight.T
    chosen = logits.topk(2, dim=-1).indices
    for e in range(4):
        routed = x[(chosen == e).any(-1)]
        gate = routed @ moe.experts.gate_up_proj[e, :24].T
        up = routed @ moe.experts.gate_up_proj[e, 24:].T
        out = (torch.nn.functional.silu(gate) * up) @ moe.experts.down_proj[e].T
        record = scan.experts[e]
        assert record.tokens == routed.shape[0]
        assert record.output_max == pytest.approx(float(out.abs().max()), rel=1e-5)


def test_super_expert_rule():
    def spikes(layer, expert, value):
        return ExpertSpikes(layer, expert, "p", 1, value, 0, 0, 1.0, 1.0)

    values = {(0, 0): 1.0, (0, 1): 2.0, (1, 0): 500.0, (1, 1): 3.0, (2, 0): 40.0, (2, 1): 1.5}
    experts = [spikes(layer, expert, v) for (layer, expert), v in values.items()]
    # the 99.5th percentile of six values lies between the two largest: only 500 is above it
    assert [(e.layer, e.expert) for e in super_experts(experts)] == [(1, 0)]
    # at the 50th percentile (2.5), 40 and 3 clear it too, but 3 is not above a tenth of its layer's 500
    assert [(e.layer, e.expert) for e in super_experts(experts, 50.0)] == [(1, 0), (2, 0)]


def test_dense_model_has_no_packed_experts():
    from conftest import tiny_llama

    assert packed_experts(tiny_llama()) == [] and scan_experts(tiny_llama(), _batches()) is None


def test_find_super_weights_reports_experts(tmp_path, capsys):
    """``cwa find-super-weights`` on a Mixtral (no dense MLP at all): the planted weight is candidate 1 with
    its expert, its ablation zeroes exactly that element, the super expert is in summary.json and the csv."""
    import csv
    import json

    from conftest import make_tokenizer

    from cwa.cli import main

    model_dir = tmp_path / "model"
    _planted("mixtral").save_pretrained(model_dir)
    make_tokenizer(model_dir)
    code = main(
        [
            "find-super-weights",
            f"--model.pretrained={model_dir}",
            "--data.seq_len=32",
            "--data.num_samples=8",
            "--data.heldout_fraction=0.3",
            "--data.batch_size=4",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            "--trainer.logger.init_args.name=sw",
            "--super_weights.bootstrap=200",
            "--super_weights.permutations=200",
        ]
    )
    assert code == 0, capsys.readouterr().err
    run = tmp_path / "logs" / "sw" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    top = summary["candidates"][0]
    assert (top["rank"], top["layer"], top["expert"], top["row"], top["col"]) == (1, LAYER, EXPERT, ROW, COL)
    assert top["storage_index"] == [EXPERT, ROW, COL] and "ablation" in top
    assert [(e["layer"], e["expert"]) for e in summary["super_experts"]][:1] == [(LAYER, EXPERT)]
    with open(run / "super_weights.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 4  # one per expert
    planted = next(r for r in rows if (r["layer"], r["expert"]) == (str(LAYER), str(EXPERT)))
    assert planted["candidate_rank"] == "1" and planted["super_expert"] == "True"
    assert f"expert {EXPERT} [{ROW}, {COL}]" in capsys.readouterr().out


def test_topk_csv_names_the_expert(tmp_path, capsys):
    """fit-sensitivity (magnitude) on a Mixtral's packed down-projections: each topk.csv row's (expert, row,
    col) is the weight torch.topk finds in the packed tensor, unravelled by hand."""
    import csv

    from conftest import make_tokenizer

    from cwa.cli import main

    model_dir = tmp_path / "model"
    model = tiny_moe("mixtral")
    model.save_pretrained(model_dir)
    make_tokenizer(model_dir)
    code = main(
        [
            "fit-sensitivity",
            f"--model.pretrained={model_dir}",
            "--model.metric=magnitude",
            "--model.include=[.*experts\\.down_proj]",
            "--model.k=6",
            "--data.seq_len=16",
            "--data.num_samples=2",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            "--trainer.logger.init_args.name=moe",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "experts.down_proj[expert " in capsys.readouterr().out
    with open(tmp_path / "logs" / "moe" / "version_0" / "topk.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    packed = {n: p.detach() for n, p in model.named_parameters() if n.endswith("experts.down_proj")}
    flat = torch.cat([p.abs().reshape(-1) for p in packed.values()])
    best = flat.topk(6).indices
    size = next(iter(packed.values())).numel()
    for row, position in zip(rows, best.tolist(), strict=True):
        name = list(packed)[position // size]
        expert, out, inp = torch.unravel_index(torch.tensor(position % size), packed[name].shape)
        assert row["parameter"] == name
        assert (row["expert"], row["row"], row["col"]) == (str(int(expert)), str(int(out)), str(int(inp)))


def test_expert_units_and_their_random_control():
    """Unit ``expert``: every weight of the chosen weights' experts (checked against a mask built by hand),
    and a random control of as many other experts of the same tensor, never the target's."""
    from cwa.ablation.controls import ControlContext, MagnitudeMatched, RandomMatched
    from cwa.ablation.units import expand, unit_mean_abs
    from cwa.common.errors import CwaError
    from cwa.scoring.topk import TopK

    shape = (6, 3, 4)
    packed = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    chosen = torch.tensor([13, 14, 50])  # experts 1, 1 and 4
    members = expand({"experts": chosen}, {"experts": shape}, {}, "expert")["experts"]
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[1] = mask[4] = True
    assert torch.equal(members, torch.nonzero(mask.reshape(-1)).squeeze(1))
    assert torch.allclose(unit_mean_abs(packed, False, "expert"), packed.abs().mean(dim=(1, 2)))
    with pytest.raises(CwaError, match="2-D tensor holds no packed experts"):
        expand({"w": torch.tensor([0])}, {"w": (3, 4)}, {}, "expert")
    params = {"experts": packed, "norm": torch.randn(4)}
    topk = TopK(names=["experts"], param=torch.zeros(3, dtype=torch.long), index=chosen, score=torch.ones(3))
    for control in (RandomMatched(), MagnitudeMatched(bins=1)):  # one bin: 4 other experts for 2 targets
        control.prepare(ControlContext(params, topk, 3, None, {}))
        for seed in range(4):
            drawn = control.select(3, seed, "expert")["experts"]
            experts = torch.unique(drawn // 12)
            assert experts.numel() == 2 and not set(experts.tolist()) & {1, 4}
            assert torch.equal(drawn, (experts[:, None] * 12 + torch.arange(12)).reshape(-1))


def test_perturb_unit_expert_equals_zeroing_the_expert_by_hand(tmp_path, capsys):
    """``cwa perturb --units [expert]`` on a planted Mixtral: the top weight's whole expert zeroed (384
    weights, routing unchanged) gives the perplexity of the same expert zeroed by hand; every bit restored."""
    import csv

    from conftest import make_tokenizer
    from transformers import AutoModelForCausalLM

    from cwa.ablation.perturbations import tensor_checksum
    from cwa.cli import main
    from cwa.perturb.evaluate import evaluate
    from cwa.perturb.recipe import PerturbRecipe
    from cwa.perturb.run_data import build_data
    from cwa.rundir import Run

    model_dir = tmp_path / "model"
    _planted("mixtral").save_pretrained(model_dir)
    make_tokenizer(model_dir)
    logs = tmp_path / "logs"
    args = [f"--model.pretrained={model_dir}", "--model.metric=magnitude", "--model.include=[.*experts\\.down_proj]"]
    args += ["--model.k=2", "--data.seq_len=16", "--data.num_samples=2", "--data.heldout_samples=8"]
    args += [f"--trainer.logger.init_args.save_dir={logs}", "--trainer.logger.init_args.name=moe"]
    assert main(["fit-sensitivity", *args, "--trainer.enable_progress_bar=false"]) == 0
    run = logs / "moe" / "version_0"
    recipe = PerturbRecipe(
        run=str(run),
        perturbation=["zero"],
        ks=(1,),
        single=1,
        units=("expert",),
        controls=("random_matched",),
        seeds=(0,),
        bootstrap=50,
        permutations=50,
        tensorboard=False,
        figures=False,
    )
    recipe.run()
    with open(run / "perturb" / "1" / "perturb.csv", newline="") as handle:
        rows = {r["condition"]: r for r in csv.DictReader(handle)}
    single = rows["zero/single/rank=1/unit=expert"]
    assert single["n_weights"] == "384"
    assert rows["zero/random_matched/k=1/seed=0/unit=expert"]["n_weights"] == "384"

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert {n: tensor_checksum(p) for n, p in recipe.model.named_parameters()} == {
        n: tensor_checksum(p) for n, p in model.named_parameters()
    }
    with torch.no_grad():
        model.model.layers[LAYER].mlp.experts.down_proj[EXPERT] = 0.0
    heldout = build_data(Run.load(run)).heldout
    by_hand = evaluate(model, heldout, 4, torch.device("cpu")).perplexity
    assert float(single["perplexity"]) == pytest.approx(by_hand, rel=1e-5)

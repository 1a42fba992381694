"""Ablation units (weight, row, column) on both weight layouts, unit-matched controls, mean ablation, and
``cwa perturb`` with units, leave-one-out sets and pairs end to end on tiny models built in code."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from test_perturb import make_run

from cwa.ablation.controls import ControlContext, ControlUnavailable, MagnitudeBins, MagnitudeMatched, RandomMatched
from cwa.ablation.perturbations import ChecksumCache, Mean, Zero, perturbed, tensor_checksum
from cwa.ablation.units import expand, unit_ids, unit_mean_abs
from cwa.common.errors import CwaError
from cwa.model.params import select_parameters
from cwa.scoring.topk import TopK

pytestmark = pytest.mark.usefixtures("one_thread")


# -- each unit selects exactly the intended weights --------------------------------------------------
def _layer(arch: str):
    """(model, module, parameter name, transposed) of an MLP input projection: a Linear or a GPT-2 Conv1D."""
    if arch == "llama":
        model, name = tiny_llama(), "model.layers.0.mlp.up_proj"
    else:
        model, name = tiny_gpt2(), "transformer.h.0.mlp.c_fc"
    info = select_parameters(model)[f"{name}.weight"][1]
    return model, model.get_submodule(name), f"{name}.weight", info.transposed


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_unit_changes_exactly_its_output_feature_or_input_channel(arch: str) -> None:
    model, module, name, transposed = _layer(arch)
    assert transposed == (arch == "gpt2")  # Conv1D stores (in, out)
    weight = module.weight.data
    d_in = weight.shape[0] if transposed else weight.shape[1]
    out, col = 5, 3  # the chosen weight: output feature 5, input channel 3
    flat = col * weight.shape[1] + out if transposed else out * weight.shape[1] + col
    x = torch.randn(4, d_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = module(x)
    params = {name: weight}
    expected = {
        "weight": {(out, col)},
        "row": {(out, c) for c in range(d_in)},
        "column": {(o, col) for o in range(before.shape[-1])},
    }
    for unit, cells in expected.items():
        chosen = expand({name: torch.tensor([flat])}, {name: tuple(weight.shape)}, {name: transposed}, unit)
        by_hand = sorted(c * weight.shape[1] + o if transposed else o * weight.shape[1] + c for o, c in cells)
        assert chosen[name].tolist() == by_hand, unit
        with perturbed(params, chosen, Zero()), torch.no_grad():
            after = module(x)
            w = weight.t() if transposed else weight  # (out, in), as the module computes
            assert all(float(w[o, c]) == 0.0 for o, c in cells)
            assert int((w == 0).sum()) == len(cells)
        changed = (after != before).any(0)
        if unit == "row":  # exactly that output feature changes, to its bias alone
            assert changed.nonzero().flatten().tolist() == [out]
            bias = 0.0 if module.bias is None else module.bias[out]
            assert torch.allclose(after[:, out], torch.as_tensor(bias).expand(4))
        else:  # the output moves by exactly the removed input contributions
            removed = torch.zeros_like(before)
            for o, c in cells:
                removed[:, o] += x[:, c] * (weight[c, o] if transposed else weight[o, c])
            assert torch.allclose(before - after, removed, atol=1e-6), unit


def test_a_1d_tensor_is_its_own_unit_and_3d_is_refused() -> None:
    index = torch.tensor([2, 7])
    assert expand({"norm": index}, {"norm": (16,)}, {}, "row")["norm"].tolist() == [2, 7]
    with pytest.raises(CwaError, match="3-D tensor has no rows"):
        expand({"conv": index}, {"conv": (2, 3, 4)}, {}, "row")


def test_unit_ids_agree_with_param_info() -> None:
    for arch in ("llama", "gpt2"):
        model, _, name, transposed = _layer(arch)
        info = select_parameters(model)[name][1]
        flat = torch.arange(0, info.numel, 37)
        row, col = info.row_col(flat)
        assert unit_ids(flat, info.shape, transposed, "row").tolist() == torch.unique(row).tolist()
        assert unit_ids(flat, info.shape, transposed, "column").tolist() == torch.unique(col).tolist()


# -- unit-matched controls ---------------------------------------------------------------------------
def _context(arch: str) -> tuple[ControlContext, dict[str, tuple[int, ...]], dict[str, bool]]:
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    chosen = {n: (p, i) for n, (p, i) in select_parameters(model).items() if p.dim() == 2 and "mlp" in n}
    params = {n: p.data for n, (p, _) in chosen.items()}
    names = list(params)
    # A top-K list with weights sharing rows and columns in two tensors.
    param = torch.tensor([0, 0, 0, 1, 1, 0])
    index = torch.tensor([0, 1, 40, 5, 200, 41])
    topk = TopK(names=names, param=param, index=index, score=torch.arange(6, 0, -1).float())
    transposed = {n: i.transposed for n, (_, i) in chosen.items()}
    context = ControlContext(params, topk, 6, None, transposed)
    return context, {n: tuple(p.shape) for n, p in params.items()}, transposed


def _units_of(selection, shapes, transposed, unit) -> dict[str, list[int]]:
    """Unit ids of a selection, checking that it is made of whole units."""
    out = {}
    for name, index in selection.items():
        ids = unit_ids(index, shapes[name], transposed[name], unit)
        whole = expand({name: index}, shapes, transposed, unit)[name]
        assert torch.equal(whole, index), f"{name}: not whole {unit}s"
        out[name] = ids.tolist()
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("unit", ["row", "column"])
def test_unit_matched_controls_draw_whole_units_never_the_targets(arch: str, unit: str) -> None:
    from cwa.ablation.perturbations import topk_prefix

    context, shapes, transposed = _context(arch)
    target = _units_of(expand(topk_prefix(context.topk, 6), shapes, transposed, unit), shapes, transposed, unit)
    random, magnitude = RandomMatched(), MagnitudeMatched(bins=4)
    random.prepare(context), magnitude.prepare(context)
    for control in (random, magnitude):
        draws = []
        for seed in range(3):
            drawn = _units_of(control.select(6, seed, unit), shapes, transposed, unit)
            if control is random:  # the same number of distinct units per tensor
                assert {n: len(u) for n, u in drawn.items()} == {n: len(u) for n, u in target.items()}
            for name, ids in drawn.items():
                assert not set(ids) & set(target.get(name, [])), f"{control.name} drew a target {unit}"
            draws.append(drawn)
        assert draws[0] != draws[1] or draws[1] != draws[2]  # seeded, not fixed
    # Magnitude-matched units: as many weights, and per unit length the target units' mean-|w| bin counts.
    drawn = _units_of(magnitude.select(6, 0, unit), shapes, transposed, unit)
    means = {n: unit_mean_abs(t, transposed[n], unit) for n, t in context.params.items()}
    lengths = {n: context.params[n].numel() // means[n].numel() for n in means}
    assert sum(len(u) * lengths[n] for n, u in drawn.items()) == sum(len(u) * lengths[n] for n, u in target.items())
    for length in set(lengths.values()):
        bins = MagnitudeBins({n: m for n, m in means.items() if lengths[n] == length}, 4)

        def histogram(units: dict[str, list[int]], length: int = length, bins: MagnitudeBins = bins) -> list[int]:
            values = [means[n][torch.tensor(u)] for n, u in units.items() if lengths[n] == length]
            values = torch.cat(values) if values else torch.zeros(0)
            return torch.bincount(bins.bin_of(values), minlength=4).tolist()

        assert histogram(drawn) == histogram(target), length


def test_a_random_unit_control_refuses_when_too_few_units_remain() -> None:
    params = {"w": torch.randn(3, 4)}
    topk = TopK(names=["w"], param=torch.tensor([0, 0]), index=torch.tensor([0, 5]), score=torch.ones(2))
    control = RandomMatched()
    control.prepare(ControlContext(params, topk, 2, None, {"w": False}))
    with pytest.raises(ControlUnavailable, match="2 of the top-K rows and only 1 others"):
        control.select(2, 0, "row")
    assert control.select(2, 0, "column")["w"].numel() == 2 * 3  # two other columns of 3 weights


# -- mean ablation -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_mean_writes_the_mean_of_the_unperturbed_output_row(transposed: bool, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    out_in = torch.randn(5, 7, generator=g) + 0.3  # (out, in): rows have non-zero means
    tensor = (out_in.t().contiguous() if transposed else out_in.clone()).to(dtype)
    original = tensor.clone()
    # Two weights of output row 2 (one with |w| large), one of output row 4.
    cells = [(2, 0), (2, 6), (4, 3)]
    cols = tensor.shape[1]
    flat = torch.tensor(sorted(c * cols + o if transposed else o * cols + c for o, c in cells))
    params = {"w": tensor}
    with perturbed(params, {"w": flat}, Mean(), checksums=ChecksumCache(params), transposed={"w": transposed}):
        w = tensor.t() if transposed else tensor
        w0 = original.t() if transposed else original
        for o, c in cells:
            row = [float(v) for v in w0[o].double()]
            assert float(w[o, c]) == float(torch.tensor(math.fsum(row) / len(row), dtype=torch.float64).to(dtype))
        untouched = torch.ones_like(w, dtype=torch.bool)
        for o, c in cells:
            untouched[o, c] = False
        assert torch.equal(w[untouched], w0[untouched])
    assert torch.equal(tensor.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       original.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # fmt: skip


def test_mean_of_a_row_unit_flattens_the_row_to_its_mean() -> None:
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    row = expand({"w": torch.tensor([8])}, {"w": (4, 6)}, {"w": False}, "row")  # weight (1, 2): row 1
    expected = w[1].double().mean().float()
    with perturbed({"w": w}, row, Mean()):
        assert torch.equal(w[1], expected.expand(6))


# -- cwa perturb end to end ------------------------------------------------------------------------
def _checksums(model: torch.nn.Module) -> dict[str, str]:
    return {n: tensor_checksum(p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perturb_with_units_sets_and_mean_end_to_end(
    arch: str, tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path: Path, capsys
) -> None:
    from transformers import AutoModelForCausalLM

    from cwa.perturb.recipe import PerturbRecipe
    from cwa.rundir import Run

    model_dir, include = (
        (tiny_llama_dir, r".*mlp\..*proj\.weight") if arch == "llama" else (tiny_gpt2_dir, r".*mlp\.c_.*\.weight")
    )
    run = make_run(tmp_path, model_dir, k=20, include=include)
    recipe = PerturbRecipe(
        run=str(run),
        perturbation=["zero", "mean"],
        ks=(2,),
        single=1,
        units=("weight", "row", "column"),
        leave_one_out=3,
        pairs=3,
        controls=("random_matched", MagnitudeMatched(bins=4), "bottomk"),
        seeds=(0,),
        bootstrap=50,
        permutations=100,
        tensorboard=False,
        figures=arch == "llama",
    )
    recipe.run()
    # Joint, leave-one-out and pairs restored every parameter bit for bit over the whole run.
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    assert _checksums(recipe.model) == _checksums(original)

    rows = Run.load(run).perturbation.rows  # every row parses
    names = [r.condition for r in rows]
    assert len(names) == len(set(names))
    per_unit = 2 * (1 + 2) + 3 + 3 + 3  # ks {2, 3} with random and magnitude controls, 3 singles, 3 sets, 3 pairs
    assert len(rows) == 1 + 2 * (3 * per_unit + 2)  # bottom-K at unit weight only, for K = 2 and 3
    by_name = {r.condition: r for r in rows}
    assert by_name["zero/single/rank=1/unit=row"].unit == "row"
    loo = by_name["mean/leave_one_out/k=3/without=2/unit=column"]
    assert (loo.target, loo.k, loo.rank, loo.p_value_vs) == ("leave_one_out", 3, 2, "topk")
    pair = by_name["zero/pair/ranks=1+3"]
    assert (pair.target, pair.ranks, pair.unit, pair.p_value_vs) == ("pair", "1+3", "weight", "baseline")
    for kind in ("zero", "mean"):  # the same weights give the same pass: without 3 = top 2 = pair 1+2, ...
        for tail in ("", "/unit=row", "/unit=column"):
            same = [
                f"{kind}/leave_one_out/k=3/without=3{tail}",
                f"{kind}/topk/k=2{tail}",
                f"{kind}/pair/ranks=1+2{tail}",
            ]
            assert len({(by_name[n].nll, by_name[n].n_weights) for n in same}) == 1, same
            without = by_name[f"{kind}/leave_one_out/k=3/without=1{tail}"]
            assert (without.nll, without.n_weights) == (
                by_name[f"{kind}/pair/ranks=2+3{tail}"].nll,
                by_name[f"{kind}/pair/ranks=2+3{tail}"].n_weights,
            )
    assert by_name["zero/leave_one_out/k=3/without=1"].n_weights == 2
    assert by_name["zero/topk/k=3"].n_weights == 3
    shapes, transposed = recipe.loaded.shapes, recipe.loaded.transposed
    for r in rows[1:]:
        if r.is_control and r.unit != "weight":  # whole units of the same length: the same weight count
            assert r.n_weights == by_name[f"{r.perturbation}/topk/k={r.k}/unit={r.unit}"].n_weights, r.condition
        if r.target == "single" and r.unit != "weight":
            name = recipe.topk.names[int(recipe.topk.param[r.rank - 1])]
            rows_, cols_ = shapes[name]
            (out_len, in_len) = (cols_, rows_) if transposed[name] else (rows_, cols_)
            assert r.n_weights == (in_len if r.unit == "row" else out_len)
    assert "bottomk skipped at unit row, column" in " ".join(Run.load(run).perturbation.meta["notes"])
    printed = capsys.readouterr().out
    assert "the top 3 as a set" in printed and "ranks 1+2" in printed and "zero of each row" in printed
    if arch == "llama":
        assert (run / "perturb" / "1" / "figures" / "perturb_sets.png").stat().st_size > 1000


def test_a_perturb_csv_without_the_unit_columns_reads_with_their_defaults() -> None:
    from cwa.rundir import PerturbRow

    added = {"broken_fraction", "unit", "ranks", "restore", "recovered_fraction", "recovered_fraction_low"}
    added |= {"recovered_fraction_high", "restored_tokens"}
    old = {c: "1" for c in PerturbRow.columns() if c not in added} | {
        "condition": "zero/topk/k=1",
        "target": "topk",
        "p_value_vs": "",
    }
    row = PerturbRow.parse(old)
    assert (row.unit, row.ranks, row.broken_fraction, row.is_control) == ("weight", "", None, False)
    assert PerturbRow.parse({**old, "target": "leave_one_out"}).is_control is False
    assert PerturbRow.parse({**old, "target": "random_matched"}).is_control is True

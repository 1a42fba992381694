"""``cwa prune`` and ``cwa protect`` end to end on a tiny Llama: every row checked against a hand-made model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_interventions import hand_rtn, reference_nm_mask, reference_row_mask
from test_perturb import make_run, tiny_dir  # noqa: F401  (tiny_dir is a fixture)

from cwa.common.errors import CwaError
from cwa.rundir.interventions import ProtectRow, PruneRow, read_intervention

pytestmark = pytest.mark.usefixtures("one_thread")

LINEAR = r".*_proj\.weight"
QUICK = {"bootstrap": 50, "permutations": 50, "heldout_tokens": 12}


def _metric_run(root: Path, model_dir: Path, metric: str, seed: int) -> Path:
    """A run of the tiny model whose scores are random (a stand-in for another metric's)."""
    from cwa.rundir import write_scores

    run = make_run(root, model_dir, include=LINEAR)
    summary = json.loads((run / "summary.json").read_text())
    summary["metric"]["name"] = metric
    (run / "summary.json").write_text(json.dumps(summary))
    generator = torch.Generator().manual_seed(seed)
    from safetensors.torch import load_file

    scores = {n: torch.rand(t.shape, generator=generator) for n, t in load_file(run / "scores.safetensors").items()}
    write_scores(run / "scores.safetensors", scores, "float32", {"metric": metric})
    return run


def _fresh(model_dir: Path):
    from cwa.model.loading import load_model

    return load_model(str(model_dir))


def _perplexity(model, recipe) -> float:
    from cwa.perturb.evaluate import evaluate

    return evaluate(model, recipe.session.blocks, 4, torch.device("cpu")).stats.perplexity


def _same_weights(model, model_dir: Path) -> bool:
    fresh = dict(_fresh(model_dir).named_parameters())
    return all(torch.equal(p, fresh[n]) for n, p in model.named_parameters())


def test_prune_end_to_end(tiny_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    from cwa.prune.recipe import PruneRecipe

    magnitude = make_run(tmp_path / "a", tiny_dir, include=LINEAR)
    other = _metric_run(tmp_path / "b", tiny_dir, "grad_x_weight", seed=1)
    recipe = PruneRecipe(
        run=[str(magnitude), str(other)],
        sparsity=(0.5, 0.7),
        groups=("row", "global"),
        structure=("unstructured", "2:4"),
        **QUICK,
    )
    recipe.run()
    rows, meta = read_intervention(magnitude, "prune")
    assert [r.metric for r in rows] == ["dense"] + ["magnitude"] * 5 + ["grad_x_weight"] * 5
    assert meta["status"] == "complete" and meta["tensors"]["count"] == 14
    total = 2 * (4 * 16 * 16 + 3 * 32 * 16)
    for row in rows[1:]:
        # Wanda's count is rounded down in every row: 11 of 16 inputs and 22 of 32 at 70%.
        per_row = [(2 * (4 * 16 + 2 * 32), 16), (2 * 16, 32)]  # (rows, inputs): q k v o gate up, then down
        by_rows = sum(rows_ * int(inputs * row.sparsity) for rows_, inputs in per_row)
        assert row.weights == total and row.removed == (int(total * row.sparsity) if row.group == "global" else by_rows)
        assert row.delta_perplexity_low <= row.delta_perplexity <= row.delta_perplexity_high
    assert rows[0].perplexity == pytest.approx(_perplexity(_fresh(tiny_dir), recipe), rel=1e-6)
    # Two rows rebuilt by hand: the published per-row rule on |w| and on the other run's scores (2:4).
    from safetensors.torch import load_file

    other_scores = load_file(other / "scores.safetensors")
    for metric, structure, sparsity in (("magnitude", "unstructured", 0.7), ("grad_x_weight", "2:4", 0.5)):
        model, masks = _fresh(tiny_dir), []
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_proj.weight"):
                    key = param.abs() if metric == "magnitude" else other_scores[name]
                    mask = (
                        reference_row_mask(key, sparsity)
                        if structure == "unstructured"
                        else reference_nm_mask(key, 2, 4)
                    )
                    param[mask] = 0.0
                    masks.append(mask)
        row = next(
            r for r in rows if (r.metric, r.structure, r.group, r.sparsity) == (metric, structure, "row", sparsity)
        )
        assert row.removed == sum(int(m.sum()) for m in masks)
        assert row.perplexity == pytest.approx(_perplexity(model, recipe), rel=1e-6)
    assert _same_weights(recipe.session.model, tiny_dir)  # every condition was undone bit for bit
    assert (magnitude / "figures" / "prune.png").stat().st_size > 1000
    assert "cwa prune" in capsys.readouterr().out


def test_prune_from_the_command_line(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from cwa.cli import main

    run = make_run(tmp_path, tiny_dir, include=LINEAR)
    args = ["prune", str(run), "--sparsity", "[0.5]", "--structure", "[unstructured]", "--figures", "false"]
    assert main([*args, "--bootstrap", "20", "--permutations", "20", "--heldout_tokens", "8"]) == 0
    rows, _ = read_intervention(run, "prune")
    assert len(rows) == 2 and isinstance(rows[1], PruneRow)
    assert main(["prune", str(tmp_path / "missing")]) == 1


def test_protect_rtn_end_to_end(tiny_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    from cwa.protect.recipe import ProtectRecipe

    run = make_run(tmp_path, tiny_dir, include=LINEAR)
    recipe = ProtectRecipe(
        run=str(run),
        stress="rtn",
        levels=(2, 3),
        protect_k=(0, 5, 20),
        controls=("random_matched",),
        seeds=(0, 1),
        group_size=None,
        symmetric=False,
        **QUICK,
    )
    recipe.run()
    rows, meta = read_intervention(run, "protect")
    assert all(isinstance(r, ProtectRow) for r in rows)
    per_level = 1 + 2 + 2 * 2 + 2  # none, top-K at two K, random at two K and two seeds, their two means
    assert len(rows) == 1 + 2 * per_level
    assert meta["timings"]["mean_apply_restore_s_per_condition"] > 0
    # The 2-bit top-20 row by hand: per-row min-max RTN with the top-20 weights kept and out of the ranges.
    from cwa.rundir import Run

    topk = Run.load(run).topk
    protected = {(topk.names[int(p)], int(i)) for p, i in zip(topk.param[:20], topk.index[:20], strict=True)}
    model = _fresh(tiny_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.weight"):
                cols = param.shape[1]
                for r in range(param.shape[0]):
                    keep = [(name, r * cols + c) in protected for c in range(cols)]
                    param[r] = torch.tensor(hand_rtn(param[r].tolist(), keep, 2, False))
    row = next(r for r in rows if (r.level, r.protected, r.k) == (2, "topk", 20))
    assert row.n_protected == 20 and row.seed is None
    assert row.perplexity == pytest.approx(_perplexity(model, recipe), rel=1e-4)
    means = [r for r in rows if r.over == "seeds"]
    assert len(means) == 4 and all(r.protected == "random_matched" and r.seeds == 2 for r in means)
    assert _same_weights(recipe.session.model, tiny_dir)
    for figure in ("protect_k.png", "protect_level.png"):
        assert (run / "figures" / figure).stat().st_size > 1000
    assert "cwa protect" in capsys.readouterr().out


def test_protect_bit_errors_with_super_weights_and_rows(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from cwa.protect.recipe import ProtectRecipe

    run = make_run(tmp_path, tiny_dir, include=LINEAR)
    scan = tmp_path / "scan"
    scan.mkdir()
    name = "model.layers.1.mlp.down_proj.weight"
    summary = {
        "status": "complete",
        "kind": "find-super-weights",
        "super_weights": [{"parameter": name, "storage_index": [3, 7]}],
    }
    (scan / "summary.json").write_text(json.dumps(summary))
    recipe = ProtectRecipe(
        run=str(run),
        stress="bit_errors",
        levels=(1e-3,),
        protect_k=(0, 4),
        controls=(),
        super_weights=str(scan),
        units=("weight", "row"),
        seeds=(0, 1),
        bit_field="all",
        figures=False,
        **QUICK,
    )
    recipe.run()
    rows, _ = read_intervention(run, "protect")
    single = [r for r in rows if r.over == "sequences" and r.stress == "bit_errors"]
    # none, then per unit the super weights and the top-4 set; each with two stress seeds
    assert [(r.protected, r.unit) for r in single[::2]] == [
        ("none", "weight"),
        ("super_weights", "weight"),
        ("topk", "weight"),
        ("super_weights", "row"),
        ("topk", "row"),
    ]
    sizes = [r.n_protected for r in single[::2]]
    assert sizes[:4] == [0, 1, 4, 32] and sizes[4] >= 16  # a super weight's row of down_proj: 32 inputs
    flips = [r.changed for r in single if r.protected == "none"]
    expected = 1e-3 * 32 * 2 * (4 * 16 * 16 + 3 * 32 * 16)
    assert all(abs(f - expected) < 6 * math.sqrt(expected) for f in flips)  # most hit weights get one flip
    assert _same_weights(recipe.session.model, tiny_dir)


def test_protect_refuses_bad_settings_in_one_sentence(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from cwa.protect.recipe import ProtectRecipe

    run = make_run(tmp_path, tiny_dir, include=LINEAR, k=10)
    with pytest.raises(CwaError, match="integer bit widths"):
        ProtectRecipe(run=str(run), levels=(3.5,))
    with pytest.raises(CwaError, match=r"protect_k \[100\] asks for more weights than the run can name: only 10 "):
        ProtectRecipe(run=str(run), protect_k=(0, 100), **QUICK).run()
    with pytest.raises(CwaError, match="does not divide"):
        ProtectRecipe(run=str(run), group_size=5, protect_k=(0,), **QUICK).run()
    assert read_intervention(run, "protect") is None  # nothing half-written


def test_an_interrupted_write_keeps_the_previous_set(tmp_path: Path) -> None:
    from cwa.rundir.interventions import write_intervention

    nan = {f"delta_{m}{s}": 0.0 for m in ("perplexity", "nll", "accuracy") for s in ("", "_low", "_high")}
    row = PruneRow("dense", "", "", "", 0.0, 10, 0, 5.0, 1.6, 0.3, **nan, p_value=None, broken_fraction=0.0)
    write_intervention(tmp_path, "prune", [row], {"model": "tiny"})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    def interrupted(path: Path) -> None:
        path.write_bytes(b"half a figure")
        raise KeyboardInterrupt

    changed = PruneRow(**{**row.as_dict(), "perplexity": 9.0})
    with pytest.raises(KeyboardInterrupt):
        write_intervention(tmp_path, "prune", [changed], {"model": "tiny"}, {"prune.png": interrupted})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not list(tmp_path.rglob("*.tmp"))
    rows, meta = read_intervention(tmp_path, "prune")
    assert rows == [row] and meta["model"] == "tiny"
    (tmp_path / "prune.csv").write_text((tmp_path / "prune.csv").read_text().replace("5", "6"))
    with pytest.raises(CwaError, match="interrupted cwa prune"):
        read_intervention(tmp_path, "prune")


def test_report_shows_the_prune_and_protect_sets_of_a_run(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    import re

    from cwa.cli import main
    from cwa.common import format as fmt
    from cwa.protect.recipe import ProtectRecipe
    from cwa.prune.recipe import PruneRecipe

    run = make_run(tmp_path / "a", tiny_dir, include=LINEAR)
    plain = make_run(tmp_path / "b", tiny_dir, include=LINEAR)
    PruneRecipe(run=[str(run)], sparsity=(0.5,), groups=("row",), structure=("unstructured",), **QUICK).run()
    ProtectRecipe(
        run=str(run), stress="rtn", levels=(3,), protect_k=(0, 5), controls=("random_matched",), seeds=(0, 1), **QUICK
    ).run()
    out = tmp_path / "report" / "r.md"
    assert main(["report", str(run), str(plain), "--output", str(out), "--ks", "5", "--sample", "200"]) == 0
    text = out.read_text()
    section = text[text.index("### Pruning and protection") :]
    section = section[: section.index("\n## ")] if "\n## " in section else section
    lines = section.splitlines()
    pruned, _ = read_intervention(run, "prune")
    for row in pruned:
        delta = fmt.interval(row.delta_perplexity, row.delta_perplexity_low, row.delta_perplexity_high, fmt.effect)
        assert any(
            line.startswith(f"| {row.metric} |") and f"| {fmt.perplexity(row.perplexity)} | {delta} |" in line
            for line in lines
        ), row
    protected, _ = read_intervention(run, "protect")
    shown = [line for line in lines if line.startswith("| rtn |")]
    means = [r for r in protected if r.over == "seeds"]
    singles = [r for r in protected if r.stress == "rtn" and r.protected != "random_matched"]
    assert len(means) == 1 and len(shown) == len(singles) + 1  # the two random seeds are shown by their mean
    mean_delta = fmt.interval(
        means[0].delta_perplexity, means[0].delta_perplexity_low, means[0].delta_perplexity_high, fmt.effect
    )
    assert any("| random_matched |" in line and mean_delta in line and "| 2 |" in line for line in shown)
    assert "R2 (`cwa" not in section  # the run without prune or protect sets has no table
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section)
    assert sorted(Path(link).name for link in links) == ["protect_k.png", "protect_level.png", "prune.png"]
    assert all((out.parent / link).exists() for link in links)
    numbers = json.loads(out.with_suffix(".json").read_text())["interventions"]
    assert list(numbers) == [run.parent.name + "/" + run.name]
    assert [r["perplexity"] for r in next(iter(numbers.values()))["prune"]] == [r.perplexity for r in pruned]


def test_protect_k_counts_weights_of_the_stressed_tensors(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """A run that scored norms and embeddings too ranks the norms' 1.0 weights first under magnitude: K = 5
    protects the five best-ranked *linear* weights (what the stress would change), and its control is as large."""
    from cwa.protect.recipe import ProtectRecipe
    from cwa.rundir import Run

    run = make_run(tmp_path, tiny_dir, k=2000)
    topk = Run.load(run).topk
    assert not topk.names[int(topk.param[0])].endswith("_proj.weight")  # the list starts outside the stress
    recipe = ProtectRecipe(
        run=str(run), stress="rtn", levels=(2,), protect_k=(0, 5), controls=("random_matched",), seeds=(0,), **QUICK
    )
    recipe.run()
    rows, _ = read_intervention(run, "protect")
    top = next(r for r in rows if r.protected == "topk")
    assert top.n_protected == 5
    assert next(r for r in rows if r.protected == "random_matched").n_protected == 5
    linear = [
        (topk.names[int(p)], int(i))
        for p, i in zip(topk.param, topk.index, strict=True)
        if topk.names[int(p)].endswith("_proj.weight")
    ][:5]
    chosen = recipe._protected(next(c for c in recipe.conditions if c.protected == "topk"))
    assert sorted((n, int(i)) for n, idx in chosen.items() for i in idx) == sorted(linear)
    # A K the run cannot name in the stressed tensors is left out with a note; the others run.
    named = len(topk.within(recipe.params))
    recipe = ProtectRecipe(run=str(run), stress="rtn", levels=(2,), protect_k=(0, 5, named + 1), controls=(), **QUICK)
    recipe.run()
    assert sorted({r.k for r in read_intervention(run, "protect")[0]}) == [0, 5]
    assert any(f"K={named + 1} left out: only {named} of the run's top-2000" in n for n in recipe.notes)

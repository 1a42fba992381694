"""cwa report over runs of several models: the "Across models" section (relative depth, normalised module types,
effects side by side, super-weight candidates), and no weight coordinate compared across models (report and
compare alike)."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, tiny_gpt2, tiny_llama, tiny_moe, tiny_opt
from helpers import fit, latest_run
from test_compare import load_runs, make_run, random_scores

from cwa.cli import main
from cwa.common.errors import CwaError
from cwa.compare.models import ModelId, display_names, group_models
from cwa.compare.recipe import compare_runs
from cwa.model.params import ParamInfo, split_name
from cwa.report.across_models import share_difference
from cwa.report.analysis import analyse, headlines
from cwa.report.markdown import render
from cwa.report.module_types import depth_bin, module_type
from cwa.report.recipe import report
from cwa.rundir import write_super_weights

# -- normalised coordinates -------------------------------------------------------------------------------


def _info(name: str, shape: tuple[int, ...] = (4, 4)) -> ParamInfo:
    return ParamInfo(name, shape, *split_name(name))


@pytest.mark.parametrize(
    "build",
    [
        tiny_llama,
        tiny_gpt2,
        tiny_opt,
        lambda: tiny_moe("mixtral"),
        lambda: tiny_moe("olmoe"),
        lambda: tiny_moe("qwen2_moe"),
    ],  # fmt: skip
    ids=["llama", "gpt2", "opt", "mixtral", "olmoe", "qwen2_moe"],
)
def test_every_tensor_of_every_family_has_a_module_type(build):
    """No tensor of the tiny families falls under 'other': every one has a type that means the same elsewhere."""
    types = {name: module_type(_info(name)) for name, _ in build().named_parameters()}
    assert "other" not in types.values(), [n for n, t in types.items() if t == "other"]


def test_module_types_by_hand():
    expected = {
        # Llama
        "model.embed_tokens.weight": "embedding",
        "model.layers.0.self_attn.q_proj.weight": "attn q",
        "model.layers.0.self_attn.o_proj.weight": "attn out",
        "model.layers.0.mlp.gate_proj.weight": "MLP gate",
        "model.layers.0.mlp.down_proj.weight": "MLP down",
        "model.layers.0.input_layernorm.weight": "norm",
        "lm_head.weight": "LM head",
        # GPT-2: c_proj is the attention's output or the MLP's down projection, by its parent
        "transformer.wte.weight": "embedding",
        "transformer.h.1.attn.c_attn.weight": "attn qkv (fused)",
        "transformer.h.1.attn.c_proj.weight": "attn out",
        "transformer.h.1.mlp.c_fc.weight": "MLP up",
        "transformer.h.1.mlp.c_proj.weight": "MLP down",
        "transformer.h.1.mlp.c_proj.bias": "bias",
        "transformer.h.1.ln_2.bias": "norm",
        "transformer.ln_f.weight": "norm",
        # OPT
        "model.decoder.layers.0.fc1.weight": "MLP up",
        "model.decoder.layers.0.fc2.weight": "MLP down",
        "model.decoder.layers.0.self_attn.out_proj.weight": "attn out",
        "model.decoder.embed_positions.weight": "embedding",
        # GPT-NeoX
        "gpt_neox.embed_in.weight": "embedding",
        "gpt_neox.layers.3.attention.query_key_value.weight": "attn qkv (fused)",
        "gpt_neox.layers.3.attention.dense.weight": "attn out",
        "gpt_neox.layers.3.mlp.dense_h_to_4h.weight": "MLP up",
        "gpt_neox.layers.3.mlp.dense_4h_to_h.weight": "MLP down",
        "embed_out.weight": "LM head",
        # mixtures of experts
        "model.layers.0.block_sparse_moe.experts.0.w1.weight": "MLP gate",
        "model.layers.0.block_sparse_moe.experts.0.w3.weight": "MLP up",
        "model.layers.0.block_sparse_moe.experts.0.w2.weight": "MLP down",
        "model.layers.0.block_sparse_moe.gate.weight": "router",
        "model.layers.0.mlp.experts.gate_up_proj": "MLP gate+up (fused)",
        "model.layers.0.mlp.experts.down_proj": "MLP down",
    }
    assert {n: module_type(_info(n)) for n in expected} == expected


def test_relative_depth_bins():
    assert depth_bin(_info("model.layers.0.mlp.down_proj.weight"), 30) == "0.0–0.1"
    assert depth_bin(_info("model.layers.3.mlp.down_proj.weight"), 30) == "0.1–0.2"
    assert depth_bin(_info("model.layers.15.mlp.down_proj.weight"), 30) == "0.5–0.6"
    assert depth_bin(_info("model.layers.29.mlp.down_proj.weight"), 30) == "0.9–1.0"
    assert depth_bin(_info("model.layers.1.mlp.down_proj.weight"), 2) == "0.5–0.6"
    assert depth_bin(_info("model.embed_tokens.weight"), 2) == "embeddings"
    assert depth_bin(_info("model.norm.weight", (4,)), 2) == "final norm / head"
    assert depth_bin(_info("lm_head.weight"), 2) == "final norm / head"


# -- runs of two families, fitted and perturbed -----------------------------------------------------------
K = 40
PERTURB = ["--ks", "[10]", "--single", "0", "--controls", "[random_matched]", "--seeds", "[0]", "--figures", "false",
           "--tensorboard", "false", "--bootstrap", "100"]  # fmt: skip


@pytest.fixture(scope="module")
def two_families(tmp_path_factory) -> dict[str, Path]:
    """tiny_llama scored with grad_x_weight and grad_squared, tiny_gpt2 with grad_x_weight; each perturbed."""
    root = tmp_path_factory.mktemp("two-families")
    runs = {}
    for family, build, metrics in (("llama", tiny_llama, ("grad_x_weight", "grad_squared")),
                                   ("gpt2", tiny_gpt2, ("grad_x_weight",))):  # fmt: skip
        model_dir = root / f"tiny-{family}"
        build().save_pretrained(model_dir)
        make_tokenizer(model_dir)
        for metric in metrics:
            name = f"{family}-{metric}"
            assert fit(model_dir, root / "logs", f"--model.k={K + 10}", f"--model.metric={metric}", name=name,
                       figures=False) == 0  # fmt: skip
            runs[name] = latest_run(root / "logs", name)
            assert main(["perturb", "--run", str(runs[name]), *PERTURB]) == 0
    return runs


def _hand_type(name: str) -> str:
    """The module type by hand, for the two families' tensor names."""
    stem = name.split(".", 3)[-1] if ".h." in name or ".layers." in name else name
    if name.endswith(".bias") and "ln_" not in name:
        return "bias"
    table = {"embed_tokens": "embedding", "wte": "embedding", "wpe": "embedding", "q_proj": "attn q",
             "k_proj": "attn k", "v_proj": "attn v", "o_proj": "attn out", "gate_proj": "MLP gate",
             "up_proj": "MLP up", "down_proj": "MLP down", "layernorm": "norm", "ln_": "norm", "model.norm": "norm",
             "lm_head": "LM head", "c_attn": "attn qkv (fused)", "attn.c_proj": "attn out", "c_fc": "MLP up",
             "mlp.c_proj": "MLP down"}  # fmt: skip
    (found,) = {t for key, t in table.items() if key in (stem if key != "model.norm" else name)}
    return found


def _hand_depth(name: str, layer: str) -> str:
    if layer == "":
        return "embeddings" if ("embed" in name or ".wte" in name or ".wpe" in name) else "final norm / head"
    return {"0": "0.0–0.1", "1": "0.5–0.6"}[layer]  # two blocks: block 1 starts halfway


def _hand_count(run: Path) -> tuple[Counter, Counter]:
    """The top-K of topk.csv by hand, without the weights tied with the (K+1)-th (as the report places them)."""
    with open(run / "topk.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    cutoff = abs(float(rows[K]["score"]))
    rows = [r for r in rows[:K] if abs(float(r["score"])) != cutoff]
    depth = Counter(_hand_depth(r["parameter"], r["layer"]) for r in rows)
    module = Counter(_hand_type(r["parameter"]) for r in rows)
    return depth, module


def test_cross_model_report_places_the_topk_by_depth_and_module_type(two_families, tmp_path, capsys):
    paths = [str(two_families[n]) for n in ("llama-grad_x_weight", "llama-grad_squared", "gpt2-grad_x_weight")]
    output = report(paths, tmp_path / "report.md", ks=[10], sample=2000, location_k=K)
    runs = load_runs(paths)
    analysis = analyse(runs, [10], sample=2000, location_k=K)
    cross = analysis.across_models
    assert cross is not None and cross.models == ["tiny-llama", "tiny-gpt2"]
    assert cross.members == {"tiny-llama": [0, 1], "tiny-gpt2": [2]}
    columns = {(s.model, s.metric): s for s in cross.shares}
    assert set(columns) == {("tiny-llama", "grad_x_weight"), ("tiny-gpt2", "grad_x_weight"),
                            ("tiny-llama", "grad_squared")}  # fmt: skip
    by_hand = {}
    for (model, metric), s in columns.items():
        depth, module = by_hand[model, metric] = _hand_count(two_families[f"{model.removeprefix('tiny-')}-{metric}"])
        placed = sum(depth.values())
        assert s.k == [placed] and placed > K // 2
        assert {d: v for d, v in s.depth.items() if v} == pytest.approx({d: c / placed for d, c in depth.items()})
        assert {m: v for m, v in s.module.items() if v} == pytest.approx({m: c / placed for m, c in module.items()})
        assert sum(sum(row.values()) for row in s.cells.values()) == pytest.approx(1.0)

    placed = [f for f in cross.findings if f.verdict == "placement_differs"]
    assert placed  # the GPT-2's top-K is mostly its embedding, the Llama's is not
    for f in placed:
        kind = 0 if f.numbers["kind"] == "relative depth" else 1
        counts = [by_hand[model, f.numbers["metric"]][kind][f.numbers["where"]] for model in f.numbers["models"]]
        n = [sum(by_hand[model, f.numbers["metric"]][0].values()) for model in f.numbers["models"]]
        assert f.numbers["counts"] == counts and f.numbers["placed"] == n
        assert f.value == pytest.approx(counts[0] / n[0] - counts[1] / n[1]) and f.interval[0] > 0

    # Coordinates are compared within the Llama only: its two metrics; never a Llama run against the GPT-2 run.
    assert [members for members, _ in analysis.comparisons] == [[0, 1]]
    pairs = {f.runs for f in analysis.findings if f.section in ("agreement", "reproducibility") and len(f.runs) == 2}
    assert all(2 not in p for p in pairs)
    saved = json.loads(output.with_suffix(".json").read_text())
    assert [c["members"] for c in saved["comparisons"]] == [[analysis.names[0], analysis.names[1]]]
    assert saved["across_models"]["models"] == ["tiny-llama", "tiny-gpt2"]

    # Effects side by side: the top-10 and its random control, each model's ratio exp(ΔNLL) with its interval.
    rows = {(r.metric, r.target, r.k): r for r in cross.effects}
    assert set(rows) == {("grad_x_weight", "topk", 10), ("grad_x_weight", "random_matched", 10)}
    top = rows[("grad_x_weight", "topk", 10)]
    for model, effect in top.effects.items():
        (csv_row,) = [r for r in runs[effect.run].perturbation.rows if r.target == "topk"]
        assert effect.ratio == pytest.approx(math.exp(csv_row.delta_nll))
        assert effect.ratio_low == pytest.approx(math.exp(csv_row.delta_nll_low))
        assert runs[effect.run].model.endswith(model)
    (finding,) = [f for f in cross.findings if f.verdict != "placement_differs"]
    a, b = top.effects.values()
    disjoint = a.delta_nll_low > b.delta_nll_high or b.delta_nll_low > a.delta_nll_high
    assert finding.verdict == ("larger_effect" if disjoint else "effects_overlap")
    assert finding in analysis.findings

    text = output.read_text()
    section = text.split("### Across models", 1)[1].split("\n### ", 1)[0]
    assert "tiny-gpt2 · grad_x_weight (R3; K=40)" in section and "random_matched" in section
    assert "across_models_depth.png" in section
    assert (tmp_path / "report-figures" / "across_models_depth.png").exists()

    # compare refuses the two models in one sentence; within one model it still compares.
    assert main(["compare", paths[0], paths[2], "--output", str(tmp_path / "cmp"), "--figures", "false"]) == 1
    err = capsys.readouterr().err
    assert "the runs score 2 different models (tiny-llama: " in err and "Traceback" not in err
    assert not (tmp_path / "cmp").exists()
    assert main(["compare", paths[0], paths[1], "--output", str(tmp_path / "cmp"), "--figures", "false"]) == 0


# -- artificial runs ----------------------------------------------------------------------------------------
def _named(root: Path, model: str, name: str, **kwargs) -> Path:
    path = make_run(root, name, random_scores(1), k=10, **kwargs)
    summary = json.loads((path / "summary.json").read_text())
    summary["model"] = model
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_one_model_report_has_no_cross_model_section(tmp_path):
    runs = load_runs([make_run(tmp_path, "a", random_scores(1)), make_run(tmp_path, "b", random_scores(2))])
    analysis = analyse(runs, [10], sample=500)
    assert analysis.across_models is None and analysis.comparisons
    text = render(analysis, tmp_path / "r.md", {}, headlines(analysis))
    assert "Across models" not in text and analysis.to_json()["across_models"] is None


def test_two_models_of_one_layout_share_no_coordinates(tmp_path):
    """Same tensor names and shapes, different models: their top-K sets are not compared (they were before)."""
    a, b = _named(tmp_path, "org/model-a", "a"), _named(tmp_path, "org/model-b", "b")
    runs = load_runs([a, b])
    analysis = analyse(runs, [10], sample=500)
    assert analysis.comparisons == [] and analysis.of("agreement") == []
    assert analysis.across_models.models == ["org/model-a", "org/model-b"]
    with pytest.raises(CwaError, match=r"2 different models \(org/model-a: a/version_0; org/model-b: b/version_0\)"):
        compare_runs(runs, [10], sample=0)


def _rows(delta_nll: tuple[float, float, float], k: int = 10) -> list[dict]:
    value, low, high = delta_nll
    base = {"perturbation": "zero", "rank": "", "seed": "", "n_weights": k, "perplexity": 30.0, "nll": 3.4,
            "accuracy": 0.3, "delta_accuracy": 0, "delta_accuracy_low": 0, "delta_accuracy_high": 0,
            "p_value_vs": "baseline"}  # fmt: skip

    def row(target: str, nll: tuple[float, float, float], **more) -> dict:
        ppl = [30.0 * math.expm1(x) for x in nll]
        return {**base, "condition": target, "target": target, "k": k, "delta_nll": nll[0], "delta_nll_low": nll[1],
                "delta_nll_high": nll[2], "delta_perplexity": ppl[0], "delta_perplexity_low": ppl[1],
                "delta_perplexity_high": ppl[2], "p_value": 0.001, **more}  # fmt: skip

    baseline = {**row("baseline", (0, 0, 0)), "k": "", "n_weights": 0, "p_value": "", "p_value_vs": ""}
    control = row("random_matched", (0.01, -0.01, 0.02), seed=0, p_value_vs="topk")
    return [baseline, row("topk", (value, low, high)), control]


def test_effect_differences_are_claimed_only_where_the_intervals_separate(tmp_path):
    a = _named(tmp_path, "model-a", "a", perturb_rows=_rows((0.6, 0.5, 0.7)))
    b = _named(tmp_path, "model-b", "b", perturb_rows=_rows((0.15, 0.1, 0.2)))
    c = _named(tmp_path, "model-c", "c", perturb_rows=_rows((0.3, 0.15, 0.55)))
    analysis = analyse(load_runs([b, a, c]), [10], sample=0)
    found = {tuple(f.numbers["models"]): f for f in analysis.of("across_models")}
    assert {m: f.verdict for m, f in found.items()} == {
        ("model-a", "model-b"): "larger_effect",
        ("model-b", "model-c"): "effects_overlap",
        ("model-a", "model-c"): "effects_overlap",
    }
    larger = found[("model-a", "model-b")]
    assert larger.runs == (1, 0) and larger.value == pytest.approx(math.exp(0.6))
    assert larger.interval == pytest.approx((math.exp(0.5), math.exp(0.7)))
    assert [[f] for f in analysis.of("across_models") if f.verdict == "larger_effect"] == headlines(analysis)[-1:]
    control = next(r for r in analysis.across_models.effects if r.target == "random_matched")
    assert set(control.effects) == {"model-a", "model-b", "model-c"}  # in the table; no claim about controls
    text = render(analysis, tmp_path / "r.md", {}, headlines(analysis))
    assert "zero of the top 10 (grad_x_weight) costs model-a more than model-b" in text
    assert "a difference between the models is not supported" in text


def test_super_weight_candidates_sit_beside_the_runs(tmp_path):
    fit_run = make_run(tmp_path, "fit", random_scores(1))
    candidates = [
        {"rank": 1, "layer": 1, "parameter": "model.layers.1.mlp.down_proj.weight", "verdict": "activation_only",
         "ablation": {"delta_nll": 0.01, "delta_nll_low": -0.01, "delta_nll_high": 0.03, "p_value": 0.4}},
        {"rank": 2, "layer": 2, "parameter": "model.layers.2.mlp.down_proj.weight", "verdict": "super_weight",
         "ablation": {"delta_nll": 1.5, "delta_nll_low": 1.2, "delta_nll_high": 1.8, "p_value": 0.001}},
    ]  # fmt: skip
    summary = {"model": "org/other", "layers": 4, "candidates": candidates, "super_weights": candidates[1:]}
    write_super_weights(tmp_path / "sw", [], summary)
    output = report([str(fit_run), str(tmp_path / "sw")], tmp_path / "r.md", ks=[10], sample=0, figures=False)
    (c,) = json.loads(output.with_suffix(".json").read_text())["across_models"]["super_weights"]
    assert (c["model"], c["layer"], c["relative_depth"], c["module"], c["verdict"]) == (
        "org/other", 2, 0.5, "MLP down", "super_weight")  # fmt: skip
    assert c["ratio"] == pytest.approx(math.exp(1.5)) and c["super_weights"] == 1 and c["candidates"] == 2
    assert "`model.layers.2.mlp.down_proj.weight`" in output.read_text()
    # Malformed entries are left out, never a traceback: a layer that is no count, a parameter that is no name.
    bad = [{"rank": 1, "layer": "2", "parameter": "x"}, {"rank": 2, "layer": 1, "parameter": 7}, "junk"]
    write_super_weights(
        tmp_path / "bad", [], {"model": "org/bad", "layers": "4", "candidates": bad, "super_weights": 3}
    )
    output = report([str(fit_run), str(tmp_path / "bad")], tmp_path / "r3.md", ks=[10], sample=0, figures=False)
    assert json.loads(output.with_suffix(".json").read_text())["across_models"]["super_weights"] == []
    # The same model's find-super-weights run makes no cross-model section.
    summary["model"] = json.loads((fit_run / "summary.json").read_text())["model"]
    write_super_weights(tmp_path / "sw2", [], summary)
    output = report([str(fit_run), str(tmp_path / "sw2")], tmp_path / "r2.md", ks=[10], sample=0, figures=False)
    assert "Across models" not in output.read_text()


def test_share_difference_is_newcombes_hybrid_score_interval():
    """Newcombe (1998), Statistics in Medicine 17:873, method 10 on 56/70 against 48/80: 0.0524 to 0.3339."""
    d, low, high = share_difference(56, 70, 48, 80, 1.959964)
    assert (d, round(low, 4), round(high, 4)) == (pytest.approx(0.2), 0.0524, 0.3339)


def test_placement_differences_are_claimed_from_the_counts(tmp_path):
    """Model a's top-10 all sit in q_proj of block 0, model b's in down_proj of block 2 (of 3): both the module types
    and the depth bins differ by the whole top-K; a third model placed like a makes no claim against it."""

    def scores(name: str) -> dict:
        s = random_scores(1)
        s[name].view(-1)[:10] = 10.0 + torch.arange(10.0)
        return s

    q, down = "model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"
    runs = [make_run(tmp_path, n, scores(t), k=10) for n, t in (("a", q), ("b", down), ("c", q))]
    for run, model in zip(runs, ("model-a", "model-b", "model-c"), strict=True):
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "model": model}))
    analysis = analyse(load_runs(runs), [10], sample=0, location_k=10)
    found = {(tuple(f.numbers["models"]), f.numbers["where"]): f for f in analysis.of("across_models")}
    assert set(found) == {
        (("model-a", "model-b"), "attn q"), (("model-b", "model-a"), "MLP down"),
        (("model-a", "model-b"), "0.0–0.1"), (("model-b", "model-a"), "0.6–0.7"),
        (("model-c", "model-b"), "attn q"), (("model-b", "model-c"), "MLP down"),
        (("model-c", "model-b"), "0.0–0.1"), (("model-b", "model-c"), "0.6–0.7"),
    }  # fmt: skip
    f = found[(("model-a", "model-b"), "attn q")]
    assert (f.verdict, f.value, f.numbers["counts"], f.numbers["placed"], f.numbers["tests"]) == (
        "placement_differs", 1.0, [10, 0], [10, 10], 4)  # fmt: skip
    assert 0 < f.interval[0] < 1.0 == pytest.approx(f.interval[1])
    assert "model-a puts more of its top-K in attn q weights than model-b: 100% (10 of 10)" in render(
        analysis, tmp_path / "r.md", {}, headlines(analysis))  # fmt: skip


def test_model_identity_is_name_revision_and_what_else_the_runs_recorded():
    ids = [
        ModelId("org/a"),
        ModelId("org/a", model_class="LlamaForCausalLM", num_parameters=10),
        ModelId("org/a", model_class="LlamaForCausalLM", num_parameters=12),  # another checkpoint at that name
        ModelId("org/a", revision="v2"),
        ModelId("/tmp/models/tiny/"),
        ModelId("/data/tiny"),
    ]
    groups = group_models(ids)
    assert [members for _, members in groups] == [[0, 1], [2], [3], [4], [5]]
    assert groups[0][0] == ids[1]  # named by the member that records the most
    names = display_names([m for m, _ in groups])
    assert names == ["org/a (10 parameters)", "org/a (12 parameters)", "org/a@v2", "/tmp/models/tiny", "/data/tiny"]

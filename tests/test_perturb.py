"""cwa perturb: in-place perturbations and bit-exact restoration, IEEE bit flips, controls, evaluation and
the command end to end on a tiny Llama built in code."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import latest_set, write_run

os.environ["HF_HUB_OFFLINE"] = "1"

from cwa.ablation.controls import MagnitudeBins, bottomk, random_matched  # noqa: E402
from cwa.ablation.perturbations import (  # noqa: E402
    BitFlip,
    ChecksumCache,
    GaussianNoise,
    Scale,
    SignFlip,
    Zero,
    flip_bit,
    make_perturbation,
    perturbed,
    resolve_bit,
    selection_from,
    topk_prefix,
)
from cwa.common.errors import CwaError  # noqa: E402
from cwa.scoring.topk import select_topk  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


pytestmark = pytest.mark.usefixtures("one_thread")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(INT[t.dtype]).clone()


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = {
        "a.weight": torch.randn(20, 30, generator=g),
        "b.weight": torch.randn(50, generator=g) * 3,
        "c.weight": torch.randn(40, 25, generator=g) * 0.1,
    }
    params["a.weight"][0, :4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")])
    return {n: t.to(dtype) for n, t in params.items()}


# -- perturbations and restoration ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize(
    "perturbation",
    [
        Zero(),
        SignFlip(),
        Scale(factor=3.0),
        GaussianNoise(sigma=0.5, relative_to="weight"),
        GaussianNoise(sigma=0.5, relative_to="tensor_std"),
        BitFlip(bit="sign"),
        BitFlip(bit="exponent_msb"),
        BitFlip(bit=0),
    ],
    ids=lambda p: p.describe().replace(" ", "_"),
)
def test_restoration_is_bit_exact(perturbation, dtype: torch.dtype) -> None:
    params = _params(dtype)
    before = {n: _bits(t) for n, t in params.items()}
    selection = {"a.weight": torch.tensor([0, 1, 2, 3, 7, 100]), "c.weight": torch.tensor([5, 999])}
    checksums = ChecksumCache(params)
    with perturbed(params, selection, perturbation, torch.Generator().manual_seed(0), checksums):
        after = {n: _bits(t) for n, t in params.items()}
        for name, index in selection.items():
            changed = after[name].view(-1) != before[name].view(-1)
            assert not changed[[i for i in range(changed.numel()) if i not in set(index.tolist())]].any()
        assert torch.equal(after["b.weight"], before["b.weight"])
        if perturbation.name != "zero":
            assert (
                after["c.weight"].view(-1)[selection["c.weight"]] != before["c.weight"].view(-1)[selection["c.weight"]]
            ).any()
    for name in params:
        assert torch.equal(_bits(params[name]), before[name]), name


def test_restoration_also_when_the_condition_fails() -> None:
    params = _params()
    before = {n: _bits(t) for n, t in params.items()}
    with (
        pytest.raises(RuntimeError, match="boom"),
        perturbed(params, {"b.weight": torch.arange(10)}, Zero()),
    ):
        assert (params["b.weight"][:10] == 0).all()
        raise RuntimeError("boom")
    assert all(torch.equal(_bits(params[n]), before[n]) for n in params)


def test_checksum_detects_a_stray_write() -> None:
    params = _params()
    checksums = ChecksumCache(params)
    with (
        pytest.raises(RuntimeError, match="original bits"),
        perturbed(params, {"b.weight": torch.tensor([1])}, Zero(), checksums=checksums),
    ):
        params["b.weight"][5] += 1.0  # outside the selection: restoration cannot undo it


def test_zero_writes_exactly_the_selected_weights() -> None:
    params = _params()
    with perturbed(params, {"c.weight": torch.tensor([0, 26, 999])}, Zero()):
        flat = params["c.weight"].view(-1)
        assert (flat[[0, 26, 999]] == 0).all() and int((flat == 0).sum()) == 3


# -- IEEE bit flips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_sign_bit_negates(dtype: torch.dtype) -> None:
    values = torch.tensor([1.0, -2.5, 0.0, 3.0e-3, float("inf")], dtype=dtype)
    flipped = flip_bit(values, "sign")
    assert torch.equal(flipped[[0, 1, 3, 4]], -values[[0, 1, 3, 4]])
    assert flipped[2] == 0 and torch.signbit(flipped[2])


@pytest.mark.parametrize(
    ("dtype", "value", "bit", "expected"),
    [
        (torch.bfloat16, 1.0, "exponent_msb", math.inf),  # exponent 0x7F -> 0xFF with a zero mantissa
        (torch.float32, 1.0, "exponent_msb", math.inf),
        (torch.float16, 1.0, "exponent_msb", math.inf),  # exponent 01111 -> 11111
        (torch.bfloat16, 0.5, "exponent_msb", 2.0**127),  # exponent 0x7E -> 0xFE
        (torch.float32, 0.5, "exponent_msb", 2.0**127),
        (torch.float16, 0.5, "exponent_msb", 2.0**15),  # exponent 01110 -> 11110: 2^(30-15)
        (torch.bfloat16, 2.0, "exponent_msb", 2.0**-126),  # exponent 0x80 -> 0x00: subnormal? no: 0 exp, zero mantissa
        (torch.float32, 1.0, 0, 1.0 + 2.0**-23),  # least-significant mantissa bit
        (torch.bfloat16, 1.0, 0, 1.0 + 2.0**-7),
        (torch.float16, 1.0, 0, 1.0 + 2.0**-10),
        (torch.bfloat16, 1.0, 6, 1.5),  # the mantissa's top bit
        (torch.float32, 1.0, 23, 0.5),  # the exponent's lowest bit: 0x7F -> 0x7E
    ],
)
def test_bit_flip_gives_the_ieee_value(dtype: torch.dtype, value: float, bit: int | str, expected: float) -> None:
    if value == 2.0 and bit == "exponent_msb":
        expected = 0.0  # 2.0 = 0x4000 in bf16: clearing the exponent MSB leaves all-zero bits, +0.0
    got = flip_bit(torch.tensor([value], dtype=dtype), bit)
    assert got.dtype == dtype
    assert float(got[0]) == expected
    assert torch.equal(_bits(flip_bit(got, bit)), _bits(torch.tensor([value], dtype=dtype)))  # involution


def test_bit_indices_of_each_format() -> None:
    assert resolve_bit("sign", torch.float32) == 31 and resolve_bit("exponent_msb", torch.float32) == 30
    assert resolve_bit("sign", torch.bfloat16) == 15 and resolve_bit("exponent_msb", torch.bfloat16) == 14
    assert resolve_bit("sign", torch.float16) == 15 and resolve_bit("exponent_msb", torch.float16) == 14
    assert resolve_bit("5", torch.float16) == 5
    with pytest.raises(CwaError, match="outside the bf16 format"):
        resolve_bit(16, torch.bfloat16)
    with pytest.raises(CwaError, match="outside the fp32 format"):
        resolve_bit(-1, torch.float32)
    with pytest.raises(CwaError, match="unknown bit"):
        resolve_bit("mantissa", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_registered_perturbation_writes_its_formula(dtype: torch.dtype) -> None:
    from cwa.ablation.perturbations import PERTURBATIONS

    values = torch.tensor([1.5, -0.25, 3.0, 0.0, -2.0], dtype=dtype)
    index = torch.tensor([0, 2, 4])
    chosen = values[index].float()
    noise = torch.randn(3, generator=torch.Generator().manual_seed(5))
    expected = {
        "zero": torch.zeros(3),
        "mean": torch.full((3,), math.fsum(values.double().tolist()) / 5, dtype=torch.float64),  # 1-D: the tensor's
        "sign_flip": -chosen,
        "scale": chosen * 3.0,
        "gaussian_noise": chosen + 0.5 * chosen.abs() * noise,
        "bit_flip": flip_bit(values[index], "sign").float(),
    }
    options = {"scale": {"factor": 3.0}, "gaussian_noise": {"sigma": 0.5}, "bit_flip": {"bit": "sign"}}
    assert set(PERTURBATIONS) == set(expected)
    for name, cls in PERTURBATIONS.items():
        tensor = values.clone()
        cls(**options.get(name, {})).write(tensor, index, torch.Generator().manual_seed(5))
        assert torch.equal(tensor[index].float(), expected[name].to(dtype).float()), name
        assert torch.equal(tensor[[1, 3]], values[[1, 3]]), name


def test_unknown_perturbation_is_refused() -> None:
    with pytest.raises(CwaError, match="unknown perturbation 'prune'"):
        make_perturbation("prune")


# -- controls -------------------------------------------------------------------------------------
def _topk(params: dict[str, torch.Tensor], k: int):
    g = torch.Generator().manual_seed(7)
    scores = {n: torch.rand(t.shape, generator=g) for n, t in params.items()}
    return select_topk(scores, k), scores


def test_random_matched_has_the_per_tensor_counts_and_no_topk_weight() -> None:
    params = _params()
    topk, _ = _topk(params, 60)
    target = topk_prefix(topk, 60)
    control = random_matched(params, target, torch.Generator().manual_seed(0))
    assert {n: i.numel() for n, i in control.items()} == {n: i.numel() for n, i in target.items()}
    for name, index in control.items():
        assert not torch.isin(index, target[name]).any()
        assert index.unique().numel() == index.numel() and int(index.max()) < params[name].numel()
    again = random_matched(params, target, torch.Generator().manual_seed(0))
    other = random_matched(params, target, torch.Generator().manual_seed(1))
    assert all(torch.equal(control[n], again[n]) for n in control)
    assert any(not torch.equal(control[n], other[n]) for n in control)


def test_random_matched_on_a_large_tensor_uses_rejection_sampling() -> None:
    params = {"big.weight": torch.zeros(5_000_000)}
    target = {"big.weight": torch.arange(0, 5_000_000, 1000)}
    control = random_matched(params, target, torch.Generator().manual_seed(0))["big.weight"]
    assert control.numel() == 5000 and control.unique().numel() == 5000
    assert not torch.isin(control, target["big.weight"]).any()


def test_random_matched_refuses_an_impossible_match() -> None:
    params = {"n.weight": torch.ones(10)}
    with pytest.raises(CwaError, match="too few"):
        random_matched(params, {"n.weight": torch.arange(6)}, torch.Generator().manual_seed(0))


def test_magnitude_matched_has_the_bin_counts_and_no_topk_weight() -> None:
    params = {n: t.nan_to_num(0.0, posinf=0.0) for n, t in _params().items()}
    scores = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(3)) for n, t in params.items()}
    topk = select_topk(scores, 80)
    target = topk_prefix(topk, 80)
    bins = MagnitudeBins(params, bins=10)
    assert bins.edges.numel() == 9 and int(bins.counts.sum()) == sum(t.numel() for t in params.values())
    control = bins.matched(target, torch.Generator().manual_seed(0))

    def bin_counts(selection):
        return Counter(b for n, i in selection.items() for b in bins.bin_of(params[n].view(-1)[i]).tolist())

    assert sum(i.numel() for i in control.values()) == 80
    assert bin_counts(control) == bin_counts(target)
    for name, index in control.items():
        if name in target:
            assert not torch.isin(index, target[name]).any()
    other = bins.matched(target, torch.Generator().manual_seed(1))
    assert bin_counts(other) == bin_counts(target)
    assert any(n not in other or not torch.equal(control[n], other[n]) for n in control)


def test_bins_are_quantiles() -> None:
    params = {"x.weight": torch.arange(1000, dtype=torch.float32)}
    bins = MagnitudeBins(params, bins=4)
    assert bins.counts[0].tolist() == [250, 250, 250, 250]


def test_bottomk_matches_a_sort_of_the_concatenation() -> None:
    g = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.randint(0, 5, (30,), generator=g).float(),  # many ties
        "b": -torch.randint(0, 5, (7, 3), generator=g).float(),
        "c": torch.randint(0, 5, (40,), generator=g).float(),
    }
    for k in (1, 5, 17, 40):
        got = bottomk(scores, k)
        flat = [(abs(float(v)), p, i) for p, s in enumerate(scores.values()) for i, v in enumerate(s.reshape(-1))]
        expected = sorted(flat)[:k]
        assert list(zip(got.param.tolist(), got.index.tolist(), strict=True)) == [(p, i) for _, p, i in expected]
    with pytest.raises(CwaError, match="larger than"):
        bottomk(scores, 1000)


def test_selection_groups_by_tensor() -> None:
    sel = selection_from(["a", "b", "c"], torch.tensor([2, 0, 2, 0]), torch.tensor([5, 3, 1, 3]))
    assert list(sel) == ["a", "c"] and sel["a"].tolist() == [3] and sel["c"].tolist() == [1, 5]


# -- evaluation on a tiny model -------------------------------------------------------------------
def _tokenizer(path: Path) -> None:
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Counter(w for text in topics.values() for w in text.split())
    vocab = {"<unk>": 0, "<eos>": 1}
    for word, _ in words.most_common(62):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-perturb")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    _tokenizer(path)
    return path


def test_evaluation_equals_a_hand_computation(tiny_dir: Path) -> None:
    from cwa.model.loading import load_model
    from cwa.perturb.evaluate import evaluate

    model = load_model(str(tiny_dir))
    blocks = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(0))
    result = evaluate(model, blocks, batch_size=2, device=torch.device("cpu"))
    total_nll, total_tokens, correct = 0.0, 0, 0
    with torch.no_grad():
        for seq in blocks:
            logits = model(input_ids=seq[None]).logits[0]
            for t in range(seq.numel() - 1):
                logp = torch.log_softmax(logits[t].double(), -1)
                total_nll -= float(logp[seq[t + 1]])
                correct += int(int(logits[t].argmax()) == int(seq[t + 1]))
                total_tokens += 1
    assert result.stats.tokens.tolist() == [11.0] * 5
    assert result.stats.mean_nll == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert result.stats.accuracy == pytest.approx(correct / total_tokens)
    assert result.perplexity == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)


# -- the command ----------------------------------------------------------------------------------
def make_run(
    root: Path,
    model_dir: Path,
    k: int = 60,
    scores: bool = True,
    heldout_fraction: float = 0.1,
    include: str | None = None,
) -> Path:
    """A complete fit-sensitivity run directory written through cwa.rundir (magnitude scores) for the tiny model
    (``include``: score only the parameters it selects)."""
    from transformers import AutoModelForCausalLM

    from cwa.model.params import select_parameters

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    chosen = select_parameters(model, include=include)
    config = {
        "model": {"pretrained": str(model_dir), "metric": "magnitude", "k": k, "mode": "global", "dtype": "float32"},
        "data": {
            "source": "pydoc",
            "seq_len": 16,
            "num_samples": 4,
            "batch_size": 4,
            "heldout_fraction": heldout_fraction,
            "heldout_samples": 6,
            "seed": 0,
        },
    }
    return write_run(
        root / "run",
        {n: p.detach().abs() for n, (p, _) in chosen.items()},
        weights={n: p for n, (p, _) in chosen.items()},
        infos={n: i for n, (_, i) in chosen.items()},
        model=str(model_dir),
        metric={"name": "magnitude"},
        k=k,
        save_scores=scores,
        config=config,
        tensors={n: {"shape": list(p.shape), "numel": p.numel()} for n, (p, _) in chosen.items()},
        dtype="float32",
    )


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _quick(run: Path, **options):
    from cwa.perturb.recipe import PerturbRecipe

    settings = {"ks": (2,), "single": 1, "seeds": (0,), "controls": ("random_matched",), "bootstrap": 50}
    return PerturbRecipe(run=str(run), **{**settings, **options})


def test_perturb_end_to_end(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    from cwa.ablation.controls import BottomK, MagnitudeMatched, RandomMatched
    from cwa.perturb.recipe import PerturbRecipe
    from cwa.rundir import PerturbRow, Run

    run = make_run(tmp_path, tiny_dir)
    PerturbRecipe(
        run=str(run),
        perturbation=["zero", BitFlip(bit="sign")],
        ks=(1, 5, 20),
        single=2,
        controls=(RandomMatched(), MagnitudeMatched(bins=20), BottomK()),
        seeds=(0, 1),
        bootstrap=200,
        permutations=500,
    ).run()
    columns, rows = _read_csv(latest_set(run) / "perturb.csv")
    assert columns == PerturbRow.columns()
    report = json.loads((latest_set(run) / "perturb.json").read_text())
    # The magnitude top-20 holds all 16 weights of the first RMSNorm (all 1.0 at init): no tensor-matched
    # random control exists there, which is skipped and said, for both seeds and both perturbations.
    skipped = [n for n in report["notes"] if "random_matched/k=20" in n]
    assert len(skipped) == 4 and "too few" in skipped[0]
    per_k = 1 + 2 + 2 + 1  # top-K, two seeds of each random control, bottom-K
    assert len(rows) == 1 + 2 * (3 * per_k + 2) - 4
    base = rows[0]
    assert base["target"] == "baseline" and float(base["delta_perplexity"]) == 0.0 and base["p_value"] == ""
    assert float(base["perplexity"]) == pytest.approx(math.exp(float(base["nll"])), rel=1e-4)
    for row in rows[1:]:
        k = int(row["k"]) if row["k"] else 1
        assert int(row["n_weights"]) == k
        if row["target"] in ("topk", "single"):
            assert row["p_value_vs"] == "baseline"
        else:
            assert row["p_value_vs"] == "topk" and 0 < float(row["p_value"]) <= 1
        assert (row["seed"] != "") == (row["target"] in ("random_matched", "magnitude_matched"))
        assert (row["rank"] != "") == (row["target"] == "single")
        low, delta, high = (float(row[c]) for c in ("delta_nll_low", "delta_nll", "delta_nll_high"))
        if math.isfinite(delta):
            assert low <= delta + 1e-9 and delta <= high + 1e-9
    # Zeroing the 20 largest weights must hurt more than zeroing 20 of the smallest.
    top20 = next(r for r in rows if r["condition"] == "zero/topk/k=20")
    bottom20 = next(r for r in rows if r["condition"] == "zero/bottomk/k=20")
    assert float(top20["delta_nll"]) > float(bottom20["delta_nll"])
    assert report["status"] == "complete" and report["heldout"]["sequences"] == 6
    assert report["baseline"]["torchmetrics_relative_gap"] < 1e-4
    assert report["timings"]["mean_eval_s_per_condition"] > 0
    assert report["settings"]["controls"][1] == {"name": "magnitude_matched", "bins": 20}
    assert (latest_set(run) / "figures" / "perturb_dose_response.png").stat().st_size > 1000
    assert (latest_set(run) / "figures" / "perturb_single_weight.png").stat().st_size > 1000
    assert list(run.glob("events.out.tfevents.*"))
    assert Run.load(run).perturbation.rows[0].target == "baseline"  # the set reads back through rundir
    out = capsys.readouterr().out
    assert "cwa perturb" in out and "baseline: perplexity" in out


def test_perturb_without_scores_skips_bottomk(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path, tiny_dir, scores=False)
    _quick(run, single=0, controls=("random_matched", "bottomk"), figures=False, tensorboard=False).run()
    _, rows = _read_csv(latest_set(run) / "perturb.csv")
    assert [r["target"] for r in rows] == ["baseline", "topk", "random_matched"]
    assert "bottom-K skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--run", "{empty}"], "has no summary.json"),
        (["--run", "{run}", "--ks", "[1,61]"], "K=61 is larger than the run's top-K list"),
        (
            ["--run", "{run}", "--perturbation", "BitFlip", "--perturbation.bit", "32"],
            "bit index 32 is outside the fp32 format",
        ),
        (
            ["--run", "{run}", "--perturbation", "shuffle"],
            ("unknown perturbation 'shuffle' for --perturbation", "zero, mean, sign_flip"),
        ),
        (["--run", "{run}", "--pairs", "21"], ("pairs=21 would evaluate 210 pairs", "at most 20")),
        (["--run", "{run}", "--leave_one_out", "1"], "leave_one_out needs a set of at least 2"),
        (["--run", "{run}", "--units", "[row,neuron]"], "--units"),
        (["--run", "{run}", "--heldout_samples", "0"], "held-out split is empty"),
        (["--run", "{no_heldout}"], "held-out split is empty"),
        (["--run", "{run}", "--heldout_samples", "1"], ("1 held-out sequence cannot reach 0.95", "at least 6")),
        (["--run", "{run}", "--heldout_samples", "2"], ("2 held-out sequences cannot reach 0.95", "at least 6")),
        (["--run", "{run}", "--heldout_samples", "4", "--confidence", "0.9"], ("cannot reach 0.9 ", "at least 5")),
        (["--run", "{run}", "--controls", "[nearby]"], ("unknown control 'nearby' for --controls", "bottomk")),
        (["--run", "{run}", "--perturbation", "Scale", "--perturbation.factor", "x"], ("--perturbation.factor", "'x'")),
        (["--run", "{run}", "--ks", "[a]"], ("--ks", "a")),
    ],
)
def test_bad_input_is_one_clear_sentence(
    tiny_dir: Path, tmp_path: Path, capsys, args: list[str], message: str | tuple[str, ...]
) -> None:
    from cwa.cli import main

    paths = {"empty": tmp_path / "empty", "run": tmp_path / "ok" / "run", "no_heldout": tmp_path / "nh" / "run"}
    paths["empty"].mkdir()
    if "{run}" in args:
        make_run(tmp_path / "ok", tiny_dir)
    if "{no_heldout}" in args:
        make_run(tmp_path / "nh", tiny_dir, heldout_fraction=0.0)
    base = ["--ks", "[1]", "--single", "1", "--figures", "false", "--tensorboard", "false"]
    argv = ["perturb", *base, *[a.format(**paths) for a in args]]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cwa: error: "), err
    assert all(part in err[0] for part in ((message,) if isinstance(message, str) else message)), err


def test_short_names_and_classes_parse_from_the_signature() -> None:
    """The command line of the recipe's typed signature: short names, lists of them, and classes with options."""
    from cwa.ablation.controls import MagnitudeMatched
    from cwa.cli import build_parser

    def parsed(*args: str):
        cli, _ = build_parser("perturb")
        return cli.instantiate_classes(cli.parse_args(["--run", "x", *args]))

    assert parsed("--perturbation", "zero").perturbation == "zero"
    assert parsed("--perturbation", "[zero,sign_flip]").perturbation == ["zero", "sign_flip"]
    got = parsed("--controls", "[random_matched,bottomk]", "--ks", "[1,10,100]", "--seeds", "[0,1]")
    assert got.controls == ("random_matched", "bottomk") and got.ks == (1, 10, 100) and got.seeds == (0, 1)
    assert parsed("--perturbation", "Scale", "--perturbation.factor", "2").perturbation == Scale(factor=2.0)
    got = parsed("--controls", "[bottomk, {class_path: MagnitudeMatched, init_args: {bins: 7}}]")
    assert got.controls[0] == "bottomk" and isinstance(got.controls[1], MagnitudeMatched)
    assert got.controls[1].bins == 7


def test_the_help_documents_the_choices_and_class_options(capsys) -> None:
    from cwa.cli import main

    with pytest.raises(SystemExit):
        main(["perturb", "-h"])
    text = capsys.readouterr().out
    assert "'gaussian_noise'" in text and "'magnitude_matched'" in text and "--trust_remote_code" in text
    with pytest.raises(SystemExit):
        main(["perturb", "--perturbation.help", "GaussianNoise"])
    text = capsys.readouterr().out
    assert "--perturbation.sigma" in text and "tensor_std" in text


# -- issue 9: nothing runs from a run directory, outputs change together, unfinished runs refused ---------
def test_an_incomplete_run_is_refused_in_one_sentence(tiny_dir: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path, tiny_dir)
    (run / "summary.json").unlink()
    with pytest.raises(CwaError, match="has no summary.json"):
        _quick(run).run()
    assert not (run / "perturb.csv").exists() and not (run / "perturb").exists()


def _outputs(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["figure", "json"])
def test_an_interrupted_perturb_leaves_the_previous_set(
    tiny_dir: Path, tmp_path: Path, monkeypatch, where: str
) -> None:
    import cwa.perturb.figures
    import cwa.rundir.perturbation

    run = make_run(tmp_path, tiny_dir)
    _quick(run, tensorboard=False).run()
    before = _outputs(run)
    assert {"perturb/1/perturb.csv", "perturb/1/perturb.json", "perturb/1/figures/perturb_dose_response.png"} <= set(
        before
    )

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "figure":
        monkeypatch.setattr(cwa.perturb.figures, "single_weight", interrupt)
    else:
        monkeypatch.setattr(cwa.rundir.perturbation, "write_json", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _quick(run, ks=(1, 2), seeds=(1,), tensorboard=False).run()  # different settings: a different csv
    assert _outputs(run) == before  # the previous set untouched, and nothing of the new one (no perturb/2)


@pytest.mark.parametrize(
    "class_path",
    ["os.system", "subprocess.Popen", "evil_module.Source", "cwa.perturb.recipe.PerturbRecipe", "cwa.nowhere.X"],
)
def test_a_crafted_class_path_in_the_config_runs_nothing(
    tiny_dir: Path, tmp_path: Path, monkeypatch, class_path: str
) -> None:
    import sys

    import yaml

    run = make_run(tmp_path, tiny_dir)
    marker = tmp_path / "marker"
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Source: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["source"] = {"class_path": class_path, "init_args": {"command": f"touch {marker}"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CwaError, match="not one of cwa's TextSource classes"):
        _quick(run, figures=False, tensorboard=False).run()
    assert not marker.exists() and "evil_module" not in sys.modules
    assert not (run / "perturb.csv").exists() and not (run / "perturb").exists()


def test_a_cwa_text_source_and_every_data_setting_are_carried_over(tiny_dir: Path, tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    import yaml

    from cwa.perturb.run_data import build_data
    from cwa.rundir import Run

    run = make_run(tmp_path, tiny_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["source"] = {"class_path": "cwa.fit.data.TextFiles", "init_args": {"paths": [str(corpus)]}}
    config["data"]["num_workers"] = 0
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    data = build_data(Run.load(run), batch_size=3)
    assert data.source.paths == [str(corpus)] and data.seq_len == 16 and data.batch_size == 3
    assert data.heldout_samples == 6 and data.heldout.shape == (6, 16)
    config["data"]["shuffle_blocks"] = True  # an argument CalibrationData does not have
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CwaError, match="does not fit CalibrationData"):
        build_data(Run.load(run))


def test_trust_remote_code_comes_only_from_the_command(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import yaml

    import cwa.model.loading

    run = make_run(tmp_path, tiny_dir)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    seen = []
    load_model = cwa.model.loading.load_model

    def spy(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return load_model(*args, **kwargs)

    monkeypatch.setattr(cwa.model.loading, "load_model", spy)
    _quick(run, figures=False, tensorboard=False).run()
    _quick(run, figures=False, tensorboard=False, trust_remote_code=True).run()
    assert seen == [False, True]


def test_fit_config_runs_fit_sensitivity_first(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import yaml

    from cwa.perturb.recipe import PerturbRecipe

    monkeypatch.chdir(tmp_path)
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": "tiny", "default_hp_metric": False},
            },
        },
        "model": {"pretrained": str(tiny_dir), "metric": "magnitude", "k": 8},
        "data": {"source": "pydoc", "seq_len": 16, "num_samples": 2, "heldout_samples": 6},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    run_dir = PerturbRecipe(
        fit_config=str(tmp_path / "fit.yaml"),
        fit_args=["--model.k", "6"],
        ks=(1, 6),
        single=2,
        seeds=(0,),
        controls=("random_matched",),
        bootstrap=50,
        figures=False,
        tensorboard=False,
    ).run()
    assert run_dir.parent.name == "tiny" and (run_dir / "topk.csv").exists()
    _, rows = _read_csv(latest_set(run_dir) / "perturb.csv")
    assert [r["condition"] for r in rows] == [
        "baseline", "zero/topk/k=1", "zero/random_matched/k=1/seed=0", "zero/topk/k=6",
        "zero/random_matched/k=6/seed=0", "zero/single/rank=1", "zero/single/rank=2",
    ]  # fmt: skip


def test_the_config_parses(capsys) -> None:
    from cwa.cli import main

    config = Path(__file__).resolve().parent.parent / "configs" / "perturb-smollm2.yaml"
    assert config.read_text().startswith("# cwa perturb --config configs/perturb-smollm2.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["perturb", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "ks:" in printed and "fit_config:" in printed and "bins: 100" in printed


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path: Path) -> None:
    """The embedded SmolLM2-135M with tiny settings: magnitude top-K, a few held-out blocks."""
    import yaml

    from cwa.perturb.recipe import PerturbRecipe

    config = {
        "trainer": {
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path), "name": "smol"},
            }
        },
        "model": {"pretrained": "smollm2-135m", "metric": "magnitude", "k": 10},
        "data": {"source": "pydoc", "seq_len": 64, "num_samples": 1, "heldout_samples": 6},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    recipe = PerturbRecipe(fit_config=str(tmp_path / "fit.yaml"), ks=(1, 10), single=2, seeds=(0,), bootstrap=100)
    run_dir = recipe.run()
    _, rows = _read_csv(latest_set(run_dir) / "perturb.csv")
    assert len(rows) == 1 + 2 * 4 + 2
    assert 5 < float(rows[0]["perplexity"]) < 200


def test_the_short_names_are_the_registries() -> None:
    """The Literal types that -h shows list exactly the registered classes."""
    from typing import get_args

    from cwa.ablation.controls import CONTROLS, ControlName
    from cwa.ablation.perturbations import PERTURBATIONS, PerturbationName

    assert list(get_args(PerturbationName)) == list(PERTURBATIONS)
    assert list(get_args(ControlName)) == list(CONTROLS)
    assert all(cls.name == name for name, cls in {**PERTURBATIONS, **CONTROLS}.items())


def test_perturb_removes_the_temporaries_a_killed_perturb_left(tiny_dir: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path, tiny_dir)
    stale = [run / ".perturb.csv.4242.staged.tmp", run / "figures" / ".perturb_dose_response.png.a1b2c3.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half-written")
    _quick(run, tensorboard=False).run()
    assert not any(path.exists() for path in stale)
    assert (latest_set(run) / "perturb.csv").is_file() and not list(run.rglob("*.tmp"))


# -- extension points on their classes ------------------------------------------------------------
def test_a_control_defined_here_is_drawn_in_the_dose_response_figure(
    tiny_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A control that declares no figure style gets a free colour and its name as the label; one that declares
    a style is drawn with it; neither touches cwa/perturb/figures.py. The console table names their columns."""
    from cwa.ablation.controls import Control, FigureStyle, random_matched
    from cwa.ablation.perturbations import seeded
    from cwa.perturb import figures as perturb_figures

    class Unstyled(Control):
        name = "unstyled"

        def select(self, k, seed):
            target = topk_prefix(self.context.topk, k)
            return random_matched(self.context.params, target, seeded(seed or 0, k, 41))

    class Styled(Unstyled):
        name = "styled"
        style = FigureStyle("my control", "tab:brown", "P")

    drawn = {}

    def keep(fig, path: Path) -> None:
        drawn[path.name.split(".")[-2]] = fig  # the staged file name ends in <figure>.<id>.tmp or <figure>.png
        path.write_bytes(b"png")

    monkeypatch.setattr(perturb_figures, "_save", keep)
    run = make_run(tmp_path, tiny_dir)
    _quick(run, ks=(1, 2, 4), single=0, controls=("random_matched", Unstyled(), Styled()), tensorboard=False).run()
    (fig,) = drawn.values()
    (ax,) = [a for a in fig.axes if a.get_visible()]
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == list(lines) == ["top-K", "random, matched per tensor", "unstyled", "my control"]
    assert lines["unstyled"].get_color() == perturb_figures.FREE_COLORS[0]  # orange: no other line uses it
    assert (lines["my control"].get_color(), lines["my control"].get_marker()) == ("tab:brown", "P")
    _, rows = _read_csv(latest_set(run) / "perturb.csv")
    for name, label in (("unstyled", "unstyled"), ("styled", "my control")):
        mine = [r for r in rows if r["target"] == name]
        assert list(lines[label].get_xdata()) == [1, 2, 4]
        assert list(lines[label].get_ydata()) == pytest.approx([float(r["delta_perplexity"]) for r in mine])
    header = next(line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["K"])
    assert header == ["K", "top-K", "random", "unstyled", "my", "control"]


def test_a_condition_kind_is_typed_and_writes_the_same_strings() -> None:
    from cwa.ablation.controls import RandomMatched
    from cwa.perturb.evaluate import Condition
    from cwa.rundir import ConditionKind, PerturbRow

    assert [k.value for k in ConditionKind] == ["baseline", "topk", "single", "leave_one_out", "pair", "control"]
    assert Condition(Zero(), ConditionKind.TOPK, 5).target == "topk"
    loo = Condition(Zero(), ConditionKind.LEAVE_ONE_OUT, 3, rank=2)
    assert (loo.target, loo.name, loo.is_control) == ("leave_one_out", "zero/leave_one_out/k=3/without=2", False)
    control = Condition(Zero(), ConditionKind.CONTROL, 5, seed=1, control=RandomMatched())
    assert (control.target, control.name, control.is_control) == (
        "random_matched",
        "zero/random_matched/k=5/seed=1",
        True,
    )
    with pytest.raises(ValueError, match="control"):
        Condition(Zero(), ConditionKind.CONTROL, 5)
    with pytest.raises(ValueError, match="control"):
        Condition(Zero(), ConditionKind.TOPK, 5, control=RandomMatched())
    # Rows of a perturb.csv written before the enum existed: the target cell decides the kind.
    cells = {c: "" for c in PerturbRow.columns()} | {"n_weights": "1", "perplexity": "1", "nll": "0", "accuracy": "0"}
    cells |= {c: "0" for c in PerturbRow.columns() if c.startswith("delta_")}
    kinds = {t: PerturbRow.parse(cells | {"target": t}).kind for t in ("baseline", "pair", "bottomk", "my_control")}
    assert kinds == {
        "baseline": ConditionKind.BASELINE,
        "pair": ConditionKind.PAIR,
        "bottomk": ConditionKind.CONTROL,
        "my_control": ConditionKind.CONTROL,
    }
    assert PerturbRow.parse(cells | {"target": "topk"}).cells()[2] == "topk"


def test_a_figure_that_fails_costs_no_results(tiny_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A figure that raises (a bit flip's rows once gave matplotlib "Data cannot be log-scaled") leaves the
    csv and json written, the other figures drawn, and a note on the console and in perturb.json."""
    import cwa.perturb.figures

    def fail(*args, **kwargs):
        raise ValueError("Data cannot be log-scaled")

    monkeypatch.setattr(cwa.perturb.figures, "single_weight", fail)
    run = make_run(tmp_path, tiny_dir)
    _quick(run, tensorboard=False).run()
    outputs = _outputs(latest_set(run))
    assert {"perturb.csv", "perturb.json", "figures/perturb_dose_response.png"} <= set(outputs)
    assert "figures/perturb_single_weight.png" not in outputs
    notes = json.loads(outputs["perturb.json"])["figure_notes"]
    assert len(notes) == 1 and "perturb_single_weight.png" in notes[0] and "log-scaled" in notes[0]
    assert "perturb_single_weight.png was not drawn" in capsys.readouterr().out


def test_the_dose_response_figure_draws_rows_that_broke_the_model(tiny_dir: Path, tmp_path: Path) -> None:
    """A bit flip to inf leaves every Δ NaN (broken sequences): the figure leaves those points out instead of
    raising matplotlib's "Data cannot be log-scaled"."""
    from dataclasses import replace

    from cwa.perturb.figures import dose_response
    from cwa.rundir import read_perturb_csv

    run = make_run(tmp_path, tiny_dir)
    _quick(run, tensorboard=False, figures=False).run()
    rows = read_perturb_csv(latest_set(run) / "perturb.csv")
    nan = math.nan
    broken = [rows[0], *(replace(r, delta_perplexity=nan, delta_perplexity_low=nan) for r in rows[1:])]
    dose_response(broken, "broken", tmp_path / "dose.png")


def test_default_ks_are_cut_to_the_runs_list_with_a_note(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    """The README's `cwa perturb --run` after a default fit-sensitivity run: the default ks reach 10,000, the
    run's list is shorter (60 here, 100 by default); the ks above it are left out with a note, the list's length
    is the last K, and a K given on the command line is still refused when too large."""
    from cwa.cli import main
    from cwa.rundir import read_perturb_csv

    run = make_run(tmp_path, tiny_dir)
    quick = ["--single", "1", "--controls", "[]", "--figures", "false", "--tensorboard", "false", "--bootstrap", "50"]
    assert main(["perturb", "--run", str(run), *quick]) == 0
    rows = read_perturb_csv(latest_set(run) / "perturb.csv")
    assert sorted({r.k for r in rows if r.target == "topk"}) == [1, 10, 60]
    assert "default ks 100, 1000, 10000 left out: the run's top-K list holds 60 weights" in capsys.readouterr().out
    assert main(["perturb", "--run", str(run), "--ks", "[1,100]", *quick]) == 1
    assert "K=100 is larger than the run's top-K list" in capsys.readouterr().err

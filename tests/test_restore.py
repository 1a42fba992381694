"""Activation restore: which output channels a selection writes, recording and replaying them with forward
hooks (exact recovery, partial restores, spike tokens), the recovered fraction's interval, and
``cwa perturb --restore`` end to end on a tiny Llama."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from cwa.ablation.perturbations import Scale, Zero, perturbed
from cwa.ablation.restore import output_channels, recording, recovered_fraction, replaying
from cwa.ablation.stats import SequenceStats, bootstrap_weights
from cwa.common.errors import CwaError
from cwa.perturb.evaluate import evaluate
from tests.conftest import random_blocks, tiny_gpt2, tiny_llama

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model: nn.Module, blocks: torch.Tensor, batch_size: int, before_batch=None) -> torch.Tensor:
    """The logits of every batch, in evaluate()'s batch order, calling ``before_batch`` as it does."""
    out = []
    with torch.inference_mode():
        for batch, first in enumerate(range(0, blocks.shape[0], batch_size)):
            if before_batch is not None:
                before_batch(batch)
            out.append(model(input_ids=blocks[first : first + batch_size]).logits)
    return torch.cat(out)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# -- which channels --------------------------------------------------------------------------------
def test_output_channels_follow_each_layout() -> None:
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    down = "model.layers.1.mlp.down_proj.weight"  # Linear (out=16, in=24): flat = row * 24 + col
    got = output_channels(llama, {down: torch.tensor([5 * 24 + 3, 5 * 24 + 7, 9 * 24 + 0])})
    assert list(got) == ["model.layers.1.mlp.down_proj"] and got["model.layers.1.mlp.down_proj"].tolist() == [5, 9]
    norm = "model.layers.0.input_layernorm.weight"
    assert output_channels(llama, {norm: torch.tensor([2, 11])})["model.layers.0.input_layernorm"].tolist() == [2, 11]
    embed = "model.embed_tokens.weight"  # (vocab, 16): entry [token, dim] writes channel dim
    assert output_channels(llama, {embed: torch.tensor([3 * 16 + 4, 40 * 16 + 4])})["model.embed_tokens"].tolist() == [
        4
    ]
    proj = "transformer.h.0.mlp.c_proj.weight"  # Conv1D stored (in=64, out=16): flat = col * 16 + row
    assert output_channels(gpt2, {proj: torch.tensor([10 * 16 + 3])})["transformer.h.0.mlp.c_proj"].tolist() == [3]
    bias = "transformer.h.0.mlp.c_proj.bias"
    assert output_channels(gpt2, {proj: torch.tensor([1]), bias: torch.tensor([6])})[
        "transformer.h.0.mlp.c_proj"
    ].tolist() == [1, 6]


def test_too_many_channels_are_refused_in_one_sentence() -> None:
    from cwa.ablation import restore

    llama = tiny_llama()
    down = "model.layers.0.mlp.down_proj.weight"
    original = restore.MAX_RESTORE_CHANNELS
    restore.MAX_RESTORE_CHANNELS = 3
    try:
        with pytest.raises(CwaError, match="would record 4 output channels"):
            output_channels(llama, {down: torch.tensor([0, 24, 48, 72])})
    finally:
        restore.MAX_RESTORE_CHANNELS = original


# -- exact recovery --------------------------------------------------------------------------------
CASES = [
    ("llama", "model.layers.1.mlp.down_proj.weight", [7 * 24 + 5]),  # one weight of row 7
    ("llama", "model.layers.1.mlp.down_proj.weight", [7 * 24 + c for c in range(24)]),  # the whole row 7
    ("gpt2", "transformer.h.1.mlp.c_proj.weight", [5 * 16 + 7]),  # Conv1D (in, out): row 7, column 5
    ("gpt2", "transformer.h.1.mlp.c_proj.weight", [c * 16 + 7 for c in range(64)]),  # the whole row 7
]


@pytest.mark.parametrize(("arch", "name", "flat"), CASES, ids=["llama-weight", "llama-row", "gpt2-weight", "gpt2-row"])
def test_restore_all_recovers_a_perturbation_through_its_channel_exactly(arch: str, name: str, flat: list[int]) -> None:
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    params = {name: dict(model.named_parameters())[name].data}
    selection = {name: torch.tensor(flat)}
    blocks = random_blocks(5, 12)
    channels = output_channels(model, selection)
    assert [c.tolist() for c in channels.values()] == [[7]]
    with recording(model, channels) as recorder:
        base_logits = _logits(model, blocks, 2, recorder.at_batch)
    with recording(model, channels) as again:
        base = evaluate(model, blocks, 2, CPU, again.at_batch)
    assert _hooks(model) == 0
    with perturbed(params, selection, Scale(factor=-40.0)):
        hurt_logits = _logits(model, blocks, 2)
        hurt = evaluate(model, blocks, 2, CPU)
        with replaying(model, recorder, channels, "all") as replayer:
            mended_logits = _logits(model, blocks, 2, replayer.at_batch)
            replayer.at_batch(0)
            mended = evaluate(model, blocks, 2, CPU, replayer.at_batch)
    assert _hooks(model) == 0
    assert not torch.allclose(hurt_logits, base_logits, atol=1e-4)  # the perturbation does something
    assert torch.equal(mended_logits, base_logits)  # bit for bit: the module outputs are the baseline's
    assert replayer.restored == 2 * 5 * 12  # two passes, every token of one channel
    assert abs(hurt.stats.mean_nll - base.stats.mean_nll) > 1e-4  # a random model: damage of either sign
    fraction, low, high = recovered_fraction(base.stats, hurt.stats, mended.stats, bootstrap_weights(5, 200))
    assert fraction == pytest.approx(1.0, abs=1e-6) and low == pytest.approx(1.0, abs=1e-6)
    assert high == pytest.approx(1.0, abs=1e-6)


def test_restoring_one_of_two_channels_leaves_exactly_the_other_perturbation() -> None:
    """Two weights in output rows 3 and 9 of a down-projection: restoring row 3 only gives the model with
    only the row-9 weight perturbed (everything before the projection is unperturbed), which is neither the
    baseline nor the doubly perturbed model."""
    model = tiny_llama()
    name = "model.layers.0.mlp.down_proj.weight"
    params = {name: dict(model.named_parameters())[name].data}
    module = "model.layers.0.mlp.down_proj"
    both, only_nine = {name: torch.tensor([3 * 24 + 2, 9 * 24 + 4])}, {name: torch.tensor([9 * 24 + 4])}
    blocks = random_blocks(4, 10, seed=1)
    with recording(model, output_channels(model, both)) as recorder:
        base = _logits(model, blocks, 3, recorder.at_batch)
    with perturbed(params, only_nine, Scale(factor=-60.0)):
        nine = _logits(model, blocks, 3)
    with perturbed(params, both, Scale(factor=-60.0)):
        hurt = _logits(model, blocks, 3)
        with replaying(model, recorder, {module: torch.tensor([3])}, "all") as replayer:
            mended = _logits(model, blocks, 3, replayer.at_batch)
    assert torch.equal(mended, nine)
    assert not torch.allclose(mended, base, atol=1e-4) and not torch.allclose(mended, hurt, atol=1e-4)
    assert _hooks(model) == 0 and torch.equal(_logits(model, blocks, 3), base)


def test_hooks_are_removed_on_error() -> None:
    model = tiny_llama()
    channels = {"model.layers.0.mlp.down_proj": torch.tensor([1])}
    with pytest.raises(RuntimeError, match="boom"), recording(model, channels) as recorder:
        _logits(model, random_blocks(2, 6), 2, recorder.at_batch)
        raise RuntimeError("boom")
    assert _hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"), replaying(model, recorder, channels, "spikes"):
        assert _hooks(model) == 1
        raise RuntimeError("boom")
    assert _hooks(model) == 0


# -- spike tokens ----------------------------------------------------------------------------------
def test_spikes_restores_exactly_the_tokens_over_the_threshold() -> None:
    """An embedding plants a massive value in channel 1 of a Linear output at token 7; zeroing the weight
    that carries it and restoring spikes writes back exactly the tokens with |value| ≥ 10 · median."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3, 4))  # output channel c = input channel c
        model[0].weight[:, 1] = torch.tensor([0.5, -1.0, 2.0, 1.5, -0.7, 0.9, 1.1, 60.0, -25.0, 0.2])
    blocks = torch.tensor([[0, 7, 2, 3, 1], [8, 4, 5, 7, 6], [9, 2, 1, 0, 3]])
    batches = [blocks[:2], blocks[2:]]
    values = [float(model[0].weight[int(t), 1]) for t in blocks.reshape(-1)]
    median = statistics.median(abs(v) for v in values)
    expected = torch.tensor([abs(v) >= 10 * median for v in values]).view(3, 5)
    assert int(expected.sum()) == 3  # tokens 7 (twice) and 8 (|-25| ≥ 10 · 1.1); 2.0 is not
    channels = {"1": torch.tensor([1])}
    with torch.no_grad(), recording(model, channels) as recorder:
        for i, batch in enumerate(batches):
            recorder.at_batch(i)
            model(batch)
    assert recorder.magnitude_median("1").item() == pytest.approx(median)
    with (
        torch.no_grad(),
        perturbed({"w": model[1].weight.data}, {"w": torch.tensor([1 * 4 + 1])}, Zero()),
        replaying(model, recorder, channels, "spikes", threshold=10.0) as replayer,
    ):
        out = []
        for i, batch in enumerate(batches):
            replayer.at_batch(i)
            out.append(model(batch)[..., 1])
    got = torch.cat(out)
    planted = model[0].weight[blocks, 1].detach()
    assert replayer.restored == 3
    assert torch.equal(got, torch.where(expected, planted, torch.zeros_like(planted)))


# -- the recovered fraction ------------------------------------------------------------------------
def _stats(n: int, seed: int) -> tuple[SequenceStats, SequenceStats, SequenceStats]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(20, 60, (n,), generator=g).double()
    base = tokens * (2.0 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64))
    damage = tokens * torch.distributions.Exponential(2.0).sample((n,)).double()  # skewed, as in real runs
    hurt = base + damage
    mended = hurt - damage * (0.4 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64))
    zeros = torch.zeros(n, dtype=torch.float64)
    return SequenceStats(base, tokens, zeros), SequenceStats(hurt, tokens, zeros), SequenceStats(mended, tokens, zeros)


def _hand_interval(base, hurt, mended, weights, confidence):
    """A loop over resamples: f = (P − R) / (P − B) from weighted means, its standard error from autograd
    (the delta method: se² = Σ w_i (∂f/∂w_i)²), equal-tailed quantiles of the roots (f* − f) / se*."""

    def fraction_and_se(w: torch.Tensor) -> tuple[float, float]:
        w = w.clone().requires_grad_(True)
        mean = lambda s: (w * s.nll).sum() / (w * s.tokens).sum()  # noqa: E731
        f = (mean(hurt) - mean(mended)) / (mean(hurt) - mean(base))
        (grad,) = torch.autograd.grad(f, w)
        return float(f), float((w.detach() * grad.square()).sum().sqrt())

    f, se = fraction_and_se(torch.ones(len(base), dtype=torch.float64))
    roots = []
    for row in weights:
        f_star, se_star = fraction_and_se(row)
        roots.append((f_star - f) / se_star)
    alpha = (1 - confidence) / 2
    q = torch.quantile(torch.tensor(roots, dtype=torch.float64), torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return f, f - float(q[1]) * se, f - float(q[0]) * se


def test_recovered_fraction_interval_equals_a_hand_written_bootstrap() -> None:
    base, hurt, mended = _stats(24, seed=3)
    weights = bootstrap_weights(24, 300, seed=0)
    got = recovered_fraction(base, hurt, mended, weights, 0.9)
    expected = _hand_interval(base, hurt, mended, weights, 0.9)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 0.4 < got[0] < 0.7 and got[1] < got[0] < got[2]


def test_recovered_fraction_is_undefined_without_damage() -> None:
    base, hurt, mended = _stats(10, seed=4)
    weights = bootstrap_weights(10, 50)
    fraction, low, high = recovered_fraction(base, hurt, mended, weights, damage_interval=(-0.1, 0.3))
    assert math.isfinite(fraction) and low is None and high is None
    assert recovered_fraction(base, base, mended, weights)[0] != recovered_fraction(base, base, mended, weights)[0]
    broken = SequenceStats(hurt.nll.clone().index_fill_(0, torch.tensor([2]), math.inf), hurt.tokens, hurt.correct)
    assert recovered_fraction(base, broken, mended, weights)[1:] == (None, None)


# -- cwa perturb --restore -------------------------------------------------------------------------
from tests.test_perturb import make_run, tiny_dir  # noqa: E402, F401  (tiny_dir: the fixture)


def test_perturb_restore_end_to_end(tiny_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    """The magnitude top-K of a freshly initialized Llama is RMSNorm scales (all 1.0): zeroing one acts only
    through its norm's output channel, so restoring every token of it recovers exactly all of the damage."""
    from cwa.cli import main
    from cwa.rundir import PerturbRow, Run

    run = make_run(tmp_path, tiny_dir)
    argv = ["perturb", "--run", str(run), "--ks", "[1,5]", "--single", "2", "--controls", "[random_matched]"]
    argv += ["--seeds", "[0]", "--restore", "[all,spikes]", "--bootstrap", "100", "--permutations", "200"]
    assert main([*argv, "--figures", "false", "--tensorboard", "false"]) == 0
    with open(run / "perturb" / "1" / "perturb.csv", newline="") as handle:
        columns = list(csv.DictReader(handle).fieldnames or [])
    assert columns == PerturbRow.columns() and columns[-5:] == [
        "restore", "recovered_fraction", "recovered_fraction_low", "recovered_fraction_high", "restored_tokens",
    ]  # fmt: skip
    rows = Run.load(run).perturbation.rows
    twins = lambda name: [name, f"{name}/restore=all", f"{name}/restore=spikes"]  # noqa: E731
    assert [r.condition for r in rows] == [
        "baseline", *twins("zero/topk/k=1"), "zero/random_matched/k=1/seed=0", *twins("zero/topk/k=5"),
        "zero/random_matched/k=5/seed=0", *twins("zero/single/rank=1"), *twins("zero/single/rank=2"),
    ]  # fmt: skip
    sequences, tokens = 6, 16
    for row in rows:
        if not row.restore:
            assert row.recovered_fraction is None and row.restored_tokens is None
            continue
        assert row.p_value_vs == row.condition.rsplit("/restore=", 1)[0] and 0 < row.p_value <= 1
        channels = row.k if row.target == "topk" else 1  # the top weights are distinct entries of norm scales
        if row.restore == "all":
            assert row.recovered_fraction == pytest.approx(1.0, abs=1e-6)
            assert row.delta_nll == pytest.approx(0.0, abs=1e-9)
            assert row.restored_tokens == sequences * tokens * channels
        else:
            assert 0 <= row.restored_tokens < sequences * tokens * channels
    out = capsys.readouterr().out
    assert "restore all on zero/single/rank=1: " in out and "restore spikes on zero/topk/k=5: " in out
    assert out.count("restore all on") == 4
    assert main(["report", str(run), "--output", str(tmp_path / "report" / "report.md")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| recovered [95% CI] |" in report and "| 100% [100%, 100%] |" in report


def test_old_perturb_rows_parse_without_the_restore_columns() -> None:
    from cwa.rundir import PerturbRow

    old = {name: "1" for name in PerturbRow.columns()[:22]} | {"condition": "zero/topk/k=1", "p_value_vs": "baseline"}
    row = PerturbRow.parse(old)
    assert row.restore == "" and row.recovered_fraction is None and row.restored_tokens is None


def test_a_bad_restore_mode_is_one_clear_sentence(tiny_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    from cwa.cli import main

    run = make_run(tmp_path, tiny_dir)
    assert main(["perturb", "--run", str(run), "--restore", "[some]"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cwa: error: ") and "restore" in err[0], err


def test_restore_all_undoes_a_whole_row_or_column_of_a_down_projection(
    tiny_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Units and restore together: a down-projection row acts only through its output channel and a column
    only through every output channel of that module, so restoring all tokens of the channels the unit
    writes recovers exactly all of the damage, for every unit."""
    from cwa.cli import main
    from cwa.rundir import Run

    run = make_run(tmp_path, tiny_dir, k=5, include=r".*mlp\.down_proj\.weight")
    argv = ["perturb", "--run", str(run), "--ks", "[2]", "--single", "1", "--controls", "[]", "--perturbation"]
    argv += ["[zero,mean]", "--units", "[weight,row,column]", "--restore", "[all]", "--bootstrap", "50"]
    assert main([*argv, "--permutations", "50", "--figures", "false", "--tensorboard", "false"]) == 0
    rows = Run.load(run).perturbation.rows
    restored = [r for r in rows if r.restore]
    assert len(restored) == 2 * 3 * 2  # perturbations x units x (top-2, rank 1)
    for row in restored:
        assert row.delta_nll == pytest.approx(0.0, abs=1e-9), row.condition
        damaged = next(r for r in rows if r.condition == row.p_value_vs)
        assert damaged.unit == row.unit and damaged.n_weights == row.n_weights
        if abs(damaged.delta_nll) > 1e-6:
            assert row.recovered_fraction == pytest.approx(1.0, abs=1e-6), row.condition

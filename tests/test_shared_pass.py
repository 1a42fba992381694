"""One pass, many metrics: each metric of a shared pass equals its own single-metric run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from crash import crash_after
from helpers import fit_args
from safetensors.torch import load_file

from cwa.cli import main
from cwa.common.errors import CwaError
from cwa.model.loss import next_token_nll
from cwa.rundir import Run
from cwa.scoring.metrics import make_scorer
from cwa.scoring.saliency import OBD
from cwa.scoring.scorers import GradSquared
from cwa.scoring.shared_pass import SharedPass
from tests.conftest import tiny_llama

SHARED = ["magnitude", "grad_x_weight", "grad_squared", "wanda", "obd"]
EXACT = {"magnitude", "grad_squared", "obd"}  # the others differ by float rounding (see below)


def _scores(metric, batches) -> dict:
    """Scores of ``metric`` (a name or a list) over ``batches`` on a fresh tiny Llama, in process."""
    model = tiny_llama()
    scorer = make_scorer(metric)
    scorer.bind(dict(model.named_parameters()))
    scorer.attach(model)
    for step, batch in enumerate(batches):
        scorer.set_step(step)
        scorer.update(batch, lambda b: next_token_nll(model, b))
    return scorer.compute_each() if isinstance(scorer, SharedPass) else scorer.compute()


def _batches(rows: int, seq_len: int = 20) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 252, (rows, seq_len), generator=generator)} for _ in range(3)]


@pytest.mark.parametrize("metrics", [SHARED, ["grad_x_weight", "obd"]], ids=["with-grad_squared", "obd-alone"])
def test_micro_batched_pass_equals_each_metric_alone(metrics):
    """Squared metrics see the same micro-batch backward as alone: bit-identical (obd's Fisher is
    grad_squared's, copied, when both are in the pass). grad_x_weight adds t_m * g_m per micro-batch instead
    of one batch gradient, and wanda sums per micro-batch: the same sums in another order."""
    batches = _batches(rows=3)
    shared = _scores(metrics, batches)
    for metric in metrics:
        alone = _scores(metric, batches)
        assert list(shared[metric]) == list(alone), metric
        for name, expected in alone.items():
            if metric in EXACT:
                assert torch.equal(shared[metric][name], expected), (metric, name)
            else:
                scale = float(expected.abs().max())
                torch.testing.assert_close(shared[metric][name], expected, rtol=1e-6, atol=1e-6 * scale)


def test_pass_without_squared_metric_is_bit_identical():
    """Without a squared-gradient metric one forward and backward of each batch serves every member."""
    batches = _batches(rows=3)
    metrics = ["magnitude", "grad_x_weight", "wanda"]
    shared = _scores(metrics, batches)
    for metric in metrics:
        alone = _scores(metric, batches)
        for name, expected in alone.items():
            assert torch.equal(shared[metric][name], expected), (metric, name)


def test_signed_taylor_obd_and_microbatch_shared():
    """obd's signed_taylor gradient is fed by the shared pass too; fisher_microbatch 2 splits batches of 4."""
    batches = _batches(rows=4)
    shared = _scores([GradSquared(fisher_microbatch=2), OBD(signed_taylor=True, fisher_microbatch=2)], batches)
    assert all(torch.equal(shared["grad_squared"][n], t) for n, t in _scores(GradSquared(2), batches).items())
    for name, expected in _scores(OBD(signed_taylor=True, fisher_microbatch=2), batches).items():
        torch.testing.assert_close(shared["obd"][name], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        (["grad_x_weight", "hutchinson_diag"], "hutchinson_diag cannot share a forward and backward"),
        (["wanda", "obs"], "obs cannot share"),
        (["grad_x_weight", OBD(hessian="hutchinson")], "obd with hessian hutchinson cannot share"),
        (["wanda", "wanda"], "names 'wanda' twice"),
        (["grad_squared", OBD(fisher_microbatch=3)], "must share fisher_microbatch"),
        ([], "empty"),
    ],
)
def test_metrics_that_cannot_share_are_refused(metrics, message):
    with pytest.raises(CwaError, match=message):
        make_scorer(metrics)


def test_a_list_of_one_is_that_metric():
    assert make_scorer(["grad_squared"]).name == "grad_squared"


def test_dry_run_counts_one_gradient_and_every_members_accumulators(tiny_llama_dir, capsys):
    from cwa.fit.module import SensitivityModule
    from cwa.fit.trainer import dry_run_fit_sensitivity

    def plan(metric):
        return dry_run_fit_sensitivity(SensitivityModule(str(tiny_llama_dir), metric=metric), 1, False)

    one, two = plan("grad_x_weight"), plan(["grad_x_weight", "grad_squared", "wanda"])
    assert two.gradients == one.gradients and two.accumulators == 3 * one.accumulators
    assert (
        two.extras["wanda: float64 input sums (per distinct layer input)"]
        == plan("wanda").extras["float64 input sums (per distinct layer input)"]
    )


# -- the command: one complete run directory per metric ------------------------------------------------------


def _args(model_dir: Path, save_dir: Path, *extra: str) -> list[str]:
    settings = {"name": "run", "seq_len": 17, "num_samples": 5, "batch_size": 2, "k": 20, "figures": False}
    return fit_args(model_dir, save_dir, *extra, **settings)


LIST = f"--model.metric=[{', '.join(SHARED)}]"


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("shared")
    out = {}
    for metric in SHARED:
        assert main(_args(tiny_llama_dir, base / metric, f"--model.metric={metric}")) == 0
        out[metric] = base / metric / "run" / "version_0"
    assert main(_args(tiny_llama_dir, base / "shared", LIST)) == 0
    out["shared"] = base / "shared" / "run"
    return out


def _topk(run: Path) -> list[tuple[str, str]]:
    return [(r["parameter"], r["index"]) for r in csv.DictReader((run / "topk.csv").read_text().splitlines())]


def test_each_metric_writes_a_complete_run_equal_to_its_own(runs):
    assert sorted(p.name for p in runs["shared"].iterdir()) == sorted(f"version_0-{m}" for m in SHARED)
    for metric in SHARED:
        alone, shared = runs[metric], runs["shared"] / f"version_0-{metric}"
        a, b = load_file(alone / "scores.safetensors"), load_file(shared / "scores.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            if metric in EXACT:
                assert torch.equal(a[name], b[name]), (metric, name)
            else:
                torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-6 * float(a[name].abs().max()))
        assert _topk(alone) == _topk(shared), metric
        run = Run.load(shared)  # what perturb and report read
        assert run.metric == metric
        summary = json.loads((shared / "summary.json").read_text())
        assert summary["shared_pass"] == SHARED
        assert summary["tokens"] == json.loads((alone / "summary.json").read_text())["tokens"] == 5 * 16
        assert yaml.safe_load((shared / "config.yaml").read_text())["model"]["metric"] == metric
        assert list(shared.glob("events.out.tfevents.*")), "each metric has its TensorBoard histograms"


def test_perturb_reads_a_metric_of_a_shared_pass(runs, tmp_path):
    run = runs["shared"] / "version_0-grad_x_weight"
    assert main(["perturb", f"--run={run}", "--ks=[2]", "--controls=[]", "--heldout_samples=6"]) == 0
    assert (run / "perturb" / "1" / "perturb.csv").exists()


def test_resume_of_a_shared_pass_equals_the_uninterrupted_one(runs, tiny_llama_dir, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_args(tiny_llama_dir, tmp_path / "killed", LIST, "--model.checkpoint_every=1", *crash_after(2)))
    killed = tmp_path / "killed" / "run" / "version_0"
    assert sorted(p.name for p in (killed / "accumulators").iterdir()) == ["rank0-of-1-batch2.safetensors"]
    assert [p.name for p in (tmp_path / "killed" / "run").iterdir()] == ["version_0"]  # no partial metric run
    assert main(_args(tiny_llama_dir, tmp_path / "resumed", LIST, f"--model.resume_from={killed}")) == 0
    for metric in SHARED:
        whole = load_file(runs["shared"] / f"version_0-{metric}" / "scores.safetensors")
        resumed_dir = tmp_path / "resumed" / "run" / f"version_0-{metric}"
        resumed = load_file(resumed_dir / "scores.safetensors")
        for name in whole:
            assert torch.equal(whole[name], resumed[name]), (metric, name)
        assert json.loads((resumed_dir / "summary.json").read_text())["resumed_from"] == 2
    # A different list is refused in one sentence.
    assert (
        main(
            _args(
                tiny_llama_dir, tmp_path / "other", "--model.metric=[magnitude, wanda]", f"--model.resume_from={killed}"
            )
        )
        == 1
    )


# -- two processes: DDP and FSDP2 (the set has grad_squared: the sharded pass takes turns) ----------------------


@pytest.fixture(scope="module")
def two_process_runs(runs, tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    from tests.test_distributed import _run_workers

    base = tmp_path_factory.mktemp("shared-two")
    jobs = [
        {"args": _args(tiny_llama_dir, base / s, LIST, "--trainer.devices=2", f"--trainer.strategy={s}"), "expect": 0}
        for s in ("ddp", "fsdp2")
    ]
    _run_workers(jobs, base)
    return {s: base / s / "run" for s in ("ddp", "fsdp2")}


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_shared_pass_equals_each_metric_alone(runs, two_process_runs, strategy):
    for metric in SHARED:
        alone, shared = runs[metric], two_process_runs[strategy] / f"version_0-{metric}"
        a, b = load_file(alone / "scores.safetensors"), load_file(shared / "scores.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6 * float(a[name].abs().max()))
        assert _topk(alone) == _topk(shared), (strategy, metric)
        summary = json.loads((shared / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["shared_pass"] == SHARED and summary["tokens"] == 5 * 16


def test_seed_experiments_share_a_pass_only_where_only_the_metric_differs(tmp_path, monkeypatch):
    import importlib.util
    import sys

    path = Path(__file__).resolve().parent.parent / "scripts" / "seed_experiments.py"
    spec = importlib.util.spec_from_file_location("seed_experiments", path)
    seed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "seed_experiments", seed)  # dataclasses look their module up there
    spec.loader.exec_module(seed)
    exp = seed.Experiment
    gxw = exp("g", "gpt2.yaml", "grad_x_weight", 10, "global", 5)
    wanda = exp("w", "gpt2.yaml", "wanda", 10, "global", 5)
    plan = [
        (gxw, "g", 0),
        (exp("h", "gpt2.yaml", "hutchinson_diag", 10, "global", 5), "h", 0),  # cannot share
        (wanda, "w", 0),
        (exp("m", "gpt2.yaml", "magnitude", 20, "global", 5), "m", 0),  # another K
        (gxw, "g_again", 0),  # the same metric twice
        (wanda, "w_seed1", 1),  # another seed
    ]
    assert [[name for _, name, _ in group] for group in seed.shared_groups(plan)] == [
        ["g", "w"],
        ["h"],
        ["m"],
        ["g_again"],
        ["w_seed1"],
    ]
    # The seed report's grid: wherever two metrics could share, K, mode or samples differ.
    assert all(len(group) == 1 for group in seed.shared_groups([(e, e.name, 0) for e in seed.SEED_GRID]))
    # A shared pass's metric directories are found under the pass's first experiment, apart from plain runs.
    logs = tmp_path / "lightning_logs"
    for run in ("g/version_0-grad_x_weight", "g/version_0-wanda", "h/version_0", "g/version_1-wanda"):
        (logs / run).mkdir(parents=True)
        (logs / run / "summary.json").write_text(json.dumps({"status": "complete" if "1" not in run else "running"}))
    group = seed.shared_groups(plan)[0]
    assert seed.entry_runs(group[1], group, logs) == {logs / "g" / "version_0-wanda"}
    assert seed.complete_runs(logs / "g") == set() and seed.complete_runs(logs / "h") == {logs / "h" / "version_0"}

"""A metric cwa knows only by ``class_path``: what its class declares reaches the dry run, the summary and
the report, and runs written before metrics declared their facts and descriptions still read the same."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from cwa.cli import main
from cwa.fit.module import SensitivityModule
from cwa.fit.trainer import dry_run_fit_sensitivity
from cwa.rundir import Run, Summary
from cwa.scoring.scorers import Scorer
from cwa.scoring.sizing import gib


class GradMagnitude(Scorer):
    """|g|, g the gradient of the mean calibration NLL: declares nothing beyond its name (the defaults apply)."""

    name = "grad_magnitude"

    def update(self, batch, loss_fn):
        nll, tokens = loss_fn(batch)
        self._count(nll, tokens)
        with self._consume_grads(lambda name, grad: self.acc[name].add_(grad)):
            nll.backward()

    def compute(self):
        self.check_finite()
        return {name: self.acc[name].div(self.tokens).abs() for name in self.params}


class ScaledGradMagnitude(GradMagnitude):
    """|g| times a factor.

    Args:
        factor: the factor.
    """

    name = "scaled_grad_magnitude"
    description = "factor·|g| (a test metric)"

    def __init__(self, factor: float = 2.0) -> None:
        super().__init__()
        self.factor = factor

    def settings(self) -> dict:
        return {"factor": self.factor}

    def facts(self) -> dict:
        return {"zero_gradients": sum(int((a == 0).sum()) for a in self.acc.values())}

    def compute(self):
        return {name: score.mul_(self.factor) for name, score in super().compute().items()}


def test_a_class_path_metric_plans_with_the_default_memory_model(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The default memory model: one float32 accumulator per scored weight, gradients consumed as they come
    (at most the largest tensor's at once), checked by hand from the model's shapes."""
    monkeypatch.chdir(tmp_path)
    metric = json.dumps({"class_path": f"{__name__}.GradMagnitude"})
    args = [f"--model.pretrained={tiny_llama_dir}", f"--model.metric={metric}", "--data.seq_len=32"]
    assert main(["fit-sensitivity", *args, "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "metric grad_magnitude;" in out and list(tmp_path.iterdir()) == []

    module = SensitivityModule(pretrained=str(tiny_llama_dir), metric=GradMagnitude())
    memory = dry_run_fit_sensitivity(module, world_size=1, sharded=False)
    capsys.readouterr()
    from transformers import AutoModelForCausalLM

    sizes = [p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters()]
    assert (memory.weights, memory.gradients, memory.accumulators) == (4 * sum(sizes), 4 * max(sizes), 4 * sum(sizes))
    assert memory.extras == {}
    assert re.search(rf"^total\s+{gib(memory.total, 2**20)}$", out, re.M)  # the CLI printed the same plan (MiB)


def _fit(tmp_path: Path, model_dir: Path, metric: dict) -> Path:
    args = [
        "fit-sensitivity",
        f"--model.pretrained={model_dir}",
        f"--model.metric={json.dumps(metric)}",
        "--model.k=5",
        "--data.seq_len=16",
        "--data.num_samples=2",
        "--data.batch_size=2",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.logger.init_args.name=tiny",
        "--trainer.enable_progress_bar=false",
    ]
    assert main(args) == 0
    return next((tmp_path / "logs" / "tiny").glob("version_*"))


def test_declarations_reach_the_summary_and_the_report(tiny_llama_dir, tmp_path, capsys):
    metric = {"class_path": f"{__name__}.ScaledGradMagnitude", "init_args": {"factor": 3.0}}
    run_dir = _fit(tmp_path, tiny_llama_dir, metric)
    entry = json.loads((run_dir / "summary.json").read_text())["metric"]
    zero = sum(int((s == 0).sum()) for s in _scores(run_dir).values())
    assert entry == {
        "name": "scaled_grad_magnitude",
        "signed": False,
        "factor": 3.0,
        "zero_gradients": zero,
        "description": "factor·|g| (a test metric)",
        "fact_keys": ["zero_gradients"],
    }
    run = Run.load(run_dir)
    assert run.metric_options == {"factor": 3.0} and run.metric_facts == {"zero_gradients": zero}
    assert run.metric_description == "factor·|g| (a test metric)"

    out = tmp_path / "report.md"
    assert main(["report", str(run_dir), "--output", str(out)]) == 0
    capsys.readouterr()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| `scaled_grad_magnitude`")]
    # The Metrics Used table: description as declared (pipes escaped for Markdown), options without the facts.
    assert r"| `scaled_grad_magnitude` | factor·\|g\| (a test metric) | factor=3.0 | 1 |" in rows


def _scores(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "scores.safetensors")


class Undocumented(GradMagnitude):
    pass


class Wrapped(GradMagnitude):
    """A summary that does not fit on one line
    of the docstring.

    More detail that the report does not show.
    """


def test_the_default_description_is_the_docstrings_summary():
    assert GradMagnitude.description == (
        "|g|, g the gradient of the mean calibration NLL: declares nothing beyond its name (the defaults apply)."
    )
    assert Wrapped.description == "A summary that does not fit on one line of the docstring."
    assert Undocumented.description == GradMagnitude.description  # no docstring: the parent's
    assert ScaledGradMagnitude.description == "factor·|g| (a test metric)"  # declared, not taken from the docstring


def _old_run(metric: dict) -> Run:
    summary = Summary(model="tiny", metric=metric, mode="global", k=10, tensors={})
    return Run(path=Path("lightning_logs/tiny/version_0"), summary=summary)


def test_runs_written_before_the_declarations_read_as_before():
    """Summaries without ``fact_keys`` or ``description``: the facts cwa recorded then are told from the options
    by their names, and a registered metric's description is its class's."""
    facts = {"unscored": {"b": "bias"}, "memory_bound_mib": 1.5}
    old = _old_run({"name": "obs", "signed": False, "damping": 0.01, **facts})
    assert old.metric_options == {"damping": 0.01}
    assert old.metric_facts == facts
    assert old.metric_description.startswith("w_ij² / [H⁻¹]_jj")
    assert _old_run({"name": "not_registered", "signed": False}).metric_description is None

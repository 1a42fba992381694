"""The fit-sensitivity pipeline: one callback per job, one result object, nothing written into the module;
and the pure-torch layer imports no Lightning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import fit_args
from safetensors.torch import load_file

from cwa import rundir
from cwa.fit.callbacks import (
    FitResult,
    RunDirectoryWriter,
    ScoreFigures,
    SummaryWriter,
    TensorBoardHistograms,
    TopKSelection,
    selected_weights,
)
from cwa.fit.data import CalibrationData
from cwa.fit.module import SensitivityModule
from cwa.fit.trainer import CwaTrainer, run_fit_sensitivity
from cwa.scoring.topk import select_topk

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a clean ``sys.modules``) with this checkout's cwa."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env)


@pytest.mark.slow  # a fresh interpreter importing cwa and Lightning (about 6 s)
def test_strategy_name_is_registered_explicitly():
    code = (
        "import cwa.fit.distributed, cwa.fit.trainer; from lightning.pytorch.strategies import StrategyRegistry; "
        "before = 'fsdp2' in StrategyRegistry; cwa.fit.distributed.register_strategy_name(); "
        "print(before, 'fsdp2' in StrategyRegistry)"
    )
    out = _python(code)
    assert out.stdout.split() == ["False", "True"]


class _Attributes(L.Callback):
    """The module's attributes (name and object) when the loop starts, the model loaded."""

    def on_validation_start(self, trainer, pl_module) -> None:
        self.before = {name: id(value) for name, value in vars(pl_module).items()}


def test_fit_sensitivity_returns_its_result_and_leaves_the_module_alone(tiny_llama_dir, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    module = SensitivityModule(pretrained=str(tiny_llama_dir), metric="grad_x_weight", k=7)
    data = CalibrationData(tokenizer=str(tiny_llama_dir), seq_len=32, num_samples=4, batch_size=2)
    attributes = _Attributes()
    trainer = CwaTrainer(
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="t", default_hp_metric=False),
        callbacks=[SummaryWriter(), ScoreFigures(enabled=False), attributes],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    result = trainer.fit_sensitivity(module, data)
    after = {name: id(value) for name, value in vars(module).items()}
    assert after.keys() == attributes.before.keys(), "a callback added an attribute to the module"
    # Only the module (its final scores and counters) and Lightning (mode, device, hook name) replace these.
    changed = {name for name in after if after[name] != attributes.before[name]}
    assert changed <= {"scores", "rank_memory", "_started", "_current_fx_name", "training", "_device"}, changed
    stages = [type(c) for c in trainer.callbacks if hasattr(c, "stage")]
    assert stages == [TopKSelection, RunDirectoryWriter, ScoreFigures, TensorBoardHistograms, SummaryWriter]
    assert isinstance(result, FitResult) and result is trainer.fit_result
    assert result.run_dir == tmp_path / "t" / "version_0"
    assert not (result.run_dir / rundir.FIGURES).exists()  # the given ScoreFigures(enabled=False) was kept
    run = rundir.Run.load(result.run_dir)
    assert run.summary == result.summary and run.summary.schema == rundir.SCHEMA_VERSION
    assert set(result.summary.timings) >= {"load_model_s", "accumulate_s", "reduce_s", "topk_s", "write_s"}
    # The result's top-K is the one in topk.csv and in an independent selection over the written scores.
    scores = load_file(result.run_dir / rundir.SCORES)
    expected = select_topk({n: scores[n] for n in module.selected}, 7, "global")
    assert torch.equal(result.topk.index, expected.index) and torch.equal(run.topk.index, expected.index)
    params = dict(module.model.named_parameters())
    for i in range(len(expected)):
        name = expected.names[int(expected.param[i])]
        assert float(result.topk.weight[i]) == float(params[name].reshape(-1)[int(expected.index[i])])


def test_selected_weights_reads_each_value():
    params = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([10.0, -20.0], dtype=torch.bfloat16)}
    top = select_topk({"a": params["a"], "b": params["b"].float()}, 4, "global")
    weights = selected_weights(top, params)
    assert weights.tolist() == [-20.0, 10.0, 5.0, 4.0]


def test_callbacks_need_the_result_object():
    with pytest.raises(RuntimeError, match="fit_sensitivity"):
        TopKSelection.result(L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False))


def test_run_fit_sensitivity_returns_the_run_directory(tiny_llama_dir, tmp_path, capsys):
    no_histograms = (
        "--trainer.callbacks+=cwa.fit.callbacks.TensorBoardHistograms",
        "--trainer.callbacks.enabled=false",
    )
    settings = {"name": "r", "num_samples": 3, "batch_size": None, "k": 3, "accelerator": None}
    args = fit_args(tiny_llama_dir, tmp_path, *no_histograms, **settings)
    run_dir = run_fit_sensitivity(args[1:])  # the arguments after the command's name
    assert run_dir == tmp_path / "r" / "version_0" and rundir.is_complete(run_dir)
    assert (run_dir / rundir.FIGURES / "topk_locations.png").is_file()
    assert f"run directory: {run_dir}" in capsys.readouterr().out


def test_figures_use_the_models_layers_and_module_order(tmp_path, monkeypatch):
    """topk_locations has a bar slot for every layer of the model (not only those holding a top-K weight), and
    the heatmap's rows follow the modules' order in a block (attention before MLP), not the alphabet."""
    import cwa.fit.figures as figures
    from cwa.model.params import ParamInfo, split_name
    from cwa.scoring.topk import TopK

    names = [f"model.layers.{i}.{m}.weight" for i in range(4) for m in ("self_attn.q_proj", "mlp.down_proj")]
    infos = {n: ParamInfo(n, (2, 2), *split_name(n)) for n in names}
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig))
    topk = TopK(names, torch.tensor([0, 7]), torch.tensor([0, 1]), torch.tensor([2.0, 1.0]))
    figures.topk_locations(topk, infos, "t", tmp_path / "a.png")
    scores = {n: torch.full((2, 2), float(i + 1)) for i, n in enumerate(names)}
    figures.layer_module_heatmap(scores, infos, "t", tmp_path / "b.png")
    locations, heatmap = (fig.axes[0] for fig in drawn)
    assert [t.get_text() for t in locations.get_xticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["self_attn.q_proj", "mlp.down_proj"]

"""What a hostile user still hit (issue 20): each case ends in one sentence and a non-zero exit, with nothing
half-written, or is refused before any work."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cwa.cli import main
from cwa.common.errors import CwaError
from cwa.rundir import Run
from cwa.scoring import checkpoint
from cwa.scoring.metrics import make_scorer
from tests.conftest import tiny_gpt2
from tests.test_compare import make_run, random_scores

ONE_PROCESS = SimpleNamespace(global_rank=0, world_size=1)


def one_sentence(text: str) -> str:
    """The single ``cwa: error:`` line of stderr, checked to be one sentence without a traceback."""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("cwa: error:")]
    assert len(lines) == 1, text
    assert lines[0].endswith("."), lines[0]
    return lines[0]


def _cli_error(capsys, args: list[str]) -> str:
    assert main(args) == 1
    return one_sentence(capsys.readouterr().err)


# -- run directories: every field validated before use ---------------------------------------------
def _edit_summary(run: Path, **fields) -> None:
    path = run / "summary.json"
    data = json.loads(path.read_text())
    for key, value in fields.items():
        target = data
        *parents, last = key.split("__")
        for parent in parents:
            target = target[parent]
        target[last] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"k": "ten"}, "'k'"),
        ({"k": 0}, "'k'"),
        ({"mode": "everywhere"}, "'mode'"),
        ({"tokens": -5}, "'tokens'"),
        ({"include": "layers"}, "'include'"),
        ({"metric": {"name": 3}}, "'metric.name'"),
        ({"tensors__model.norm.weight__shape": [1 << 30, 1 << 30]}, "'tensors.model.norm.weight.shape'"),
        ({"tensors__model.norm.weight__shape": [-8]}, "'tensors.model.norm.weight.shape'"),
        ({"tensors__model.norm.weight__numel": 9}, "'tensors.model.norm.weight.numel'"),
        ({"layout__model.norm.weight__layer": "x"}, "'layout.model.norm.weight.layer'"),
    ],
)
def test_summary_fields_are_validated(tmp_path, capsys, edit, field):
    run = make_run(tmp_path, "a", random_scores(0))
    _edit_summary(run, **edit)
    message = _cli_error(capsys, ["report", str(run), "--output", str(tmp_path / "report.md")])
    assert "summary.json" in message and field in message
    assert not (tmp_path / "report.md").exists()


def test_summary_shapes_must_match_the_scores_file(tmp_path):
    run = make_run(tmp_path, "a", random_scores(0))
    _edit_summary(run, **{"tensors__model.norm.weight__shape": [4, 2], "tensors__model.norm.weight__numel": 8})
    with pytest.raises(CwaError, match=r"holds 'model.norm.weight' with shape \[8\] but the run's summary.json"):
        Run.load(run).scores()


@pytest.mark.parametrize(("index", "parameter"), [(-1, None), (10**6, None), (0, "model.no_such.weight")])
def test_topk_rows_are_validated(tmp_path, index, parameter):
    run = make_run(tmp_path, "a", random_scores(0))
    lines = (run / "topk.csv").read_text().splitlines()
    cells = lines[1].split(",")
    cells[6] = str(index)
    if parameter:
        cells[1] = parameter
    lines[1] = ",".join(cells)
    (run / "topk.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CwaError, match="line 2") as info:
        _ = Run.load(run).topk
    assert ("outside its" in str(info.value)) if parameter is None else ("does not list" in str(info.value))


def test_nan_scores_are_refused_not_ranked(tmp_path, capsys):
    from safetensors.torch import save_file

    scores = random_scores(0)
    first = make_run(tmp_path, "a", scores)
    second = make_run(tmp_path, "b", random_scores(1))
    planted = {n: s.clone() for n, s in scores.items()}
    planted["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(planted, str(first / "scores.safetensors"))
    message = _cli_error(capsys, ["compare", str(first), str(second), "--output", str(tmp_path / "cmp")])
    assert "non-finite scores in 'model.layers.0.mlp.down_proj.weight'" in message
    assert not (tmp_path / "cmp").exists() or not any((tmp_path / "cmp").iterdir())


def test_compare_of_unrelated_models_is_refused(tmp_path, capsys):
    """Two runs with no scored tensor in common (a Llama's and a GPT-2's) have no measurable overlap: one
    sentence and no compare.json, not a table of zeros that reads like total disagreement."""
    from tests.helpers import write_run

    llama = make_run(tmp_path, "llama", random_scores(0))
    gpt2 = write_run(
        tmp_path / "gpt2" / "version_0",
        {"transformer.h.0.mlp.c_fc.weight": torch.rand(8, 4), "transformer.wte.weight": torch.rand(16, 8)},
        model="tiny-gpt2",
    )
    message = _cli_error(capsys, ["compare", str(llama), str(gpt2), "--output", str(tmp_path / "cmp")])
    assert message.startswith("cwa: error: the runs score 2 different models (tiny-llama: llama/version_0; tiny-gpt2:")
    assert message.endswith("comparing the models by relative depth and module type.")
    assert not (tmp_path / "cmp" / "compare.json").exists()


def test_only_regular_files_are_read(tmp_path, capsys, tiny_llama_dir):
    run = make_run(tmp_path, "a", random_scores(0))
    (run / "summary.json").unlink()
    (run / "summary.json").symlink_to("/dev/zero")
    message = _cli_error(capsys, ["report", str(run), "--output", str(tmp_path / "report.md")])
    assert "is a device, not a regular file" in message
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    args = [
        "fit-sensitivity",
        "--data.source",
        str(fifo),
        "--model.pretrained",
        str(tiny_llama_dir),
        "--data.seq_len=16",
    ]
    message = _cli_error(capsys, [*args, f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert "is a FIFO, not a regular file" in message


def test_no_write_through_a_figures_symlink(tmp_path):
    from cwa.rundir.outputs import OutputSet

    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "figures").symlink_to(outside)
    with pytest.raises(CwaError, match="is a symbolic link; cwa writes only inside the run directory"):
        OutputSet(run).stage("figures/dose_response.png")
    assert not list(outside.iterdir())


def test_disk_full_while_writing_scores_is_one_sentence(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from cwa.rundir import write_scores

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CwaError, match="the disk is full") as info:
        write_scores(tmp_path / "scores.safetensors", {"w": torch.ones(3)}, "float32", {})
    assert str(info.value) == f"cannot write '{tmp_path / 'scores.safetensors'}': the disk is full."
    assert not list(tmp_path.iterdir())

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    with pytest.raises(CwaError, match="the disk is full"):
        write_scores(tmp_path / "scores.safetensors", {"w": torch.ones(3)}, "float32", {})
    assert not list(tmp_path.iterdir())


# -- resume: what a checkpoint claims is checked ---------------------------------------------------
def _scorer(batches: int = 0):
    model = tiny_gpt2(seed=0)
    scorer = make_scorer("grad_x_weight")
    scorer.bind({n: p for n, p in model.named_parameters() if "ln_f" in n})
    from cwa.model.loss import next_token_nll

    g = torch.Generator().manual_seed(0)
    for _ in range(batches):
        scorer.update({"input_ids": torch.randint(0, 252, (2, 16), generator=g)}, lambda b: next_token_nll(model, b))
    return scorer


def _rewrite(path: Path, change) -> Path:
    """Rewrite a checkpoint with its tensors or metadata changed (as a user with safetensors would)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        meta = json.loads(handle.metadata()["cwa_checkpoint"])
    new_name = change(tensors, meta) or path.name
    path.unlink()
    target = path.with_name(new_name)
    save_file(tensors, str(target), metadata={"cwa_checkpoint": json.dumps(meta)})
    return target


def _scale(tensors, meta):
    tensors["acc.transformer.ln_f.weight"] *= 1000


def _nan(tensors, meta):
    tensors["acc.transformer.ln_f.weight"][0] = float("nan")


def _claim(tensors, meta):
    meta["batches"] = 99
    return "rank0-of-1-batch99.safetensors"


def _claim_meta_only(tensors, meta):
    meta["batches"] = 99


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_scale, "does not match the checksum"),
        (_nan, "does not match the checksum"),
        (_claim, "claims 99 batches but this process has only 4"),
        (_claim_meta_only, "claims 99 batches but its name says 2"),
    ],
)
def test_edited_checkpoints_are_refused(tmp_path, change, message):
    run = tmp_path / "run"
    checkpoint.save(run / "accumulators", _scorer(2), 2, {"model": "m"}, ONE_PROCESS)
    _rewrite(next((run / "accumulators").iterdir()), change)
    with pytest.raises(CwaError, match=message) as info:
        checkpoint.load(run, _scorer(), {"model": "m"}, ONE_PROCESS, max_batches=4)
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


def test_unedited_checkpoint_resumes_exactly(tmp_path):
    saved = _scorer(2)
    checkpoint.save(tmp_path, saved, 2, {"model": "m"}, ONE_PROCESS)
    restored = _scorer()
    assert checkpoint.load(tmp_path, restored, {"model": "m"}, ONE_PROCESS, max_batches=2) == 2
    assert all(torch.equal(restored.acc[n], saved.acc[n]) for n in saved.acc)


def test_resume_from_names_what_is_wrong(tmp_path):
    with pytest.raises(CwaError, match="does not exist"):
        checkpoint.load(tmp_path / "nothing", _scorer(), {}, ONE_PROCESS)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CwaError, match="is a file, not a directory"):
        checkpoint.load(tmp_path / "file", _scorer(), {}, ONE_PROCESS)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "accumulators").write_text("edited")
    with pytest.raises(CwaError, match=re.escape("accumulators' is not a directory of checkpoints")):
        checkpoint.load(tmp_path / "run", _scorer(), {}, ONE_PROCESS)


# -- code from a shared configuration --------------------------------------------------------------
def test_config_file_cannot_trust_remote_code(tmp_path, capsys, tiny_gpt2_dir):
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"pretrained": str(tiny_gpt2_dir), "trust_remote_code": True}}))
    message = _cli_error(capsys, ["fit-sensitivity", "--config", str(config), "--dry_run"])
    assert "sets model.trust_remote_code: True, which cwa takes only from the command line" in message
    from cwa.cli import check_config_files

    check_config_files(["--config", str(config), "--model.trust_remote_code", "true"])  # said on the command line


def test_config_file_class_path_is_checked_before_import(tmp_path, capsys):
    import sys

    import yaml

    assert "this" not in sys.modules
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"metric": {"class_path": "this.Scorer"}}}))
    message = _cli_error(capsys, ["fit-sensitivity", f"--config={config}", "--dry_run"])
    assert "names the class 'this.Scorer' at model.metric.class_path" in message
    assert "this" not in sys.modules and "Beautiful is better" not in capsys.readouterr().out
    config.write_text(yaml.safe_dump({"perturbation": "this.Zero"}))
    assert "names the class 'this.Zero'" in _cli_error(capsys, ["perturb", "--config", str(config)])
    assert "this" not in sys.modules


# -- a checkpoint missing a tensor ------------------------------------------------------------------
def test_checkpoint_missing_a_tensor_is_named(tmp_path, tiny_gpt2_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    from cwa.model.loading import load_model

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CwaError, match=r"has no tensor for 'transformer\.h\.1\.mlp\.c_fc\.weight'; cwa never scores"):
        load_model(str(model_dir))
    assert load_model(str(tiny_gpt2_dir)) is not None  # a complete checkpoint still loads


# -- bounds on what a configuration may ask for ---------------------------------------------------
def test_absurd_model_config_is_refused_before_building(tmp_path, capsys, tiny_gpt2_dir):
    import shutil
    import time

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["n_layer"] = 2_000_000
    (model_dir / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    message = _cli_error(
        capsys, ["fit-sensitivity", f"--model.pretrained={model_dir}", "--data.seq_len=16", "--dry_run"]
    )
    assert "asks for n_layer=2,000,000, outside 0..1,024" in message
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize(
    ("seeds", "message"),
    [("[0,0]", "seeds [0, 0] repeat 0"), ("[]", "seeds is empty, so no random control would be drawn")],
)
def test_seeds_are_validated(capsys, tmp_path, seeds, message):
    assert message in _cli_error(capsys, ["perturb", "--run", str(tmp_path), "--seeds", seeds])


def test_check_seeds_against_its_definition():
    from cwa.ablation.controls import check_seeds

    assert check_seeds([3, 1, 2]) == (3, 1, 2)
    for bad in ([], [1, 1], [1, True], "012"):
        with pytest.raises(CwaError):
            check_seeds(bad)


# -- one sentence for options a class refuses, and for an absent device ----------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.metric", "hutchinson_diag", "--model.metric.probes", "0"], "probes must be at least 1, got 0."),
        (["--model.metric=hutchinson_diag", "--model.metric.fd_eps", "-1"], "fd_eps must be positive, got -1.0."),
        (["--model.metric", "HutchinsonDiag", "--model.metric.fd_eps=-0.5"], "fd_eps must be positive, got -0.5."),
    ],
)
def test_metric_options_refused_in_one_sentence(capsys, args, message):
    assert _cli_error(capsys, ["fit-sensitivity", *args, "--dry_run"]).endswith(message)


def test_short_metric_name_takes_options():
    from cwa.fit.trainer import metric_class_names
    from cwa.scoring.scorers import HutchinsonDiag

    args = ["--model.metric", "hutchinson_diag", "--model.metric.probes", "2", "--model.k=3"]
    assert metric_class_names(args)[1] == f"{HutchinsonDiag.__module__}.{HutchinsonDiag.__qualname__}"
    assert metric_class_names(["--model.metric=wanda"]) == ["--model.metric=wanda"]  # no options: the name stays


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_device_is_one_sentence(capsys, tmp_path):
    message = _cli_error(capsys, ["perturb", "--run", str(tmp_path), "--device", "cuda"])
    assert message.endswith(
        "device 'cuda' is not available: this torch build has no CUDA; use --device cpu (or auto)."
    ) or ("no CUDA device is visible" in message)
    assert "is not a device name" in _cli_error(capsys, ["perturb", "--run", str(tmp_path), "--device", "gpu0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_config_on_a_cpu_machine_is_one_sentence(capsys, tmp_path, tiny_llama_dir):
    """The README's 8-GPU config, its model at hand, on a machine without a GPU: one sentence, nothing written."""
    config = Path(__file__).resolve().parent.parent / "configs" / "llama-3.1-8b.yaml"
    args = ["fit-sensitivity", "--config", str(config), f"--model.pretrained={tiny_llama_dir}"]
    message = _cli_error(capsys, [*args, f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert message == "cwa: error: accelerator 'gpu' was requested but this machine has no CUDA GPU; use cpu or auto."
    assert not list(tmp_path.iterdir())


# -- the hub: one probe, before any process --------------------------------------------------------
@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub at a closed local port, HF_HUB_OFFLINE unset, no proxy: what a machine without network sees."""
    from huggingface_hub import constants

    from cwa.model import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "_reachable", set())
    for proxy in hub.PROXIES:
        monkeypatch.delenv(proxy, raising=False)


@pytest.fixture
def hub_run(tmp_path, tiny_llama_dir) -> Path:
    """A complete run directory whose config.yaml names a hub model (as one made where the hub was reachable)."""
    from tests.test_perturb import make_run as make_real_run

    run = make_real_run(tmp_path, tiny_llama_dir)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(tiny_llama_dir), "org/model"))
    return run


HUB_COMMANDS = {
    "fit-sensitivity": ["fit-sensitivity", "--model.pretrained=org/model", "--trainer.accelerator=cpu"]
    + ["--trainer.devices=8", "--trainer.strategy=ddp"],
    "find-super-weights": ["find-super-weights", "--model.pretrained=org/model", "--trainer.accelerator=cpu"]
    + ["--trainer.devices=8", "--trainer.strategy=ddp"],
    "perturb": ["perturb", "--run", "RUN", "--ks", "[1]", "--single", "0", "--seeds", "[0]"],
    "prune": ["prune", "RUN", "--sparsity", "[0.5]", "--structure", "[unstructured]"],
    "protect": ["protect", "--run", "RUN", "--levels", "[4]", "--protect_k", "[0]"],
}


@pytest.mark.parametrize("command", list(HUB_COMMANDS))
def test_unreachable_hub_fails_fast(command, unreachable_hub, hub_run, capsys):
    """Every command that loads a model probes the hub once, before any process or model load: one sentence
    within seconds, instead of huggingface_hub's 45 s of retries (in each launched process)."""
    import time

    start = time.perf_counter()
    args = [str(hub_run) if a == "RUN" else a for a in HUB_COMMANDS[command]]
    message = _cli_error(capsys, args)
    assert message.startswith(
        "cwa: error: cannot fetch 'org/model': the Hugging Face Hub at http://127.0.0.1:9 is unreachable"
    )
    assert time.perf_counter() - start < 10


# -- run numbers stay unique after a shared pass ---------------------------------------------------
@pytest.mark.parametrize("metric", ["magnitude", "grad_x_weight"])
def test_nan_weight_gives_no_run(tmp_path, capsys, tiny_gpt2_dir, metric):
    """A NaN planted in a model's weights: refused in one sentence naming the tensor (not blamed on the dtype or
    the data), and the failed run leaves no version_N behind."""
    import shutil

    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "nan-model"
    shutil.copytree(tiny_gpt2_dir, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_parameter("transformer.h.0.mlp.c_fc.weight")[0, 0] = float("nan")
    model.save_pretrained(model_dir)
    args = [a for a in _fit_args(model_dir, tmp_path / "logs") if not a.startswith("--model.metric")]
    message = _cli_error(capsys, [*args, f"--model.metric={metric}"])
    assert message == (
        "cwa: error: the calibration loss became nan because the weights of 'transformer.h.0.mlp.c_fc.weight' hold "
        "1 non-finite values (NaN or inf); the checkpoint is damaged, so restore it from where it came from."
    )
    assert not list((tmp_path / "logs").glob("*/version_*"))


def test_next_version_counts_metric_directories(tmp_path):
    from cwa.rundir import next_version

    assert next_version(tmp_path / "none") == 0
    for name in ("version_0", "version_3-magnitude", "version_3-wanda", "version_x", "other_7"):
        (tmp_path / name).mkdir()
    (tmp_path / "version_9").write_text("a file, not a run")
    assert next_version(tmp_path) == 4


def _fit_args(model_dir: Path, save_dir: Path, samples: int = 4) -> list[str]:
    return [
        "fit-sensitivity",
        f"--model.pretrained={model_dir}",
        "--data.seq_len=16",
        f"--data.num_samples={samples}",
        "--data.batch_size=1",
        "--model.metric=grad_x_weight",
        "--model.k=5",
        "--trainer.accelerator=cpu",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.callbacks+=cwa.fit.callbacks.ScoreFigures",
        "--trainer.callbacks.enabled=false",
    ]


def test_a_run_after_a_shared_pass_takes_a_new_number(tmp_path, tiny_gpt2_dir, capsys):
    experiment = tmp_path / "cwa"
    (experiment / "version_0-magnitude").mkdir(parents=True)  # what a shared pass leaves (its version_0 removed)
    assert main(_fit_args(tiny_gpt2_dir, tmp_path)) == 0
    assert sorted(p.name for p in experiment.iterdir()) == ["version_0-magnitude", "version_1"]


def test_progress_lines_when_stdout_is_not_a_terminal(tmp_path, tiny_gpt2_dir, capsys):
    assert main(_fit_args(tiny_gpt2_dir, tmp_path, samples=3)) == 0
    out = capsys.readouterr().out
    assert re.search(r"^cwa: scored batch 1 of 3 \(\d+ s, about \d+ s left\), calibration NLL \d", out, re.M), out
    assert re.search(r"^cwa: scored batch 3 of 3 \(\d+ s\), calibration NLL \d", out, re.M), out


@pytest.mark.slow  # a fit-sensitivity process interrupted after its first checkpoint, about 7 s each
@pytest.mark.parametrize("ignored", [False, True])
def test_sigint_after_a_checkpoint_stops_the_run_resumable(tmp_path, tiny_gpt2_dir, ignored):
    """Ctrl-C (or ``kill -INT``, also on a run a shell script started in the background, where SIGINT arrives
    ignored) stops the run with exit 130 and leaves its checkpoint, never a complete-looking run."""
    import signal
    import subprocess
    import sys
    import time

    args = [*_fit_args(tiny_gpt2_dir, tmp_path, samples=400), "--model.checkpoint_every=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent)}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None
    process = subprocess.Popen(
        [sys.executable, "-m", "cwa", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=ignore
    )
    deadline = time.monotonic() + 300
    while not list(tmp_path.rglob("rank0-of-1-batch*.safetensors")) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err.decode()[-2000:]
    run = next(tmp_path.rglob("version_0"))
    assert not (run / "summary.json").exists()
    assert list((run / "accumulators").glob("rank0-of-1-batch*.safetensors"))


def test_perturbation_files_must_be_regular(tmp_path):
    from cwa.rundir.perturbation import read_perturbation

    run = make_run(tmp_path, "a", random_scores(0))
    os.mkfifo(run / "perturb.csv")
    (run / "perturb.json").symlink_to("/dev/zero")
    with pytest.raises(CwaError, match="perturbation table '.*perturb.csv' is a FIFO, not a regular file"):
        read_perturbation(run)


def test_scores_of_other_shapes_are_not_taken_for_absent_scores(tmp_path):
    from safetensors.torch import save_file

    scores = random_scores(0)
    run = make_run(tmp_path, "a", scores)
    save_file({**scores, "model.norm.weight": torch.rand(4, 2)}, str(run / "scores.safetensors"))
    with pytest.raises(CwaError, match="with shape \\[4, 2\\] but the run's summary.json says \\[8\\]"):
        _ = Run.load(run).has_scores
    (run / "scores.safetensors").write_bytes(b"truncated")
    assert Run.load(run).has_scores is False  # an unreadable file is a run without scores, as before


def test_progress_on_a_terminal_says_scoring(monkeypatch):
    import sys

    from lightning.pytorch.callbacks import TQDMProgressBar

    from cwa.fit.progress import PlainProgress, ScoringBar, use_plain_progress

    trainer = SimpleNamespace(callbacks=[TQDMProgressBar(refresh_rate=3)])
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    use_plain_progress(trainer)
    assert isinstance(trainer.callbacks[0], ScoringBar) and trainer.callbacks[0].validation_description == "Scoring"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    trainer = SimpleNamespace(callbacks=[TQDMProgressBar()])
    use_plain_progress(trainer)
    assert [type(c) for c in trainer.callbacks] == [PlainProgress]


def test_local_and_embedded_models_never_probe_the_hub(unreachable_hub, tiny_llama_dir):
    """With the hub unreachable and HF_HUB_OFFLINE unset, a local directory or the embedded model loads as ever:
    only a hub name is probed."""
    from cwa.model.hub import check_hub

    for name in (str(tiny_llama_dir), "smollm2-135m", "", "/no/such/dir"):
        check_hub(name)
    with pytest.raises(CwaError, match="unreachable from here"):
        check_hub("org/model")


def test_hub_tasks_with_an_unreachable_hub_fail_fast(unreachable_hub, tmp_path, tiny_llama_dir, capsys):
    """perturb --tasks with a hub task: one sentence within seconds, before lm-eval indexes its tasks."""
    import time

    pytest.importorskip("lm_eval")
    from tests.test_perturb import make_run as make_real_run

    run = make_real_run(tmp_path, tiny_llama_dir)
    start = time.perf_counter()
    args = ["perturb", "--run", str(run), "--ks", "[1]", "--single", "0", "--seeds", "[0]", "--tasks", "hellaswag"]
    message = _cli_error(capsys, args)
    assert message.startswith(
        "cwa: error: lm-eval cannot load the task 'hellaswag': the Hugging Face Hub at http://127.0.0.1:9 is "
        "unreachable from here"
    )
    assert time.perf_counter() - start < 20


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "environment", "expected"),
    [
        (
            ["find-super-weights", "--trainer.devices", "1", "--trainer.strategy", "auto"],
            {"HF_ENDPOINT": "http://127.0.0.1:9"},
            "the Hugging Face Hub at http://127.0.0.1:9 is unreachable from here",
        ),
        (["fit-sensitivity"], {"HF_HUB_OFFLINE": "1"}, "the Hugging Face Hub is unreachable from here (HF_HUB_OFFLINE"),
    ],
    ids=["endpoint-closed", "offline-8-processes"],
)
def test_unreachable_hub_through_the_environment(tmp_path, command, environment, expected):
    """The hub unreachable as a user's shell has it (HF_ENDPOINT at a closed port, or HF_HUB_OFFLINE=1 with the
    model not in the cache): the 8B config on the CPU fails in one line within seconds, said once before any
    process is launched (not by each of the 8), with no retry lines of huggingface_hub and no traceback."""
    import subprocess
    import sys
    import time

    from cwa.model.hub import PROXIES

    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE") and k not in PROXIES}
    env.update(environment, HF_HOME=str(tmp_path / "hf-home"))  # an empty Hugging Face cache
    root = Path(__file__).resolve().parent.parent
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "cwa", command[0], "--config", str(root / "configs" / "llama-3.1-8b.yaml")]
        + ["--trainer.accelerator", "cpu", *command[1:], f"--trainer.logger.init_args.save_dir={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert expected in done.stderr
    assert elapsed < 60  # interpreter and torch start-up on a busy machine included; the retries alone took 45 s

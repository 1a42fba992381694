"""Bad inputs give one sentence, before the work, and nothing read from a run directory runs code (issue 9)."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from crash import crash_after
from helpers import fit, fit_args

from cwa.cli import main
from cwa.common import io
from cwa.common.errors import CwaError
from cwa.fit import preflight
from cwa.fit.data import TextFiles, as_source
from cwa.fit.module import SensitivityModule
from cwa.model.loading import load_model, load_tokenizer
from cwa.model.params import compile_patterns, select_parameters
from cwa.scoring import checkpoint
from cwa.scoring.metrics import make_scorer
from cwa.scoring.scorers import HutchinsonDiag
from tests.conftest import corpus_words, tiny_gpt2

ONE_PROCESS = SimpleNamespace(global_rank=0, world_size=1)


class _Marker:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _bound_scorer(seed: int = 0, batches: int = 1):
    model = tiny_gpt2(seed=seed)
    scorer = make_scorer("grad_x_weight")
    scorer.bind({n: p for n, p in model.named_parameters() if "ln_f" in n or "wte" in n})
    from cwa.fit.module import next_token_nll

    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        batch = {"input_ids": torch.randint(0, 252, (2, 16), generator=g)}
        scorer.update(batch, lambda b: next_token_nll(model, b))
    return scorer


def _fresh_scorer():
    model = tiny_gpt2(seed=1)
    scorer = make_scorer("grad_x_weight")
    scorer.bind({n: p for n, p in model.named_parameters() if "ln_f" in n or "wte" in n})
    return scorer


# -- class 1: resume files never unpickle ---------------------------------------------------------
@pytest.mark.parametrize("name", ["rank0-of-1-batch2.pt", "rank0-of-1-batch2.safetensors"])
def test_crafted_pickle_in_accumulators_runs_nothing(tmp_path, name):
    run = tmp_path / "run"
    (run / "accumulators").mkdir(parents=True)
    marker = tmp_path / "code-ran"
    payload = pickle.dumps({"scorer": _Marker(marker), "batches": 2, "fingerprint": {}})
    pickle.loads(payload)  # the payload is live: loading it with pickle does run code
    assert marker.exists()
    marker.unlink()
    (run / "accumulators" / name).write_bytes(payload)
    torch.save({"x": _Marker(marker)}, run / "accumulators" / "rank0-of-1-batch3.pt")
    with pytest.raises(CwaError) as info:
        checkpoint.load(run, _fresh_scorer(), {}, ONE_PROCESS)
    assert not marker.exists()
    message = str(info.value)
    assert message.count(". ") == 0 and message.endswith(".")
    assert ("no longer reads" in message) if name.endswith(".pt") else ("is not a cwa checkpoint" in message)


def test_checkpoint_round_trip_is_exact_and_keeps_only_the_newest(tmp_path):
    fingerprint = {"model": "m", "scored": ["a", "b"], "settings": {"eps": 1e-4}, "world_size": 1}
    for batches in (1, 2, 3):
        scorer = _bound_scorer(batches=batches)
        checkpoint.save(tmp_path, scorer, batches, fingerprint, ONE_PROCESS)
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"rank0-of-1-batch{batches}.safetensors"]
    restored = _fresh_scorer()
    assert checkpoint.load(tmp_path, restored, dict(fingerprint), ONE_PROCESS) == 3
    for name, tensor in scorer.acc.items():
        assert torch.equal(restored.acc[name], tensor), name
    assert torch.equal(restored.counters, scorer.counters) and restored.counters.dtype == torch.float64
    with pytest.raises(CwaError, match=r"different settings \(model\)"):
        checkpoint.load(tmp_path, _fresh_scorer(), {**fingerprint, "model": "other"}, ONE_PROCESS)
    checkpoint.finish(tmp_path, keep=True)
    assert list(tmp_path.iterdir())
    checkpoint.finish(tmp_path, keep=False)
    assert not tmp_path.exists()
    checkpoint.finish(tmp_path, keep=False)  # a second call (or another rank's) is harmless


def test_checkpoint_of_other_tensors_is_refused(tmp_path):
    checkpoint.save(tmp_path, _bound_scorer(), 1, {}, ONE_PROCESS)
    other = make_scorer("grad_x_weight")
    other.bind({n: p for n, p in tiny_gpt2().named_parameters() if "wpe" in n})
    with pytest.raises(CwaError, match="does not hold the accumulators of this run"):
        checkpoint.load(tmp_path, other, {}, ONE_PROCESS)


# -- class 2: a path is a path ----------------------------------------------------------------
def _printed_source(capsys, path: Path) -> object:
    with pytest.raises(SystemExit) as info:
        main(["fit-sensitivity", "--data.source", str(path), "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)["data"]["source"]


def _yamlish_corpora(tmp_path: Path) -> dict[str, Path]:
    words = [w for w in corpus_words(250) if w.isalpha()]
    prose = tmp_path / "prose.txt"  # parses as one YAML string (a plain multi-line scalar)
    prose.write_text("\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12)) * 20)
    one_line = tmp_path / "one-line.txt"
    one_line.write_text(" ".join(words * 10) + "\n")
    mapping = tmp_path / "notes.txt"  # parses as a YAML mapping
    mapping.write_text("Note: this corpus is prose.\nAnother: line of it.\n")
    return {"prose": prose, "one_line": one_line, "mapping": mapping}


def test_txt_corpus_that_parses_as_yaml_stays_a_path(tmp_path, capsys):
    for path in _yamlish_corpora(tmp_path).values():
        assert yaml.safe_load(path.read_text()) is not None  # each would load as YAML
        assert _printed_source(capsys, path) == str(path)
    (tmp_path / "c.yaml").write_text(f"data:\n  source: {tmp_path / 'one-line.txt'}\n")
    with pytest.raises(SystemExit):
        main(["fit-sensitivity", "--config", str(tmp_path / "c.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["data"]["source"] == str(tmp_path / "one-line.txt")
    # A class with options still parses as a class.
    paths = f"[{tmp_path / 'one-line.txt'}]"
    with pytest.raises(SystemExit):
        main(
            [
                "fit-sensitivity",
                "--data.source=cwa.fit.data.TextFiles",
                f"--data.source.paths={paths}",
                "--print_config",
            ]
        )
    source = yaml.safe_load(capsys.readouterr().out)["data"]["source"]
    assert source["class_path"] == "cwa.fit.data.TextFiles"
    assert source["init_args"]["paths"] == [str(tmp_path / "one-line.txt")]


def test_txt_corpus_that_parses_as_yaml_is_scored_as_a_file(tmp_path, tiny_gpt2_dir):
    corpus = _yamlish_corpora(tmp_path)["one_line"]
    save_dir = tmp_path / "logs"
    settings = {"name": None, "seq_len": 16, "num_samples": 4, "batch_size": 2, "k": 5, "figures": False}
    assert fit(tiny_gpt2_dir, save_dir, f"--data.source={corpus}", **settings) == 0
    summary = json.loads(next(save_dir.rglob("summary.json")).read_text())
    assert str(corpus) in json.dumps(summary)
    assert isinstance(as_source(corpus), TextFiles)


# -- class 3: limits checked before the work --------------------------------------------------
def test_seq_len_beyond_context_is_refused_quickly(tiny_gpt2_dir, tmp_path, capsys):
    start = time.perf_counter()
    code = main(
        [
            "fit-sensitivity",
            f"--model.pretrained={tiny_gpt2_dir}",
            "--data.seq_len=4096",
            "--trainer.accelerator=cpu",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    elapsed = time.perf_counter() - start
    assert code == 1 and elapsed < 15
    err = capsys.readouterr().err
    assert "seq_len=4096 is beyond the context" in err and "(128 tokens)" in err
    with pytest.raises(CwaError, match="context"):
        preflight.check_context(str(tiny_gpt2_dir), 129)
    preflight.check_context(str(tiny_gpt2_dir), 128)


def test_more_processes_than_batches_and_absurd_probes_are_refused():
    preflight.check_processes(3, num_samples=5, batch_size=2)
    with pytest.raises(CwaError, match="4 processes but only 3 calibration batches"):
        preflight.check_processes(4, num_samples=5, batch_size=2)
    with pytest.raises(CwaError, match="probes=100000 is outside"):
        SensitivityModule(metric=HutchinsonDiag(probes=100000))
    SensitivityModule(metric=HutchinsonDiag(probes=preflight.MAX_PROBES))
    with pytest.raises(CwaError, match="fd_eps"):
        preflight.check_scorer(SimpleNamespace(fd_eps=float("nan")))


def test_missing_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("cuda", "gpu"):
        with pytest.raises(CwaError, match=f"accelerator '{accelerator}' was requested but this machine has no CUDA"):
            preflight.check_device(accelerator, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    preflight.check_device("cuda", 2)
    preflight.check_device("gpu", "0,1")
    for devices, wanted in ((3, 3), ([0, 1, 2, 3], 4), ("0,1,2", 3)):
        with pytest.raises(CwaError, match=f"asks for {wanted} but accelerator 'cuda' has 2 CUDA GPU"):
            preflight.check_device("cuda", devices)
    preflight.check_device("cpu", 64)  # CPU processes may outnumber cores
    preflight.check_device("auto", "auto")


# -- class 4: operating-system errors as one sentence naming the path ---------------------------
def _no_temporaries(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


def test_write_errors_name_the_path_and_leave_no_temporary(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CwaError, match=rf"cannot write '{blocker}/run/summary.json': a parent of it is a file"):
        io.write_json(blocker / "run" / "summary.json", {})
    with pytest.raises(CwaError, match=rf"cannot write '{blocker}/run': a parent of it is a file"):
        preflight.check_writable(blocker / "run")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)
    target = tmp_path / "out" / "summary.json"
    with pytest.raises(CwaError, match=rf"^cannot write '{target}': the disk is full\.$"):
        io.write_json(target, {"a": 1})
    assert not target.exists() and _no_temporaries(tmp_path)
    monkeypatch.undo()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(io.tempfile, "mkstemp", denied)
    with pytest.raises(CwaError, match=rf"cannot write '{tmp_path / 'ro'}': permission denied\."):
        preflight.check_writable(tmp_path / "ro")
    with pytest.raises(CwaError, match="permission denied"):
        io.write_json(tmp_path / "ro" / "x.json", {})


def test_stale_temporaries_are_removed(tmp_path):
    with pytest.raises(KeyboardInterrupt), io.atomic_path(tmp_path / "scores.safetensors") as tmp:
        tmp.write_bytes(b"partial")
        left = Path(str(tmp))
        raise KeyboardInterrupt
    assert not left.exists()  # an interrupt cleans up; a SIGKILL cannot, hence remove_stale_temporaries
    (tmp_path / "figures").mkdir()
    stale = [tmp_path / ".scores.safetensors.k2j_9xq1.tmp", tmp_path / "figures" / ".topk.png.abc123zz.tmp"]
    keep = [tmp_path / "scores.safetensors", tmp_path / "notes.tmp", tmp_path / "figures" / "topk.png"]
    for path in stale + keep:
        path.write_bytes(b"x")
    assert sorted(io.remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert io.remove_stale_temporaries(tmp_path / "missing") == []


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_corpus_names_the_file(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    bad = tmp_path / f"bad{suffix}"
    text = "caf\xe9 au lait " * 50
    if suffix == ".txt":
        good.write_text(text, encoding="utf-8")
        bad.write_bytes(text.encode("latin-1"))
    else:
        good.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
        bad.write_bytes(('{"text": "' + text + '"}\n').encode("latin-1"))
    assert TextFiles([str(good)]).load() == [text]
    with pytest.raises(CwaError, match=rf"^data file '{bad}' is not UTF-8 text \(byte \d+ is 0xe9\)"):
        TextFiles([str(good), str(bad)]).load()
    with pytest.raises(CwaError, match=rf"data path '{tmp_path}' is a directory"):
        TextFiles([str(tmp_path)]).load()


# -- class 7: messages that say what is wrong ---------------------------------------------------
def test_local_model_directory_problems_are_named(tmp_path, tiny_gpt2_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gpt2_dir / name, no_tokenizer / name)
    messages = []
    with pytest.raises(CwaError) as info:
        load_tokenizer(str(no_tokenizer))  # transformers alone would build an empty tokenizer here
    messages.append(str(info.value))
    assert f"'{no_tokenizer}' has no tokenizer files" in messages[-1]
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_gpt2_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CwaError) as info:
        load_model(str(truncated))
    messages.append(str(info.value))
    assert f"the weight file '{weights}' is truncated" in messages[-1]
    weights.unlink()
    with pytest.raises(CwaError) as info:
        load_model(str(truncated))
    messages.append(str(info.value))
    assert f"'{truncated}' has no weight files" in messages[-1]
    assert not [m for m in messages if "hub" in m.lower() or "hf download" in m]


def test_include_patterns(tmp_path, capsys):
    model = tiny_gpt2()
    assert list(select_parameters(model, include="ln_f")) == list(select_parameters(model, include=["ln_f"]))
    assert SensitivityModule(include="mlp").include == ["mlp"]
    with pytest.raises(CwaError, match=r"^include pattern 'mlp\(' is not a valid regular expression: .*\.$"):
        SensitivityModule(include="mlp(")
    with pytest.raises(CwaError, match="exclude pattern '\\[' is not"):
        compile_patterns(["ok", "["], "exclude")
    with pytest.raises(SystemExit):
        main(["fit-sensitivity", "--model.include", "mlp", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["include"] in ("mlp", ["mlp"])
    assert main(["fit-sensitivity", "--model.include", "mlp(", f"--trainer.logger.init_args.save_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "include pattern 'mlp(' is not a valid regular expression" in err and len(err.splitlines()) == 1


# -- class 8: trainer flags that would quietly do nothing ---------------------------------------
def _trainer(tmp_path: Path, **flags):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": TensorBoardLogger(save_dir=str(tmp_path / "logs"), name="cwa"),
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
        "num_sanity_val_steps": 0,
        "inference_mode": False,
    }
    return L.Trainer(**{**options, **flags})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"fast_dev_run": True}, "fast_dev_run scores one batch"),
        ({"limit_val_batches": 0}, "limit_val_batches=0 would score only part"),
        ({"limit_val_batches": 0.5}, "limit_val_batches=0.5 would score only part"),
        ({"limit_val_batches": 2}, "limit_val_batches=2 would score only part"),
        ({"overfit_batches": 1}, "overfit_batches=1 would score a few batches"),
        ({"max_steps": 1}, "max_steps is a training option"),
        ({"min_steps": 3}, "min_steps is a training option"),
        ({"accumulate_grad_batches": 4}, "accumulate_grad_batches is a training option"),
        ({"gradient_clip_val": 1.0}, "gradient_clip_val is a training option"),
        ({"val_check_interval": 0.5}, "val_check_interval is a training option"),
        ({"check_val_every_n_epoch": 2}, "check_val_every_n_epoch is a training option"),
        ({"limit_train_batches": 0.1}, "limit_train_batches is a training option"),
        ({"precision": "bf16-mixed"}, r"precision=bf16-mixed is not how"),
        ({"precision": "64-true"}, r"precision=64-true is not how"),
        ({"precision": "bf16-true"}, r"precision=bf16-true is not how"),
        ({"logger": False}, "needs a logger to name its run directory"),
        ({"default_root_dir": "ELSEWHERE"}, "default_root_dir=.* is ignored when a logger names the run directory"),
        ({"num_nodes": 2}, "num_nodes=2 but no cluster launcher"),
    ],
)
def test_trainer_flags_that_would_do_nothing_are_refused(tmp_path, monkeypatch, flags, message):
    for variable in ("MASTER_ADDR", "NODE_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    flags = {k: (str(tmp_path / "elsewhere") if v == "ELSEWHERE" else v) for k, v in flags.items()}
    with pytest.raises(CwaError, match=message):
        preflight.check_trainer(_trainer(tmp_path, **flags))


def test_default_trainer_passes(tmp_path, monkeypatch):
    preflight.check_trainer(_trainer(tmp_path))
    preflight.check_trainer(_trainer(tmp_path, default_root_dir=str(tmp_path), val_check_interval=1))
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    preflight.check_trainer(_trainer(tmp_path, num_nodes=2))
    assert (tmp_path / "logs").is_dir()  # check_writable created it


def test_killed_run_keeps_only_its_newest_checkpoint_and_resumes_exactly(tiny_gpt2_dir, tmp_path, monkeypatch):
    def args(save_dir: Path, *extra: str) -> list[str]:
        settings = {"name": None, "seq_len": 16, "num_samples": 6, "batch_size": 1, "k": 5, "figures": False}
        return fit_args(tiny_gpt2_dir, save_dir, "--model.metric=grad_squared", *extra, **settings)

    from safetensors.torch import load_file

    assert main(args(tmp_path / "whole")) == 0
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args(tmp_path / "killed", "--model.checkpoint_every=1", *crash_after(4)))
    killed = next((tmp_path / "killed").rglob("version_0"))
    assert [p.name for p in (killed / "accumulators").iterdir()] == ["rank0-of-1-batch4.safetensors"]
    assert main(args(tmp_path / "resumed", f"--model.resume_from={killed}")) == 0
    whole = load_file(next((tmp_path / "whole").rglob("scores.safetensors")))
    resumed = load_file(next((tmp_path / "resumed").rglob("scores.safetensors")))
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name

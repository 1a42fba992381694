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


def test_only_regular_files_are_read(tmp_path, capsys):
    run = make_run(tmp_path, "a", random_scores(0))
    (run / "summary.json").unlink()
    (run / "summary.json").symlink_to("/dev/zero")
    message = _cli_error(capsys, ["report", str(run), "--output", str(tmp_path / "report.md")])
    assert "is a device, not a regular file" in message
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    message = _cli_error(capsys, ["fit-sensitivity", "--data.source", str(fifo), "--model.pretrained", "x"])
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

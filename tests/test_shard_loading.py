"""Shard-only loading (cwa.model.shard_loading): every local shard holds exactly the checkpoint's rows.

The 2-process test shards a tiny Llama with tied embeddings and a tiny GPT-2 (Conv1D, tied wte / LM head)
with a 251-row vocabulary over 2 gloo ranks (126 + 125 rows: uneven), fills the shards from the
safetensors file and compares every gathered parameter with the file read independently
(``tests/shard_worker.py``). The one-process tests check the name mapping, sharded checkpoints, dtype
conversion and the one-sentence failures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

from cwa.common.errors import CwaError
from cwa.model.loading import load_model
from cwa.model.shard_loading import build_skeleton, checkpoint_files, load_local_shards, materialize

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 251  # odd: the embedding rows split 126 + 125 over 2 ranks


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("shard-models")
    out = {"llama": base / "llama", "gpt2": base / "gpt2"}
    tiny_llama(vocab_size=VOCAB, tied=True).save_pretrained(out["llama"])
    tiny_gpt2(vocab_size=VOCAB).save_pretrained(out["gpt2"])
    return out


def _load_skeleton(directory: Path, dtype: str = "float32") -> torch.nn.Module:
    model = build_skeleton(str(directory), dtype)
    materialize(model, "cpu")
    load_local_shards(model, checkpoint_files(str(directory)))
    return model


@pytest.mark.distributed
def test_two_ranks_fill_every_shard_with_the_checkpoint_rows(models, tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", WORLD_SIZE="2", HF_HUB_OFFLINE="1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    args = [sys.executable, str(ROOT / "tests" / "shard_worker.py"), str(out), "float32", *map(str, models.values())]
    procs = [subprocess.Popen(args, env=env | {"RANK": str(r)}, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errors)
    ranks = json.loads(out.read_text())
    for key, directory in models.items():
        per_rank = [r[str(directory)] for r in ranks]
        assert all(r["tied"] and r["reference_tied"] for r in per_rank), key
        embedding = "model.embed_tokens.weight" if key == "llama" else "transformer.wte.weight"
        assert [r["rows"][embedding][:2] for r in per_rank] == [[0, 126], [126, 125]]
        for name in per_rank[0]["rows"]:  # the shards tile the rows: no row twice, none left out
            spans = [r["rows"][name][:2] for r in per_rank]
            assert spans[0][0] == 0 and spans[0][0] + spans[0][1] == spans[1][0], (name, spans)
        total = sum(p.numel() for p in load_model(str(directory)).parameters())  # a tied tensor counts once
        assert sum(r["read"] for r in per_rank) == total


@pytest.mark.parametrize("key", ["llama", "gpt2"])
def test_one_process_equals_a_normal_load(models, key):
    loaded, reference = _load_skeleton(models[key]), load_model(str(models[key]))
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    for (name, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bfloat16_and_sharded_checkpoint_and_hub_names(models, tmp_path):
    """A checkpoint split over several files (with its index), with GPT-2's hub names (no
    ``transformer.`` prefix), loaded in bfloat16: each tensor is the file's, converted."""
    reference = load_model(str(models["gpt2"]))
    split = tmp_path / "split"
    reference.save_pretrained(split, max_shard_size="20KB")
    index = json.loads((split / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for file in set(index["weight_map"].values()):  # rename to the hub checkpoint's names
        tensors = load_file(str(split / file))
        save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, str(split / file))
    index["weight_map"] = {k.removeprefix("transformer."): v for k, v in index["weight_map"].items()}
    (split / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(checkpoint_files(str(split))) == len(set(index["weight_map"].values()))
    loaded = _load_skeleton(split, "bfloat16")
    for name, param in loaded.named_parameters():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, reference.get_parameter(name).to(torch.bfloat16)), name


def test_missing_tensor_is_named(models, tmp_path):
    broken = tmp_path / "broken"
    load_model(str(models["llama"])).save_pretrained(broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CwaError, match=r"no tensor for 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        _load_skeleton(broken)


def test_no_safetensors_means_no_shard_files(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert checkpoint_files(str(tmp_path)) == []
    assert torch.equal(load_model(str(tmp_path)).lm_head.weight, model.lm_head.weight)  # the full-load fallback


def test_bfloat16_checkpoint_into_float32_and_truncated_file(models, tmp_path):
    """A bf16 file read into a float32 model equals the file upcast; a truncated file fails in one sentence."""
    stored = load_file(str(models["llama"] / "model.safetensors"))
    half = tmp_path / "half"
    load_model(str(models["llama"])).config.save_pretrained(half)
    save_file({k: v.to(torch.bfloat16) for k, v in stored.items()}, str(half / "model.safetensors"))
    loaded = _load_skeleton(half, "float32")
    for name, param in loaded.named_parameters():
        assert torch.equal(param, stored[name].to(torch.bfloat16).float()), name
    data = (half / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CwaError, match=r"model\.safetensors' is truncated \("):
        _load_skeleton(half)


_CONVERT_ONCE = """
import sys, time
from pathlib import Path
import cwa.model.loading as models

def fake_convert(target: Path) -> None:  # stands in for the GGUF conversion: slow, writes the cache
    with open(sys.argv[1], "a") as log:
        log.write("converted\\n")
    time.sleep(2)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"x")
    (target / "tokenizer.json").write_text("{}")

models._convert_embedded = fake_convert
print(models.embedded_model_dir())
"""


@pytest.mark.distributed
def test_embedded_conversion_happens_once_across_processes(tmp_path):
    """Two ranks asking for the embedded model at once: one converts under the file lock, the other waits."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CWA_CACHE=str(tmp_path / "cache"))
    log = tmp_path / "conversions.log"
    cmd = [sys.executable, "-c", _CONVERT_ONCE, str(log)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [str(tmp_path / "cache" / "smollm2-135m-instruct")] * 2
    assert log.read_text().splitlines() == ["converted"]


def _tiny_family(family: str):
    """Tiny GPT-NeoX (its checkpoints store ``embed_out`` for the LM head), Mixtral and OLMoE (their
    checkpoints store each expert apart; transformers packs them into one tensor per layer)."""
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
    if family == "gpt_neox":
        config = tf.GPTNeoXConfig(**common, intermediate_size=24, max_position_embeddings=64)
        return tf.GPTNeoXForCausalLM(config).eval()
    moe = {"intermediate_size": 24, "num_key_value_heads": 1, "num_experts_per_tok": 2, "max_position_embeddings": 64}
    if family == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**common, **moe, num_local_experts=4)).eval()
    return tf.OlmoeForCausalLM(tf.OlmoeConfig(**common, **moe, num_experts=4)).eval()


@pytest.mark.parametrize(
    ("family", "stored", "packed"),
    [
        ("gpt_neox", "embed_out.weight", False),
        ("mixtral", "model.layers.0.block_sparse_moe.experts.0.w1.weight", True),
        ("olmoe", "model.layers.0.mlp.experts.0.gate_proj.weight", True),
    ],
)
def test_renamed_and_packed_checkpoints(tmp_path, capsys, family, stored, packed):
    """transformers' own renaming is followed shard by shard; packed experts fall back to a full load with a
    note, never an error; either way the model equals transformers' own load."""
    from cwa.model.shard_loading import load_for_sharding, read_index

    _tiny_family(family).save_pretrained(tmp_path)
    files = checkpoint_files(str(tmp_path))
    assert stored in read_index(files)  # the checkpoint really uses the names transformers converts
    reference = load_model(str(tmp_path))
    model, shard_files = load_for_sharding(str(tmp_path), files)
    assert shard_files == ([] if packed else files)
    if not packed:
        materialize(model, "cpu")
        load_local_shards(model, shard_files)
    note = capsys.readouterr().err
    assert ("loads the whole checkpoint before sharding" in note) == packed
    assert packed is False or "cannot be read shard by shard" in note
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

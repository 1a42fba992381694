"""One rank of a gloo group that shard-loads each model directory given and checks every shard.

For each directory: build the skeleton (meta parameters), ``fully_shard`` it over all ranks, materialize,
fill the local row shards from the safetensors file, then gather every parameter and compare it
bit for bit with the file (``safetensors.torch.load_file``, read independently), check that a tied LM
head is still the embedding's parameter and that the buffers equal a normally loaded model's. Prints one
line per directory on rank 0; exits non-zero on the first difference.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from cwa.model.loading import load_model
from cwa.model.shard_loading import build_skeleton, checkpoint_files, load_local_shards, materialize
from cwa.model.sharding import apply_fsdp2, local_of, shard_rows


def check(directory: str, dtype: str) -> dict:
    model = build_skeleton(directory, dtype)
    apply_fsdp2(model, "cpu")
    materialize(model, "cpu")
    files = checkpoint_files(directory)
    read = load_local_shards(model, files)
    stored = load_file(str(files[0]))
    reference = load_model(directory, dtype)
    tied_names = [
        n for n, p in reference.named_parameters(remove_duplicate=False) if n not in dict(reference.named_parameters())
    ]
    rows = {}
    for name, param in model.named_parameters():
        first, n = shard_rows(param)
        rows[name] = [first, n, list(local_of(param).shape)]
        full = param.full_tensor()
        key = name if name in stored else name.split(".", 1)[1]
        expected = stored[key].to(full.dtype)
        if not torch.equal(full, expected):
            raise AssertionError(f"{name}: gathered tensor differs from the checkpoint")
    for (name, buf), (_, ref) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        if not torch.equal(buf, ref):
            raise AssertionError(f"buffer {name} differs from a normally loaded model's")
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return {"read": read, "rows": rows, "tied": head is embedding, "reference_tied": bool(tied_names)}


def main(out: str, dtype: str, *directories: str) -> int:
    dist.init_process_group("gloo")
    results = {directory: check(directory, dtype) for directory in directories}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(out, "w") as handle:
            json.dump(gathered, handle)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

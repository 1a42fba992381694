"""Shard-only loading under FSDP2: no rank ever holds the whole checkpoint.

The model is built with its parameters on the meta device (buffers such as the rotary ``inv_freq`` are
computed on the CPU as usual: they are tiny), sharded with ``fully_shard``, and only then materialized:
``to_empty`` gives every rank storage for its own row shards, which are filled from the checkpoint's
safetensors files. A row shard of a row-major tensor is one contiguous byte range of the file, so each
rank reads exactly its bytes with ``readinto`` straight into its shard (through a shard-sized buffer when
the dtype or device differs). Not ``safe_open(...).get_slice``: that reads through an mmap whose touched
pages count in the process's resident memory until the file is closed, which on the embedded model kept
the loading peak at the whole-checkpoint level. Every parameter must be filled exactly once; a missing
tensor fails with one sentence naming it. Checkpoints without safetensors fall back to the full load
(cwa.model.loading.load_model).

Checkpoint names are mapped to the model's through transformers' own conversion mapping (its
``WeightRenaming`` rules: GPT-NeoX stores ``embed_out.weight`` for ``lm_head.weight``). A tensor that
transformers builds from several stored ones (``WeightConverter``: Mixtral's and OLMoE's experts, stored one
by one, packed into one 3-D tensor per layer) has no byte range to read: such a checkpoint is loaded in full
before sharding, with a note (``load_for_sharding``).
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch
from torch import nn

from cwa.common.errors import CwaError
from cwa.model.loading import (
    _hub_error,
    _safetensors_problem,
    check_config_sizes,
    missing_tensors_error,
    resolve_model_path,
    torch_dtype,
)
from cwa.model.sharding import local_of, shard_rows, world_and_rank

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_INDEX = "model.safetensors.index.json"


def checkpoint_files(name: str, revision: str | None = None) -> list[Path]:
    """The safetensors files holding ``name``'s weights (the files its index lists, else
    ``model.safetensors``, else every ``*.safetensors``); an empty list when it has none.

    Args:
        name: a local model directory, a hub name (its snapshot is fetched, weights only) or the embedded
            model's name (converted to safetensors once).
        revision: hub revision.
    """
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return _hub_checkpoint_files(str(path), revision)
    if (path / _INDEX).exists():
        weight_map = json.loads((path / _INDEX).read_text())["weight_map"]
        return [path / file for file in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    return sorted(path.glob("*.safetensors"))


def _hub_checkpoint_files(name: str, revision: str | None) -> list[Path]:
    """Download a hub model's safetensors files (index first, else model.safetensors); [] without them."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        try:
            index = Path(hf_hub_download(name, _INDEX, revision=revision))
        except EntryNotFoundError:
            try:
                return [Path(hf_hub_download(name, "model.safetensors", revision=revision))]
            except EntryNotFoundError:
                return []
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [Path(hf_hub_download(name, file, revision=revision)) for file in files]
    except Exception as exc:  # offline, gated, missing repository: one sentence
        raise _hub_error(name, exc) from exc


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside this context every parameter a module registers is moved to the meta device at once, while
    buffers stay where they were computed (the CPU): their values (e.g. rotary ``inv_freq``, which is not
    in checkpoints) are then exactly those of a normally built model."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            kept = module._parameters[name]
            module._parameters[name] = type(kept)(kept.to("meta"), requires_grad=kept.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(
    name: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedModel:
    """``name``'s architecture with meta parameters (no storage) and real buffers, in eval mode; tied
    parameters (an LM head tied to the embedding) are one Parameter, as in a loaded model.

    Args:
        name: a hub name, a local directory or the embedded model's name.
        dtype: the parameters' dtype.
        attn_implementation: attention kernel, or None for the default.
        trust_remote_code: allow custom configuration and model code from the hub.
        revision: hub revision.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as exc:  # transformers raises OSError, ValueError or hub errors here
        raise _hub_error(name, exc) from exc
    check_config_sizes(config.to_dict(), name)
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class Stored:
    """Where one tensor lies in a safetensors file: ``start`` is its first byte in the file."""

    file: Path
    start: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_index(files: list[Path]) -> dict[str, Stored]:
    """Every tensor in ``files`` (their headers only are read), by name."""
    index: dict[str, Stored] = {}
    for file in files:
        problem = _safetensors_problem(file)
        if problem is not None:
            raise CwaError(f"the weight file '{file}' is {problem}; copy or download it again.")
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _DTYPES:
                raise CwaError(f"'{file}' stores '{name}' as {entry['dtype']}, which cwa cannot shard-load.")
            index[name] = Stored(
                file, 8 + length + entry["data_offsets"][0], _DTYPES[entry["dtype"]], tuple(entry["shape"])
            )
    return index


def read_rows(handle: BinaryIO, stored: Stored, first: int, dest: torch.Tensor) -> None:
    """Fill ``dest`` with rows ``first .. first + len(dest)`` of ``stored`` (a 0-d tensor: the whole),
    read from ``handle`` (the open file) as one byte range, converted to ``dest``'s dtype and device."""
    row_bytes = math.prod(stored.shape[1:]) * torch.empty((), dtype=stored.dtype).element_size()
    direct = dest.dtype == stored.dtype and dest.device.type == "cpu" and dest.is_contiguous()
    buffer = dest if direct else torch.empty(dest.shape, dtype=stored.dtype)
    view = memoryview(buffer.detach().reshape(-1).view(torch.uint8).numpy())
    handle.seek(stored.start + first * row_bytes)
    done = 0
    while done < len(view):  # a raw read may return fewer bytes than asked (e.g. beyond 2 GiB)
        got = handle.readinto(view[done:])
        if not got:
            raise CwaError(f"'{stored.file}' ends inside a tensor (truncated); copy or download it again.")
        done += got
    if not direct:
        dest.copy_(buffer)


def _conversions(model: nn.Module) -> tuple[list, list]:
    """transformers' (renamings, converters) for ``model``'s checkpoints; empty where transformers has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # a transformers without conversion mappings renames nothing either
        return [], []
    transforms = get_model_conversion_mapping(model, add_legacy=True)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def model_names(model: nn.Module, stored: list[str]) -> tuple[dict[str, str], list[str]]:
    """The names the model gives the checkpoint's tensors, as transformers' loading renames them.

    Returns ({model name: checkpoint name} for every tensor read as it is, [checkpoint names that
    transformers converts: packed or merged from several stored tensors]).

    Args:
        model: the model the checkpoint is loaded into (a skeleton is enough: only names are read).
        stored: the checkpoint's tensor names.
    """
    renamings, converters = _conversions(model)
    if not renamings and not converters:
        return {name: name for name in stored}, []
    from transformers.core_model_loading import rename_source_key

    wanted = dict.fromkeys(model.state_dict(keep_vars=True), True)
    prefix = getattr(model, "base_model_prefix", None) or None
    renamed, converted = {}, []
    for name in stored:
        target, pattern = rename_source_key(name, renamings, converters, prefix, wanted)
        if pattern is not None:
            converted.append(name)
        else:
            renamed[target] = name
    return renamed, converted


def _candidates(names: list[str], prefix: str) -> Iterator[str]:
    """Checkpoint names a model tensor may be stored under: its own names, then without / with the base
    model's prefix (GPT-2's hub checkpoint stores ``h.0.attn.c_attn.weight`` for
    ``transformer.h.0.attn.c_attn.weight``)."""
    yield from names
    if prefix:
        for name in names:
            if name.startswith(prefix + "."):
                yield name[len(prefix) + 1 :]
            else:
                yield f"{prefix}.{name}"


def _aliases(model: nn.Module) -> list[tuple[nn.Parameter, list[str]]]:
    """Each distinct parameter with every name it has (a tied LM head is one parameter with two names)."""
    groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), (param, []))[1].append(name)
    return list(groups.values())


def materialize(model: nn.Module, device: torch.device | str) -> None:
    """Give every rank storage for its own shards (``to_empty``), keep the buffers computed at build time
    (``to_empty`` would leave them uninitialized: they are moved to ``device`` instead) and keep tied
    parameters one object (FSDP2's DTensors are swapped in place; plain tensors are replaced module by
    module, which would untie them).

    Args:
        model: a model built by ``build_skeleton``, sharded or not.
        device: where the shards live.
    """
    buffers = [(module, key, buf) for module in model.modules() for key, buf in module._buffers.items()]
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, key))
    model.to_empty(device=device)
    for module, key, buf in buffers:
        if buf is not None:
            module._buffers[key] = buf.to(device)
    for (first, first_key), *others in owners.values():
        for module, key in others:
            module._parameters[key] = first._parameters[first_key]


def load_local_shards(model: nn.Module, files: list[Path]) -> int:
    """Fill every rank's row shards of ``model``'s (materialized) parameters from ``files``, and its
    persistent buffers found there; returns the number of elements this rank read.

    Each distinct parameter is filled exactly once, from the first of its names the checkpoint holds, in
    the parameter's dtype. Raises CwaError naming the first tensor the checkpoint lacks, or a shape that
    differs.

    Args:
        model: the sharded model after ``materialize``.
        files: its safetensors files.
    """
    stored = read_index(files)
    renamed, _ = model_names(model, list(stored))
    index = {**stored, **{name: stored[key] for name, key in renamed.items()}}
    prefix = getattr(model, "base_model_prefix", "") or ""
    missing: list[str] = []
    read = 0
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(open(f, "rb", buffering=0)) for f in {s.file for s in index.values()}}
        with torch.no_grad():
            for param, names in _aliases(model):
                key = next((c for c in _candidates(names, prefix) if c in index), None)
                if key is None:
                    missing.append(names[0])
                    continue
                stored = index[key]
                if stored.shape != tuple(param.shape):
                    raise CwaError(
                        f"the checkpoint's '{key}' has shape {stored.shape}, the model's '{names[0]}' "
                        f"{tuple(param.shape)}."
                    )
                local = local_of(param)
                if local.numel():
                    read_rows(handles[stored.file], stored, shard_rows(param)[0], local)
                    read += local.numel()
            for module_name, module in model.named_modules():  # persistent buffers the checkpoint holds
                for attr, buf in module._buffers.items():
                    if buf is None or attr in module._non_persistent_buffers_set:
                        continue
                    name = f"{module_name}.{attr}" if module_name else attr
                    key = next((c for c in _candidates([name], prefix) if c in index), None)
                    if key is not None and index[key].shape == tuple(buf.shape):
                        read_rows(handles[index[key].file], index[key], 0, buf)
    if missing:
        raise missing_tensors_error(files[0].parent, missing)
    return read


def load_for_sharding(
    name: str,
    files: list[Path],
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[PreTrainedModel, list[Path]]:
    """``name`` ready to be sharded: a skeleton and the files to fill its shards from when every tensor can be
    read as stored, else (packed experts, or no safetensors files) the whole model loaded as transformers
    loads it, with a note, and no files.

    Args:
        name: a hub name, a local directory or the embedded model's name.
        files: its safetensors files (``checkpoint_files``; empty: load in full).
        dtype: the parameters' dtype.
        attn_implementation: attention kernel, or None for the default.
        trust_remote_code: allow custom configuration and model code from the hub.
        revision: hub revision.
    """
    from cwa.model.loading import load_model

    options = {"attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code}
    if files:
        skeleton = build_skeleton(name, dtype, revision=revision, **options)
        header_names = list(read_index(files))
        _, converted = model_names(skeleton, header_names)
        if not converted:
            return skeleton, files
        note(
            f"transformers builds {len(converted)} of '{name}''s tensors from several stored ones (e.g. "
            f"'{converted[0]}'), which cannot be read shard by shard: every rank loads the whole checkpoint "
            "before sharding."
        )
        del skeleton
    return load_model(name, dtype, revision=revision, **options), []


def note(message: str) -> None:
    """One line on stderr from rank 0 only."""
    if world_and_rank()[1] == 0:
        print(f"cwa: {message}", file=sys.stderr, flush=True)

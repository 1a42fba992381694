"""Which parameter tensors are scored, and how their names and coordinates read."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cwa.common.errors import CwaError

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.(.+)$")
_SUFFIX = re.compile(r"\.(weight|bias)$")


@dataclass(frozen=True)
class ParamInfo:
    """A scored parameter tensor.

    ``transposed`` is True for GPT-2's ``Conv1D``, which stores its weight as (in, out); row and column
    in cwa's outputs always mean (output unit, input unit), as for ``nn.Linear``.
    """

    name: str
    shape: tuple[int, ...]
    layer: int | None
    module: str
    transposed: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def row_col(self, flat_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(output row, input column) of flat storage indices of a 2-D tensor, else None."""
        if len(self.shape) != 2:
            return None
        r, c = flat_index // self.shape[1], flat_index % self.shape[1]
        return (c, r) if self.transposed else (r, c)

    def expert_row_col(self, flat_index: int) -> tuple[int, int, int] | None:
        """(expert, output row, input column) of a flat index into packed experts (a 3-D (experts, out, in)
        tensor such as Mixtral's ``experts.down_proj``), else None."""
        if len(self.shape) != 3:
            return None
        expert, rest = divmod(int(flat_index), self.shape[1] * self.shape[2])
        return (expert, *divmod(rest, self.shape[2]))


def split_name(name: str) -> tuple[int | None, str]:
    """``model.layers.3.mlp.down_proj.weight`` -> ``(3, "mlp.down_proj")``;
    ``transformer.wte.weight`` -> ``(None, "wte")``."""
    stem = _SUFFIX.sub("", name)
    match = _LAYER.search(stem)
    if match:
        return int(match.group(1)), match.group(2)
    parts = stem.split(".")
    return None, parts[-1] if parts else stem


def as_patterns(patterns: Sequence[str] | str | None) -> list[str]:
    """``include`` / ``exclude`` as a list: a single string is one pattern (``--model.include mlp``).

    Args:
        patterns: None, one pattern, or several.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return [str(p) for p in patterns]


def compile_patterns(patterns: Sequence[str] | str | None, what: str) -> list[re.Pattern]:
    """Compile ``include`` / ``exclude`` patterns; a bad one is one sentence naming it.

    Args:
        patterns: the patterns (a single string is one pattern).
        what: ``include`` or ``exclude``, for the message.
    """
    compiled = []
    for pattern in as_patterns(patterns):
        original = pattern
        if re.fullmatch(r"[\w.-]+", pattern):
            # Only name characters and dots: a plain name, dots literal ("layers.1." is not "layers.10.").
            pattern = re.escape(pattern)
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise CwaError(f"{what} pattern '{original}' is not a valid regular expression: {exc}.") from None
    return compiled


def _matches(name: str, pattern: re.Pattern) -> bool:
    """A pattern matches a full parameter name, or a dot-delimited part of it.

    ``layers.1.`` matches ``model.layers.1.mlp.up_proj.weight`` but never ``model.layers.10...``:
    the match has to start at the beginning of the name or right after a dot.
    """
    for start in [0] + [i + 1 for i, ch in enumerate(name) if ch == "."]:
        m = pattern.match(name, start)
        if m and (m.end() == len(name) or name[m.end() - 1] == "." or name[m.end()] == "."):
            return True
    return False


def select_parameters(
    model: nn.Module, include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None
) -> dict[str, tuple[nn.Parameter, ParamInfo]]:
    """Parameters chosen by ``include`` / ``exclude`` regexes, tied weights once, in model order.

    A pattern selects a parameter when it matches the whole name or a run of whole dot-separated
    components of it (``mlp``, ``layers.1``, ``layers\\.1[0-9]\\.mlp\\..*``, ``.*down_proj.weight``).
    A pattern of only name characters and dots is a plain name: its dots are literal.
    """
    inc, exc = compile_patterns(include, "include"), compile_patterns(exclude, "exclude")
    transposed = _transposed_names(model)
    selected: dict[str, tuple[nn.Parameter, ParamInfo]] = {}
    for name, param in model.named_parameters():  # remove_duplicate=True: tied weights appear once
        if inc and not any(_matches(name, p) for p in inc):
            continue
        if any(_matches(name, p) for p in exc):
            continue
        layer, module = split_name(name)
        shape = tuple(param.shape)
        selected[name] = (param, ParamInfo(name, shape, layer, module, name in transposed))
    if not selected:
        raise CwaError(
            f"include={as_patterns(include)} / exclude={as_patterns(exclude)} select no parameter of the model; "
            f"names look like '{next(iter(dict(model.named_parameters())), '?')}'."
        )
    return selected


def _transposed_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, module in model.named_modules():
        if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight is (in, out)
            names.add(f"{mod_name}.weight" if mod_name else "weight")
    return names

"""Published super-weight coordinates, so that a scan of one of these models says which it recovered.

Source: Yu et al. 2024, "The Super Weight in Large Language Models" (arXiv:2411.07191), the coordinates
listed by the authors' code; coordinates are ``model.layers[layer].mlp.down_proj.weight[row, col]`` (row:
output channel, col: input channel, ``nn.Linear`` storage). The source names models, not hub repositories:
the hub names below are the public repositories of those exact checkpoints, as cwa maps them.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "Yu et al. 2024, The Super Weight in Large Language Models, arXiv:2411.07191 (authors' code)"


@dataclass(frozen=True)
class PublishedSuperWeight:
    """One published super weight: ``layers[layer].mlp.down_proj.weight[row, col]`` of ``model``."""

    model: str
    layer: int
    row: int
    col: int
    source: str = SOURCE


def _entries(model: str, *coordinates: tuple[int, int, int]) -> tuple[PublishedSuperWeight, ...]:
    return tuple(PublishedSuperWeight(model, layer, row, col) for layer, row, col in coordinates)


PUBLISHED: dict[str, tuple[PublishedSuperWeight, ...]] = {
    "huggyllama/llama-7b": _entries("Llama-7B", (2, 3968, 7003)),
    "huggyllama/llama-13b": _entries("Llama-13B", (2, 2231, 2278), (2, 2231, 6939)),
    "mistralai/mistral-7b-v0.1": _entries("Mistral-7B-v0.1", (1, 2070, 7310)),
    "meta-llama/meta-llama-3-8b": _entries("Meta-Llama-3-8B", (1, 788, 2427), (1, 1384, 2427), (1, 4062, 2427)),
    "allenai/olmo-7b-0724-hf": _entries("OLMo-7B-0724", (1, 269, 7467), (2, 269, 8275), (7, 269, 453), (24, 269, 2300)),
}
"""Published coordinates by hub name (lower case)."""


def published_super_weights(model_name: str) -> tuple[PublishedSuperWeight, ...]:
    """The published coordinates for a hub name, or for a local directory named like the repository.

    Args:
        model_name: ``huggyllama/llama-7b`` (any case), or a path whose last part is the repository's name
            (``/models/Meta-Llama-3-8B``).
    """
    key = model_name.strip().rstrip("/").lower()
    if key in PUBLISHED:
        return PUBLISHED[key]
    base = key.replace("\\", "/").rsplit("/", 1)[-1]
    matches = [v for k, v in PUBLISHED.items() if k.rsplit("/", 1)[-1] == base]
    return matches[0] if len(matches) == 1 else ()

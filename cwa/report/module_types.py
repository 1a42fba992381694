"""Coordinates that mean the same thing in every model: a tensor's module type, normalised across families, and its
relative depth (layer index / number of layers) in tenths, with the embeddings before the first block and the
final norm and LM head after the last.

Families name the same part differently (GPT-2 ``attn.c_attn`` is Llama's q/k/v fused, ``mlp.c_fc`` its
``up_proj``; OPT ``fc1`` / ``fc2``, GPT-NeoX ``dense_h_to_4h`` / ``dense_4h_to_h``, Mixtral's experts ``w1`` /
``w3`` / ``w2``). :func:`module_type` maps a scored tensor to one of :data:`MODULE_TYPES`; :func:`depth_bin` to one
of :data:`DEPTH_BINS`.
"""

from __future__ import annotations

from cwa.model.params import ParamInfo

EMBEDDING, LM_HEAD, NORM, BIAS, ROUTER, OTHER = "embedding", "LM head", "norm", "bias", "router", "other"
ATTN_Q, ATTN_K, ATTN_V, ATTN_QKV, ATTN_OUT = "attn q", "attn k", "attn v", "attn qkv (fused)", "attn out"
MLP_GATE, MLP_UP, MLP_GATE_UP, MLP_DOWN = "MLP gate", "MLP up", "MLP gate+up (fused)", "MLP down"

MODULE_TYPES = (EMBEDDING, ATTN_Q, ATTN_K, ATTN_V, ATTN_QKV, ATTN_OUT, MLP_GATE, MLP_UP, MLP_GATE_UP, MLP_DOWN,
                ROUTER, NORM, BIAS, LM_HEAD, OTHER)  # fmt: skip
"""Every normalised module type, in the order tables and figures list them."""

# The last component of a module's name -> its type; "c_proj" and "dense" depend on their parent (below).
_BY_NAME = {
    **dict.fromkeys(("q_proj", "query", "wq", "q"), ATTN_Q),
    **dict.fromkeys(("k_proj", "key", "wk", "k"), ATTN_K),
    **dict.fromkeys(("v_proj", "value", "wv", "v"), ATTN_V),
    **dict.fromkeys(("c_attn", "query_key_value", "qkv_proj", "wqkv", "qkv"), ATTN_QKV),
    **dict.fromkeys(("o_proj", "out_proj", "wo", "o"), ATTN_OUT),
    **dict.fromkeys(("gate_proj", "w1"), MLP_GATE),
    **dict.fromkeys(("up_proj", "c_fc", "fc1", "fc_in", "dense_h_to_4h", "w3"), MLP_UP),
    **dict.fromkeys(("gate_up_proj",), MLP_GATE_UP),
    **dict.fromkeys(("down_proj", "fc2", "fc_out", "dense_4h_to_h", "w2"), MLP_DOWN),
    **dict.fromkeys(("gate", "router", "shared_expert_gate"), ROUTER),
    **dict.fromkeys(("lm_head", "embed_out"), LM_HEAD),
    **dict.fromkeys(("wte", "wpe", "embed_tokens", "embed_positions", "embed_in", "word_embeddings"), EMBEDDING),
}
_ATTENTION_PARENTS = ("attn", "attention", "self_attn", "self_attention")


def module_type(info: ParamInfo) -> str:
    """The normalised type of a scored tensor: a linear layer's bias is ``bias``, a norm's weight and bias ``norm``.

    Args:
        info: the tensor as the run records it (its module path within the block, e.g. ``mlp.c_proj``).
    """
    parts = info.module.lower().split(".")
    last, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if "norm" in last or last.startswith("ln"):
        return NORM
    if info.name.endswith(".bias"):
        return BIAS
    if last in ("c_proj", "dense"):
        if parent in _ATTENTION_PARENTS:
            return ATTN_OUT
        return MLP_DOWN if last == "c_proj" or parent == "mlp" else OTHER
    if last in _BY_NAME:
        return _BY_NAME[last]
    return EMBEDDING if "embed" in last else OTHER


DEPTH_TENTHS = tuple(f"{i / 10:.1f}–{(i + 1) / 10:.1f}" for i in range(10))
BEFORE, AFTER = "embeddings", "final norm / head"
DEPTH_BINS = (BEFORE, *DEPTH_TENTHS, AFTER)
"""Relative depth: the tensors before the first block, the blocks in tenths of the depth, the tensors after."""


def depth_bin(info: ParamInfo, layers: int) -> str:
    """The relative-depth bin of a tensor: block ``l`` of ``layers`` falls in tenth ⌊10·l/layers⌋; a tensor outside
    the blocks sits before them (embeddings) or after them (the final norm, the LM head, anything else).

    Args:
        info: the tensor.
        layers: the model's number of blocks (at least the largest recorded layer index + 1).
    """
    if info.layer is None:
        return BEFORE if module_type(info) == EMBEDDING else AFTER
    return DEPTH_TENTHS[min(9, 10 * info.layer // max(1, layers))]


def relative_depth(layer: int, layers: int) -> float:
    """Layer index / number of layers (0 for the first block)."""
    return layer / max(1, layers)


def count_layers(infos: dict[str, ParamInfo]) -> int:
    """The number of blocks a run's tensors span: the largest layer index + 1 (0 without blocks)."""
    return max((i.layer for i in infos.values() if i.layer is not None), default=-1) + 1

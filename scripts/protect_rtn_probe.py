"""Why protecting Wanda's top-1,000 weights makes per-row 4-bit RTN worse on the embedded SmolLM2 (issue 19).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/protect_rtn_probe.py

A cheap probe, not the protect sweep: 4 calibration and 8 held-out sequences of 64 tokens of pydoc text
(``str`` and ``dict``), Wanda scores |W|·‖x_j‖ from the calibration inputs, symmetric per-row 4-bit RTN of every
linear weight of the blocks through cwa's own ``rtn``, checked against a hand-written quantizer. It separates
the two parts of protection: the protected weights keep their values, and they leave their row's range.
About two minutes on a 2-core CPU.
"""

from __future__ import annotations

import math
import pydoc

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from cwa.ablation.quantize import rtn
from cwa.model.loading import load_tokenizer, resolve_model_path


def reference_rtn(weight: Tensor, protected: Tensor) -> Tensor:
    """Per-row absmax 4-bit RTN written out independently; protected weights exact and out of the range."""
    keep = torch.zeros(weight.numel(), dtype=torch.bool)
    keep[protected] = True
    keep = keep.view(weight.shape)
    scale = weight.abs().masked_fill(keep, 0).amax(1, keepdim=True) / 7
    return torch.where(keep, weight, torch.round(weight / scale).clamp(-8, 7) * scale)


def main() -> None:
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m"), dtype=torch.float32).eval()
    text = pydoc.render_doc(str, renderer=pydoc.plaintext) + pydoc.render_doc(dict, renderer=pydoc.plaintext)
    ids = load_tokenizer("smollm2-135m")(text, return_tensors="pt").input_ids[0]
    calib, held = ids[:256].reshape(4, 64), ids[256:768].reshape(8, 64)
    linear = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    inputs: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, i, _o, n=n: inputs.__setitem__(n, i[0].reshape(-1, i[0].shape[-1])))
        for n, m in linear.items()
    ]
    with torch.no_grad():
        model(calib)
    for hook in hooks:
        hook.remove()
    original = {n: m.weight.detach().clone() for n, m in linear.items()}
    names = list(linear)
    scores = torch.cat([(original[n].abs() * inputs[n].norm(dim=0)).flatten() for n in names])
    offsets = torch.tensor([0] + [original[n].numel() for n in names]).cumsum(0)
    top = scores.topk(1000).indices
    chosen = {n: top[(top >= offsets[t]) & (top < offsets[t + 1])] - offsets[t] for t, n in enumerate(names)}
    chosen = {n: i for n, i in chosen.items() if i.numel()}
    none = torch.empty(0, dtype=torch.long)
    plain = {n: rtn(original[n], 4, None, True) for n in names}
    guarded = {n: rtn(original[n], 4, None, True, chosen[n]) if n in chosen else plain[n] for n in names}
    same = all(torch.equal(guarded[n], reference_rtn(original[n], chosen.get(n, none))) for n in names)
    print("cwa rtn equals the hand-written quantizer on every tensor:", same)

    def perplexity(weights: dict[str, Tensor]) -> float:
        for n in names:
            linear[n].weight.data.copy_(weights[n])
        with torch.no_grad():
            return math.exp(model(held, labels=held).loss.item())

    def output_error(weights: dict[str, Tensor]) -> float:
        return sum(float(((original[n] - weights[n]) @ inputs[n].T).norm() ** 2) for n in names)

    exact_only = {n: plain[n].clone() for n in names}
    range_only = {n: guarded[n].clone() for n in names}
    for n, index in chosen.items():
        exact_only[n].view(-1)[index] = original[n].view(-1)[index]
        range_only[n].view(-1)[index] = plain[n].view(-1)[index]
    for label, weights in [
        ("dense", original),
        ("K = 0", plain),
        ("top-1,000 protected", guarded),
        ("values kept exact, range as K = 0", exact_only),
        ("range without them, values rounded as K = 0", range_only),
    ]:
        print(f"{label}: perplexity {perplexity(weights):.2f}, sum of ||(W - Q) X||^2 {output_error(weights):.4g}")
    for n, index in sorted(chosen.items(), key=lambda kv: -kv[1].numel())[:3]:
        mask = torch.zeros(original[n].numel(), dtype=torch.bool)
        mask[index] = True
        delta = ((original[n] - plain[n]).view(-1) * mask).view(original[n].shape) @ inputs[n].T
        per_token = delta.norm(dim=0)
        columns, counts = torch.unique(index % original[n].shape[1], return_counts=True)
        print(
            f"{n}: {index.numel()} protected, most in column {int(columns[counts.argmax()])} "
            f"({int(counts.max())}); their K = 0 output error per token: max {float(per_token.max()):.4g}, "
            f"median {float(per_token.median()):.4g}"
        )
    for n, index in chosen.items():  # protection within one tensor, every other tensor rounded as at K = 0
        print(f"protected only in {n} ({index.numel()}): perplexity {perplexity({**plain, n: guarded[n]}):.2f}")
    print("restored dense perplexity:", f"{perplexity(original):.2f}")


if __name__ == "__main__":
    main()

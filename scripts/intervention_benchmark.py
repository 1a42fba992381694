"""Benchmark rows of ``cwa prune`` / ``cwa protect``: what a transform and its restore cost against the held-out
pass they serve, and cwa's Wanda masks beside torchao's ``WandaSparsifier`` where torchao imports.

    python scripts/intervention_benchmark.py --run lightning_logs/smollm2-135m/version_0 --heldout_samples 8

Part 1 (``--run``, a fit-sensitivity run): loads the run's model and held-out blocks once, then for each stress
times one in-place transform of every linear weight plus its bit-exact, checksummed restore, against one held-out
pass. Part 2 (always, on a tiny random Llama built here): Wanda masks from cwa (row and tensor groups, 2:4) and
from torchao (which ranks |W| · Σx² over the whole layer, the squared input norm, not Wanda's |W| · ‖X‖ per
output row), as the share of weights on which the masks agree. llm-compressor is not compared: its releases pin
transformers below the version cwa needs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cwa.ablation.interventions import RTN, BitErrors, Noise, Prune, StressContext, intervened
from cwa.ablation.pruning import prune_key, tensor_mask


def cost_rows(run_path: str, heldout_samples: int, repeats: int, with_global: bool) -> list[dict]:
    from cwa.perturb.evaluate import evaluate
    from cwa.prune.session import HeldOutSession
    from cwa.rundir import Run

    run = Run.load(run_path)
    session = HeldOutSession(run, heldout_samples, None, None, "cpu", False, True)
    session.load()
    params = session.tensors(list(run.infos), "linear")
    transposed = session.transposed(list(params))
    batch = int(run.data.get("batch_size") or 4)
    evaluation = evaluate(session.model, session.blocks, batch, session.device)
    start = time.perf_counter()
    for name in params:  # once per command: the originals' checksums that every restore is verified against
        session.checksums.original(name)
    rows = [{"stress": "checksums of the originals (once)", "seconds": round(time.perf_counter() - start, 3)}]
    print(json.dumps(rows[-1]), flush=True)
    stresses = [Prune(0.5, "row"), Prune(0.0, "row", "2:4"), RTN(4, 64), BitErrors(1e-6, "exponent"), Noise(0.1)]
    if with_global:
        stresses.append(Prune(0.5, "global"))
    for stress in stresses:
        times = []
        for seed in range(repeats):
            context = StressContext(params, {}, transposed, generator=torch.Generator().manual_seed(seed))
            start = time.perf_counter()
            with intervened(stress, context, session.checksums):
                applied_s = time.perf_counter() - start
            times.append((applied_s, time.perf_counter() - start))
        apply_s = min(t[0] for t in times)
        total_s = min(t[1] for t in times)
        rows.append(
            {
                "stress": stress.describe(),
                "weights": sum(p.numel() for p in params.values()),
                "heldout_pass_s": round(evaluation.seconds, 3),
                "apply_s": round(apply_s, 3),
                "apply_restore_verify_s": round(total_s, 3),
                "share_of_pass": round(total_s / evaluation.seconds, 4),
                "heldout_tokens": int(session.blocks.numel()),
            }
        )
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    return rows


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def torchao_rows() -> list[dict]:
    """cwa's masks beside torchao's WandaSparsifier on a tiny random Llama (same calibration tokens)."""
    try:
        from torchao.sparsity import WandaSparsifier
    except ImportError as exc:
        print(json.dumps({"torchao": f"not importable ({exc})"}))
        return []
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    names = [n for n, m in _tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    sums = _input_square_sums(_tiny_llama(), names, tokens)
    rows = []
    for block in (None, 4):
        model = _tiny_llama()
        sparsifier = WandaSparsifier(sparsity_level=0.5, semi_structured_block_size=block)
        sparsifier.prepare(model, [{"tensor_fqn": f"{n}.weight"} for n in names])
        with torch.no_grad():
            model(input_ids=tokens)
        sparsifier.step()
        modules = dict(model.named_modules())
        theirs = {n: modules[n].parametrizations.weight[0].mask == 0 for n in names}
        weights = {n: modules[n].parametrizations.weight.original.detach() for n in names}
        structure = "unstructured" if block is None else "2:4"
        for label, key_of, group in (
            ("cwa wanda |W|·‖X‖, row groups", lambda n, w=weights: w[n].abs() * sums[n].sqrt(), "row"),
            ("cwa wanda |W|·‖X‖, tensor groups", lambda n, w=weights: w[n].abs() * sums[n].sqrt(), "tensor"),
            ("cwa on torchao's |W|·Σx², tensor groups", lambda n, w=weights: w[n].abs() * sums[n], "tensor"),
        ):
            if structure == "2:4" and group == "tensor" and "Σx²" not in label:
                continue
            agree = sum(
                int((tensor_mask(prune_key(key_of(n)), 0.5, group, structure) == theirs[n]).sum()) for n in names
            )
            total = sum(theirs[n].numel() for n in names)
            rows.append(
                {
                    "reference": "torchao WandaSparsifier",
                    "structure": structure,
                    "cwa": label,
                    "mask_agreement": round(agree / total, 6),
                }
            )
            print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    return rows


def _input_square_sums(model, names: list[str], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σx² over every calibration token of each linear layer's input channels."""
    sums: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook_for(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)

        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    with torch.no_grad():
        model(input_ids=tokens)
    for handle in handles:
        handle.remove()
    return {n: s.float() for n, s in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a fit-sensitivity run directory (its model and held-out blocks)")
    parser.add_argument("--heldout_samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("--threads", type=int, help="torch threads (on a shared machine 1 avoids OpenMP contention)")
    parser.add_argument("--with_global", action="store_true", help="also time global pruning (31 counting passes)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {
        "cost": cost_rows(args.run, args.heldout_samples, args.repeats, args.with_global) if args.run else [],
        "torchao": torchao_rows(),
    }
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()

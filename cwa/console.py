"""What a user reads at the end of a command."""

from __future__ import annotations


def print_fit_result(trainer, module, rows: int = 10) -> None:
    if not trainer.is_global_zero or module.topk is None:
        return
    run_dir = module.run_dir
    scorer = module.scorer
    seconds = sum(module.timings.values())
    print()
    print(f"cwa fit-sensitivity: {module.pretrained} · {scorer.name} · {module.mode} k={module.k}")
    print(
        f"  {int(scorer.tokens):,} calibration tokens, mean NLL {scorer.mean_loss:.4f}, "
        f"{sum(i.numel for i in module.selected.values()):,} weights scored in {len(module.selected)} tensors, "
        f"{seconds:.1f} s"
    )
    print(f"  {'rank':>4}  {'score':>11}  {'weight':>10}  where")
    for i in range(min(rows, len(module.topk))):
        name = module.topk.names[int(module.topk.param[i])]
        index = int(module.topk.index[i])
        info = module.selected[name]
        import torch

        rc = info.row_col(torch.tensor(index))
        where = f"{name}[{int(rc[0])}, {int(rc[1])}]" if rc is not None else f"{name}[{index}]"
        if module.topk.weight is not None:  # sharded runs: no rank holds the whole tensor
            weight = module.topk.weight[i]
        else:
            weight = dict(module.model.named_parameters())[name].detach().reshape(-1)[index]
        print(f"  {i + 1:>4}  {float(module.topk.score[i]):>11.4g}  {float(weight):>10.4g}  {where}")
    print(f"  run directory: {run_dir}")

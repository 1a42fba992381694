"""What a user reads at the end of a command."""

from __future__ import annotations

from cwa.fit.callbacks import FitResult


def print_fit_result(result: FitResult, rows: int = 10) -> None:
    """The run in a few lines and its best ``rows`` weights (on the process that wrote the summary).

    Args:
        result: the finished run, as ``CwaTrainer.fit_sensitivity`` returns it.
        rows: how many of the top-K weights to list.
    """
    summary, topk = result.summary, result.topk
    if summary is None or topk is None:
        return
    seconds = sum(summary.timings.values())
    print()
    print(f"cwa fit-sensitivity: {summary.model} · {summary.metric_name} · {summary.mode} k={summary.k}")
    print(
        f"  {summary.tokens:,} calibration tokens, mean NLL {summary.mean_loss:.4f}, "
        f"{summary.num_scored:,} weights scored in {summary.scored_tensors} tensors, {seconds:.1f} s"
    )
    print(f"  {'rank':>4}  {'score':>11}  {'weight':>10}  where")
    for i in range(min(rows, len(topk))):
        name = topk.names[int(topk.param[i])]
        index = int(topk.index[i])
        rc = result.infos[name].row_col(topk.index[i])
        packed = result.infos[name].expert_row_col(index)
        where = f"{name}[{int(rc[0])}, {int(rc[1])}]" if rc is not None else f"{name}[{index}]"
        if packed is not None:
            where = f"{name}[expert {packed[0]}: {packed[1]}, {packed[2]}]"
        weight = float("nan") if topk.weight is None else float(topk.weight[i])
        print(f"  {i + 1:>4}  {float(topk.score[i]):>11.4g}  {weight:>10.4g}  {where}")
    print(f"  run directory: {result.run_dir}")

"""Lightning strategies for fit-sensitivity: which one shards the model, which one is refused, and the
``fsdp2`` strategy name. The tensor side of sharding (FSDP2, row shards, collectives) is plain torch in
:mod:`cwa.model.sharding`.

Nothing here runs at import: :class:`cwa.fit.trainer.CwaTrainer` calls :func:`register_strategy_name` before
Lightning resolves ``--trainer.strategy``.
"""

from __future__ import annotations

from cwa.common.errors import CwaError

FSDP2_STRATEGY = "fsdp2"
"""``--trainer.strategy=fsdp2``: Lightning's ``ModelParallelStrategy``, which cwa shards with FSDP2."""


def register_strategy_name() -> None:
    """Make ``fsdp2`` a strategy name (Lightning registers ModelParallelStrategy under none)."""
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
    except ImportError:
        return
    if FSDP2_STRATEGY not in StrategyRegistry:
        StrategyRegistry.register(
            FSDP2_STRATEGY, ModelParallelStrategy, description="FSDP2 fully_shard over all processes (cwa)"
        )


def is_sharded_strategy(strategy: object) -> bool:
    """True for Lightning's ``ModelParallelStrategy`` (FSDP2), where cwa shards the model itself."""
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # lightning < 2.4
        return False
    return isinstance(strategy, ModelParallelStrategy)


def check_supported_strategy(strategy: object) -> None:
    """Refuse strategies whose gradient layout cwa cannot read, with the one to use instead."""
    try:
        from lightning.pytorch.strategies import FSDPStrategy
    except ImportError:
        return
    if isinstance(strategy, FSDPStrategy):
        raise CwaError(
            "fit-sensitivity does not support FSDPStrategy (FSDP1 flattens parameters, so per-weight "
            "gradients have no stable coordinates); use class_path lightning.pytorch.strategies."
            "ModelParallelStrategy (FSDP2, same memory savings, GPUs and CPU) as in configs/llama-3.1-8b.yaml."
        )

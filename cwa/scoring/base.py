"""The base of every per-weight metric, :class:`Scorer`, and what a metric declares about itself (no Lightning).

A scorer is bound to the parameters it scores, sees the calibration batches one by one through
``update`` and returns one score tensor per parameter from ``compute``. The contract
(``docs/design.md``): L is the token-weighted mean next-token NLL over all calibration tokens. The metrics
themselves are in :mod:`cwa.scoring.scorers`, :mod:`cwa.scoring.hutchinson`, :mod:`cwa.scoring.saliency`
and :mod:`cwa.scoring.obd`.

Accumulators are float32 whatever the model's dtype. Gradients are consumed by
post-accumulate-grad hooks as soon as each one is ready and then freed, so a scorer never holds a
second full copy of the gradients.

Sharded parameters (FSDP2 DTensors, ``bind(params, sharded=True)``): accumulators cover this rank's row shard only;
the gradient a hook sees is already the sum over ranks (reduce-scatter), so ``reduce`` sums only the
counters. Metrics that are not linear in the batch (``turn_taking``) let the module run one rank's
batch at a time with the other ranks idle (see ``SensitivityModule``): those ranks call ``take_part``,
which runs the same passes and counts nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from cwa.common.errors import CwaError
from cwa.scoring.sizing import Layout, MetricMemory, consumed_gradients, float32_accumulators

Batch = dict[str, Tensor]
LossFn = Callable[[Batch], tuple[Tensor, int]]
"""Maps a batch to (sum of next-token NLL over its counted tokens, number of counted tokens)."""


class Scorer:
    """Base class: float32 accumulators, counters, distributed reduction and checkpoint state.

    Everything cwa needs to know about a metric is declared on its class, each with a default here, so that a
    metric given only by ``class_path`` works everywhere (``--dry_run``, the summary, the report):

    * ``name``: its short name in summaries and run directories.
    * ``description``: one line for the report's metric table (default: the docstring's first paragraph).
    * ``needs_data``, ``signed``, ``turn_taking``: see below; ``repeats_passes``, ``required_attn_implementation``.
    * ``settings()``: the options asked for; ``facts()``: what the run found out. Both go to ``summary.json``.
    * ``memory(layout, weight_bytes)``: what it holds beside the weights, as ``--dry_run`` counts it (default:
      one float32 accumulator per scored weight and, when it needs data, gradients consumed as they are ready).
    * ``plan_scored(model, params)``: the tensors it would score (default: all given).
    * ``check_plan(dtype, sharded)``: refuse, before anything is loaded, settings its ``bind`` would refuse.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    """One line for the report; a subclass that sets none gets its docstring's summary (first paragraph)."""
    needs_data: ClassVar[bool] = True
    """Takes gradients or activations from the calibration data (False: only the loss is measured)."""
    signed: ClassVar[bool] = False
    """Scores may be negative; they are ranked by absolute value."""
    turn_taking: ClassVar[bool] = False
    """Not linear in the batch (squares, per-batch probes): under sharding each rank's batch runs alone."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "description" not in cls.__dict__ and cls.__doc__:  # without a docstring, the parent's stays
            summary = inspect.cleandoc(cls.__doc__).split("\n\n")[0]
            cls.description = " ".join(summary.split())

    @property
    def repeats_passes(self) -> bool:
        """Several forward+backward passes over each batch: the loop keeps freed memory for them
        (:func:`cwa.common.environment.keep_freed_memory`)."""
        return False

    def __init__(self) -> None:
        self.params: dict[str, nn.Parameter] = {}
        self.acc: dict[str, Tensor] = {}
        # tokens, summed NLL, micro-batches, probes: float64 so that token counts stay exact.
        self.counters = torch.zeros(4, dtype=torch.float64)
        self.step = 0
        self.sharded = False  # given to bind; read only afterwards
        self._counting = True  # False only inside take_part

    # -- setup ---------------------------------------------------------------------------------
    def required_attn_implementation(self) -> str | None:
        """Attention kernel the metric needs (``eager`` for double backward), or None for any."""
        return None

    def bind(self, params: dict[str, nn.Parameter], sharded: bool = False) -> None:
        """Attach to the parameters to score and allocate zeroed float32 accumulators beside them.

        Args:
            params: the scored parameters by name.
            sharded: the parameters are FSDP2 row shards (DTensors) of a model sharded over the processes.
        """
        self.params = dict(params)
        self.sharded = sharded
        self.acc = {}
        if self.needs_data:
            self.acc = {
                n: torch.zeros(_local(p).shape, dtype=torch.float32, device=p.device) for n, p in params.items()
            }
        self.counters = torch.zeros(4, dtype=torch.float64)

    def settings(self) -> dict:
        """The metric's options (what was asked for), for the summary and the checkpoints' fingerprint."""
        return {}

    def facts(self) -> dict:
        """What this run found out about the metric (tensors it cannot score, weights a step cannot move...),
        recorded in the summary beside the settings. Default: nothing."""
        return {}

    def check_plan(self, dtype: str, sharded: bool) -> None:
        """Refuse, before any weight is loaded, the settings ``bind`` would refuse. Default: none.

        Args:
            dtype: the weights' dtype (``float32``, ``bfloat16``, ``float16``).
            sharded: whether the run shards the model with FSDP2.
        """

    def plan_scored(self, model: nn.Module, params: dict[str, nn.Parameter]) -> tuple[list[str], list[int]]:
        """The tensors this metric would score among ``params``, and the widths of the distinct layer inputs it
        reads, found without weights (``model`` may be on the meta device). Default: every tensor, no inputs.

        Args:
            model: the model the parameters belong to.
            params: the selected parameters by name.
        """
        return list(params), []

    def memory(self, layout: Layout, weight_bytes: int) -> MetricMemory:
        """What this metric holds beside the weights on the fullest rank (``cwa.scoring.sizing``). Default: one
        float32 accumulator per scored weight and, when it needs data, each gradient consumed by a hook as
        soon as it is ready (``_consume_grads``).

        Args:
            layout: what each rank holds of the model and of the scored tensors.
            weight_bytes: bytes per weight in the model's dtype.
        """
        gradients = consumed_gradients(layout, weight_bytes) if self.needs_data else 0
        return MetricMemory(gradients, float32_accumulators(layout))

    def attach(self, model: nn.Module) -> None:
        """Called by the module after ``bind`` with the model itself; scorers that read layer inputs
        (``cwa.scoring.saliency``) register their hooks here. Default: nothing."""

    # -- accumulation --------------------------------------------------------------------------
    @property
    def tokens(self) -> float:
        return float(self.counters[0])

    @property
    def mean_loss(self) -> float:
        return float(self.counters[1] / self.counters[0]) if self.counters[0] > 0 else float("nan")

    def _count(self, nll: Tensor, tokens: int, microbatches: int = 0, probes: int = 0) -> None:
        if not self._counting:
            return
        value = float(nll.detach())
        if not math.isfinite(value):
            for name, param in self.params.items():  # a damaged checkpoint, not the dtype or the data
                bad = int((~torch.isfinite(_local(param).detach())).sum())
                if bad:
                    raise CwaError(
                        f"the calibration loss became {value} because the weights of '{name}' hold {bad} non-finite "
                        "values (NaN or inf); the checkpoint is damaged, so restore it from where it came from."
                    )
            raise CwaError(f"the calibration loss became {value}; check the model's dtype and the data.")
        self.counters += torch.tensor([tokens, value, microbatches, probes], dtype=torch.float64)

    def update(self, batch: Batch, loss_fn: LossFn) -> None:
        raise NotImplementedError

    def receive_counters(self, counters: Tensor) -> None:
        """Take the loss and token counts that a driver of several metrics (a shared pass) counted once for all."""
        self.counters.copy_(counters)

    def take_part(self, batch: Batch, loss_fn: LossFn) -> None:
        """Run ``update``'s passes for another rank's turn (or a filler batch) under sharding: every collective
        of forward and backward takes place, nothing is counted. ``loss_fn`` should weigh nothing."""
        self._counting = False
        try:
            self.update(batch, loss_fn)
        finally:
            self._counting = True

    def set_step(self, step: int) -> None:
        """The global index of the batch about to be seen (random metrics seed their probes with it,
        so that any split of the batches over processes gives the same result)."""
        self.step = step

    def _consume_grads(self, fn: Callable[[str, Tensor], None]) -> contextlib.AbstractContextManager[None]:
        """Call ``fn(name, grad)`` as each scored parameter's gradient is ready, then free the gradient."""
        return consume_grads(self.params, fn)

    # -- results -------------------------------------------------------------------------------
    def reduce(self, all_reduce: Callable[[Tensor], None]) -> None:
        """Sum accumulators and counters over processes: one collective per tensor. Sharded
        accumulators already hold the sum over ranks (backward reduce-scatters gradients): only the
        counters are summed then."""
        if not self.sharded:
            for tensor in self.acc.values():
                all_reduce(tensor)
        self._reduce_counters(all_reduce)

    def _reduce_counters(self, all_reduce: Callable[[Tensor], None]) -> None:
        # Counters live on the CPU; NCCL reduces device tensors only.
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        counters = self.counters.to(device)
        all_reduce(counters)
        self.counters.copy_(counters.cpu())

    def compute(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def nonfinite(self) -> list[str]:
        """Names of the accumulators (this rank's part) holding NaN or Inf: an overflowed gradient."""
        return [name for name, tensor in self.acc.items() if not bool(torch.isfinite(tensor).all())]

    def check_finite(self) -> None:
        bad = self.nonfinite()
        if bad:
            raise nonfinite_error(bad[0], next(iter(self.params.values())).dtype)

    def state_dict(self) -> dict:
        return {"acc": self.acc, "counters": self.counters}

    def load_state_dict(self, state: dict) -> None:
        for name, tensor in state["acc"].items():
            self.acc[name].copy_(tensor)
        self.counters.copy_(state["counters"])


@contextlib.contextmanager
def consume_grads(params: dict[str, nn.Parameter], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    """While open, call ``fn(name, grad)`` as each of ``params``' gradients is ready (``grad`` this rank's part),
    then free the gradient: no second copy of the gradients is ever held."""

    def hook_for(name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            grad = param.grad
            fn(name, _local(grad))
            param.grad = None

        return hook

    handles = [p.register_post_accumulate_grad_hook(hook_for(n)) for n, p in params.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def nonfinite_error(name: str, dtype: torch.dtype) -> CwaError:
    hint = "use dtype bfloat16 or float32" if dtype == torch.float16 else "try dtype float32"
    return CwaError(
        f"the gradient of '{name}' overflowed (NaN or Inf in a {str(dtype).removeprefix('torch.')} model); "
        f"{hint}, a shorter seq_len, or exclude that tensor."
    )


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor

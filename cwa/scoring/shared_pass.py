"""Several metrics from one forward and backward per batch (``model.metric`` given as a list).

The metrics that can share a pass and what each takes from it:

* ``magnitude``: nothing (|w| at the end);
* ``wanda``: the layer inputs of the forward pass (its forward pre-hooks);
* ``grad_x_weight`` (and ``obd``'s ``signed_taylor`` gradient): the gradient of the summed loss;
* ``grad_squared`` and ``obd`` with ``hessian: fisher``: the squared gradient of each micro-batch's mean loss.

When a squared-gradient metric is in the set every batch is split into its micro-batches and each one
gets one forward and one backward of its mean loss: the squared metrics add g_m ** 2 exactly as they do
alone, and the summed-gradient metrics add t_m * g_m (t_m the micro-batch's token count), which is the
gradient of its summed loss up to float rounding. Without a squared metric one forward and backward of the
batch's summed loss serves every member exactly as it serves ``grad_x_weight`` alone. ``hutchinson_diag``
and ``obs`` need passes (or matrices) of their own and are refused in a list.

Each member keeps its own accumulators and computes its own scores; the loss and token counters are
counted once here and handed to every member before it computes. ``obd``'s Fisher beside ``grad_squared``
with the same ``fisher_microbatch`` is the same sum: it is accumulated once and copied for ``obd`` when the
scores are computed. Under FSDP2 the pass takes turns across
ranks (``turn_taking``) when any member needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from cwa.common.errors import CwaError
from cwa.model.sharding import all_reduce_sum
from cwa.scoring.base import Batch, LossFn, Scorer
from cwa.scoring.obd import OBD
from cwa.scoring.saliency import Wanda
from cwa.scoring.scorers import GradSquared, GradXWeight, Magnitude
from cwa.scoring.sizing import Layout, MetricMemory

SHAREABLE: tuple[type[Scorer], ...] = (Magnitude, GradXWeight, GradSquared, Wanda, OBD)
"""The metric classes a shared pass can feed (exactly these classes: a subclass may update differently)."""


class SharedPass(Scorer):
    """Drives several scorers from one forward and backward per batch (micro-batch).

    Args:
        members: the scorers, each at most once by name; every one of ``SHAREABLE``'s classes, ``obd`` with
            ``hessian: fisher`` only, and all squared-gradient members with the same ``fisher_microbatch``.
        per_sequence: how squared-gradient members get each micro-batch's gradient: ``backward`` (one
            backward per micro-batch), ``vmap`` (``torch.func``, vectorised: ``cwa.scoring.per_sequence``), or
            ``auto``: ``vmap`` on CUDA, ``backward`` on the CPU (there vmap is faster too, but ``backward``
            keeps these metrics bit-identical to their own runs). Sharded parameters and padded batches always
            take ``backward``.
        vmap_chunk: micro-batches differentiated at once by ``vmap`` (bounds their stacked gradients).
    """

    def __init__(
        self,
        members: list[Scorer],
        per_sequence: Literal["auto", "vmap", "backward"] = "auto",
        vmap_chunk: int = 4,
    ) -> None:
        super().__init__()
        if vmap_chunk < 1:
            raise CwaError(f"vmap_chunk must be at least 1, got {vmap_chunk}.")
        self.per_sequence, self.vmap_chunk = per_sequence, vmap_chunk
        self._model: nn.Module | None = None
        names = [m.name for m in members]
        if len(members) < 2:
            raise CwaError("a shared pass needs at least two metrics; give a single metric by itself.")
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise CwaError(f"the metric list names '{twice}' twice; each metric may appear once.")
        self.members: dict[str, Scorer] = dict(zip(names, members, strict=True))
        self._sums: list[Scorer] = []  # acc += gradient of the summed loss
        self._squares: list[Scorer] = []  # acc += (gradient of the micro-batch's mean loss) ** 2
        self._inputs: list[Wanda] = []
        self._copies: dict[int, tuple[Scorer, Scorer]] = {}  # obd's Fisher = grad_squared's: copied at the end
        for member in members:
            self._classify(member)
        micro = {s.fisher_microbatch for s in self._squares}
        if len(micro) > 1:
            raise CwaError(
                f"the squared-gradient metrics of one pass must share fisher_microbatch (got {sorted(micro)}); "
                "give them the same value or run them separately."
            )
        self.microbatch: int | None = micro.pop() if micro else None
        self.name = "+".join(names)
        self.turn_taking = any(m.turn_taking for m in members)
        self.needs_data = any(m.needs_data for m in members)
        self.signed = False

    def _classify(self, member: Scorer) -> None:
        kind = type(member)
        if kind not in SHAREABLE or (kind is OBD and member.hessian != "fisher"):
            raise CwaError(
                f"{member.name}{' with hessian hutchinson' if kind is OBD else ''} cannot share a forward and "
                f"backward with other metrics (it needs passes of its own); run it separately. Metrics that "
                f"share one pass: {', '.join(c.name for c in SHAREABLE)} (obd with hessian: fisher)."
            )
        if kind is GradXWeight:
            self._sums.append(member)
        elif kind is GradSquared:
            self._squares.append(member)
        elif kind is Wanda:
            self._inputs.append(member)
        elif kind is OBD:
            fisher = member.diag.settings()
            same = [s for s in self.members.values() if type(s) is GradSquared and s.settings() == fisher]
            if same:  # the same Fisher: accumulated once, copied when the scores are computed
                self._copies[id(member)] = (member.diag, same[0])
            else:
                self._squares.append(member.diag)
            if member.grad is not None:
                self._sums.append(member.grad)

    @property
    def needs_gradients(self) -> bool:
        return bool(self._sums or self._squares)

    # -- setup ---------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {name: m.settings() for name, m in self.members.items()}

    def check_plan(self, dtype: str, sharded: bool) -> None:
        for member in self.members.values():
            member.check_plan(dtype, sharded)

    def plan_scored(self, model: nn.Module, params: dict[str, nn.Parameter]) -> tuple[list[str], list[int]]:
        """Every tensor some member scores, and the layer inputs the member that reads them reads."""
        readers = [m for m in self.members.values() if isinstance(m, Wanda)]
        return list(params), readers[0].plan_scored(model, params)[1] if readers else []

    def memory(self, layout: Layout, weight_bytes: int) -> MetricMemory:
        """One backward serves every member (the largest gradient need); each keeps its own accumulators."""
        parts = {name: member.memory(layout, weight_bytes) for name, member in self.members.items()}
        extras = {f"{name}: {what}": n for name, part in parts.items() for what, n in part.extras.items()}
        gradients = max(part.gradients for part in parts.values())
        return MetricMemory(gradients, sum(part.accumulators for part in parts.values()), extras)

    def bind(self, params: dict[str, nn.Parameter], sharded: bool = False) -> None:
        self.params = dict(params)
        self.sharded = sharded
        self.acc = {}
        self.counters = torch.zeros(4, dtype=torch.float64)
        for member in self.members.values():
            member.bind(params, sharded)
        for diag, _ in self._copies.values():
            diag.acc = {}  # nothing to accumulate, reduce, check or save until compute_each

    def attach(self, model: nn.Module) -> None:
        self._model = model
        for member in self.members.values():
            member.attach(model)

    def set_step(self, step: int) -> None:
        self.step = step
        for member in self.members.values():
            member.set_step(step)

    # -- accumulation --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reading_inputs(self, batch: Batch) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for member in self._inputs:
                stack.enter_context(member._reading_inputs(batch, self._counting))
            yield

    def update(self, batch: Batch, loss_fn: LossFn) -> None:
        if not self.needs_gradients:
            with torch.no_grad(), self._reading_inputs(batch):
                nll, tokens = loss_fn(batch)
            self._count(nll, tokens)
        elif not self._squares:
            with self._reading_inputs(batch):
                nll, tokens = loss_fn(batch)
            self._count(nll, tokens)
            with self._consume_grads(self._add_sums):
                nll.backward()
        else:
            size = next(iter(batch.values())).shape[0]
            done = self._update_vectorised(batch, loss_fn) if self._vectorised(batch) else 0
            for start in range(done, size, self.microbatch):
                self._update_micro({k: v[start : start + self.microbatch] for k, v in batch.items()}, loss_fn)

    def _vectorised(self, batch: Batch) -> bool:
        """Whether this batch's micro-batch gradients come from ``torch.func`` (see ``per_sequence``)."""
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        if self.per_sequence == "backward" or self.sharded or self._model is None or ids is None:
            return False  # vmap differentiates a causal LM's next-token loss over its input_ids only
        if mask is not None and not bool(mask.all()):
            return False  # padded blocks: Transformers' mask builder branches on values, which vmap cannot trace
        return self.per_sequence == "vmap" or ids.device.type == "cuda"

    def _update_vectorised(self, batch: Batch, loss_fn: LossFn) -> int:
        """Whole micro-batches, ``vmap_chunk`` at a time; returns where the per-micro-batch remainder starts."""
        from cwa.scoring.per_sequence import micro_batch_gradients

        size = next(iter(batch.values())).shape[0]
        whole = size - size % self.microbatch
        step = self.microbatch * self.vmap_chunk
        for start in range(0, whole, step):
            part = {k: v[start : min(start + step, whole)] for k, v in batch.items()}
            if self._inputs:  # layer inputs are not read inside vmap: one plain forward without a graph
                with torch.no_grad(), self._reading_inputs(part):
                    loss_fn(part)
            grads, nll, tokens = micro_batch_gradients(self._model, self.params, part, self.microbatch)
            for value, count in zip(nll, tokens.tolist(), strict=True):
                self._count(value, count, microbatches=int(count > 0))
            for name, grad in grads.items():
                squared = grad.float()
                for member in self._squares:
                    member.acc[name].add_(squared.square().sum(0))
                if self._sums:
                    weights = tokens.to(squared).reshape(-1, *[1] * (squared.dim() - 1))
                    self._add_sums(name, squared.mul_(weights).sum(0))
        return whole

    def _add_sums(self, name: str, grad: Tensor, scale: float = 1.0) -> None:
        for member in self._sums:
            member.acc[name].add_(grad, alpha=scale)

    def _update_micro(self, micro: Batch, loss_fn: LossFn) -> None:
        """One micro-batch: forward, backward of its mean loss, squares and rescaled sums consumed per tensor."""
        with self._reading_inputs(micro):
            nll, tokens = loss_fn(micro)
        self._count(nll, tokens, microbatches=int(tokens > 0))
        if tokens == 0 and not self.sharded:
            return  # no loss, no gradient; sharded ranks still join backward's collectives
        scale = float(tokens)
        if self.sharded and self._sums:
            # Taking turns, the gradient every rank sees is the turn rank's: so must its token count be.
            count = torch.tensor([scale], dtype=torch.float64, device=nll.device)
            all_reduce_sum(count)
            scale = float(count)

        def consume(name: str, grad: Tensor) -> None:
            squared = grad.float()
            for member in self._squares:
                member.acc[name].addcmul_(squared, squared)
            self._add_sums(name, grad, scale)

        with self._consume_grads(consume):
            # An idle rank's loss is 0 with 0 tokens: its (zero) gradient must not be 0/0.
            (nll / max(tokens, 1)).backward()

    # -- results -------------------------------------------------------------------------------
    def reduce(self, all_reduce) -> None:
        """Each member sums its own accumulators (its counters are still zero); the shared counters once."""
        for member in self.members.values():
            member.reduce(all_reduce)
        super().reduce(all_reduce)

    def compute(self) -> dict[str, Tensor]:
        raise CwaError("a shared pass computes one set of scores per metric: call compute_each().")

    def compute_each(self) -> dict[str, dict[str, Tensor]]:
        """Every member's scores, by metric name (each member's accumulators become its scores in place)."""
        for member in self.members.values():
            member.receive_counters(self.counters)
        for diag, source in self._copies.values():
            diag.acc = {name: tensor.clone() for name, tensor in source.acc.items()}
        return {name: member.compute() for name, member in self.members.items()}

    def nonfinite(self) -> list[str]:
        return [name for member in self.members.values() for name in member.nonfinite()]

    def _accumulators(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, member in self.members.items():
            parts = {"diag": member.diag, "grad": member.grad} if isinstance(member, OBD) else {"": member}
            for label, part in parts.items():
                if part is not None:
                    prefix = f"{name}.{label}." if label else f"{name}."
                    out.update({prefix + key: tensor for key, tensor in part.acc.items()})
        return out

    def state_dict(self) -> dict:
        return {"acc": self._accumulators(), "counters": self.counters}

    def load_state_dict(self, state: dict) -> None:
        mine = self._accumulators()
        if set(state["acc"]) != set(mine):
            raise CwaError("the saved accumulators are not those of this metric list; resume with the same metrics.")
        for key, tensor in mine.items():
            tensor.copy_(state["acc"][key])
        self.counters.copy_(state["counters"])

"""The LightningModule that drives a scorer over calibration batches."""

from __future__ import annotations

import time
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from cwa.errors import CwaError
from cwa.models import Dtype, load_model, set_attn_implementation
from cwa.params import ParamInfo, select_parameters
from cwa.scorers import Scorer, make_scorer
from cwa.topk import Mode, TopK, check_k


def next_token_nll(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """(sum of next-token NLL over counted tokens, number of counted tokens); padding never counts."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    labels = input_ids[:, 1:]
    if mask is not None:
        labels = labels.masked_fill(mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return nll, int((labels != -100).sum())


class SensitivityModule(L.LightningModule):
    """Wraps a Hugging Face causal LM; accumulates per-weight sensitivity scores in the validation loop.

    Args:
        pretrained: model to analyse: ``smollm2-135m`` (the embedded offline default), a Hugging Face
            Hub name (``gpt2``, ``meta-llama/Llama-3.1-8B``) or a local directory.
        metric: sensitivity metric: a short name (``magnitude``, ``grad_x_weight``, ``grad_squared``,
            ``hutchinson_diag``) or a class with options, e.g. ``class_path: cwa.scorers.HutchinsonDiag``
            with ``init_args: {probes: 4, hvp: finite_difference}``.
        k: how many critical weights to select (in total for ``global``, per tensor for ``per_layer``).
        mode: ``global`` (top-K over all selected tensors) or ``per_layer`` (top-K within each tensor).
        include: regular expressions; only parameters matching one are scored (all when empty). A
            pattern matches the whole name or whole dot-separated parts of it: ``layers.1`` never
            selects ``layers.10``.
        exclude: regular expressions of parameters not to score.
        dtype: dtype the model is loaded in; scores are accumulated in float32 regardless.
        attn_implementation: attention kernel (``eager``, ``sdpa``); None lets the metric choose
            (double-backward Hutchinson needs ``eager``).
        trust_remote_code: allow custom model code from the hub (off unless you trust the repository).
        revision: hub revision (branch, tag or commit) of the model.
        save_scores: dtype of ``scores.safetensors`` (``float32``, ``bfloat16``) or ``off``.
    """

    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        metric: Scorer | str = "grad_x_weight",
        k: int = 100,
        mode: Mode = "global",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        dtype: Dtype = "float32",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        save_scores: Literal["float32", "bfloat16", "off"] = "float32",
    ) -> None:
        super().__init__()
        if k < 1:
            raise CwaError(f"k must be at least 1, got {k}.")
        if mode not in ("global", "per_layer"):
            raise CwaError(f"unknown mode '{mode}': use global or per_layer.")
        self.pretrained, self.k, self.mode = pretrained, k, mode
        self.include, self.exclude = list(include or []), list(exclude or [])
        self.dtype_name, self.attn_implementation = dtype, attn_implementation
        self.trust_remote_code, self.revision, self.save_scores = trust_remote_code, revision, save_scores
        self.scorer = make_scorer(metric)
        self.model: torch.nn.Module | None = None
        self.selected: dict[str, ParamInfo] = {}
        self.scores: dict[str, Tensor] = {}
        self.topk: TopK | None = None
        self.timings: dict[str, float] = {}
        self.run_dir = None
        self._started = 0.0

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        start = time.perf_counter()
        needed = self.scorer.required_attn_implementation()
        if needed and self.attn_implementation and self.attn_implementation != needed:
            raise CwaError(
                f"{self.scorer.name} with these settings needs attn_implementation '{needed}', "
                f"not '{self.attn_implementation}'."
            )
        self.model = load_model(
            self.pretrained,
            self.dtype_name,
            attn_implementation=self.attn_implementation or needed,
            trust_remote_code=self.trust_remote_code,
            revision=self.revision,
        )
        if needed:
            set_attn_implementation(self.model, needed)
        self.bind_scorer()
        self.timings["load_model_s"] = time.perf_counter() - start

    def bind_scorer(self) -> None:
        """Select the scored tensors, freeze the rest (their gradients are never computed) and bind."""
        chosen = select_parameters(self.model, self.include, self.exclude)
        check_k({name: info.numel for name, (_, info) in chosen.items()}, self.k, self.mode)
        for param in self.model.parameters():
            param.requires_grad_(False)
        for param, _ in chosen.values():
            param.requires_grad_(self.scorer.needs_data)
        self.selected = {name: info for name, (_, info) in chosen.items()}
        self.scorer.bind({name: param for name, (param, _) in chosen.items()})

    def loss_fn(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        return next_token_nll(self.model, batch)

    # -- loop ----------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._started = time.perf_counter()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.scorer.set_step(batch_idx * self.trainer.world_size + self.trainer.global_rank)
        with torch.enable_grad():
            self.scorer.update(batch, self.loss_fn)
        self.log("calibration_nll", self.scorer.mean_loss, prog_bar=True, on_step=True, on_epoch=False, logger=False)

    def on_validation_epoch_end(self) -> None:
        self.timings["accumulate_s"] = time.perf_counter() - self._started
        start = time.perf_counter()
        if self.trainer.world_size > 1:
            import torch.distributed as dist

            self.scorer.reduce(lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
        if self.scorer.tokens == 0:
            raise CwaError("no calibration tokens were scored; check num_samples and the data.")
        self.scores = self.scorer.compute()
        self.timings["reduce_s"] = time.perf_counter() - start

    def configure_optimizers(self):  # noqa: D102 - scoring never optimizes
        return None

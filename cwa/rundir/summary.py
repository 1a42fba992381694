"""``summary.json``: the typed summary of a run, validated when read and written last."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from cwa.common.errors import CwaError
from cwa.common.io import write_json
from cwa.rundir.files import FIT_KIND, SCHEMA_VERSION, SUMMARY
from cwa.rundir.validate import check_fields, check_summary_values


@dataclass
class Summary:
    """``summary.json``: what a fit-sensitivity run did and found (the contract in docs/design.md)."""

    model: str
    metric: dict  # metric_entry(): {"name", "signed", **settings, **facts, "description", "fact_keys"}
    mode: str
    k: int
    tensors: dict[str, dict]  # per-tensor statistics: shape, numel, mean, std, min, max, abs_sum, zeros, topk_count
    status: str = "complete"
    schema: int = SCHEMA_VERSION
    kind: str = FIT_KIND
    created: str | None = None
    model_class: str | None = None
    dtype: str | None = None
    num_parameters: int | None = None
    num_scored: int | None = None
    scored_tensors: int | None = None
    topk_rows: int | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    samples: int | None = None
    tokens: int | None = None
    mean_loss: float | None = None
    perplexity: float | None = None
    seed: int | None = None
    data: dict = field(default_factory=dict)
    data_fingerprint: str | None = None
    world_size: int | None = None
    strategy: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    memory_ranks: list[dict] | None = None
    resumed_from: int = 0
    environment: dict = field(default_factory=dict)
    layout: dict[str, dict] = field(default_factory=dict)  # name -> {layer, module, transposed}
    shared_pass: list[str] | None = None  # every metric of the one pass this run's scores came from (None: alone)
    smoke: bool = False  # sizes shrunk by CWA_SMOKE (cwa.common.smoke): a check that the commands run, not a result

    REQUIRED = ("model", "metric", "mode", "k", "tensors")

    @classmethod
    def from_json(cls, data: object, path: Path) -> Summary:
        """Validate a parsed ``summary.json``; one CwaError sentence when it is not a complete cwa run."""
        if not isinstance(data, dict) or data.get("status") != "complete":
            raise CwaError(f"'{path.parent}' is not a complete run (summary.json status is not 'complete'); rerun it.")
        kind = data.get("kind", FIT_KIND)
        if kind != FIT_KIND:
            raise CwaError(
                f"'{path.parent}' is a {kind} run, not a fit-sensitivity run; pass fit-sensitivity run directories."
            )
        schema = data.get("schema", 0)
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise CwaError(
                f"'{path}' has summary schema {schema!r}, newer than this cwa understands ({SCHEMA_VERSION}); "
                "upgrade cwa."
            )
        missing = [key for key in cls.REQUIRED if key not in data]
        if missing:
            raise CwaError(f"'{path}' lacks '{missing[0]}': it was not written by cwa fit-sensitivity.")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["schema"] = schema
        for key in ("include", "exclude"):
            values[key] = values.get(key) or []
        for key in ("data", "timings", "memory", "environment", "layout"):
            values[key] = values.get(key) or {}
        # Types, then ranges and shapes: nothing downstream sizes an allocation from an unchecked number.
        check_fields(values, typing.get_type_hints(cls), path)
        check_summary_values(values, path)
        return cls(**values)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def metric_name(self) -> str:
        return str(self.metric.get("name", "?"))


def metric_entry(name: str, signed: bool, settings: dict, facts: dict, description: str) -> dict:
    """The summary's ``metric`` entry: the metric's name, sign, settings and facts side by side (flat, as older
    summaries have them), its one-line description, and which keys are facts (``fact_keys``), so that a reader
    needs no knowledge of the metric to tell what was asked for from what the run found out.

    Args:
        name: the metric's short name.
        signed: whether its scores may be negative.
        settings: its options (``Scorer.settings()``).
        facts: what the run found out (``Scorer.facts()``).
        description: one line for the report (``Scorer.description``).
    """
    return {"name": name, "signed": signed, **settings, **facts, "description": description, "fact_keys": list(facts)}


def write_summary(run_dir: Path, summary: Summary) -> None:
    """Write ``summary.json`` (atomically). Call it last: its presence marks the run complete."""
    write_json(Path(run_dir) / SUMMARY, summary.to_json())

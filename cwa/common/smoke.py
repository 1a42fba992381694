"""``CWA_SMOKE=1``: every command does a token amount of its work, so that a test can run the README's
commands as written, on the real embedded model, in a few minutes.

The caps live here and nowhere else; the command line applies them once per command (:func:`shrink`), the
perturbation recipe bounds its K by the run's list (:func:`bound_ks`), and every JSON a command writes
records the mode (``environment.smoke``, and ``smoke`` in a fit's ``summary.json``), so that no smoke result
passes for a real one. A cap only lowers a setting: what is already smaller stays as it was.
"""

from __future__ import annotations

import os
import sys
from typing import Any

ENV = "CWA_SMOKE"
MESSAGE = f"{ENV}: sizes shrunk (calibration, held-out, resamples, conditions); the results are not measurements."

CAPS: dict[str, int] = {
    # fit-sensitivity and find-super-weights: the data section
    "data.num_samples": 4,  # calibration blocks: two batches, so a 2-process run still has one each
    "data.batch_size": 2,
    "data.seq_len": 32,  # tokens per block
    "data.heldout_samples": 6,  # the fewest held-out sequences that can reach 0.95 confidence
    "model.metric.init_args.probes": 1,  # Hutchinson probes per batch (a metric given with its options)
    # find-super-weights
    "super_weights.blocks": 2,
    "super_weights.max_verify": 2,
    "super_weights.heldout_samples": 6,
    "super_weights.bootstrap": 100,
    "super_weights.permutations": 100,
    "super_weights.row_controls": 2,
    # perturb, prune, protect
    "heldout_samples": 6,
    "heldout_tokens": 8,  # tokens of each held-out sequence: every condition is one forward pass over them
    "bootstrap": 100,
    "permutations": 100,  # smallest p 2/101, below 0.05
    "single": 2,
    "leave_one_out": 2,
    "pairs": 2,
    "tasks_limit": 8,  # lm-eval items per task
    "tasks_batch_size": 4,
    # compare, report
    "sample": 20_000,  # weights of the rank correlations
}
"""The largest value of each option (dotted as the command's parser names it) under ``CWA_SMOKE``."""
UNSET_MEANS_ALL = {
    "data.heldout_samples",
    "super_weights.heldout_samples",
    "heldout_samples",
    "heldout_tokens",
    "tasks_limit",
}
"""Options whose ``None`` means "all of them" (or the run's setting): capped too."""
LIST_CAPS: dict[str, int] = {"seeds": 1, "controls": 1}
"""List options cut to their first N entries: random controls drawn once, one kind of control (perturb's
and protect's first: ``random_matched``); each condition is a pass over the held-out sequences."""
SCORED_EXCLUDE = (r".*\.(?:[2-9]|[1-9]\d+)\..*", r".*(?:embed_tokens|embed_out|wte|wpe|lm_head).*")
"""Added to fit-sensitivity's ``model.exclude``: only the first two blocks (and the norms outside the blocks) are
scored, so the scores, their top-K and every later command's transforms and checksums stay small; held-out passes
still run the whole model."""
MAX_KS = 2
"""The most top-K sizes a perturbation evaluates (:func:`bound_ks`)."""

_announced = False


def active() -> bool:
    """Whether ``CWA_SMOKE`` is set to anything but empty or ``0``."""
    return os.environ.get(ENV, "") not in ("", "0")


def announce() -> None:
    """Say once per process, on stderr, that sizes are shrunk."""
    global _announced
    if not _announced:
        print(MESSAGE, file=sys.stderr)
        _announced = True


def shrink(config: Any) -> Any:
    """Cap the sizes of a parsed command line (a jsonargparse ``Namespace``: dotted keys) in place, when
    ``CWA_SMOKE`` is set; return it.

    Args:
        config: the parsed options of one command (for fit-sensitivity: its subcommand's section).
    """
    if not active():
        return config
    announce()
    for key, cap in CAPS.items():
        if key not in config:
            continue
        value = config[key]
        larger = isinstance(value, int) and not isinstance(value, bool) and value > cap
        if larger or (value is None and key in UNSET_MEANS_ALL):
            config[key] = cap
    if "model.exclude" in config and "model.include" in config:
        config["model.exclude"] = [*_patterns(config["model.exclude"]), *SCORED_EXCLUDE]
    for key, keep in LIST_CAPS.items():
        value = config.get(key) if key in config else None
        if isinstance(value, list | tuple) and len(value) > keep:
            config[key] = type(value)(value[:keep])
    return config


def _patterns(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def bound_ks(ks: tuple[int, ...], listed: int, required: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Under ``CWA_SMOKE``, the smallest ``MAX_KS`` of a perturbation's K that fit the run's top-K list of
    ``listed`` weights (the list's length when none does), and the ``required`` ones (a leave-one-out set's
    joint K); otherwise ``ks`` unchanged."""
    if not active():
        return ks
    fitting = sorted(k for k in ks if k <= listed)[:MAX_KS] or [listed]
    return tuple(sorted({*fitting, *(k for k in required if k)}))

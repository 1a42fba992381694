"""``cwa``: one command per research step.

``fit-sensitivity`` and ``perturb`` are LightningCLI subcommands (the Trainer's methods), configured
from YAML; ``compare`` and ``report`` read finished run directories and never load a model.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from cwa.errors import CwaError

USAGE = """usage: cwa COMMAND [options]

Critical weight analysis: find the weights of a language model that matter most, prove it, report it.

commands:
  fit-sensitivity   accumulate per-weight sensitivity scores and select the top-K critical weights
  perturb           perturb the top-K weights and matched controls, measure held-out perplexity
  compare           agreement between runs: top-K overlap, rank correlations, stability
  report            a Markdown research report over a set of runs

`cwa COMMAND -h` documents every option; `cwa fit-sensitivity --print_config` prints a full config.
With no config, fit-sensitivity scores the embedded SmolLM2-135M on the pydoc corpus (offline).
"""

_LIGHTNING_VERBS = {"fit-sensitivity": "fit_sensitivity", "fit_sensitivity": "fit_sensitivity"}


def _quiet_frameworks() -> None:
    """Silence framework chatter that says nothing about the user's analysis."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for message in (
        r".*does not have many workers.*",
        r".*GPU available but not used.*",
        r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
        r".*LeafSpec.*",
        r".*The `srun` command is available.*",
        r".*on_validation_end.*",
        r".*You called `self.log\(.*",
        r".*Starting from v1.9.0, `tensorboardX` has been removed.*",
        r".*`torch_dtype` is deprecated.*",
        r".*No device id is provided via.*",
        r".*litlogger.*",
        r".*LightningCLI's args parameter.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
        "lightning.pytorch.accelerators.cuda",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # per-load "Loading weights" bars; the conversion re-enables it
    except ImportError:
        pass


def lightning_main(subcommand: str, args: list[str]) -> int:
    from cwa.trainer import run_fit_sensitivity

    run_fit_sensitivity(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    verb, rest = argv[0], argv[1:]
    _quiet_frameworks()
    try:
        if verb in _LIGHTNING_VERBS:
            return lightning_main(_LIGHTNING_VERBS[verb], rest)
        if verb == "perturb":
            from cwa.perturb import main as perturb_main

            return perturb_main(rest)
        if verb == "compare":
            from cwa.compare import main as compare_main

            return compare_main(rest)
        if verb == "report":
            from cwa.report import main as report_main

            return report_main(rest)
    except CwaError as exc:
        print(f"cwa: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cwa: interrupted; no incomplete file was left looking complete.", file=sys.stderr)
        return 130
    print(f"cwa: error: unknown command '{verb}'.\n\n{USAGE}", file=sys.stderr)
    return 2


def entrypoint() -> None:
    sys.exit(main())

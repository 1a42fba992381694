"""``cwa``: one command per research step, one command-line convention.

Every command's options come from a typed signature through jsonargparse: ``fit-sensitivity`` through
LightningCLI (the module's, the data module's and the Trainer's ``__init__``), the others from their
entry point's signature (a function, or a recipe class's ``__init__``). ``-h`` documents each option once
(from the ``Args:`` docstrings), ``--config FILE`` works for every command, and a bad value ends in one
sentence naming the option, never a usage dump.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from cwa.common import smoke
from cwa.common.errors import CwaError, argument_error, cwa_cause


@dataclass(frozen=True)
class Command:
    """A command other than fit-sensitivity: ``target`` is ``module:function`` or ``module:RecipeClass``
    (whose ``run()`` is called); ``positional`` names its ``list[str]`` parameter given as bare words."""

    summary: str
    target: str
    positional: str | None = None


COMMANDS: dict[str, Command] = {
    "perturb": Command(
        "perturb the top-K weights and matched controls, measure held-out perplexity",
        "cwa.perturb.recipe:PerturbRecipe",
    ),
    "prune": Command(
        "remove the lowest-scoring weights of each run's metric, measure held-out perplexity against sparsity",
        "cwa.prune.recipe:PruneRecipe",
        "run",
    ),
    "protect": Command(
        "quantize / prune / flip bits / add noise everywhere except a protected set, against matched random sets",
        "cwa.protect.recipe:ProtectRecipe",
    ),
    "compare": Command(
        "agreement between runs: top-K overlap, rank correlations, stability", "cwa.compare.recipe:compare", "runs"
    ),
    "report": Command("a Markdown research report over a set of runs", "cwa.report.recipe:report", "runs"),
}
FIT = "fit-sensitivity"
FIT_SUMMARY = "accumulate per-weight sensitivity scores and select the top-K critical weights"
SUPER = "find-super-weights"
SUPER_SUMMARY = "activation spikes at every MLP output projection; candidates verified by ablation"
LIGHTNING_COMMANDS = {FIT: FIT_SUMMARY, SUPER: SUPER_SUMMARY}
"""Commands parsed by LightningCLI (the model, data and trainer sections of one YAML)."""


def usage() -> str:
    rows = [*LIGHTNING_COMMANDS.items(), *((name, c.summary) for name, c in COMMANDS.items())]
    width = max(len(name) for name, _ in rows)
    lines = "\n".join(f"  {name:<{width}}   {summary}" for name, summary in rows)
    return f"""usage: cwa COMMAND [options]

Critical weight analysis: find the weights of a language model that matter most, prove it, report it.

commands:
{lines}

`cwa COMMAND -h` documents every option; every command takes `--config FILE` and `--print_config`.
With no config, fit-sensitivity scores the embedded SmolLM2-135M on the pydoc corpus (offline).
"""


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


# -- parsing ---------------------------------------------------------------------------------------
_NO_VALUE = {"-h", "--help"}


def _split_positionals(args: list[str], name: str) -> list[str]:
    """Bare words (those that are not an option's value) become ``--NAME [json list]``, so that
    ``cwa report lightning_logs/*/version_*`` works while the option stays a typed ``list[str]`` that a
    ``--config`` file can also set."""
    options, words, i = [], [], 0
    while i < len(args):
        token = args[i]
        if token.startswith("-") and token != "-":
            options.append(token)
            takes_value = "=" not in token and token not in _NO_VALUE and not token.startswith("--print_config")
            if takes_value and i + 1 < len(args):
                options.append(args[i + 1])
                i += 1
        else:
            words.append(token)
        i += 1
    if words:
        options += [f"--{name}", json.dumps(words)]
    return options


def _resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_parser(verb: str):
    """The jsonargparse parser of a command, built from its entry point's typed signature."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    command = COMMANDS[verb]
    target = _resolve(command.target)
    doc = (target.__doc__ or command.summary).strip().split("\n\n")[0]
    usage = f"cwa {verb} RUN [RUN ...] [options]" if command.positional else f"cwa {verb} [options]"
    parser = ArgumentParser(prog=f"cwa {verb}", usage=usage, description=doc, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the options below")
    if isinstance(target, type):
        parser.add_class_arguments(target, fail_untyped=True, sub_configs=True)
    else:
        parser.add_function_arguments(target, fail_untyped=True, sub_configs=True)
    return parser, target


def run_command(verb: str, args: list[str]) -> int:
    from jsonargparse import ArgumentError

    command = COMMANDS[verb]
    parser, target = build_parser(verb)
    if command.positional:
        args = _split_positionals(args, command.positional)
    try:
        config = smoke.shrink(parser.parse_args(args))
        init = parser.instantiate_classes(config)
    except ArgumentError as exc:
        raise argument_error(verb, exc) from None
    kwargs = {k: v for k, v in vars(init).items() if k != "config"}
    if isinstance(target, type):
        target(**kwargs).run()
    else:
        target(**kwargs)
    return 0


def lightning_main(verb: str, args: list[str]) -> int:
    if verb == FIT:
        from cwa.fit.trainer import run_fit_sensitivity

        run_fit_sensitivity(args)
    else:
        from cwa.find_super_weights.recipe import run_find_super_weights

        run_find_super_weights(args)
    return 0


# -- configuration files: data, never code -----------------------------------------------------------
TRUSTED_MODULES = ("cwa", "lightning", "lightning_fabric", "pytorch_lightning", "torch")
"""Packages whose classes a ``--config`` file may name: a ``class_path`` elsewhere imports (runs) its module
before jsonargparse can check the class, so another class must be given on the command line."""
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_CONFIG_BYTES = 16 << 20
_YAML = (".yaml", ".yml")


def check_config_files(args: list[str]) -> None:
    """Refuse, before anything is parsed or imported, a ``--config`` file (or a YAML file given as an option's
    value) that names code: a class outside cwa, Lightning and torch, or ``trust_remote_code: true`` (which
    is taken from the command line only, so rerunning a shared ``config.yaml`` never runs its model's code).

    Args:
        args: the command line after the command's name.
    """
    given = {a.split("=", 1)[0] for a in args if a.startswith("--") and "trust_remote_code" in a}
    files = []
    for i, token in enumerate(args):
        name, equals, value = token.partition("=")
        if name in ("--config", "-c"):
            files.append(value if equals else args[i + 1] if i + 1 < len(args) else "")
        elif token.startswith("--") and value.endswith(_YAML):
            files.append(value)  # --model=model.yaml: a sub-configuration file
        elif not token.startswith("-") and token.endswith(_YAML) and i > 0 and args[i - 1].startswith("--"):
            files.append(token)
    for file in files:
        if file and Path(file).is_file():
            _check_config(Path(file), given)


def _check_config(path: Path, given: set[str]) -> None:
    import yaml

    from cwa.common.io import read_regular

    try:
        data = yaml.safe_load(read_regular(path, _CONFIG_BYTES, "configuration").decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return  # not YAML: jsonargparse says so in its own sentence
    stack: list[tuple[object, str]] = [(data, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                option = f"{where}.{key}" if where else str(key)
                if (
                    key == "trust_remote_code"
                    and value not in (False, None, "false", "False")
                    and (f"--{option}" not in given)
                ):
                    raise CwaError(
                        f"'{path}' sets {option}: {value}, which cwa takes only from the command line so that a "
                        f"shared configuration never runs a model's own code; add --{option} true if you trust it."
                    )
                stack.append((value, option))
        elif isinstance(node, list):
            stack.extend((value, where) for value in node)
        elif isinstance(node, str) and _names_class(node, where) and not _trusted(node):
            raise CwaError(
                f"'{path}' names the class '{node}' at {where or 'its top level'}, outside "
                f"{', '.join(TRUSTED_MODULES)}; a configuration file may not import code, so give that class "
                "on the command line instead."
            )


def _names_class(value: str, where: str) -> bool:
    """A ``class_path``, or a dotted name ending in a capitalised word (jsonargparse resolves such a string
    given for a class-typed option as an import path); file names such as ``notes.txt`` are neither."""
    if not _IMPORT_PATH.match(value):
        return False
    return where.endswith("class_path") or value.rsplit(".", 1)[1][:1].isupper()


def _trusted(path: str) -> bool:
    """Whether a dotted name is one of the trusted packages' or no importable module's (a parameter name such
    as ``mlp.down_proj``). The top-level module is only located (``find_spec``), never imported."""
    from importlib.util import find_spec

    top = path.split(".", 1)[0]
    if top in TRUSTED_MODULES:
        return True
    try:
        return find_spec(top) is None
    except (ImportError, ValueError):
        return True


# -- entry point -----------------------------------------------------------------------------------
def _interruptible() -> None:
    """Make SIGINT interrupt cwa even where it was inherited as ignored: a shell script starts background
    commands with SIGINT ignored, and Python then never raises KeyboardInterrupt, so ``kill -INT`` (or
    Ctrl-C on the script) let a run finish with exit 0 instead of stopping it resumable."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0].replace("_", "-"), argv[1:]
    if verb not in LIGHTNING_COMMANDS and verb not in COMMANDS:
        print(f"cwa: error: unknown command '{argv[0]}'.\n\n{usage()}", file=sys.stderr)
        return 2
    _quiet_frameworks()
    _interruptible()
    try:
        check_config_files(rest)
        return lightning_main(verb, rest) if verb in LIGHTNING_COMMANDS else run_command(verb, rest)
    except CwaError as exc:
        print(f"cwa: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        cause = cwa_cause(exc)
        if cause is None:
            raise
        print(f"cwa: error: {cause}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cwa: interrupted; no incomplete file was left looking complete.", file=sys.stderr)
        return 130


def entrypoint() -> None:
    sys.exit(main())

"""A run's data module rebuilt from its ``config.yaml``, without running any code named in the file.

``config.yaml`` is data: a ``data.source`` given as a ``class_path`` may only name one of cwa's own
:class:`~cwa.fit.data.TextSource` classes (checked by module path before anything is imported, then by a
subclass check), and every other setting goes through :class:`~cwa.fit.data.CalibrationData`'s own signature,
so a new argument is carried over and an unknown one is refused.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from cwa.common.errors import CwaError
from cwa.fit.data import CalibrationData, TextSource
from cwa.rundir import CONFIG, Run


def text_source(value: object, where: str) -> TextSource | str:
    """The data source a run's config names: a string as is (a corpus name or path: data, not code), or
    one of cwa's TextSource classes with its options.

    Args:
        value: ``data.source`` from the config.
        where: the config file, for messages.
    """
    if isinstance(value, str):
        return value
    if not isinstance(value, Mapping) or not isinstance(value.get("class_path"), str):
        raise CwaError(f"'{where}' has a data.source that is neither a name nor a class_path; rerun fit-sensitivity.")
    class_path = value["class_path"]
    refused = CwaError(
        f"'{where}' names the data source class '{class_path}', which is not one of cwa's TextSource classes; "
        "cwa runs no other code named in a run directory."
    )
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name.startswith("cwa.") and module_name != "cwa":
        raise refused
    try:
        cls = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        raise refused from None
    if not (isinstance(cls, type) and issubclass(cls, TextSource)):
        raise refused
    return cls(**_checked_arguments(cls, value.get("init_args") or {}, f"data.source in '{where}'"))


def _checked_arguments(cls: type, values: object, what: str, skip: set[str] | None = None) -> dict:
    """``values`` checked against ``cls.__init__``'s typed signature (unknown keys and wrong types refused)."""
    from jsonargparse import ArgumentError, ArgumentParser

    if not isinstance(values, Mapping):
        raise CwaError(f"{what} is not a mapping of options.")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, skip=skip or set())
    try:
        config = parser.parse_object(dict(values))
    except ArgumentError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CwaError(f"{what} does not fit {cls.__name__} ({first}); rerun fit-sensitivity.") from None
    return config.as_dict()


def build_data(run: Run, heldout_samples: int | None = None, batch_size: int | None = None) -> CalibrationData:
    """The run's data module with the same settings (so its held-out split is the run's), set up.

    Args:
        run: the run.
        heldout_samples: at most this many held-out blocks (None: the run's setting).
        batch_size: blocks per batch (None: the run's setting).
    """
    where = str(run.path / CONFIG)
    settings = dict(run.config.get("data") or {})
    if not isinstance(run.config.get("data") or {}, Mapping):
        raise CwaError(f"'{where}' has a data section that is not a mapping; rerun fit-sensitivity.")
    source = text_source(settings.pop("source", "pydoc"), where)
    settings.setdefault("tokenizer", (run.config.get("model") or {}).get("pretrained") or run.model)
    # A run made before blocks started the tokenizer's way cut the raw stream: evaluate it on the same blocks.
    settings.setdefault("block_start", "none")
    if heldout_samples is not None:
        settings["heldout_samples"] = heldout_samples
    if batch_size is not None:
        settings["batch_size"] = batch_size
    arguments = _checked_arguments(CalibrationData, settings, f"the data section of '{where}'", skip={"source"})
    data = CalibrationData(source=source, **arguments)
    data.setup()
    return data

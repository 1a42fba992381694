"""Old module paths, kept importable because saved configs, run directories and user code name them.

Before the package had sub-packages, every module sat directly in ``cwa/``; a ``config.yaml`` written then
says ``class_path: cwa.scorers.HutchinsonDiag`` or ``cwa.data.TextFiles``. :func:`install` puts a finder on
``sys.meta_path`` that answers ``import cwa.scorers`` with the module that now holds that code (the same
module object, so classes compare equal). Commands and recipes that became packages (``cwa.perturb``,
``cwa.compare``, ``cwa.report``, ``cwa.find_super_weights``) keep their names as packages.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

MOVED: dict[str, str] = {
    "cwa.errors": "cwa.common.errors",
    "cwa.io": "cwa.common.io",
    "cwa.environment": "cwa.common.environment",
    "cwa.models": "cwa.model.loading",
    "cwa.params": "cwa.model.params",
    "cwa.loss": "cwa.model.loss",
    "cwa.sharding": "cwa.model.sharding",
    "cwa.shard_loading": "cwa.model.shard_loading",
    "cwa.scorers": "cwa.scoring.scorers",
    "cwa.saliency": "cwa.scoring.saliency",
    "cwa.shared_pass": "cwa.scoring.shared_pass",
    "cwa.metrics": "cwa.scoring.metrics",
    "cwa.topk": "cwa.scoring.topk",
    "cwa.checkpoint": "cwa.scoring.checkpoint",
    "cwa.sizing": "cwa.scoring.sizing",
    "cwa.agreement": "cwa.scoring.agreement",
    "cwa.perturbations": "cwa.ablation.perturbations",
    "cwa.controls": "cwa.ablation.controls",
    "cwa.units": "cwa.ablation.units",
    "cwa.restore": "cwa.ablation.restore",
    "cwa.stats": "cwa.ablation.stats",
    "cwa.super_weights": "cwa.ablation.super_weights",
    "cwa.published": "cwa.ablation.published",
    "cwa.module": "cwa.fit.module",
    "cwa.data": "cwa.fit.data",
    "cwa.callbacks": "cwa.fit.callbacks",
    "cwa.trainer": "cwa.fit.trainer",
    "cwa.distributed": "cwa.fit.distributed",
    "cwa.console": "cwa.fit.console",
    "cwa.preflight": "cwa.fit.preflight",
    "cwa.figures": "cwa.fit.figures",
    "cwa.evaluate": "cwa.perturb.evaluate",
    "cwa.downstream": "cwa.perturb.downstream",
    "cwa.perturb_console": "cwa.perturb.console",
    "cwa.perturb_figures": "cwa.perturb.figures",
    "cwa.run_data": "cwa.perturb.run_data",
    "cwa.analysis": "cwa.report.analysis",
    "cwa.findings": "cwa.report.findings",
    "cwa.findings_placement": "cwa.report.placement",
    "cwa.report_text": "cwa.report.text",
    "cwa.report_markdown": "cwa.report.markdown",
    "cwa.report_figures": "cwa.report.figures",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module object at its new path."""

    def __init__(self) -> None:
        self._own_specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self._own_specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The module at the new path has already run: give it back its own spec, which the import replaced."""
        module.__spec__ = self._own_specs[module.__name__]


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())

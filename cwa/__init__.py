"""cwa: critical weight analysis for causal language models.

The package is one sub-package per layer (docs/architecture.md): ``common`` (errors, files, process
settings), ``model``, ``scoring`` and ``ablation`` (pure torch), ``rundir`` (the run directory),
``fit`` (Lightning), one package per command (``perturb``, ``find_super_weights``, ``compare``,
``report``) and ``cli``. Module paths from before that layout (``cwa.scorers.HutchinsonDiag`` in an old
``config.yaml``) still import: :mod:`cwa._legacy` maps them onto the modules that now hold the code.
"""

from cwa import _legacy

__version__ = "0.1.0"

_legacy.install()

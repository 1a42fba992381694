"""The names in a run directory, its summary schema version and the run kinds: shared by every module of
:mod:`cwa.rundir` and by nobody else's string literals."""

SCHEMA_VERSION = 1
"""Version of ``summary.json``. Runs without one were written before versioning (same fields)."""

CONFIG = "config.yaml"
SCORES = "scores.safetensors"
TOPK = "topk.csv"
SUMMARY = "summary.json"
PERTURB = "perturb"  # the folder of the numbered sets: perturb/1/, perturb/2/...
PERTURB_CSV = "perturb.csv"
PERTURB_JSON = "perturb.json"
DOWNSTREAM_CSV = "downstream.csv"
SUPER_WEIGHTS = "super_weights.csv"
ROW_TEST = "row_test.csv"
PRUNE = "prune"
PRUNE_CSV = "prune.csv"
PRUNE_JSON = "prune.json"
PRUNE_DOWNSTREAM_CSV = "prune_downstream.csv"
PROTECT = "protect"
PROTECT_CSV = "protect.csv"
PROTECT_JSON = "protect.json"
PROTECT_DOWNSTREAM_CSV = "protect_downstream.csv"
FIGURES = "figures"
ACCUMULATORS = "accumulators"

Key = tuple[str, int]  # (parameter name, flat index into the stored tensor)


FIT_KIND = "fit-sensitivity"
SUPER_WEIGHTS_KIND = "find-super-weights"

SCORES_FORMAT = "cwa-scores/1"  # the safetensors metadata "format" of scores.safetensors

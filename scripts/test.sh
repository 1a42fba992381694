#!/usr/bin/env bash
# Install cwa into ./.venv (scripts/bootstrap.sh), then, offline: ruff check, ruff format --check and every
# test, the slow and distributed ones included (-m ""; plain `pytest` leaves them out). Arguments go to
# pytest after that, so `-m "not slow"` or `-k NAME` narrows the run. CI runs `bash scripts/test.sh -q`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check cwa tests scripts
.venv/bin/ruff format --check cwa tests scripts
exec .venv/bin/python -m pytest -m "" "$@"

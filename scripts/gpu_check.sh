#!/usr/bin/env bash
# One prepared check of cwa at Llama-3.1-8B's shape on one GPU (tiny shape without CUDA or with --tiny):
#   bash scripts/gpu_check.sh [--tiny] [--json out.json] [--work DIR]
# See scripts/gpu_check.py for the steps and what the table shows.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$python" scripts/gpu_check.py "$@"

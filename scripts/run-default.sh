#!/usr/bin/env bash
# Install cwa into ./.venv and run the main job on the embedded default: SmolLM2-135M on the pydoc
# corpus, offline, on the CPU. Extra arguments go to `cwa fit-sensitivity`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/cwa fit-sensitivity --config configs/smollm2-135m.yaml "$@"

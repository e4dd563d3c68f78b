#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M + the bundled corpus, on CPU.
# Installs first (same as the test command's set-up), then runs the most complete pipeline that exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}"
PY="${PY:-.venv/bin/python}"
RUN_DIR="${RUN_DIR:-runs/default}"
"$PY" -m nas_minitron prune --teacher smollm2-135m --arch L24-H432-I1024-A6-KV3 --out "$RUN_DIR/student" --overwrite
"$PY" -m nas_minitron inspect "$RUN_DIR/student"

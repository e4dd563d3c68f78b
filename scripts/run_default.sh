#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M + the bundled corpus, a search at half the teacher's size on
# CPU (~15 minutes on 2 cores). Installs first (same set-up as the test command). A second run resumes the first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}"
PY="${PY:-.venv/bin/python}"
RUN_DIR="${RUN_DIR:-runs/default}"
RESUME=()
[[ -f "$RUN_DIR/config.json" ]] && RESUME=(--resume)
"$PY" -m nas_minitron search --budget 0.5x --run-dir "$RUN_DIR" "${RESUME[@]}" "$@"

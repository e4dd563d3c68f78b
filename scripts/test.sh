#!/usr/bin/env bash
# The test command: install what the tests need, then run the suite CI runs (fast tests + the real-model checks
# marked `ci`). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for every real-model test.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# The report's browser test needs a Chromium; install Debian's where we can (root + apt), else it skips.
if ! command -v chromium >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
    >/dev/null 2>&1 || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
PY="${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}"
PY="${PY:-.venv/bin/python}"
if [[ $# -eq 0 ]]; then set -- -m "not slow or ci"; fi
"$PY" -m pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "error: pytest collected no tests (exit 5); refusing to call that a pass" >&2
  exit 1
fi
exit $rc

#!/usr/bin/env bash
# The test command: install what the tests need, lint (ruff) and type-check (mypy) the code, then run the suite CI
# runs (fast tests + the real-model checks marked `ci`). Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -m slow` for every real-model test.
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
# Lint, type check and tests all run, whatever fails first; the command fails if any of them did, naming which.
failed=()
"$PY" -m ruff check nas_minitron tests benchmarks scripts || failed+=("ruff")
"$PY" -m mypy || failed+=("mypy")  # the packages and strictness are in pyproject.toml's [tool.mypy]
"$PY" -m pytest --durations=20 "$@"  # the slowest tests, to keep CI within its budget
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "error: pytest collected no tests (exit 5); refusing to call that a pass" >&2
  rc=1
fi
[[ $rc -eq 0 ]] || failed+=("pytest")
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "error: failed: ${failed[*]}" >&2
  [[ $rc -ne 0 ]] && exit $rc  # pytest's own exit status when it failed
  exit 1
fi
exit 0

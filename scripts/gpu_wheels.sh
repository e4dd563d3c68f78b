#!/usr/bin/env bash
# Prepare .whl/ for scripts/gpu_check.sh on the lent GPU machine (Python 3.12, torch preinstalled, no network).
#
# The lent machine's image has torch, transformers 5.17, pandas, pyarrow, safetensors, tokenizers, aiohttp, grpcio ...
# but not ray, optuna or their own needs, and its transformers is older than the >= 5.23 this project requires.
# A call may carry 64 MiB: ray's 79 MB wheel does not fit, so it travels unpacked without its Java jars (unused
# here) as one xz tarball (~33 MB); the rest are wheels (~25 MB together). Run here, in the repo root, once:
#     bash scripts/gpu_wheels.sh
# then call the device tool with carry [".whl"] and `bash scripts/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d .whl \
    transformers==5.24.0 optuna==5.0.0 alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9 colorlog==6.12.0 \
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
    tensorboardX==2.6.5 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
if [ ! -f .whl/ray-site.tar.xz ]; then
    tmp=$(mktemp -d)
    mkdir "$tmp/site"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$tmp" ray==2.60.0
    (cd "$tmp/site" && unzip -q "$tmp"/ray-*.whl && rm -rf ray/jars && tar cf - . | xz -T2 -6 > "$tmp/ray-site.tar.xz")
    mv "$tmp/ray-site.tar.xz" .whl/ && rm -rf "$tmp"
fi
du -sh .whl

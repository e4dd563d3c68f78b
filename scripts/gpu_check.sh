#!/usr/bin/env bash
# The prepared GPU check (issue #12 item 9), for the lent GPU machine (the device tool), about 5 minutes:
#     here, once:      bash scripts/gpu_wheels.sh
#     device tool:     run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=500)
# (wheel install ~30 s, gpu tests <= 150 s, the checks <= 270 s: the tiny search <= 150 s, the 1B model ~1-2 min)
# It installs the carried wheels (ray, optuna, transformers >= 5.23 and their needs: the machine's image has
# torch but not these) into /tmp/site, runs the `gpu`-marked tests, then scripts/gpu_check.py; results go to
# $OUT (gpu_check.json, gpu_tests.log). Record the figures in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
    mkdir -p /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    [ -f .whl/ray-site.tar.xz ] && tar xJf .whl/ray-site.tar.xz -C /tmp/site
    export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
    export PATH=/tmp/site/bin:$PATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, transformers, ray, optuna; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'ray', ray.__version__, 'optuna', optuna.__version__)"
status=0
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 || status=1
timeout 270 python3 scripts/gpu_check.py || status=1
exit $status

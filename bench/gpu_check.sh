#!/usr/bin/env bash
# The GPU checks, as one script for a GPU box with the project's environment (or, with
# WHEELS=folder, a bare one whose Python has torch and transformers: the rest installs from
# wheels carried along). Writes its logs and results into OUT (default: bench/gpu-results).
#
#   bash bench/gpu_check.sh
#
# 1. the gpu-marked smoke test: the tiny workflow end to end on CUDA (tests/workflow/test_gpu.py)
# 2. what one GPU sustains on forward, training and generation (bench/gpu_throughput.py;
#    BENCH=0 skips it)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

began=$(date +%s)
timeout "${SMOKE_TIMEOUT:-330}" "$PY" -m pytest -m gpu tests/workflow/test_gpu.py -q -p no:cacheprovider \
  --basetemp=/tmp/gpu-smoke 2>&1 | tee "$OUT/gpu_smoke.log"
smoke=$?
echo "smoke test: exit $smoke, $(( $(date +%s) - began )) s" | tee -a "$OUT/gpu.txt"
# The smoke run's job logs, for the record (which device each stage computed on).
grep -rhoE "hardware: .*" /tmp/gpu-smoke/gpu*/logs 2>/dev/null | sort | uniq -c | tee "$OUT/hardware_lines.txt"

if [ "${BENCH:-1}" = 1 ]; then
  timeout "${BENCH_TIMEOUT:-150}" "$PY" bench/gpu_throughput.py --json "$OUT/throughput.json" 2>&1 \
    | tee "$OUT/throughput.log"
  echo "throughput: exit $?" | tee -a "$OUT/gpu.txt"
fi
exit $smoke

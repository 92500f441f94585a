#!/usr/bin/env bash
# Static cache + torch.compile (CUDA graphs) speed check on a lent CUDA machine (the `device` tool): AR tok/s
# against stock transformers and the HBM roofline, ms per compiled block forward. Installs nothing from the
# internet (transformers travels as a wheel in .whl/). Writes everything under $OUT (default ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m benchmarks.gpu_compiled --out "$OUT/gpu_compiled.json" --budget-s "${BUDGET_S:-300}" 2>&1 \
    | grep -v "^DEBUG" | tee "$OUT/gpu_speed.log"

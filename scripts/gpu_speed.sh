#!/usr/bin/env bash
# Static cache + torch.compile (CUDA graphs) speed check on a lent CUDA machine (the `device` tool): AR tok/s
# against stock transformers and the HBM roofline, ms per compiled block forward of every kind, the AR step's
# kernels by GPU time, and the same with gpt-fast's inductor tuning. Four processes compile at once and take turns
# on the GPU for timing (benchmarks/gpu_compiled.py). Installs nothing from the internet (transformers travels as a
# wheel in .whl/). Writes everything under $OUT (default ./gpu-out). About 6-7 minutes.
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
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
python3 -m benchmarks.gpu_compiled --workers 4 --out "$OUT/gpu_compiled.json" --budget-s "${BUDGET_S:-240}" 2>&1 \
    | grep -v -e "^DEBUG" -e "Warning" -e "warnings.warn" | tee "$OUT/gpu_speed.log"

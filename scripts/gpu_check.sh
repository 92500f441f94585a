#!/usr/bin/env bash
# The GPU check, for a lent CUDA machine (the `device` tool): installs nothing from the internet (transformers
# 5.24 travels as a wheel in .whl/), runs the CUDA tests, then the backend benchmark on an 8B-shaped bf16 model.
# Everything it prints is also written under $OUT (default ./gpu-out). Target: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"

echo "== CUDA tests"
timeout 300 python3 -m pytest tests/test_gpu.py -q -s -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
echo "tests exit code: $?"

echo "== backend benchmark (8B-shaped, bf16)"
timeout 240 python3 benchmarks/gpu_backends.py --out "$OUT/gpu_backends.json" --flex-kinds ar_step,draft_32
echo "benchmark exit code: $?"

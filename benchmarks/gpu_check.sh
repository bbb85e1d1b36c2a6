#!/usr/bin/env bash
# One prepared session on a CUDA machine: the GPU tests (tests/test_cuda.py: GPU features against the CPU,
# training and its checkpoint across devices, torchrun with nccl, out-of-memory batch halving, pixel
# training), then the throughput benchmark (benchmarks/gpu.py). Everything it prints and writes goes to
# $OUT (default runs/gpu_check): gpu.txt, test_cuda.log, gpu.log, gpu.json, gpu.md.
#
#   OUT=runs/gpu_check DATA=../shared/data/ebhi bash benchmarks/gpu_check.sh
#
# PYTHON (default python3) must have torch with CUDA and histomil's requirements (pip install -e '.[dev]').
set -u -o pipefail
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
tests=0
"$PY" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" || tests=$?
"$PY" benchmarks/gpu.py --device cuda --data "${DATA:-../shared/data/ebhi}" --tiles "${TILES:-1024}" --out "$OUT" \
    2>&1 | tee "$OUT/gpu.log" || exit $?
exit "$tests"

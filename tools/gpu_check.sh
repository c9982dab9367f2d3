#!/usr/bin/env bash
# The one script for a lent GPU (issue 6): build refpg with its CUDA kernels, run the cuda rows of
# the op table, the CUDA tests (whole-model parity, bad calls, memory bounds) and the benchmark on
# the real PaliGemma-3B-224 shapes. Made for the device tool's H200 image (python3 with torch,
# transformers, pybind11, scikit-build-core, pytest; nvcc 13): no installs from a registry.
#
#     (device tool)  run: bash tools/gpu_check.sh        (about 5-8 minutes; logs under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# build here (sm_90), no build isolation: the image's pybind11 / scikit-build-core, nothing fetched
python3 -m pip install --quiet --no-build-isolation --no-deps . -Cbuild-dir=/tmp/refpg-build \
  -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 2>&1 | tail -20 | tee "$OUT/build.txt"
python3 -c "from refpg import _C, cuda; print('cuda compiled:', _C.cuda.compiled, '| unavailable:', cuda.unavailable_reason()); print(_C.cuda.device_info())"
cd tests
# the tests import the installed refpg (not ../refpg): run them from tests/ with the repo off sys.path
timeout 240 python3 -m pytest -q -p no:cacheprovider -x --timeout 120 -k "cuda" \
  test_backend_ops.py test_cuda.py test_cuda_plumbing.py 2>&1 | tee "$OUT/tests.txt" | tail -25
cd ..
timeout 240 python3 tools/bench.py --shape pg1-224 --no-numpy --no-torch --no-cpp --repeat 3 --decode-steps 10 \
  2>&1 | tee "$OUT/bench.txt"

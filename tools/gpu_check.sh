#!/usr/bin/env bash
# The one script for a lent GPU (issue 6): build refpg with its CUDA kernels, run the cuda rows of
# the op table, the CUDA tests (whole-model parity, bad calls, memory bounds, the compiled bindings)
# and the benchmark on the real PaliGemma-3B-224 shapes. Made for the device tool's H200 image
# (python3 with torch, transformers, pybind11, scikit-build-core, pytest; nvcc 13): no installs from
# a registry.
#
#     (device tool)  run: bash tools/gpu_check.sh        (about 5-8 minutes; logs under $OUT)
#
# It exits non-zero, saying why on its last line, unless every step passed on a working GPU: no
# driver or nvcc, a failed build, a module built without its CUDA kernels or unable to reach the
# device, any failed cuda test, or a failed benchmark. The tests run with REFPG_REQUIRE_CUDA=1, so
# a test that would skip for want of a usable GPU fails instead.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
fail() {
  echo "gpu_check: FAILED: $*" | tee -a "$OUT/verdict.txt" >&2
  exit 1
}
# `timeout` is the only time limit: pytest's --timeout needs the pytest-timeout plugin, which the
# image may not have (without it pytest refuses the flag and runs nothing).

command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver here"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" ||
  fail "nvidia-smi could not query the GPU (driver not loaded?)"
command -v nvcc >/dev/null || fail "nvcc is not on the PATH: the CUDA kernels cannot be compiled"
nvcc --version | tail -2 | tee -a "$OUT/gpu.txt"

# Build here (sm_90), no build isolation: the image's pybind11 / scikit-build-core, nothing fetched.
cd "$ROOT"
python3 -m pip install -v --no-build-isolation --no-deps . -Cbuild-dir=/tmp/refpg-build \
  -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 -Ccmake.define.REFPG_CUDA=ON >"$OUT/build.txt" 2>&1 ||
  { tail -30 "$OUT/build.txt"; fail "pip install failed (log: $OUT/build.txt)"; }
grep -E "refpg: (CUDA|nvcc)" "$OUT/build.txt" | tail -1

# Everything below imports the installed refpg. Never from the repository root: there `import refpg`
# finds the source tree, which has no compiled _C.
export REFPG_REQUIRE_CPP=1 REFPG_REQUIRE_CUDA_BUILD=1 REFPG_REQUIRE_CUDA=1
cd "$OUT"
python3 - <<'PY' 2>&1 | tee "$OUT/diagnostics.txt"
import sys

import refpg
from refpg import _C
from refpg.backends import cuda

print("refpg imported from", refpg.__file__)
print("cuda compiled:", _C.cuda.compiled, "| unavailable:", cuda.unavailable_reason())
if not _C.cuda.compiled or cuda.unavailable_reason():
    sys.exit(1)
print(_C.cuda.device_info())
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "the installed refpg cannot use the GPU (see $OUT/diagnostics.txt)"

# The tests from tests/ (the repository root off sys.path: they import the installed refpg).
cd "$ROOT/tests"
timeout 300 python3 -m pytest -q -p no:cacheprovider --maxfail=20 -k "cuda" \
  test_backend_ops.py test_cuda.py test_cuda_plumbing.py test_cuda_bindings.py >"$OUT/tests.txt" 2>&1
status=$?
tail -25 "$OUT/tests.txt"
[ "$status" -eq 0 ] || fail "cuda tests: exit $status (124: timed out after 300 s; log: $OUT/tests.txt)"

cd "$ROOT"
timeout 240 python3 tools/bench.py --shape pg1-224 --no-numpy --no-torch --no-cpp --repeat 3 --decode-steps 10 \
  2>&1 | tee "$OUT/bench.txt"
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] || fail "bench: exit $status (124: timed out after 240 s; log: $OUT/bench.txt)"
echo "gpu_check: passed" | tee "$OUT/verdict.txt"

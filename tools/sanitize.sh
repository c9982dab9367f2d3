#!/usr/bin/env bash
# The sanitizer job: builds refpg._C with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option
# REFPG_SANITIZE, CPU kernels only) into its own build directory, stages a copy of the refpg package
# around it, and runs the op table and the fuzz tests on it, failing on any report (out-of-bounds
# access, use after free, undefined behaviour such as a misaligned load or a signed overflow).
#
#     bash tools/sanitize.sh      (about 2 minutes on 2 cores from a clean build directory, most of it the build)
#
# Environment: REFPG_SANITIZE_DIR (default /tmp/refpg-sanitize-<checksum of the checkout's path>)
# holds the build and the staged package; JOBS the build's parallelism (default 2). Needs g++ (with
# libasan, libubsan) and cmake; pybind11 is pip-installed when it is missing (CI installs refpg with
# build isolation, which keeps pybind11 out of the environment).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# one directory per checkout: a CMake cache is tied to the source directory it was made for
DIR=${REFPG_SANITIZE_DIR:-/tmp/refpg-sanitize-$(printf %s "$ROOT" | cksum | cut -d' ' -f1)}
BUILD=$DIR/build
STAGE=$DIR/stage

python3 -c "import pybind11" 2>/dev/null || python3 -m pip install --quiet "pybind11>=2.12"
command -v cmake >/dev/null || python3 -m pip install --quiet cmake
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DREFPG_SANITIZE=ON -DREFPG_CUDA=OFF \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build "$BUILD" -j"${JOBS:-2}" >"$DIR/build.log" 2>&1 || { tail -40 "$DIR/build.log"; exit 1; }

# A copy of the package with the sanitized module in it: whatever _C the source tree holds (a link
# to a development build) stays out of the way.
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -r "$ROOT/refpg" "$STAGE/refpg"
rm -f "$STAGE"/refpg/_C*.so
cp "$BUILD"/_C*.so "$STAGE/refpg/"

# Python is not instrumented: the sanitizer runtime comes in first, and libstdc++ with it (so that
# ASan's interceptors see C++ exceptions thrown through the module).
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
# Reports go to files: pytest captures stderr, and a process the sanitizer aborts takes its captured
# output with it. CPython leaks by design: no leak detection.
rm -f "$DIR"/report.*
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$DIR/report
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$DIR/report
export PYTHONPATH=$STAGE${PYTHONPATH:+:$PYTHONPATH}  # child interpreters (the fuzz batch) import it too
export REFPG_REQUIRE_CPP=1 REFPG_REQUIRE_SANITIZED=1
unset REFPG_SIMD REFPG_THREADS

# From the staged directory, so that `python3 -m pytest` (which puts the working directory first on
# sys.path) imports the staged package, never the source tree.
cd "$STAGE"
python3 -c "from refpg import _C; assert _C.sanitized, _C.__file__; print('sanitized refpg._C:', _C.__file__)"
shopt -s nullglob
tests=("$ROOT"/tests/test_backend_ops.py "$ROOT"/tests/test_fuzz*.py "$ROOT"/tests/test_threads.py)
status=0
# Deselected here (it runs in the main suite): forking while another thread runs kernels. Under GCC 12's
# libasan a forked child can inherit the sanitizer allocator's lock from a thread caught inside malloc
# and hang (seen once in CI: 1 child of 20, exit -9); glibc's malloc, used everywhere else, is made
# fork-safe by its own handlers.
python3 -m pytest -q -p no:cacheprovider "${tests[@]}" -k "not test_fork_while_another_thread_runs_kernels" \
  || status=$?
reports=("$DIR"/report.*)
if ((${#reports[@]})); then
  cat "${reports[@]}"
  echo "sanitizer job: FAILED, ${#reports[@]} report(s) above (files ${reports[*]})"
  exit 1
fi
((status == 0)) || { echo "sanitizer job: FAILED (tests exit $status)"; exit "$status"; }
echo "sanitizer job: no reports"

"""The kernels' thread pool (csrc/cpu/threadpool.cpp) under the ways Python programs use threads
and processes: set_num_threads racing kernels in another thread, fork() (os.fork, multiprocessing's
fork start method) after the pool has started, and absurd thread counts.

Each scenario runs in a child interpreter with a timeout, so a deadlock fails its test instead of
freezing pytest; forked grandchildren are killed by their parent when they overrun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import NEUTRAL_DIR, child_env
from refpg import backend

needs_cpp = pytest.mark.skipif("cpp" in backend.UNAVAILABLE, reason=backend.UNAVAILABLE.get("cpp", ""))
pytestmark = needs_cpp

# What every child script starts with: inputs, and the NumPy reference for them.
PRELUDE = """
import os, sys, threading, time
import numpy as np
from refpg import _C, ops
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 4096)).astype(np.float32)  # 64 rows: the rows are spread over the pool
w = rng.standard_normal(4096).astype(np.float32)
ref = ops.rms_norm(x, w, 1e-6)
a = rng.standard_normal((40, 512)).astype(np.float32)   # a GEMM: 40 rows, parallel over panels
b = rng.standard_normal((300, 512)).astype(np.float32)
ref_ab = a @ b.T

def kernels_are_right():
    return (np.abs(_C.rms_norm(x, w, 1e-6) - ref).max() < 1e-4
            and np.abs(_C.linear(a, b) - ref_ab).max() < 1e-3 * np.abs(ref_ab).max())

def wait_child(pid, seconds):
    '''The forked child's exit code; a child still running after `seconds` is killed (-9).'''
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -9
"""


def run_child(script: str, timeout: float = 60) -> str:
    """Runs PRELUDE + script in a fresh interpreter importing this refpg; fails on a hang or an error."""
    # its own process group: on a hang it is killed with every process it forked
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(script)], env=child_env(), text=True,
                            cwd=NEUTRAL_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the child hung (killed after {timeout} s); its output:\n{out}\n{err}")
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{out}\n{err}"
    return out


def test_set_num_threads_while_another_thread_runs_kernels_neither_hangs_nor_corrupts():
    out = run_child("""
        stop, wrong, calls = False, [], [0]
        def kernels():
            while not stop:
                if not kernels_are_right():
                    wrong.append(calls[0])
                calls[0] += 1
        t = threading.Thread(target=kernels)
        t.start()
        for i in range(3000):
            _C.set_num_threads(1 + i % 4)
            if i % 50 == 0:
                time.sleep(0.001)  # let the kernel thread in between resizes too
        stop = True
        t.join()
        assert not wrong, f"wrong results in calls {wrong[:10]}"
        assert kernels_are_right() and _C.num_threads() == 4
        print("kernel calls", calls[0])
    """)
    assert int(out.split()[-1]) > 0  # the kernel thread did run beside the resizes


def test_kernels_in_an_os_fork_child_after_the_pool_started_run_and_are_right():
    run_child("""
        _C.set_num_threads(3)
        assert kernels_are_right()  # the pool's workers exist now (in this process only)
        pid = os.fork()
        if pid == 0:
            ok = kernels_are_right() and _C.num_threads() == 3
            _C.set_num_threads(2)   # resizing in the child: there are no workers to join
            ok = ok and kernels_are_right()
            os._exit(0 if ok else 3)
        code = wait_child(pid, 10)
        assert code == 0, f"forked child: exit code {code} (-9: it hung)"
        assert kernels_are_right()  # and the parent's pool still works
    """)


def test_fork_while_another_thread_runs_kernels_gives_children_a_working_pool():
    """The fork lands between or inside the other thread's jobs: a child must not inherit a lock
    held by a thread it does not have."""
    run_child("""
        _C.set_num_threads(2)
        stop = False
        def kernels():
            while not stop:
                kernels_are_right()
        t = threading.Thread(target=kernels)
        t.start()
        codes = []
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                os._exit(0 if kernels_are_right() else 3)
            codes.append(wait_child(pid, 10))
            if codes[-1]:
                break
        stop = True
        t.join()
        assert codes == [0] * 20, f"forked children's exit codes (-9: hung): {codes}"
    """)


def test_multiprocessing_fork_pool_workers_run_kernels_after_the_parent_used_them():
    run_child("""
        import multiprocessing
        def job(i):
            return bool(kernels_are_right())
        assert kernels_are_right()
        with multiprocessing.get_context("fork").Pool(2) as pool:
            try:
                results = pool.map_async(job, range(6)).get(timeout=30)
            except multiprocessing.TimeoutError:
                pool.terminate()
                raise SystemExit("multiprocessing workers hung")
        assert results == [True] * 6, results
    """)


@pytest.mark.parametrize("n", [1025, 10**9, 10**30])
def test_set_num_threads_beyond_the_limit_raises_value_error_naming_it(n):
    from refpg import _C

    before = _C.num_threads()
    with pytest.raises(ValueError, match=r"set_num_threads: n = \d+ .*limit of 1024"):
        _C.set_num_threads(n)
    assert _C.num_threads() == before  # the pool was not touched


@pytest.mark.parametrize("n", [2.5, "4", None, True])
def test_set_num_threads_with_a_non_integer_raises_type_error_naming_n(n):
    from refpg import _C

    with pytest.raises(TypeError, match="set_num_threads: n must be an integer"):
        _C.set_num_threads(n)


def test_set_num_threads_accepts_the_limit_and_non_positive_means_every_core():
    import numpy as np

    from refpg import _C

    before = _C.num_threads()
    try:
        _C.set_num_threads(np.int64(3))
        assert _C.num_threads() == 3
        _C.set_num_threads(0)
        cores = _C.num_threads()
        _C.set_num_threads(-(10**30))
        assert _C.num_threads() == cores == min(len(os.sched_getaffinity(0)), 1024)
        _C.set_num_threads(1024)  # the limit itself: allowed (threads start with the next kernel)
        assert _C.num_threads() == 1024
    finally:
        _C.set_num_threads(before)

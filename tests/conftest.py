"""Shared fixtures: tiny random PaliGemma checkpoints written by tools/make_tiny_checkpoint.py,
each with the activations transformers computes on it (reference.npz).

They are written afresh for every pytest session. Set REFPG_TEST_CHECKPOINT_CACHE=DIR to reuse them
across sessions instead (tools/mutate.py does: it runs the suite once per mutation): they are then
written once under DIR, keyed by the sources of the tools that write them and the torch /
transformers versions, and each session works on its own copy.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
CACHE_ENV = "REFPG_TEST_CHECKPOINT_CACHE"
# what the checkpoints and their reference activations depend on (refpg itself is not among them)
CHECKPOINT_SOURCES = ("tools/make_tiny_checkpoint.py", "tools/hf_oracle.py", "tools/tiny_tokenizer.py",
                      "refpg/conform/transformers_adapter.py")


def checkpoint_cache_key() -> str:
    import torch
    import transformers

    h = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}\n".encode())
    for name in CHECKPOINT_SOURCES:
        with open(os.path.join(ROOT, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def cached_checkpoints(cache_root: str) -> str:
    """The directory under cache_root holding every variant, written now if it is not there yet."""
    from make_tiny_checkpoint import VARIANTS, make_tiny_checkpoint

    done = os.path.join(cache_root, checkpoint_cache_key())
    if not os.path.isdir(done):
        os.makedirs(cache_root, exist_ok=True)
        work = tempfile.mkdtemp(prefix="writing-", dir=cache_root)
        for name in VARIANTS:
            make_tiny_checkpoint(os.path.join(work, name), name)
        try:
            os.rename(work, done)  # atomic: a reader sees all the variants or none
        except OSError:  # another session finished first
            shutil.rmtree(work)
    return done


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{variant: directory} for every variant of the tool (needs torch + transformers)."""
    pytest.importorskip("torch", reason="tiny checkpoints are written with torch + transformers")
    pytest.importorskip("transformers", reason="tiny checkpoints are written with torch + transformers")
    from make_tiny_checkpoint import VARIANTS, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    if os.environ.get(CACHE_ENV):
        cache = cached_checkpoints(os.environ[CACHE_ENV])
        return {name: shutil.copytree(os.path.join(cache, name), str(root / name)) for name in VARIANTS}
    return {name: make_tiny_checkpoint(str(root / name), name) for name in VARIANTS}


def require_cuda_or_skip() -> None:
    """For tests that need a usable GPU: skips where there is none, saying why — or fails where
    REFPG_REQUIRE_CUDA=1 (tools/gpu_check.sh sets it: on a GPU machine, a CUDA build that is missing
    or cannot reach the device must fail the check, not skip it)."""
    from refpg import backend

    reason = backend.UNAVAILABLE.get("cuda")
    if reason and os.environ.get("REFPG_REQUIRE_CUDA"):
        pytest.fail(f"REFPG_REQUIRE_CUDA is set, but the cuda backend is unavailable: {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture
def fake_gpu(monkeypatch):
    """The cuda backend with refpg._C.cuda replaced by tests/fake_cuda.py (device memory kept in
    NumPy, each op computed by refpg.ops): its data path runs on any machine. Returns the transfer
    counts {"upload": n, "download": n}, zeroed."""
    import types

    import fake_cuda
    from refpg import backend
    from refpg.backends import cuda

    monkeypatch.setattr(cuda, "_C", types.SimpleNamespace(cuda=fake_cuda))
    monkeypatch.delitem(backend.UNAVAILABLE, "cuda", raising=False)
    for op in backend.OP_NAMES:
        monkeypatch.setitem(backend.OPS[op], "cuda", getattr(cuda, op))
    fake_cuda.transfers.update(upload=0, download=0)
    return fake_cuda.transfers


@pytest.fixture
def cuda_device():
    """A test using it runs only where the cuda backend is available (see require_cuda_or_skip)."""
    require_cuda_or_skip()


# Agreement with transformers, max |diff| / max |reference| over every named activation and logits
# (tests/test_parity_transformers.py, tests/test_backend_model.py), bounded per backend a few times
# above the worst measured over every variant and case (`python tools/parity_report.py [--backend
# cpp]`; float32 on both sides, so only summation orders differ):
#  - numpy: 2.1e-06 worst (f16-gqa-sharded, suffix through the KV cache; most cases 0.5-1.3e-06),
#    AMD EPYC; the Intel Xeon of earlier sessions measured up to 1.7e-06 (README).
#  - cpp on its float32 FMA paths (avx512, avx2, scalar): 2.4e-06 worst (same case), AMD EPYC.
#  - cpp on AMX: 3.9e-05 worst (README, Intel Xeon): the AMX GEMM carries 16 bits of each
#    activation's mantissa, not 24; bounded by 1e-4, the bound every path had before.
#  - cuda: 3e-2 on the logits. Its prefill matmuls round activations to bf16 for the tensor cores
#    (decode stays fp32): after the tiny models' 3 + 2 layers that moves logits by about what
#    rounding the weights to bf16 does (tests/test_backend_model.py's BF16_ROUNDED_TOL, measured
#    0.5-1.5 % there). Not yet measured on a GPU.
PARITY_BOUND = {"numpy": 1e-5, "cpp": 1e-5, "cpp-amx": 1e-4, "cuda": 3e-2}


def parity_bound(backend_name: str) -> float:
    """The bound on max |diff| / max |transformers| for a model run entirely on backend_name."""
    if backend_name == "cpp":
        from refpg.backends.cpp import _C

        if _C is not None and _C.simd_path() == "amx":
            return PARITY_BOUND["cpp-amx"]
    return PARITY_BOUND[backend_name]


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|: the parity measure of every whole-model test."""
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def prefill(model, inputs: dict) -> np.ndarray:
    """Logits of one forward pass over a reference case's inputs."""
    return model(inputs["input_ids"], inputs["pixel_values"], token_type_ids=inputs["token_type_ids"],
                 attention_mask=inputs["attention_mask"])


def load_reference(model_dir: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(model_dir, "reference.npz")) as z:
        return {k: z[k] for k in z.files}


def case_inputs(ref: dict, case: str) -> dict[str, np.ndarray]:
    prefix = f"{case}/input/"
    return {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}


def reference_on(model_dir: str):
    """A conform adapter running the reference on `model_dir` whatever checkpoint a case hands it:
    the intact one, when a case breaks its copy (refpg itself refuses a broken checkpoint)."""
    from refpg.conform.adapters import RefpgAdapter

    class ReferenceOn(RefpgAdapter):
        def run(self, case, _model_dir, inputs):
            return super().run(case, model_dir, inputs)

    return ReferenceOn("numpy")


# ---- the cpp backend's instruction sets ---------------------------------------------------------
SIMD_PATHS = ("amx", "avx512", "avx2", "scalar")  # what cpp can be forced to


def simd_paths_here() -> dict[str, str | None]:
    """Each instruction set cpp can be forced to (set_simd_path, REFPG_SIMD) -> None, or why this CPU
    cannot run it."""
    from refpg import backend

    if "cpp" in backend.UNAVAILABLE:
        return {path: "cpp not built" for path in SIMD_PATHS}
    from refpg import _C

    f = _C.cpu_features()
    avx2 = f["avx2"] and f["fma"]  # every vector path needs it too
    have = {"amx": f["amx_bf16"] and avx2, "avx512": f["avx512f"] and avx2, "avx2": avx2, "scalar": True}
    return {path: None if have[path] else f"this CPU (or its OS) lacks {path}" for path in SIMD_PATHS}


@contextlib.contextmanager
def simd_path(path: str):
    """The block runs the cpp kernels on `path` (amx, avx512, avx2, scalar or auto), then the path that
    was current comes back. The path is process-wide: REFPG_SIMD is read once, at first use, so a
    test switches it with refpg._C.set_simd_path, never through the environment."""
    from refpg import _C

    before = _C.simd_path()
    _C.set_simd_path(path)
    try:
        yield
    finally:
        _C.set_simd_path(before)


# ---- child interpreters ------------------------------------------------------------------------
# They import the refpg under test — the installed one in CI (with its compiled refpg._C), the source
# tree in development — and run in an empty folder: with `-m` or `-c` Python puts the working
# directory first on sys.path, and the repository root holds refpg/ without the compiled module.
NEUTRAL_DIR = tempfile.mkdtemp(prefix="refpg-tests-cwd-")
atexit.register(shutil.rmtree, NEUTRAL_DIR, True)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child interpreter: this refpg first on the path, no REFPG_* from outside
    (a test's own settings come in `extra`)."""
    import refpg

    env = {k: v for k, v in os.environ.items() if not k.startswith("REFPG_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(refpg.__file__)),
                                                      env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_python(args: list, *, env: dict | None = None, cwd=None, timeout: float = 120,
               **kwargs) -> subprocess.CompletedProcess:
    """`python ARGS` in a child (see child_env), output captured as text."""
    kwargs = {"text": True, "encoding": "utf-8", "errors": "replace", **kwargs}
    return subprocess.run([sys.executable, *args], capture_output=True, cwd=cwd or NEUTRAL_DIR,
                          env=child_env(**(env or {})), timeout=timeout, **kwargs)


def run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    """The `refpg` command (`python -m refpg ARGS`) in a child."""
    return run_python(["-m", "refpg", *args], **kwargs)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The CLI's bad-input contract: exit code 2, no traceback, and the error as one line `refpg:
    error: …` holding every needle, the last on stderr (progress lines may come before it when the
    error comes after the weights loaded). Returns that line."""
    stderr = result.stderr.decode("utf-8", "replace") if isinstance(result.stderr, bytes) else result.stderr
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert line.startswith("refpg: error:"), stderr
    for needle in needles:
        assert needle in line, line
    return line

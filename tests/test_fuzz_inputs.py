"""Fuzzing every input refpg reads (issue 15): no hang, no traceback, no silently accepted bad input.

Seeded and deterministic: each category is a fixed list of mutations of a few seeds — the tiny
checkpoint in tests/data/tiny-random (Gemma), a Gemma 2 and a two-shard variant of it built here,
its image0.png, the shipped demo model — made of explicit cases plus a fixed number drawn with
`random.Random(SEED)`. Every case is its own test, with the id `<category>:<mutation>`; `COUNTS`
pins how many each category holds (test_case_counts_are_fixed).

The contract every case asserts:
- no crash, no hang. Whatever could crash or hang runs in a subprocess with a timeout and a 4 GiB
  address-space limit: each CLI and environment case in its own `python -m refpg.cli`, the file and
  Python-API cases in a *case worker* (one long-lived python that imports refpg once and runs the
  cases one at a time; a crash or a hang fails that case and the worker is restarted);
- one outcome per case, fixed in advance: the fuzz is deterministic, so every case, drawn or named,
  says whether its input is valid (`accept`: what the result must be) or bad (`reject`: what the error
  must name), never "either" (Case and CliCase refuse both and neither). A valid input's result is
  checked to be right, against a reference that says the same thing another way: a mutated
  checkpoint that is still valid gives the seed's logits (or those of a reference checkpoint the test
  writes itself, holding the values the mutation put there), a valid image gives finite pixel values
  in [-1, 1] and finite logits, a valid CLI run exits 0 with the greedy answer (or, for `refpg diff`
  that finds the runs part ways, 1, naming the first divergent activation). A bad input is a clear
  error: in the API an exception of refpg's user-error kinds (ConfigError, CheckpointError,
  ProcessorError, InputError, BackendError; the Python API's cases must raise InputError) whose
  message names the file and the field, tensor, argument or variable at fault; in the CLI exit code
  2, no "Traceback", and a last stderr line `refpg: error: …` naming the culprit;
- never silently accepted: bad input that loads, or runs, without an error fails the case.

A failing case says which part of the contract it broke, first word of its message: HANG, CRASH,
ACCEPTED (bad input, no error), WRONG-RESULT (valid input, wrong output), REJECTED-VALID,
NOT-A-USER-ERROR (an exception of another kind: a traceback in the CLI), TRACEBACK, EXIT-CODE,
NO-ERROR-LINE, UNNAMED (the message does not name the culprit), IMPRECISE (it also names others).

Where the contract is ambiguous these tests take a demanding user's reading:
- a nested config field's error names its sub-config too (`text_config` and `hidden_size`: there
  are three `hidden_size`s); a token-id error names the config key (`pad_token_id`), not only `<pad>`;
- JSON types are strict: "64" (a string), true, [64] and 64.7 are not integers, "1e-6" is not a
  float, "false" is not a boolean. An integral float (64.0) is accepted as the integer (64); null
  means the default — the seed's own value where that is the default, else a mismatch with the
  checkpoint, named (its tensors, or preprocessor_config.json);
- sizes, head counts and eps/theta must be positive where the model divides by them or takes their
  root; an absurd size (10**9, 10**30) may be rejected by the config or by the checkpoint's shape
  check, but quickly; an image token id past the embedding table is allowed (transformers looks up
  id 0 there too), a negative one is not;
- safetensors: tensors whose byte ranges overlap (a weight silently read from another's bytes), a
  hole between tensors and bytes after the last one are errors (the format forbids all three);
  __metadata__ must be an object (of strings), trailing spaces after the header JSON are padding;
  a NaN or inf anywhere in a weight is an error at load naming the tensor;
- drawn mutations (bit flips, truncations, deleted config fields) have their one outcome worked out
  from their bytes by the test (config_flip_expectation, header_flip_expectation, data_flip,
  KEEPS_MODEL_WITHOUT); a draw the test cannot judge stops the collection, asking to extend it;
- images: zero-size ones are errors; any Pillow mode converts as transformers' convert_to_rgb does
  (through RGBA, over white), a valid image's pixel values are those of its RGB array (or path);
  array images must be uint8 [H, W, 3];
  pixel_values passed to the model must be a float array without NaN/inf (uint8 pixels are an error);
- CLI: argparse's own `refpg generate: error: …` line counts as the error line; a sampling-flag
  error names the culprit flag and not the others; a flag value the model cannot use (NaN, inf,
  --tol nan, --decode -1, --seed -1) is an error, never a traceback or a silently odd run; a
  temperature so small it underflows (1e-310) is greedy decoding; REFPG_THREADS must be a whole
  number from 1 to 1024 (0, a huge number or a non-digit is an error naming it, never "all cores" or
  clamped); REFPG_SIMD takes amx/avx512/avx2/scalar/auto in lower case or empty; REFPG_CHECK takes
  0/1/true/false/yes/no/on/off (case-insensitive) or empty, anything else is an error naming it; an
  env var's error names it and its value.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import random
import re
import resource
import select
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import PIL.Image
import pytest

import refpg
from conftest import NEUTRAL_DIR, child_env, simd_paths_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "data", "tiny-random")
IMAGE = os.path.join(TINY, "image0.png")
SEED = 15
# AddressSanitizer (tools/sanitize.sh preloads it) reserves terabytes of address space for its shadow
# memory, so there no address-space limit is set (limit_memory), and everything runs ~3x slower.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
CASE_TIMEOUT = 6 * (3 if UNDER_ASAN else 1)  # s per worker case; the legitimate ones take well under 1 s
CLI_TIMEOUT = 30 * (3 if UNDER_ASAN else 1)  # s per CLI run; the legitimate ones take about 0.5 s
MEMORY_LIMIT = 4 << 30  # address space of every subprocess: a runaway allocation fails, not the machine

FILE_ERRORS = tuple(f"refpg.errors.{kind}" for kind in ("ConfigError", "CheckpointError", "ProcessorError",
                                                         "InputError", "BackendError"))
# one kind, where a category's errors all come from one source (README, "Errors")
CONFIG_ERROR = ("refpg.errors.ConfigError",)
CHECKPOINT_ERROR = ("refpg.errors.CheckpointError",)
PROCESSOR_ERROR = ("refpg.errors.ProcessorError",)
INPUT_ERROR = ("refpg.errors.InputError",)  # the Python API's arguments


# ---- running cases where a crash or a hang cannot take the test run down ----------------------


def limit_memory() -> None:
    if not UNDER_ASAN:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


WORKER = r'''
import json, os, sys, traceback
protocol = os.fdopen(os.dup(1), "w")   # results go here; anything the code prints goes to stderr
os.dup2(2, 1)
sys.stdout = sys.stderr
import numpy as np
import PIL.Image
from refpg.model import PaliGemma
from refpg.processor import Processor

TINY, IMAGE = sys.argv[1], sys.argv[2]
_baselines = {}


def forward(model_dir, image=IMAGE, prompt="caption en"):
    proc = Processor.from_pretrained(model_dir)
    b = proc(images=[image], prompts=[prompt])
    model = PaliGemma.from_pretrained(model_dir)
    return model(b["input_ids"], b["pixel_values"], token_type_ids=b["token_type_ids"],
                 attention_mask=b["attention_mask"])


def pipeline(model_dir, seed_dir, tol=1e-5, text=None):
    """Load model_dir as a user would and run image0 + "caption en"; compare with the logits of
    seed_dir (a reference checkpoint), loaded as it is or, with `text`, with those fields of its text
    config replaced in memory (what a config value JSON cannot spell means)."""
    logits = forward(model_dir)
    key = (seed_dir, json.dumps(text, sort_keys=True))
    if key not in _baselines:
        if text:
            import dataclasses
            proc = Processor.from_pretrained(seed_dir)
            b = proc(images=[IMAGE], prompts=["caption en"])
            ref = PaliGemma.from_pretrained(seed_dir)
            ref.config = dataclasses.replace(ref.config, text=dataclasses.replace(ref.config.text, **text))
            _baselines[key] = ref(b["input_ids"], b["pixel_values"], token_type_ids=b["token_type_ids"],
                                  attention_mask=b["attention_mask"])
        else:
            _baselines[key] = forward(seed_dir)
    base = _baselines[key]
    same, diff = False, None
    if logits.shape == base.shape:
        fin = np.isfinite(base)  # non-finite logits (a huge but finite weight) must be the same non-finite values
        scale = float(np.abs(base[fin]).max()) if fin.any() else 0.0
        same = bool(np.array_equal(fin, np.isfinite(logits)) and np.array_equal(logits[~fin], base[~fin], equal_nan=True)
                    and np.allclose(logits[fin], base[fin], rtol=tol, atol=tol * scale))
        diff = float(np.abs(logits[fin] - base[fin]).max()) if fin.any() else 0.0
    return {"finite": bool(np.isfinite(logits).all()), "same": same, "max_diff": diff, "shape": list(logits.shape)}


P = Processor.from_pretrained(TINY)
M = PaliGemma.from_pretrained(TINY)


def batch():
    return P(images=[IMAGE], prompts=["caption en"])


GREEDY = M.generate(batch(), max_new_tokens=3)


def as_rgb(image):
    """transformers' convert_to_rgb, written out: an RGB image as it is, any other mode through RGBA
    composited over white; a uint8 [H, W, 3] array."""
    if image.mode == "RGB":
        return np.asarray(image)
    rgba = image.convert("RGBA")
    return np.asarray(PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"))


def process(image, reference):
    """The processor and the model on one image: what a valid image must give, and whether its
    pixel values are those of reference(), the same picture given another way (made after the
    image went through, so that a bad image's error is refpg's)."""
    b = P(images=[image], prompts=["caption en"])
    pv = b["pixel_values"]
    logits = M(b["input_ids"], pv, token_type_ids=b["token_type_ids"], attention_mask=b["attention_mask"])
    ref = P(images=[reference()], prompts=["caption en"])["pixel_values"]
    return {"shape": list(pv.shape), "finite": bool(np.isfinite(pv).all()), "lo": float(pv.min()),
            "hi": float(pv.max()), "logits_finite": bool(np.isfinite(logits).all()),
            "same_as_reference": bool(pv.shape == ref.shape and (pv == ref).all())}


def generated(ids):
    ids = np.asarray(ids)
    return {"shape": list(ids.shape), "greedy": ids.shape == GREEDY.shape and bool((ids == GREEDY).all())}


for line in sys.stdin:
    request = json.loads(line)
    scope = dict(globals(), arg=request["arg"], result=None)
    try:
        exec(request["code"], scope)
        out = {"status": "ok", "result": scope["result"]}
    except BaseException as e:
        out = {"status": "error", "mro": [f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__],
               "message": str(e), "traceback": traceback.format_exc()[-2500:]}
    protocol.write(json.dumps(out, default=repr) + "\n")
    protocol.flush()
'''


class CaseWorker:
    """One python that imports refpg once and runs code snippets on request, each under a timeout."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, TINY, IMAGE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, cwd=NEUTRAL_DIR, env=child_env(),
                                     preexec_fn=limit_memory)

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode("utf-8", "replace")[-3000:]

    def _stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, code: str, arg=None, timeout: float = CASE_TIMEOUT) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._stop()
            self._start()
        try:
            self.proc.stdin.write((json.dumps({"code": code, "arg": arg}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self._stop()
            return {"status": "hang", "timeout": timeout}
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            tail = self._stderr_tail()
            self._stop()
            return {"status": "crash", "returncode": rc, "stderr": tail}
        return json.loads(line)

    def close(self) -> None:
        self._stop()


@pytest.fixture(scope="module")
def worker():
    w = CaseWorker()
    yield w
    w.close()


def run_cli(*args, env: dict | None = None, cwd: str = NEUTRAL_DIR, timeout: float = CLI_TIMEOUT):
    """`python -m refpg.cli ARGS` -> CompletedProcess, or None when it ran past the timeout."""
    try:
        return subprocess.run([sys.executable, "-m", "refpg.cli", *args], capture_output=True, cwd=cwd,
                              env=env or child_env(), timeout=timeout, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        return None


# ---- the contract ---------------------------------------------------------------------------------

Names = tuple  # alternatives: the message must hold every string of at least one of them


def names(*alternatives) -> Names:
    """names("a") or names(("file", "field"), ("file", "tensor '"))"""
    return tuple((a,) if isinstance(a, str) else tuple(a) for a in alternatives)


def _names_ok(message: str, alternatives: Names) -> bool:
    return any(all(n in message for n in alt) for alt in alternatives)


def check(res: dict, accept: Callable[[dict], None] | None, reject: Names | None, kinds=FILE_ERRORS) -> None:
    """One worker case against the contract. accept: asserts on a successful result (None: success is
    a silently accepted bad input). reject: what an error must name (None: the input is valid)."""
    status = res["status"]
    if status == "hang":
        pytest.fail(f"HANG: no answer within {res['timeout']} s")
    if status == "crash":
        pytest.fail(f"CRASH: the worker died with code {res['returncode']}\n{res['stderr']}")
    if status == "ok":
        if accept is None:
            pytest.fail(f"ACCEPTED: bad input raised no error; result {res['result']}")
        accept(res["result"])
        return
    kind, message = res["mro"][0], res["message"]
    if reject is None:
        pytest.fail(f"REJECTED-VALID: {kind}: {message}\n{res['traceback']}")
    if not any(k in res["mro"] for k in kinds):
        pytest.fail(f"NOT-A-USER-ERROR: {kind}: {message}\n{res['traceback']}")
    if not _names_ok(message, reject):
        pytest.fail(f"UNNAMED: {kind}: {message!r} names none of {reject}")


def check_cli(res: subprocess.CompletedProcess | None, accept: Callable[[subprocess.CompletedProcess], None] | None,
              reject: Names | None, forbid: tuple[str, ...] = ()) -> None:
    """One CLI run against the contract; forbid: words the error line must not hold (other culprits)."""
    if res is None:
        pytest.fail(f"HANG: no exit within {CLI_TIMEOUT} s")
    stderr = res.stderr.decode("utf-8", "replace")
    stdout = res.stdout.decode("utf-8", "replace")
    if res.returncode < 0:
        pytest.fail(f"CRASH: signal {-res.returncode}\n{stderr[-2000:]}")
    if "Traceback" in stderr:
        pytest.fail(f"TRACEBACK: exit {res.returncode}\n{stderr[-2500:]}")
    if accept is not None:  # a valid input: its result (accept checks the exit code: 0, or diff's 1)
        if res.returncode not in (0, 1):
            pytest.fail(f"REJECTED-VALID: exit {res.returncode}\n{stderr[-2000:]}")
        accept(res)
        return
    if res.returncode == 0:
        pytest.fail(f"ACCEPTED: exit 0 on bad input; stdout {stdout[-300:]!r}; stderr {stderr[-500:]!r}")
    if res.returncode != 2:
        pytest.fail(f"EXIT-CODE: {res.returncode}, expected 2\n{stderr[-1500:]}")
    lines = stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    if not re.match(r"^refpg( [a-z]+)?: error: ", last):
        pytest.fail(f"NO-ERROR-LINE: last stderr line {last!r}")
    if not _names_ok(last, reject):
        pytest.fail(f"UNNAMED: {last!r} names none of {reject}")
    named = [w for w in forbid if w in last]
    if named:
        pytest.fail(f"IMPRECISE: {last!r} also names {named} (not at fault)")


def same_logits(r: dict) -> None:
    assert r["same"], f"WRONG-RESULT: loaded, but logits differ from the seed's (max |diff| {r['max_diff']})"


def valid_image(r: dict) -> None:
    assert r["shape"] == [1, 3, 32, 32], r
    assert r["finite"] and -1 <= r["lo"] <= r["hi"] <= 1 and r["logits_finite"], f"WRONG-RESULT: {r}"
    assert r["same_as_reference"], f"WRONG-RESULT: pixel values differ from those of the same picture given another way: {r}"


def greedy(r: dict) -> None:
    assert r["greedy"], f"WRONG-RESULT: generated {r['shape']}, not the greedy ids"


@dataclass
class Case:
    category: str
    name: str
    code: str                                 # run by the worker; sets `result`
    accept: Callable | None = None            # see check()
    reject: Names | None = None
    kinds: tuple = FILE_ERRORS
    prepare: Callable | None = None           # (workdir, seeds) -> arg for the code

    def __post_init__(self):
        one_outcome(self)

    def param(self):
        return pytest.param(self, id=f"{self.category}:{self.name}")


def one_outcome(case) -> None:
    """Every case expects exactly one outcome: its input is valid (accept) or bad (reject)."""
    if (case.accept is None) == (case.reject is None):
        raise AssertionError(f"{case.category}:{case.name}: give accept (a valid input's result) or reject "
                             f"(what a bad input's error names), not {'both' if case.accept else 'neither'}")


# ---- seeds: the checkpoints the mutations start from -------------------------------------------

def read_safetensors(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def safetensors_bytes(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head) if length is None else length) + head + data


def tensors_bytes(tensors: dict[str, np.ndarray], dtype: str = "F32") -> bytes:
    header, chunks, offset = {}, [], 0
    for name, a in tensors.items():
        if dtype == "BF16":
            raw = (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            with np.errstate(over="ignore"):  # F16 of a value past its range is inf, as the case wants
                raw = np.ascontiguousarray(a, {"F32": "<f4", "F16": "<f2"}[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return safetensors_bytes(header, b"".join(chunks))


def tiny_tensors() -> dict[str, np.ndarray]:
    header, data = read_safetensors(os.path.join(TINY, "model.safetensors"))
    header.pop("__metadata__", None)
    return {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]], "<f4").reshape(v["shape"])
            for k, v in header.items()}


def tiny_config() -> dict:
    with open(os.path.join(TINY, "config.json")) as f:
        return json.load(f)


def make_model_dir(where: str, seed_dir: str, files: dict[str, bytes | str | None]) -> str:
    """A checkpoint directory: seed_dir's files (symlinked) with `files` written over (None: left out)."""
    d = os.path.join(where, "model")
    os.makedirs(d)
    for name in os.listdir(seed_dir):
        if name not in files:
            os.symlink(os.path.join(seed_dir, name), os.path.join(d, name))
    for name, content in files.items():
        if content is not None:
            with open(os.path.join(d, name), "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
    return d


GEMMA2_TEXT = {"model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 8,
               "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
SHARD_NAMES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, str]:
    """{"tiny": tests/data/tiny-random, "gemma2": its Gemma 2 variant, "sharded": it in two shards}."""
    root = str(tmp_path_factory.mktemp("seeds"))
    tensors = tiny_tensors()
    # Gemma 2: the tiny decoder with sandwich norms (zero weights: Gemma's norms scale by 1 + w)
    g2 = dict(tensors)
    for i in range(3):
        for norm in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
            g2[f"language_model.model.layers.{i}.{norm}.weight"] = np.zeros(64, np.float32)
    cfg = tiny_config()
    cfg["text_config"].update(GEMMA2_TEXT)
    os.makedirs(os.path.join(root, "gemma2"))
    gemma2 = make_model_dir(os.path.join(root, "gemma2"), TINY,
                            {"config.json": json.dumps(cfg, indent=1), "model.safetensors": tensors_bytes(g2)})
    # two shards (vision + projector | text) and their index
    parts = ({k: v for k, v in tensors.items() if not k.startswith("language_model.")},
             {k: v for k, v in tensors.items() if k.startswith("language_model.")})
    index = {"metadata": {"total_size": 0},
             "weight_map": {k: SHARD_NAMES[i] for i, part in enumerate(parts) for k in part}}
    os.makedirs(os.path.join(root, "sharded"))
    sharded = make_model_dir(os.path.join(root, "sharded"), TINY,
                             {"model.safetensors": None, "model.safetensors.index.json": json.dumps(index, indent=1),
                              SHARD_NAMES[0]: tensors_bytes(parts[0]), SHARD_NAMES[1]: tensors_bytes(parts[1])})
    return {"tiny": TINY, "gemma2": gemma2, "sharded": sharded}


@pytest.fixture
def workdir(tmp_path_factory) -> str:
    # neutral names: the error-message checks look for words like "tensor '", and pytest's own
    # tmp_path carries the (mangled) test id
    return str(tmp_path_factory.mktemp("w"))


PIPELINE = 'result = pipeline(arg["d"], arg["seed"], **arg["opts"])'


def checkpoint_case(category: str, name: str, files: Callable[[str, dict], dict] | dict, seed: str = "tiny",
                    accept=None, reject=None, kinds=FILE_ERRORS, reference: Callable[[str, dict], dict] | None = None,
                    opts: dict | None = None) -> Case:
    """A case that loads a mutated checkpoint: files (or a function of (workdir, seeds) giving them)
    replace the seed's. Its logits are compared with the seed's, or with those of `reference`: files
    (a function of (workdir, seeds)) replacing the seed's in a second directory the test writes. opts:
    further arguments of the worker's pipeline() (tol, text)."""
    def prepare(where, seed_dirs):
        written = files(where, seed_dirs) if callable(files) else files
        base = seed_dirs[seed if seed != "sharded" else "tiny"]
        if reference is not None:
            os.makedirs(os.path.join(where, "reference"))
            base = make_model_dir(os.path.join(where, "reference"), seed_dirs[seed], reference(where, seed_dirs))
        return {"d": make_model_dir(where, seed_dirs[seed], written), "seed": base, "opts": opts or {}}
    return Case(category, name, PIPELINE, accept, reject, kinds, prepare)


# ---- config.json ------------------------------------------------------------------------------------

TENSOR = ("model.safetensors", "tensor '")
# what a checkpoint that does not fit the config may be reported as: a tensor of the file, or the
# tensors the directory lacks (named), or preprocessor_config.json disagreeing with the vision tower
MISFIT = names(TENSOR, ("checkpoint lacks", "tensor"), ("preprocessor_config.json",))


def field_names(path: tuple[str, ...]) -> Names:
    """What an error about the field at `path` must name: config.json, the sub-config, the key."""
    return names(("config.json", *path))


# (path, kind, value in the seed or the default it gets)
CONFIG_FIELDS = [
    (("text_config", "hidden_size"), "size", 64), (("text_config", "intermediate_size"), "size", 96),
    (("text_config", "num_hidden_layers"), "size", 3), (("text_config", "num_attention_heads"), "size", 4),
    (("text_config", "num_key_value_heads"), "size", 1), (("text_config", "head_dim"), "size", 16),
    (("text_config", "vocab_size"), "size", 1864), (("text_config", "max_position_embeddings"), "size", 8192),
    (("vision_config", "hidden_size"), "size", 32), (("vision_config", "intermediate_size"), "size", 72),
    (("vision_config", "num_hidden_layers"), "size", 2), (("vision_config", "num_attention_heads"), "size", 4),
    (("vision_config", "patch_size"), "size", 8), (("vision_config", "image_size"), "size", 32),
    (("vision_config", "num_channels"), "size", 3), (("projection_dim",), "size", 64),
    (("image_token_index",), "id", 1800), (("pad_token_id",), "id", 0), (("eos_token_id",), "id", 1),
    (("bos_token_id",), "id", 2),
    (("text_config", "rms_norm_eps"), "float", 1e-6), (("text_config", "rope_theta"), "float", 10000.0),
    (("vision_config", "layer_norm_eps"), "float", 1e-6),
    (("text_config", "hidden_act"), "str", "gelu_pytorch_tanh"),
    (("vision_config", "hidden_act"), "str", "gelu_pytorch_tanh"),
    (("model_type",), "str", "paligemma"), (("text_config", "model_type"), "str", "gemma"),
    (("vision_config", "model_type"), "str", "siglip_vision_model"),
]
NAN, INF = float("nan"), float("inf")

# label -> value from the seed's value (JSON: NaN / Infinity literals, big ints as digits)
BAD_NUMBERS = {
    "list": lambda v: [v], "str-number": lambda v: str(v), "str": lambda v: "abc", "object": lambda v: {"value": v},
    "true": lambda v: True, "null": lambda v: None, "float-frac": lambda v: v + 0.7,
    "float-integral": lambda v: float(v), "nan": lambda v: NAN, "inf": lambda v: INF, "-inf": lambda v: -INF,
    "zero": lambda v: 0, "neg": lambda v: -1, "1e9": lambda v: 10**9, "1e30": lambda v: 10**30,
}
BAD_STRINGS = {"number": lambda v: 5, "list": lambda v: [v], "object": lambda v: {"name": v}, "true": lambda v: True,
               "null": lambda v: None, "empty": lambda v: ""}
INT_LABELS = ["list", "str-number", "str", "object", "true", "null", "float-frac", "float-integral", "nan", "inf",
              "zero", "neg", "1e9", "1e30"]
FLOAT_LABELS = ["list", "str-number", "str", "object", "true", "null", "nan", "inf", "-inf", "zero", "neg"]
FIELDS_PER_INT_LABEL = 3


# The seed config's fields whose absence (or null) leaves the model as it is: unused by the forward
# pass (refpg reads them no more than transformers' forward does), or their default is the seed's
# value — image_token_index's default 256000 is past this vocabulary, which is allowed: the processor
# writes that id at the image positions, whose embeddings the image features replace. Every other
# field of the seed fixes a size that the tensors or preprocessor_config.json must agree with, so its
# default (the 3B model's) cannot load with these weights. Fields the seed omits have their default.
KEEPS_MODEL_WITHOUT = {
    ("architectures",), ("model_type",), ("image_token_index",), ("vocab_size",), ("hidden_size",),
    ("pad_token_id",), ("bos_token_id",), ("eos_token_id",), ("torch_dtype",),
    ("text_config", "model_type"), ("text_config", "num_image_tokens"), ("text_config", "torch_dtype"),
    ("vision_config", "model_type"), ("vision_config", "num_image_tokens"), ("vision_config", "projection_dim"),
    ("vision_config", "vision_use_head"),
}
# what a config whose default does not fit the checkpoint may be reported as: the field, a tensor,
# the tensors the directory lacks, preprocessor_config.json, or projection_dim against the text width
DEFAULT_MISFIT = MISFIT + names(("config.json", "projection_dim"))


def in_seed_config(path) -> bool:
    d = tiny_config()
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return False
        d = d[key]
    return True


def default_keeps_model(path) -> bool:
    return path in KEEPS_MODEL_WITHOUT or not in_seed_config(path)


def without_field(path) -> tuple[Callable | None, Names | None]:
    """(accept, reject) for the field at `path` absent or null: its default."""
    return (same_logits, None) if default_keeps_model(path) else (None, field_names(path) + DEFAULT_MISFIT)


def config_field_expectation(path, kind, label, orig) -> tuple[Callable | None, Names | None]:
    """(accept, reject) for the config field at `path` set to BAD_*[label](orig): exactly one is None."""
    fld = field_names(path)
    key = path[-1]
    if label == "null":
        return without_field(path)
    if label == "float-integral":
        return same_logits, None  # 64.0 is the integer 64
    if kind in ("str", "float"):
        return None, fld  # eps = 0 included: refpg takes eps/theta as finite numbers > 0
    if kind == "id":
        if key == "image_token_index" and label == "1e9":
            return same_logits, None  # past the embedding table, as transformers allows
        return None, fld
    # sizes
    if label in ("1e9", "1e30") or (label == "zero" and key == "num_hidden_layers"):
        return None, fld + names(TENSOR)  # rejected by the config or by the shape check (quickly)
    return None, fld


def set_path(d: dict, path, value) -> None:
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value


def del_path(d: dict, path) -> None:
    for key in path[:-1]:
        d = d[key]
    del d[path[-1]]


def config_case(category: str, name: str, cfg: dict | str, seed: str = "tiny", accept=None, reject=None,
                opts: dict | None = None) -> Case:
    text = cfg if isinstance(cfg, str) else json.dumps(cfg, indent=2)
    # a config that disagrees with another file may be reported by that file's check (tokenizer.model:
    # a ProcessorError), so any of refpg's file errors, naming the culprit
    return checkpoint_case(category, name, {"config.json": text}, seed, accept, reject, FILE_ERRORS, opts=opts)


def mutated_config(path, value, base: dict | None = None) -> dict:
    cfg = copy.deepcopy(base or tiny_config())
    set_path(cfg, path, value)
    return cfg


def config_cases() -> list[Case]:
    rng = random.Random(SEED)
    cases = []
    # wrong types and ranges: every kind of bad value, each on fields drawn with the seed
    ints = [f for f in CONFIG_FIELDS if f[1] in ("size", "id")]
    floats = [f for f in CONFIG_FIELDS if f[1] == "float"]
    strs = [f for f in CONFIG_FIELDS if f[1] == "str"]
    for label in INT_LABELS:
        for path, kind, orig in rng.sample(ints, FIELDS_PER_INT_LABEL):
            value = BAD_NUMBERS[label](orig)
            if value == orig and label != "float-integral":
                continue
            accept, reject = config_field_expectation(path, kind, label, orig)
            cases.append(config_case("config", f"{'.'.join(path)}={label}", mutated_config(path, value), accept=accept, reject=reject))
    for label in FLOAT_LABELS:
        path, kind, orig = rng.choice(floats)
        accept, reject = config_field_expectation(path, kind, label, orig)
        cases.append(config_case("config", f"{'.'.join(path)}={label}", mutated_config(path, BAD_NUMBERS[label](orig)),
                                 accept=accept, reject=reject))
    for label, make in BAD_STRINGS.items():
        path, kind, orig = rng.choice(strs)
        accept, reject = config_field_expectation(path, kind, label, orig)
        cases.append(config_case("config", f"{'.'.join(path)}={label}", mutated_config(path, make(orig)),
                                 accept=accept, reject=reject))
    # the ones issue 15 names
    explicit = [
        (("text_config", "hidden_size"), 64.7, None, field_names(("text_config", "hidden_size"))),
        (("vision_config", "patch_size"), 0, None, field_names(("vision_config", "patch_size"))),
        (("vision_config", "num_attention_heads"), 0, None, field_names(("vision_config", "num_attention_heads"))),
        (("text_config", "rope_theta"), 0, None, field_names(("text_config", "rope_theta"))),
        (("text_config", "rms_norm_eps"), -1e-6, None, field_names(("text_config", "rms_norm_eps"))),
        (("text_config", "max_position_embeddings"), 0, None, field_names(("text_config", "max_position_embeddings"))),
        (("image_token_index",), 1864, same_logits, None),  # past the embedding table: allowed
        (("image_token_index",), -1, None, field_names(("image_token_index",))),
        (("image_token_index",), 5, None, field_names(("image_token_index",))),
        (("image_token_index",), 10**30, None, field_names(("image_token_index",))),
        (("tie_word_embeddings",), "false", None, field_names(("tie_word_embeddings",)) + names("lm_head.weight")),
        (("tie_word_embeddings",), "true", None, field_names(("tie_word_embeddings",))),  # a string
        (("tie_word_embeddings",), 0, None, field_names(("tie_word_embeddings",)) + names("lm_head.weight")),
        (("tie_word_embeddings",), [], None, field_names(("tie_word_embeddings",))),
        (("tie_word_embeddings",), None, same_logits, None),  # the default: tied
        (("tie_word_embeddings",), False, None, names("lm_head.weight")),  # valid, and this checkpoint has no lm_head
        (("text_config", "rope_parameters"), "default", None, field_names(("text_config", "rope_parameters"))),
        (("text_config", "rope_parameters"), {"rope_type": "default", "rope_theta": "1e4"}, None,
         field_names(("text_config", "rope_theta"))),
    ]
    for path, value, accept, reject in explicit:
        label = "{rope_theta:str}" if path[-1] == "rope_parameters" and isinstance(value, dict) else json.dumps(value)
        cases.append(config_case("config", f"{'.'.join(path)}={label}", mutated_config(path, value),
                                 accept=accept, reject=reject))
    # sub-configs that are not objects
    for sub in ("text_config", "vision_config"):
        for label, value in (("list", []), ("str", "gemma"), ("number", 5), ("true", True), ("list-of-object", [{}])):
            cases.append(config_case("config", f"{sub}={label}", mutated_config((sub,), value), reject=field_names((sub,))))
        # the defaults: the 3B model's shapes, not these tensors' (the text tower's width no longer
        # matches projection_dim; the vision tower's image size no longer matches preprocessor_config.json)
        misfit = {"text_config": names(("config.json", "projection_dim", "text_config.hidden_size")),
                  "vision_config": names(("preprocessor_config.json", "image_size"))}[sub]
        for label, value in (("null", None), ("empty-object", {})):
            cases.append(config_case("config", f"{sub}={label}", mutated_config((sub,), value), reject=misfit))
    cases.append(config_case("config", "top-level=list", "[]", reject=names("config.json")))
    cases.append(config_case("config", "top-level=NaN", "NaN", reject=names("config.json")))
    cases.append(config_case("config", "deep-nesting", "[" * 100000 + "]" * 100000, reject=names("config.json")))
    # fields deleted: the default must give the same model, or the mismatch is named
    paths = [(k,) for k in tiny_config()] + [(s, k) for s in ("text_config", "vision_config") for k in tiny_config()[s]]
    for path in rng.sample(paths, 12):
        cfg = tiny_config()
        del_path(cfg, path)
        accept, reject = without_field(path)
        cases.append(config_case("config", f"delete:{'.'.join(path)}", cfg, accept=accept, reject=reject))
    # random bit flips and truncation of the text. The draw is fixed, so each flip's outcome is known
    # from its bytes (config_flip_expectation): JSON broken, or a key renamed — an unknown key, ignored
    # (as transformers ignores it), so the flip is the original key deleted, with that deletion's one
    # outcome: the seed's logits (KEEPS_MODEL_WITHOUT) or an error naming the misfit
    text = json.dumps(tiny_config(), indent=2).encode()
    for _ in range(12):
        pos, bit = rng.randrange(len(text)), rng.randrange(8)
        flipped = bytearray(text)
        flipped[pos] ^= 1 << bit
        accept, reject, kinds = config_flip_expectation(bytes(flipped))
        cases.append(checkpoint_case("config", f"bitflip@{pos}.{bit}", {"config.json": bytes(flipped)},
                                     accept=accept, reject=reject, kinds=kinds))
    for _ in range(6):
        cut = rng.randrange(1, len(text))
        cases.append(checkpoint_case("config", f"truncate@{cut}", {"config.json": text[:cut]},
                                     reject=names(("config.json", "not valid JSON")), kinds=CONFIG_ERROR))
    return cases


def renamed_key(seed, flipped, path=()) -> tuple[tuple, str] | None:
    """(path of the one key of `seed` that `flipped` holds under another name with the same value,
    that name), or None when the two differ otherwise."""
    if not (isinstance(seed, dict) and isinstance(flipped, dict)):
        return None
    gone, new = set(seed) - set(flipped), set(flipped) - set(seed)
    if len(gone) == len(new) == 1:
        (old_key,), (new_key,) = gone, new
        same_rest = all(seed[k] == flipped[k] for k in seed if k != old_key)
        return (path + (old_key,), new_key) if same_rest and seed[old_key] == flipped[new_key] else None
    changed = [k for k in seed if k in flipped and seed[k] != flipped[k]]
    if gone or new or len(changed) != 1:
        return None
    return renamed_key(seed[changed[0]], flipped[changed[0]], path + (changed[0],))


# every key refpg reads in a config: a flip that renamed a key into one of these would not be an
# ignored key, and config_flip_expectation does not know its outcome
READ_KEYS = ({p[-1] for p, _, _ in CONFIG_FIELDS} | set(GEMMA2_TEXT)
             | {"tie_word_embeddings", "rope_parameters", "image_token_id", "hidden_activation"})


def config_flip_expectation(flipped: bytes) -> tuple[Callable | None, Names | None, tuple]:
    """(accept, reject, kinds) of the seed's config.json with one bit flipped."""
    try:
        d = json.loads(flipped.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both
        return None, names(("config.json", "not valid JSON")), CONFIG_ERROR
    renamed = renamed_key(tiny_config(), d)
    if renamed is None or renamed[1] in READ_KEYS:
        # not drawn with this SEED (test_case_counts_are_fixed pins the draw): a changed value
        raise AssertionError(f"config_flip_expectation does not know the outcome of {flipped!r}: extend it")
    accept, reject = without_field(renamed[0])
    return accept, reject, FILE_ERRORS


def gemma2_cases() -> list[Case]:
    base = tiny_config()
    base["text_config"].update(GEMMA2_TEXT)

    def g2(path, value, accept=None, reject=None, label=None, opts=None):
        return config_case("config-gemma2", f"{'.'.join(path[1:])}={label or json.dumps(value)[:24]}",
                           mutated_config(path, value, base), "gemma2", accept, reject, opts)

    lt = ("text_config", "layer_types")
    ac, fc = ("text_config", "attn_logit_softcapping"), ("text_config", "final_logit_softcapping")
    sw, qs = ("text_config", "sliding_window"), ("text_config", "query_pre_attn_scalar")
    return [
        config_case("config-gemma2", "seed", base, "gemma2", accept=same_logits),
        g2(lt, "sliding_attention", reject=field_names(lt)),
        g2(lt, 3, reject=field_names(lt)),
        g2(lt, {"0": "sliding_attention"}, reject=field_names(lt), label="object"),
        g2(lt, ["sliding_attention"] * 2, reject=field_names(lt), label="too-short"),
        g2(lt, ["sliding_attention", "global", "full_attention"], reject=field_names(lt), label="unknown-kind"),
        g2(lt, [["sliding_attention"], "full_attention", "sliding_attention"], reject=field_names(lt), label="nested"),
        # transformers' default pattern (sliding on even layers) is the seed's: the seed's logits
        g2(lt, None, accept=same_logits, label="null"),
        g2(ac, "50", reject=field_names(ac)),
        g2(fc, "abc", reject=field_names(fc)),
        g2(ac, NAN, reject=field_names(ac), label="nan"),
        g2(fc, 0, reject=field_names(fc)),
        g2(ac, -5.0, reject=field_names(ac)),
        g2(fc, True, reject=field_names(fc)),
        # no soft-cap (transformers keeps None): the seed's model with the cap switched off in memory
        g2(ac, None, accept=same_logits, label="null", opts={"text": {"attn_logit_softcapping": None}}),
        g2(sw, 0, reject=field_names(sw)),
        g2(sw, 8.5, reject=field_names(sw)),
        g2(sw, "8", reject=field_names(sw)),
        g2(qs, 0, reject=field_names(qs)),
        g2(qs, -16, reject=field_names(qs)),
        g2(qs, INF, reject=field_names(qs), label="inf"),
    ]


# ---- safetensors files and the shard index -------------------------------------------------------


ST = "model.safetensors"


def st_file(mutate: Callable[[dict, bytes], bytes]) -> Callable[[str, dict], dict]:
    """files(): model.safetensors replaced by mutate(header, data) of the seed's."""
    def files(where, seed_dirs):
        header, data = read_safetensors(os.path.join(TINY, ST))
        return {ST: mutate(header, data)}
    return files


def tensor_names() -> list[str]:
    header, _ = read_safetensors(os.path.join(TINY, ST))
    return sorted(k for k in header if k != "__metadata__")


def with_entry(name: str, key: str, value):
    def mutate(header, data):
        header[name][key] = value
        return safetensors_bytes(header, data)
    return mutate


def data_flip(pos: int, bit: int) -> tuple[str, int, float]:
    """(tensor holding data byte pos, index of the float32 element holding it, that element's value
    once the bit is flipped)."""
    header, data = read_safetensors(os.path.join(TINY, ST))
    for name, info in header.items():
        if name != "__metadata__" and info["data_offsets"][0] <= pos < info["data_offsets"][1]:
            word = pos - pos % 4
            raw = bytearray(data[word:word + 4])
            raw[pos % 4] ^= 1 << bit
            return name, (word - info["data_offsets"][0]) // 4, struct.unpack("<f", bytes(raw))[0]
    raise AssertionError(pos)


def header_flip_expectation(flipped: bytes) -> bool:
    """Whether the seed's safetensors header with one bit flipped still describes the same tensors.
    The format is strict, so a flip that changes any tensor's entry cannot load: a renamed tensor is
    missing, a changed dtype, shape or offset breaks the exact tiling of the data (no single bit turns
    one JSON number into an equal one). Only a flip inside __metadata__ (free-form strings) can load,
    and then it must give the seed's logits."""
    header, _ = read_safetensors(os.path.join(TINY, ST))
    try:
        d = json.loads(flipped.decode("utf-8"))
    except ValueError:
        return False
    return (isinstance(d, dict) and isinstance(d.get("__metadata__"), dict)
            and all(isinstance(v, str) for v in d["__metadata__"].values())
            and {k: v for k, v in d.items() if k != "__metadata__"}
            == {k: v for k, v in header.items() if k != "__metadata__"})


def safetensors_cases() -> list[Case]:
    rng = random.Random(SEED + 1)
    names_ = tensor_names()
    header0, data0 = read_safetensors(os.path.join(TINY, ST))
    n0 = len(json.dumps(header0).encode())
    size0 = 8 + n0 + len(data0)
    file_only = names(ST)
    cases: list[Case] = []

    def st(name, mutate, accept=None, reject=None, reference=None):
        """A case with model.safetensors mutated: a valid one's logits are the seed's (or those of
        reference: files the test writes itself), a bad one's error names the file and, given, more."""
        reject = reject or (file_only if accept is None else None)
        cases.append(checkpoint_case("safetensors", name, st_file(mutate), accept=accept, reject=reject,
                                     kinds=CHECKPOINT_ERROR, reference=reference))

    def tensor(t):
        return names((ST, t))

    # the 8-byte header length
    for label, length in (("0", 0), ("1", 1), ("n-1", n0 - 1), ("n+1", n0 + 1), ("whole-file", size0 - 8),
                          ("past-end", size0 - 7), ("2^63", 2**63), ("2^64-1", 2**64 - 1)):
        st(f"header-length={label}", lambda h, d, length=length: safetensors_bytes(h, d, length))
    st("file=3-bytes", lambda h, d: b"\x10\x00\x00")
    st("file=empty", lambda h, d: b"")
    # the JSON header
    t = rng.choice(names_)
    norm = next(n for n in names_ if n.endswith("post_layernorm.weight"))
    same_size = [n for n in names_ if header0[n]["shape"] == header0[norm]["shape"] and n != norm]
    st("dtype=BF16", with_entry(t, "dtype", "BF16"), reject=tensor(t))
    st("dtype=F8_E4M3", with_entry(t, "dtype", "F8_E4M3"), reject=tensor(t))
    st("dtype=5", with_entry(t, "dtype", 5), reject=tensor(t))
    st("dtype=list", with_entry(t, "dtype", ["F32"]), reject=tensor(t))
    st("dtype=null", with_entry(t, "dtype", None), reject=tensor(t))
    st("dtype=I32", with_entry(norm, "dtype", "I32"), reject=tensor(norm))
    st("shape=scalar", with_entry(t, "shape", []), reject=tensor(t))
    st("shape=-1", with_entry(t, "shape", [-1] + header0[t]["shape"][1:]), reject=tensor(t))
    st("shape=2^63", with_entry(t, "shape", [2**63, 2]), reject=tensor(t))
    st("shape=2^64+1", with_entry(t, "shape", [2**64 + 1]), reject=tensor(t))
    st("shape=float", with_entry(t, "shape", [float(x) for x in header0[t]["shape"]]), reject=tensor(t))
    st("shape=str", with_entry(t, "shape", "64"), reject=tensor(t))
    st("shape=null", with_entry(t, "shape", None), reject=tensor(t))
    st("shape=nested-deep", with_entry(t, "shape", json.loads("[" * 50 + "]" * 50)), reject=tensor(t))
    mat = rng.choice([n for n in names_ if len(header0[n]["shape"]) == 2 and header0[n]["shape"][0] != header0[n]["shape"][1]])
    st("shape=transposed", with_entry(mat, "shape", header0[mat]["shape"][::-1]), reject=tensor(mat))
    st("shape=flattened", with_entry(mat, "shape", [math.prod(header0[mat]["shape"])]), reject=tensor(mat))
    st("data_offsets=overlap", with_entry(norm, "data_offsets", header0[same_size[0]]["data_offsets"]), reject=tensor(norm))
    b, e = header0[norm]["data_offsets"]
    st("data_offsets=shifted+4", with_entry(norm, "data_offsets", [b + 4, e + 4]), reject=tensor(norm))
    st("data_offsets=past-end", with_entry(norm, "data_offsets", [len(data0), len(data0) + e - b]), reject=tensor(norm))
    st("data_offsets=reversed", with_entry(norm, "data_offsets", [e, b]), reject=tensor(norm))
    st("data_offsets=one", with_entry(norm, "data_offsets", [b]), reject=tensor(norm))
    st("data_offsets=2^64", with_entry(norm, "data_offsets", [2**64, 2**64 + e - b]), reject=tensor(norm))
    st("data_offsets=bool", with_entry(norm, "data_offsets", [True, e]), reject=tensor(norm))

    def wrapping(h, d):  # 2**62 * 4 elements: an int64 byte count wraps to 0, matching empty offsets
        h[norm]["shape"], h[norm]["data_offsets"] = [2**62, 4], [b, b]
        return safetensors_bytes(h, d)
    # the file alone, as SafetensorsFile reads it (the model's shape check would name it anyway)
    case = checkpoint_case("safetensors", "shape-product-wraps-int64", st_file(wrapping), reject=tensor(norm),
                           kinds=CHECKPOINT_ERROR)
    case.code = (f"from refpg.safetensors_io import SafetensorsFile\n"
                 f"f = SafetensorsFile(arg['d'] + '/{ST}')\n"
                 f"result = {{'shape': list(f.shape({norm!r})), 'nbytes': int(f.raw({norm!r}).nbytes)}}")
    cases.append(case)
    last = max(names_, key=lambda n: header0[n]["data_offsets"][0])

    def hole(h, d):  # 16 junk bytes before the last tensor: a gap no tensor covers, values intact
        lb, le = h[last]["data_offsets"]
        h[last]["data_offsets"] = [lb + 16, le + 16]
        return safetensors_bytes(h, d[:lb] + b"\xff" * 16 + d[lb:])
    st("data_offsets=hole", hole)  # the format forbids holes and trailing bytes: refpg refuses both
    st("trailing-bytes", lambda h, d: safetensors_bytes(h, d + b"\x00" * 64))
    st("header=deep-list", lambda h, d: safetensors_bytes(b"[" * 100000 + b"]" * 100000, d))
    st("header=deep-object", lambda h, d: safetensors_bytes(b'{"a":' * 50000 + b"1" + b"}" * 50000, d))
    st("header=array", lambda h, d: safetensors_bytes(b"[]", d))
    st("header=null", lambda h, d: safetensors_bytes(b"null", d))
    st("header=not-utf8", lambda h, d: safetensors_bytes(json.dumps(h).encode().replace(b'"F32"', b'"F\xff2"', 1), d))
    st("header=entry-is-list", with_entry_replace(t, [1, 2, 3]), reject=tensor(t))
    # __metadata__ is a string-to-string map in the format: a list is a malformed header
    st("header=metadata-list", lambda h, d: safetensors_bytes({**h, "__metadata__": [1, 2]}, d),
       reject=names((ST, "__metadata__")))
    # the format pads the header with trailing spaces (to align the data): valid
    st("header=space-padded", lambda h, d: safetensors_bytes(json.dumps(h).encode() + b" " * 7, d), accept=same_logits)
    st("header=reordered", lambda h, d: safetensors_bytes(dict(reversed(list(h.items()))), d), accept=same_logits)
    st("tensor-renamed", lambda h, d: safetensors_bytes({("x" + k if k == t else k): v for k, v in h.items()}, d),
       reject=names(t, "x" + t))
    # non-finite weights: rejected at load, naming the tensor
    def fill(name, value, count=None):
        def mutate(h, d):
            b, e = h[name]["data_offsets"]
            vals = np.frombuffer(d[b:e], "<f4").copy()
            vals[:count] = value
            return safetensors_bytes(h, d[:b] + vals.tobytes() + d[e:])
        return mutate
    st("weights=all-nan", fill(mat, NAN), reject=tensor(mat))
    st("weights=one-inf", fill(norm, INF, 1), reject=tensor(norm))
    st("weights=one-nan-in-unused-embedding-row", lambda h, d: fill_at(h, d, "language_model.model.embed_tokens.weight",
                                                                          1850 * 64, NAN),
       reject=tensor("language_model.model.embed_tokens.weight"))
    tensors = tiny_tensors()
    # the checkpoint stored as BF16 (each value's top 16 bits): its logits are those of an F32
    # checkpoint holding the same truncated values, up to the summation order of the bf16 kernels
    # (the AMX path carries 16 bits of each activation's mantissa: 1e-4, as conftest.PARITY_BOUND)
    truncated = {k: (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32) for k, v in tensors.items()}
    cases.append(checkpoint_case("safetensors", "bf16-copy", {ST: tensors_bytes(tensors, "BF16")}, accept=same_logits,
                                 kinds=CHECKPOINT_ERROR, reference=lambda w, s: {ST: tensors_bytes(truncated)},
                                 opts={"tol": 1e-4}))
    bad = dict(tensors)
    bad[norm] = np.full_like(tensors[norm], NAN)
    cases.append(checkpoint_case("safetensors", "bf16-with-nan", {ST: tensors_bytes(bad, "BF16")}, reject=tensor(norm),
                                 kinds=CHECKPOINT_ERROR))
    big = dict(tensors)
    big[mat] = tensors[mat] * 1e6  # beyond float16's range: inf when stored as F16
    cases.append(checkpoint_case("safetensors", "f16-overflow-to-inf", {ST: tensors_bytes(big, "F16")}, reject=tensor(mat),
                                 kinds=CHECKPOINT_ERROR))
    # random bit flips in the header and in the data; truncation. The draw is fixed, so each flip's one
    # outcome is known from its bytes: a header flip loads only inside __metadata__
    # (header_flip_expectation); a data flip to NaN/inf is refused naming the tensor, any other is a
    # valid checkpoint whose logits must be those of a checkpoint the test writes afresh from the seed's
    # tensors with that one element set to the flipped value (the flipped byte read where it belongs)
    header_text = json.dumps(header0).encode()
    for _ in range(8):
        pos, bit = rng.randrange(len(header_text)), rng.randrange(8)
        raw = bytearray(header_text)
        raw[pos] ^= 1 << bit
        loads_ = header_flip_expectation(bytes(raw))
        st(f"header-bitflip@{pos}.{bit}", lambda h, d, raw=bytes(raw): safetensors_bytes(raw, d),
           accept=same_logits if loads_ else None,
           reject=None if loads_ else file_only + names(("checkpoint lacks", "tensor")))
    for _ in range(8):
        pos, bit = rng.randrange(len(data0)), rng.randrange(8)
        name, index, value = data_flip(pos, bit)

        def flip(h, d, pos=pos, bit=bit):
            raw = bytearray(d)
            raw[pos] ^= 1 << bit
            return safetensors_bytes(h, bytes(raw))

        def reference(where, seed_dirs, name=name, index=index, value=value):
            changed = tiny_tensors()
            changed[name] = changed[name].copy()
            changed[name].flat[index] = value
            return {ST: tensors_bytes(changed)}
        if math.isfinite(value):
            st(f"data-bitflip@{pos}.{bit}", flip, accept=same_logits, reference=reference)
        else:
            st(f"data-bitflip@{pos}.{bit}", flip, reject=tensor(name))
    for i in range(6):
        cut = rng.randrange(8 + n0 if i < 2 else size0)  # two inside the header
        st(f"truncate@{cut}", lambda h, d, cut=cut: safetensors_bytes(h, d)[:cut])
    return cases


def with_entry_replace(name, value):
    def mutate(h, d):
        h[name] = value
        return safetensors_bytes(h, d)
    return mutate


def fill_at(h, d, name, index, value):
    b, e = h[name]["data_offsets"]
    vals = np.frombuffer(d[b:e], "<f4").copy()
    vals[index] = value
    return safetensors_bytes(h, d[:b] + vals.tobytes() + d[e:])


INDEX = "model.safetensors.index.json"


def index_cases() -> list[Case]:
    rng = random.Random(SEED + 2)
    tensors = tiny_tensors()
    text = sorted(k for k in tensors if k.startswith("language_model."))
    t = rng.choice(text)

    def idx(label, mutate, reject=names(INDEX)):
        def files(where, seed_dirs):
            with open(os.path.join(seed_dirs["sharded"], INDEX)) as f:
                index = json.load(f)
            out = mutate(index)
            return {INDEX: out if isinstance(out, (str, bytes)) else json.dumps(out)}
        return checkpoint_case("index", label, files, "sharded", reject=reject, kinds=CHECKPOINT_ERROR)

    def remap(value):
        def mutate(index):
            index["weight_map"][t] = value
            return index
        return mutate

    def drop(index):
        del index["weight_map"][t]
        return index

    return [
        checkpoint_case("index", "seed", {}, "sharded", accept=same_logits),
        idx("tensor->number", remap(5), reject=names((INDEX, t))),
        idx("tensor->null", remap(None), reject=names((INDEX, t))),
        idx("tensor->list", remap([SHARD_NAMES[1]]), reject=names((INDEX, t))),
        idx("tensor->object", remap({"file": SHARD_NAMES[1]}), reject=names((INDEX, t))),
        idx("tensor->missing-shard", remap("model-00003-of-00002.safetensors"), reject=names("model-00003-of-00002.safetensors")),
        idx("tensor->empty-name", remap("")),
        idx("tensor->directory", remap(".")),
        idx("tensor->wrong-shard", remap(SHARD_NAMES[0]), reject=names((SHARD_NAMES[0], t))),
        idx("tensor-unlisted", drop, reject=names((INDEX, t))),
        idx("weight_map=list", lambda i: {**i, "weight_map": list(i["weight_map"])}),
        idx("weight_map=null", lambda i: {**i, "weight_map": None}),
        idx("weight_map-missing", lambda i: {"metadata": i["metadata"]}),
        idx("index=list", lambda i: [i]),
        idx("index=deep", lambda i: "[" * 100000 + "]" * 100000),
        idx("index=not-utf8", lambda i: json.dumps(i).encode().replace(b"weight_map", b"weight\xffmap")),
        idx("index=truncated", lambda i: json.dumps(i)[: len(json.dumps(i)) // 2]),
    ]


# ---- images ---------------------------------------------------------------------------------------

def png_bytes(size=(64, 64), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(size=(64, 64), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (a decompression bomb's header)."""
    raw = bytearray(png_bytes((1, 1)))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def image_file(name: str, content: bytes | None):
    def prepare(where, seed_dirs):
        path = os.path.join(where, name)
        if content is not None:
            with open(path, "wb") as f:
                f.write(content)
        return path
    return prepare


def image_cases() -> list[Case]:
    rng = random.Random(SEED + 3)
    cases: list[Case] = []
    image0 = names("image 0")

    def arr(label, code, accept=None, reject=image0, reference="im"):
        """An image given as an object; a valid one's pixel values must equal those of `reference`
        (an expression of it, `im`: the same picture as transformers' RGB array, or as a path)."""
        cases.append(Case("image", label, f"im = {code}\nresult = process(im, lambda: {reference})", accept,
                          None if accept else reject, PROCESSOR_ERROR))

    # arrays
    arr("array-0x0", "np.zeros((0, 0, 3), np.uint8)")
    arr("array-0x5", "np.zeros((0, 5, 3), np.uint8)")
    arr("array-5x0", "np.zeros((5, 0, 3), np.uint8)")
    arr("array-float32", "np.random.default_rng(0).random((8, 8, 3), np.float32)")
    arr("array-float64-255", "np.full((8, 8, 3), 200.0)")
    arr("array-uint16", "np.full((8, 8, 3), 300, np.uint16)")
    arr("array-int64", "np.full((8, 8, 3), 7, np.int64)")
    arr("array-bool", "np.ones((8, 8, 3), bool)")
    arr("array-object", "np.full((8, 8, 3), None, object)")
    arr("array-2d", "np.zeros((8, 8), np.uint8)")
    arr("array-1-channel", "np.zeros((8, 8, 1), np.uint8)")
    arr("array-4-channels", "np.zeros((8, 8, 4), np.uint8)")
    arr("array-4d", "np.zeros((1, 8, 8, 3), np.uint8)")
    arr("array-channels-first", "np.zeros((3, 8, 8), np.uint8)")
    arr("array-0d", "np.array(5, np.uint8)")
    arr("array-1x1", "np.full((1, 1, 3), 128, np.uint8)", valid_image, reference="PIL.Image.fromarray(im)")
    arr("array-1x5000", "np.random.default_rng(1).integers(0, 256, (1, 5000, 3), dtype=np.uint8)", valid_image,
        reference="PIL.Image.fromarray(im)")
    arr("array-5000x1", "np.random.default_rng(2).integers(0, 256, (5000, 1, 3), dtype=np.uint8)", valid_image,
        reference="PIL.Image.fromarray(im)")
    arr("array-readonly", "np.asarray(PIL.Image.open(IMAGE).convert('RGB'))", valid_image, reference="IMAGE")
    cases.append(Case("image", "array-strided-view-equals-copy",
                      "a = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)[::-1, ::2]\n"
                      "x = P(images=[a], prompts=['caption en'])['pixel_values']\n"
                      "y = P(images=[np.ascontiguousarray(a)], prompts=['caption en'])['pixel_values']\n"
                      "result = {'equal': bool((x == y).all())}",
                      lambda r: None if r["equal"] else pytest.fail("WRONG-RESULT: a strided view differs from its copy"),
                      None))
    # PIL images
    arr("pil-0x0", "PIL.Image.new('RGB', (0, 0))")
    arr("pil-0x7-L", "PIL.Image.new('L', (0, 7))")
    for mode, make in (("1", "PIL.Image.new('1', (9, 7), 1)"), ("L", "PIL.Image.new('L', (9, 7), 77)"),
                       ("LA", "PIL.Image.new('LA', (9, 7), (77, 0))"), ("RGBA", "PIL.Image.new('RGBA', (9, 7), (1, 2, 3, 4))"),
                       ("CMYK", "PIL.Image.new('CMYK', (9, 7), (1, 2, 3, 4))"), ("I;16", "PIL.Image.new('I;16', (9, 7), 40000)"),
                       ("I", "PIL.Image.new('I', (9, 7), -5)"), ("F-nan", "PIL.Image.new('F', (9, 7), float('nan'))"),
                       ("P-transparent", "(lambda im: (im.info.__setitem__('transparency', 3), im)[1])(PIL.Image.new('P', (9, 7), 3))"),
                       ("1x5000", "PIL.Image.new('RGB', (5000, 1), (9, 9, 9))")):
        arr(f"pil-{mode}", make, valid_image, reference="as_rgb(im)")
    arr("pil-closed", "(lambda im: (im.close(), im)[1])(PIL.Image.open(IMAGE))", reject=names(("image 0", "closed")))
    # other objects
    arr("object-None", "None")
    arr("object-int", "7")
    arr("object-bytes-of-png", "open(IMAGE, 'rb').read()")
    arr("object-nested-list", "[[0, 0, 0]]")
    arr("object-pathlib", "__import__('pathlib').Path(IMAGE)", valid_image, reference="IMAGE")
    # files
    good_png, good_jpeg = png_bytes(), jpeg_bytes()

    def file(label, name, content, accept=None):
        """An image file; a valid one's pixel values must equal those of its pixels as an RGB array."""
        cases.append(Case("image", label, "result = process(arg, lambda: np.asarray(PIL.Image.open(arg).convert('RGB')))",
                          accept, None if accept else names(name), PROCESSOR_ERROR, image_file(name, content)))

    file("file-random-bytes", "random.png", random.Random(SEED).randbytes(2000))
    file("file-random-bytes-no-ext", "random-noext", random.Random(SEED + 1).randbytes(500))
    for cut in sorted(rng.sample(range(8, len(good_png)), 4)):
        file(f"file-png-truncated@{cut}", f"cut{cut}.png", good_png[:cut])
    for cut in sorted(rng.sample(range(2, len(good_jpeg) - 2), 4)):
        file(f"file-jpeg-truncated@{cut}", f"cut{cut}.jpg", good_jpeg[:cut])
    file("file-png-claims-40000x40000", "bomb.png", png_claiming(40000, 40000))
    file("file-png-claims-0x0", "zero.png", png_claiming(0, 0))
    file("file-empty", "empty.png", b"")
    file("file-text", "notes.txt", b"hello, not an image\n")
    file("file-json-as-jpg", "config.jpg", json.dumps(tiny_config()).encode())
    file("file-missing", "missing.png", None)
    file("file-jpeg-ok", "ok.jpg", good_jpeg, valid_image)
    cases.append(Case("image", "file-directory", "result = process(arg, lambda: None)", None, names("imgdir"), PROCESSOR_ERROR,
                      lambda where, s: (os.makedirs(os.path.join(where, "imgdir")), os.path.join(where, "imgdir"))[1]))
    return cases


# ---- the Python API -----------------------------------------------------------------------------

def api_cases() -> list[Case]:
    def api(label, code, accept=None, reject=None):
        return Case("api", label, code, accept, reject, INPUT_ERROR)

    gen = "result = generated(M.generate({b}, max_new_tokens={n}{kw}))"

    def g(label, batch="batch()", n="3", kw="", accept=None, reject=None, setup=""):
        return api(label, setup + gen.format(b=batch, n=n, kw=kw), accept, reject)

    def with_key(key, value):
        return f"b = batch(); b[{key!r}] = {value}\n"

    return [
        g("batch=None", batch="None", reject=names("batch")),
        g("batch=list", batch="[batch()]", reject=names("batch must be a dict")),
        g("batch=str", batch="'caption en'", reject=names("batch")),
        g("batch=array", batch="batch()['input_ids']", reject=names("batch")),
        g("batch-without-input_ids", batch="b", setup="b = batch(); del b['input_ids']\n",
          reject=names("batch must be a dict with input_ids")),
        g("batch-without-pixel_values", batch="b", setup="b = batch(); del b['pixel_values']\n", reject=names("pixel_values")),
        g("batch-without-attention_mask", batch="b", setup="b = batch(); del b['attention_mask']\n", accept=greedy),
        g("max_new_tokens=2.5", n="2.5", reject=names("max_new_tokens must be an integer")),
        g("max_new_tokens=str", n="'3'", reject=names("max_new_tokens must be an integer")),
        g("max_new_tokens=None", n="None", reject=names("max_new_tokens")),
        g("max_new_tokens=-1", n="-1", reject=names("max_new_tokens must be an integer >= 0")),
        g("max_new_tokens=1e12", n="10**12", reject=names("max_new_tokens")),
        g("max_new_tokens=np.int64", n="np.int64(3)", accept=greedy),
        g("temperature=nan", kw=", temperature=float('nan')", reject=names("temperature must be a finite number")),
        g("temperature=inf", kw=", temperature=float('inf')", reject=names("temperature")),
        g("temperature=-0.5", kw=", temperature=-0.5", reject=names("temperature")),
        g("temperature=str", kw=", temperature='0.7'", reject=names("temperature")),
        g("top_k=0", kw=", temperature=1.0, top_k=0", reject=names("top_k")),
        g("top_k=2.5", kw=", temperature=1.0, top_k=2.5", reject=names("top_k must be an integer")),
        g("top_p=nan", kw=", temperature=1.0, top_p=float('nan')", reject=names("top_p")),
        g("top_p=1.5", kw=", temperature=1.0, top_p=1.5", reject=names("top_p")),
        g("seed=-1", kw=", temperature=1.0, seed=-1", reject=names("seed must be an integer >= 0")),
        g("seed=str", kw=", temperature=1.0, seed='abc'", reject=names("seed")),
        g("token_type_ids=strings", batch="b", setup=with_key("token_type_ids", "b['token_type_ids'].astype(str)"),
          reject=names("token_type_ids must hold only 0 and 1")),
        g("token_type_ids=2", batch="b", setup=with_key("token_type_ids", "np.full_like(b['token_type_ids'], 2)"),
          reject=names("token_type_ids must hold only 0 and 1")),
        g("attention_mask-wrong-shape", batch="b", setup=with_key("attention_mask", "b['attention_mask'][:, 1:]"),
          reject=names("attention_mask must have the shape")),
        g("attention_mask-all-zero", batch="b", setup=with_key("attention_mask", "np.zeros_like(b['attention_mask'])"),
          reject=names("attention_mask")),
        g("pixel_values=float64", batch="b", setup=with_key("pixel_values", "b['pixel_values'].astype(np.float64)"),
          accept=greedy),
        g("pixel_values=uint8", batch="b", setup=with_key("pixel_values", "((b['pixel_values'] + 1) * 127.5).astype(np.uint8)"),
          reject=names("pixel_values")),
        g("pixel_values-16x16", batch="b", setup=with_key("pixel_values", "b['pixel_values'][:, :, :16, :16]"),
          reject=names("pixel_values")),
        g("pixel_values-channels-last", batch="b", setup=with_key("pixel_values", "b['pixel_values'].transpose(0, 2, 3, 1)"),
          reject=names("pixel_values")),
        g("pixel_values-no-batch-dim", batch="b", setup=with_key("pixel_values", "b['pixel_values'][0]"),
          reject=names("pixel_values")),
        g("pixel_values-nan", batch="b", setup=with_key("pixel_values", "np.full_like(b['pixel_values'], np.nan)"),
          reject=names("pixel_values holds NaN")),
        g("pixel_values-inf", batch="b", setup=with_key("pixel_values", "np.full_like(b['pixel_values'], np.inf)"),
          reject=names("pixel_values")),
        g("pixel_values=strings", batch="b", setup=with_key("pixel_values", "b['pixel_values'].astype(str)"),
          reject=names("pixel_values must be a float")),
        # a nested list of floats is the same float array, as input_ids=nested-list is the same ids
        g("pixel_values=nested-list", batch="b", setup=with_key("pixel_values", "b['pixel_values'].tolist()"),
          accept=greedy),
        g("input_ids-1d", batch="b", setup=with_key("input_ids", "b['input_ids'][0]"), reject=names("input_ids")),
        g("input_ids=float", batch="b", setup=with_key("input_ids", "b['input_ids'].astype(float)"), reject=names("input_ids")),
        g("input_ids-out-of-vocab", batch="b", setup="b = batch(); b['input_ids'][0, -1] = 10**6\n", reject=names("input_ids")),
        g("input_ids=nested-list", batch="b", setup=with_key("input_ids", "b['input_ids'].tolist()"), accept=greedy),
        api("forward-pixel_values=None-with-image-tokens",
            "b = batch(); result = M(b['input_ids'], None).shape", None, names("pixel_values")),
    ]


# ---- the CLI, its flags and the environment ---------------------------------------------------------

SAMPLING_FLAGS = ("--temperature", "--top-k", "--top-p", "--max-new-tokens")


@pytest.fixture(scope="module")
def cli_greedy() -> str:
    """The tiny model's greedy 3-token answer to image0 + "caption en", as the CLI prints it."""
    res = run_cli("generate", "--model", TINY, "--image", IMAGE, "--prompt", "caption en", "--max-new-tokens", "3")
    assert res is not None and res.returncode == 0, res and res.stderr
    return res.stdout.decode()


@pytest.fixture(scope="module")
def good_dump(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("dump") / "a.npz")
    res = run_cli("dump", "--model", TINY, "--image", IMAGE, "--prompt", "caption en", "--decode", "1", "--out", path)
    assert res is not None and res.returncode == 0, res and res.stderr
    return path


def gen_args(*extra) -> list:
    return ["generate", "--model", TINY, "--image", IMAGE, "--prompt", "caption en", "--max-new-tokens", "3", *extra]


@dataclass
class CliCase:
    category: str
    name: str
    args: Callable[[str, dict], list]        # (workdir, fixtures) -> argv
    accept: Callable | None = None           # (CompletedProcess, fixtures) -> None
    reject: Names | None = None
    forbid: tuple = ()
    env: dict = field(default_factory=dict)
    skip: str | None = None                  # why this machine cannot run the case

    def __post_init__(self):
        one_outcome(self)

    def param(self):
        marks = [pytest.mark.skip(reason=self.skip)] if self.skip else []
        return pytest.param(self, id=f"{self.category}:{self.name}", marks=marks)


def flag_names(flag: str) -> Names:
    bare = flag.lstrip("-")
    return names(flag, bare.replace("-", "_"))


def same_greedy(res, fx) -> None:
    assert res.returncode == 0, f"EXIT-CODE: {res.returncode}, expected 0\n{res.stderr.decode()[-1500:]}"
    assert res.stdout.decode() == fx["greedy"], f"WRONG-RESULT: {res.stdout!r}, greedy gives {fx['greedy']!r}"


def diverges_at(activation: str):
    """accept: `refpg diff` ran and found the runs part ways, first at `activation` (exit code 1)."""
    def accept(res, fx) -> None:
        stdout = res.stdout.decode()
        assert res.returncode == 1, f"EXIT-CODE: {res.returncode}, expected 1 (the runs part ways)\n{stdout[-1500:]}"
        want = f"first activation beyond max rel 0.001: {activation}"
        assert want in stdout, f"WRONG-RESULT: {want!r} not in {stdout[-1500:]!r}"
    return accept


def cli_cases() -> list[CliCase]:
    def flag(value_flag, value, *extra, accept=None, forbid=True, reject=None):
        """generate with a sampling flag: an error names it (or reject), and not the other sampling flags."""
        others = tuple(f for f in SAMPLING_FLAGS if f != value_flag) if forbid and accept is None else ()
        return CliCase("cli", f"{value_flag}={value}", lambda w, fx: gen_args(value_flag, value, *extra),
                       accept, None if accept else reject or flag_names(value_flag), others)

    def generate_with(name, extra, reject):
        return CliCase("cli", name, lambda w, fx: ["generate", "--model", TINY, "--image", IMAGE,
                                                   "--max-new-tokens", "3", *extra(w, fx)], None, reject)

    long_prompt = " ".join(["what colour is the square"] * 60)  # 300 words: past the demo model's 256 positions
    empty_prompt = names("--prompt is empty")
    return [
        flag("--temperature", "nan"),
        flag("--temperature", "inf"),
        flag("--temperature", "-1"),
        # so small that 1/T overflows: sampling at a temperature this close to 0 is greedy decoding,
        # whatever the seed
        flag("--temperature", "1e-310", "--seed", "3", accept=same_greedy),
        flag("--top-k", "0", "--temperature", "1"),
        flag("--top-k", "-5", "--temperature", "1"),
        flag("--top-p", "0", "--temperature", "1"),
        flag("--top-p", "1.5", "--temperature", "1"),
        flag("--top-p", "nan", "--temperature", "1"),
        flag("--max-new-tokens", "-1"),
        flag("--max-new-tokens", str(10**12)),
        flag("--temperature", "abc", forbid=False),
        flag("--seed", "-1", "--temperature", "1", reject=names(("--seed", "must be an integer >= 0"))),
        CliCase("cli", "--draw=unknown-extension", lambda w, fx: gen_args("--draw", os.path.join(w, "boxes.xyz")),
                None, names(("--draw", "boxes.xyz: not an image file name"))),
        CliCase("cli", "--draw=no-extension", lambda w, fx: gen_args("--draw", os.path.join(w, "boxes")),
                None, names(("--draw", "boxes: not an image file name"))),
        CliCase("cli", "--draw=missing-directory", lambda w, fx: gen_args("--draw", os.path.join(w, "nodir", "b.png")),
                None, names(("--draw", "nodir does not exist"))),
        CliCase("cli", "--draw=a-directory", lambda w, fx: gen_args("--draw", subdir(w, "drawdir")), None,
                names(("--draw", "drawdir"))),
        CliCase("cli", "demo--out=unknown-extension", lambda w, fx: ["demo", "--out", os.path.join(w, "demo.xyz")],
                None, names(("--out", "demo.xyz: not an image file name"))),
        CliCase("cli", "demo--out=missing-directory", lambda w, fx: ["demo", "--out", os.path.join(w, "nodir", "d.png")],
                None, names(("--out", "nodir does not exist"))),
        generate_with("--prompt=empty", lambda w, fx: ["--prompt", ""], empty_prompt),
        generate_with("--prompt=whitespace", lambda w, fx: ["--prompt", "  \t "], empty_prompt),
        generate_with("--prompt=newline", lambda w, fx: ["--prompt", "\n"], empty_prompt),
        generate_with("--prompt=invalid-utf8", lambda w, fx: ["--prompt", b"caption \xff\xfe en"],
                      names(("prompt 0", "not UTF-8"))),
        CliCase("cli", "--prompt=too-long", lambda w, fx: ["generate", "--image", IMAGE, "--prompt", long_prompt],
                None, names(("prompt", "exceeds the model's limit"))),
        CliCase("cli", "dump--decode=-1", lambda w, fx: ["dump", "--model", TINY, "--image", IMAGE, "--prompt", "caption en",
                                                         "--decode", "-1", "--out", os.path.join(w, "d.npz")],
                None, flag_names("--decode")),
        CliCase("cli", "dump--decode=1e9", lambda w, fx: ["dump", "--model", TINY, "--image", IMAGE, "--prompt", "caption en",
                                                          "--decode", str(10**9), "--out", os.path.join(w, "d.npz")],
                None, names("decode steps exceeds the model's limit", "--decode")),
        CliCase("cli", "diff--b=missing-dump", lambda w, fx: diff_args("--b", os.path.join(w, "missing.npz")),
                None, names(("missing.npz", "not found"))),
        CliCase("cli", "diff--b=garbage-dump", lambda w, fx: diff_args("--b", write(w, "garbage.npz", random.Random(SEED).randbytes(3000))),
                None, names(("garbage.npz", "not an activation dump"))),
        CliCase("cli", "diff--b=npz-without-meta", lambda w, fx: diff_args("--b", npz(w, "nometa.npz", {"x": np.zeros(3)})),
                None, names(("nometa.npz", "no meta.json"))),
        CliCase("cli", "diff--b=meta-not-json", lambda w, fx: diff_args("--b", npz(w, "badmeta.npz", {"meta.json": np.array("{")})),
                None, names(("badmeta.npz", "not an activation dump"))),
        CliCase("cli", "diff--b=dump-of-another-prompt",
                lambda w, fx: diff_args("--b", fx["dump"], prompt="detect square"), None,
                names(("a.npz", "other input ids"))),
        # a dump whose logits have another shape than refpg's: the runs part ways there (diff's
        # exit code 1, the activation named), not bad input — the dump format is followed
        CliCase("cli", "diff--b=dump-with-mismatched-shapes",
                lambda w, fx: diff_args("--b", npz(w, "shapes.npz", {"prefill/logits": np.zeros((1, 2, 3), np.float32),
                                                                     "meta.json": np.array(json.dumps({"format": "refpg-activations/1"}))})),
                diverges_at("prefill/logits")),
        CliCase("cli", "diff--tol=nan", lambda w, fx: diff_args("--tol", "nan"), None, flag_names("--tol")),
        CliCase("cli", "diff--tol=-1", lambda w, fx: diff_args("--tol", "-1"), None, flag_names("--tol")),
        CliCase("cli", "diff--decode=-1", lambda w, fx: diff_args("--decode", "-1"), None, flag_names("--decode")),
        CliCase("cli", "--model=a-file", lambda w, fx: ["generate", "--model", os.path.join(TINY, "config.json"),
                                                        "--image", IMAGE, "--prompt", "caption en"],
                None, names(("config.json", "is a file, not a checkpoint directory"))),
        CliCase("cli", "--backend=gpu", lambda w, fx: gen_args("--backend", "gpu"), None, names("unknown backend 'gpu'")),
        CliCase("cli", "--backend=matmul=", lambda w, fx: gen_args("--backend", "matmul="), None,
                names("matmul", "linear", "--backend")),
        CliCase("cli", "--backend=matmul-without-value", lambda w, fx: gen_args("--backend", "matmul=cpp,attention"),
                None, names(("attention", "op=backend pairs"))),
        CliCase("cli", "--backend=bogus-op", lambda w, fx: gen_args("--backend", "conv=cpp"), None, names("conv")),
        CliCase("cli", "--image=a-directory", lambda w, fx: ["generate", "--model", TINY, "--image", subdir(w, "imgdir"),
                                                             "--prompt", "caption en"], None, names("imgdir")),
    ]


def diff_args(*extra, prompt="caption en") -> list:
    return ["diff", "--model", TINY, "--image", IMAGE, "--prompt", prompt, *extra]


def subdir(where: str, name: str) -> str:
    path = os.path.join(where, name)
    os.makedirs(path)
    return path


def write(where: str, name: str, content: bytes) -> str:
    path = os.path.join(where, name)
    with open(path, "wb") as f:
        f.write(content)
    return path


def npz(where: str, name: str, arrays: dict) -> str:
    path = os.path.join(where, name)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def lacking_simd_path() -> tuple[str | None, str | None]:
    """(a REFPG_SIMD value this CPU, or its OS, cannot run — amx on the AMD EPYC this was written on —,
    why the case cannot run here): test_backend_ops.simd_paths_here decides, from the kernels' own
    cpu_features (which count the OS's permission for AMX), as the op table does."""
    paths = simd_paths_here()
    if all(why == "cpp not built" for why in paths.values()):
        return None, "cpp not built: REFPG_SIMD configures the native kernels"
    lacking = next((path for path, why in paths.items() if why is not None), None)
    return lacking, None if lacking else "this CPU has every SIMD path refpg can be forced to"


def env_cases() -> list[CliCase]:
    def env(var, value, accept=None, reject=None, skip=None):
        """generate with one environment variable set: an error names it with its value (or reject)."""
        return CliCase("env", f"{var}={value}", lambda w, fx: gen_args(), accept,
                       None if accept else reject or names(f"{var}={value!r}"), (), {var: value}, skip)

    def threads(value):  # REFPG_THREADS is a whole number from 1 to 1024: never "all cores", never clamped
        return env("REFPG_THREADS", value, reject=names((f"REFPG_THREADS={value!r}", "from 1 to 1024")))

    def simd_choices(value):
        return names(f"REFPG_SIMD must be amx, avx512, avx2, scalar or auto, got {value!r}")

    lacking, why = lacking_simd_path()
    return [
        threads("abc"),
        threads("2.5"),
        threads("0"),
        threads("-3"),
        threads(str(10**6)),
        threads(str(10**30)),
        env("REFPG_SIMD", "bogus", reject=simd_choices("bogus")),
        CliCase("env", "REFPG_SIMD=a-path-this-cpu-lacks", lambda w, fx: gen_args(), None,
                names(f"REFPG_SIMD={lacking}"), (), {"REFPG_SIMD": lacking or ""}, why),
        env("REFPG_SIMD", "scalar", accept=same_greedy),
        env("REFPG_SIMD", "", accept=same_greedy),  # empty: unset, the best path of this CPU
        env("REFPG_SIMD", "AVX2", reject=simd_choices("AVX2")),  # the values are lower case (README)
        env("REFPG_BACKEND", "garbage"),
        env("REFPG_BACKEND", "matmul=cpp,attention"),
        env("REFPG_BACKEND", "cuda"),
        env("REFPG_CHECK", "1", accept=lambda r, fx: checked(r, fx, True)),
        env("REFPG_CHECK", "false", accept=lambda r, fx: checked(r, fx, False)),
        env("REFPG_CHECK", "off", accept=lambda r, fx: checked(r, fx, False)),
        env("REFPG_CHECK", "banana"),
    ]


def checked(res, fx, want: bool) -> None:
    """accept: the greedy answer, run in check mode (NumPy beside every op) or not, as the variable says."""
    same_greedy(res, fx)
    got = "(checked)" in res.stderr.decode()
    assert got == want, f"WRONG-RESULT: check mode {'on' if got else 'off'}, the variable says {'on' if want else 'off'}"


# ---- the tests --------------------------------------------------------------------------------------

CONFIG_CASES = config_cases() + gemma2_cases()
FILE_CASES = safetensors_cases() + index_cases()
IMAGE_CASES = image_cases()
API_CASES = api_cases()
CLI_CASES = cli_cases()
ENV_CASES = env_cases()

COUNTS = {"config": 124, "config-gemma2": 21, "safetensors": 74, "index": 17, "image": 56, "api": 41, "cli": 41, "env": 18}
# of which valid inputs (accept); the rest are bad inputs (reject) — each case exactly one of the two
VALID_COUNTS = {"config": 18, "config-gemma2": 3, "safetensors": 11, "index": 1, "image": 17, "api": 5, "cli": 2, "env": 5}


def test_case_counts_are_fixed():
    """The fuzz is deterministic: the same seed draws the same cases, so each category's count is
    fixed, and so is how many of them are valid inputs."""
    cases = CONFIG_CASES + FILE_CASES + IMAGE_CASES + API_CASES + CLI_CASES + ENV_CASES
    got: dict[str, int] = {}
    valid: dict[str, int] = {}
    for case in cases:
        one_outcome(case)
        got[case.category] = got.get(case.category, 0) + 1
        valid[case.category] = valid.get(case.category, 0) + (case.accept is not None)
    ids = [f"{c.category}:{c.name}" for c in cases]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert got == COUNTS
    assert valid == VALID_COUNTS


def test_seeds_are_valid(worker, seeds):
    """The mutations start from checkpoints that load and run."""
    for name in ("tiny", "gemma2", "sharded"):
        res = worker.run(PIPELINE, {"d": seeds[name], "seed": seeds["tiny" if name == "sharded" else name], "opts": {}})
        assert res["status"] == "ok" and res["result"]["same"] and res["result"]["finite"], (name, res)


def run_case(worker, case: Case, workdir: str, seeds: dict) -> None:
    arg = case.prepare(workdir, seeds) if case.prepare else None
    check(worker.run(case.code, arg), case.accept, case.reject, case.kinds)


@pytest.mark.parametrize("case", [c.param() for c in CONFIG_CASES])
def test_config_json(case, worker, workdir, seeds):
    run_case(worker, case, workdir, seeds)


@pytest.mark.parametrize("case", [c.param() for c in FILE_CASES])
def test_checkpoint_files(case, worker, workdir, seeds):
    run_case(worker, case, workdir, seeds)


@pytest.mark.parametrize("case", [c.param() for c in IMAGE_CASES])
def test_images(case, worker, workdir, seeds):
    run_case(worker, case, workdir, seeds)


@pytest.mark.parametrize("case", [c.param() for c in API_CASES])
def test_python_api(case, worker, workdir, seeds):
    run_case(worker, case, workdir, seeds)


@pytest.mark.parametrize("case", [c.param() for c in CLI_CASES + ENV_CASES])
def test_cli_and_environment(case, workdir, cli_greedy, good_dump):
    fx = {"greedy": cli_greedy, "dump": good_dump}
    res = run_cli(*case.args(workdir, fx), env=child_env(**case.env))
    check_cli(res, (lambda r: case.accept(r, fx)) if case.accept else None, case.reject, case.forbid)

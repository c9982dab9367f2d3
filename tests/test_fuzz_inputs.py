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
- either the input is valid and the result is right — a mutated checkpoint that is still valid loads
  and gives the seed's logits, a valid image gives finite pixel values in [-1, 1] and finite logits,
  a valid CLI run exits 0 with the greedy answer — or a clear error: in the API an exception of
  refpg's user-error kinds (ConfigError, CheckpointError, ProcessorError, InputError, BackendError;
  plain ValueError / TypeError only for misused Python arguments) whose message names the file and
  the field, tensor, argument or variable at fault; in the CLI exit code 2, no "Traceback", and a last
  stderr line `refpg: error: …` naming the culprit;
- never silently accepted: bad input that loads, or runs, without an error fails the case.

A failing case says which part of the contract it broke, first word of its message: HANG, CRASH,
ACCEPTED (bad input, no error), WRONG-RESULT (valid input, wrong output), REJECTED-VALID,
NOT-A-USER-ERROR (an exception of another kind: a traceback in the CLI), TRACEBACK, EXIT-CODE,
NO-ERROR-LINE, UNNAMED (the message does not name the culprit), IMPRECISE (it also names others).

Where the contract is ambiguous these tests take a demanding user's reading:
- a nested config field's error names its sub-config too (`text_config` and `hidden_size`: there
  are three `hidden_size`s); a token-id error names the config key (`pad_token_id`), not only `<pad>`;
- JSON types are strict: "64" (a string), true, [64] and 64.7 are not integers, "1e-6" is not a
  float, "false" is not a boolean. 64.0 may be accepted as 64 (or rejected); null may mean the
  default (or be rejected);
- sizes, head counts and eps/theta must be positive where the model divides by them or takes their
  root; an absurd size (10**9, 10**30) may be rejected by the config or by the checkpoint's shape
  check, but quickly; an image token id past the embedding table is allowed (transformers looks up
  id 0 there too), a negative one is not;
- safetensors: tensors whose byte ranges overlap (a weight silently read from another's bytes), a
  hole between tensors and bytes after the last one are errors (the format forbids all three);
  a NaN or inf anywhere in a weight is an error at load naming the tensor;
- images: zero-size ones are errors; any Pillow mode converts; array images must be uint8 [H, W, 3];
  pixel_values passed to the model must be a float array without NaN/inf (uint8 pixels are an error);
- CLI: argparse's own `refpg generate: error: …` line counts as the error line; a sampling-flag
  error names the culprit flag and not the others; a flag value the model cannot use (NaN, inf,
  --tol nan, --decode -1) is an error, never a traceback or a silently odd run; REFPG_THREADS=0 may
  mean "all cores"; a huge REFPG_THREADS may be clamped; REFPG_CHECK takes 0/1/true/false/yes/no/
  on/off (case-insensitive) or empty, anything else is an error naming it; an env var's error names it.
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
from conftest import NEUTRAL_DIR, child_env

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
API_ERRORS = FILE_ERRORS + ("builtins.ValueError", "builtins.TypeError")


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


def pipeline(model_dir, seed_dir):
    """Load model_dir as a user would and run image0 + "caption en"; compare with seed_dir's logits."""
    logits = forward(model_dir)
    if seed_dir not in _baselines:
        _baselines[seed_dir] = forward(seed_dir)
    base = _baselines[seed_dir]
    same = logits.shape == base.shape and bool(np.allclose(logits, base, rtol=1e-5, atol=1e-5 * np.abs(base).max()))
    diff = float(np.abs(logits - base).max()) if logits.shape == base.shape else None
    return {"finite": bool(np.isfinite(logits).all()), "same": same, "max_diff": diff, "shape": list(logits.shape)}


P = Processor.from_pretrained(TINY)
M = PaliGemma.from_pretrained(TINY)


def batch():
    return P(images=[IMAGE], prompts=["caption en"])


GREEDY = M.generate(batch(), max_new_tokens=3)


def process(image):
    """The processor and the model on one image: what a valid image must give."""
    b = P(images=[image], prompts=["caption en"])
    pv = b["pixel_values"]
    logits = M(b["input_ids"], pv, token_type_ids=b["token_type_ids"], attention_mask=b["attention_mask"])
    return {"shape": list(pv.shape), "finite": bool(np.isfinite(pv).all()), "lo": float(pv.min()),
            "hi": float(pv.max()), "logits_finite": bool(np.isfinite(logits).all())}


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
    if res.returncode == 1 and accept is not None and "first activation beyond" in stdout:
        return  # diff ran and found the runs part ways: its exit code 1, a result, not an error
    if res.returncode == 0:
        if accept is None:
            pytest.fail(f"ACCEPTED: exit 0 on bad input; stdout {stdout[-300:]!r}; stderr {stderr[-500:]!r}")
        accept(res)
        return
    if reject is None:
        pytest.fail(f"REJECTED-VALID: exit {res.returncode}\n{stderr[-2000:]}")
    if "Traceback" in stderr:
        pytest.fail(f"TRACEBACK: exit {res.returncode}\n{stderr[-2500:]}")
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


def loads(r: dict) -> None:
    pass


def finite_logits(r: dict) -> None:
    assert r["finite"], "WRONG-RESULT: loaded, but the logits are not finite"


def valid_image(r: dict) -> None:
    assert r["shape"] == [1, 3, 32, 32], r
    assert r["finite"] and -1 <= r["lo"] <= r["hi"] <= 1 and r["logits_finite"], f"WRONG-RESULT: {r}"


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

    def param(self):
        return pytest.param(self, id=f"{self.category}:{self.name}")


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


PIPELINE = 'result = pipeline(arg["d"], arg["seed"])'


def checkpoint_case(category: str, name: str, files: Callable[[str, dict], dict] | dict, seed: str = "tiny",
                    accept=None, reject=None) -> Case:
    """A case that loads a mutated checkpoint: files (or a function of (workdir, seeds) giving them)
    replace the seed's."""
    def prepare(where, seed_dirs):
        written = files(where, seed_dirs) if callable(files) else files
        return {"d": make_model_dir(where, seed_dirs[seed], written), "seed": seed_dirs[seed if seed != "sharded" else "tiny"]}
    return Case(category, name, PIPELINE, accept, reject, FILE_ERRORS, prepare)


# ---- config.json ------------------------------------------------------------------------------------

ANY_FILE = names("config.json", "model.safetensors", "tokenizer.model", "preprocessor_config.json")
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


def config_field_expectation(path, kind, label, orig) -> tuple[Callable | None, Names | None]:
    """(accept, reject) for the config field at `path` set to BAD_*[label](orig)."""
    fld = field_names(path)
    key = path[-1]
    if kind == "str":
        if label == "null":
            return same_logits, fld + ANY_FILE  # null may mean the default
        return None, fld
    if label == "null":
        return same_logits, fld + MISFIT  # the default, which may not fit this checkpoint
    if label == "float-integral":
        return same_logits, fld
    if kind == "float":
        if label == "zero" and key.endswith("eps"):
            return finite_logits, fld  # eps = 0 is usable; rejecting it is fine too
        return None, fld
    if kind == "id":
        if key == "image_token_index" and label == "1e9":
            return same_logits, fld  # past the embedding table, as transformers allows
        return None, fld
    # sizes
    if label in ("1e9", "1e30"):
        if key == "max_position_embeddings" and label == "1e9":
            return same_logits, fld
        return None, fld + names(TENSOR)  # rejected by the config or by the shape check (quickly)
    if label == "zero" and key == "num_hidden_layers":
        return None, fld + names(TENSOR)
    return None, fld


def set_path(d: dict, path, value) -> None:
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value


def del_path(d: dict, path) -> None:
    for key in path[:-1]:
        d = d[key]
    del d[path[-1]]


def config_case(category: str, name: str, cfg: dict | str, seed: str = "tiny", accept=None, reject=None) -> Case:
    text = cfg if isinstance(cfg, str) else json.dumps(cfg, indent=2)
    return checkpoint_case(category, name, {"config.json": text}, seed, accept, reject)


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
        (("image_token_index",), 1864, same_logits, field_names(("image_token_index",))),
        (("image_token_index",), -1, None, field_names(("image_token_index",))),
        (("image_token_index",), 5, None, field_names(("image_token_index",))),
        (("image_token_index",), 10**30, None, field_names(("image_token_index",))),
        (("tie_word_embeddings",), "false", None, field_names(("tie_word_embeddings",)) + names("lm_head.weight")),
        (("tie_word_embeddings",), "true", same_logits, field_names(("tie_word_embeddings",))),
        (("tie_word_embeddings",), 0, None, field_names(("tie_word_embeddings",)) + names("lm_head.weight")),
        (("tie_word_embeddings",), [], None, field_names(("tie_word_embeddings",))),
        (("tie_word_embeddings",), None, same_logits, field_names(("tie_word_embeddings",))),
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
        for label, value in (("null", None), ("empty-object", {})):  # the defaults: the 3B shapes, not these tensors
            cases.append(config_case("config", f"{sub}={label}", mutated_config((sub,), value),
                                     accept=same_logits, reject=field_names((sub,)) + MISFIT))
    cases.append(config_case("config", "top-level=list", "[]", reject=names("config.json")))
    cases.append(config_case("config", "top-level=NaN", "NaN", reject=names("config.json")))
    cases.append(config_case("config", "deep-nesting", "[" * 100000 + "]" * 100000, reject=names("config.json")))
    # fields deleted: the default must give the same model, or the mismatch is named
    paths = [(k,) for k in tiny_config()] + [(s, k) for s in ("text_config", "vision_config") for k in tiny_config()[s]]
    for path in rng.sample(paths, 12):
        cfg = tiny_config()
        del_path(cfg, path)
        reject = field_names(path) + MISFIT
        cases.append(config_case("config", f"delete:{'.'.join(path)}", cfg, accept=same_logits, reject=reject))
    # random bit flips and truncation of the text: valid-but-different JSON may load; else a named error
    text = json.dumps(tiny_config(), indent=2).encode()
    for _ in range(12):
        pos, bit = rng.randrange(len(text)), rng.randrange(8)
        flipped = bytearray(text)
        flipped[pos] ^= 1 << bit
        cases.append(checkpoint_case("config", f"bitflip@{pos}.{bit}", {"config.json": bytes(flipped)},
                                     accept=loads, reject=ANY_FILE))
    for _ in range(6):
        cut = rng.randrange(1, len(text))
        cases.append(checkpoint_case("config", f"truncate@{cut}", {"config.json": text[:cut]}, reject=names("config.json")))
    return cases


def gemma2_cases() -> list[Case]:
    base = tiny_config()
    base["text_config"].update(GEMMA2_TEXT)

    def g2(path, value, accept=None, reject=None, label=None):
        return config_case("config-gemma2", f"{'.'.join(path[1:])}={label or json.dumps(value)[:24]}",
                           mutated_config(path, value, base), "gemma2", accept, reject)

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
        g2(lt, None, accept=finite_logits, label="null"),  # transformers' default pattern
        g2(ac, "50", reject=field_names(ac)),
        g2(fc, "abc", reject=field_names(fc)),
        g2(ac, NAN, reject=field_names(ac), label="nan"),
        g2(fc, 0, reject=field_names(fc)),
        g2(ac, -5.0, reject=field_names(ac)),
        g2(fc, True, reject=field_names(fc)),
        g2(ac, None, accept=finite_logits, label="null"),  # no soft-cap: valid
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


def data_flip_expectation(pos: int, bit: int) -> tuple[str, bool]:
    """(tensor holding data byte pos, whether the flip makes its float32 value non-finite)."""
    header, data = read_safetensors(os.path.join(TINY, ST))
    for name, info in header.items():
        if name != "__metadata__" and info["data_offsets"][0] <= pos < info["data_offsets"][1]:
            word = pos - pos % 4
            raw = bytearray(data[word:word + 4])
            raw[pos % 4] ^= 1 << bit
            return name, not math.isfinite(struct.unpack("<f", bytes(raw))[0])
    raise AssertionError(pos)


def safetensors_cases() -> list[Case]:
    rng = random.Random(SEED + 1)
    names_ = tensor_names()
    header0, data0 = read_safetensors(os.path.join(TINY, ST))
    n0 = len(json.dumps(header0).encode())
    size0 = 8 + n0 + len(data0)
    file_only = names(ST)
    cases: list[Case] = []

    def st(name, mutate, accept=None, reject=file_only):
        cases.append(checkpoint_case("safetensors", name, st_file(mutate), accept=accept, reject=reject))

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
    case = checkpoint_case("safetensors", "shape-product-wraps-int64", st_file(wrapping), reject=tensor(norm))
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
    st("header=metadata-list", lambda h, d: safetensors_bytes({**h, "__metadata__": [1, 2]}, d), accept=same_logits)
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
    cases.append(checkpoint_case("safetensors", "bf16-copy", {ST: tensors_bytes(tensors, "BF16")}, accept=finite_logits))
    bad = dict(tensors)
    bad[norm] = np.full_like(tensors[norm], NAN)
    cases.append(checkpoint_case("safetensors", "bf16-with-nan", {ST: tensors_bytes(bad, "BF16")}, reject=tensor(norm)))
    big = dict(tensors)
    big[mat] = tensors[mat] * 1e6  # beyond float16's range: inf when stored as F16
    cases.append(checkpoint_case("safetensors", "f16-overflow-to-inf", {ST: tensors_bytes(big, "F16")}, reject=tensor(mat)))
    # random bit flips in the header and in the data; truncation
    header_text = json.dumps(header0).encode()
    for _ in range(8):
        pos, bit = rng.randrange(len(header_text)), rng.randrange(8)
        raw = bytearray(header_text)
        raw[pos] ^= 1 << bit
        st(f"header-bitflip@{pos}.{bit}", lambda h, d, raw=bytes(raw): safetensors_bytes(raw, d), accept=same_logits,
           reject=file_only + names(("checkpoint lacks", "tensor")))
    for _ in range(8):
        pos, bit = rng.randrange(len(data0)), rng.randrange(8)
        name, nonfinite = data_flip_expectation(pos, bit)

        def flip(h, d, pos=pos, bit=bit):
            raw = bytearray(d)
            raw[pos] ^= 1 << bit
            return safetensors_bytes(h, bytes(raw))
        st(f"data-bitflip@{pos}.{bit}", flip, accept=None if nonfinite else loads, reject=tensor(name) if nonfinite else None)
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

    def idx(label, mutate, accept=None, reject=names(INDEX)):
        def files(where, seed_dirs):
            with open(os.path.join(seed_dirs["sharded"], INDEX)) as f:
                index = json.load(f)
            out = mutate(index)
            return {INDEX: out if isinstance(out, (str, bytes)) else json.dumps(out)}
        return checkpoint_case("index", label, files, "sharded", accept, reject)

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

    def arr(label, code, accept=None, reject=image0):
        cases.append(Case("image", label, f"result = process({code})", accept, reject))

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
    arr("array-1x1", "np.full((1, 1, 3), 128, np.uint8)", accept=valid_image, reject=None)
    arr("array-1x5000", "np.random.default_rng(1).integers(0, 256, (1, 5000, 3), dtype=np.uint8)", valid_image, None)
    arr("array-5000x1", "np.random.default_rng(2).integers(0, 256, (5000, 1, 3), dtype=np.uint8)", valid_image, None)
    arr("array-readonly", "np.asarray(PIL.Image.open(IMAGE).convert('RGB'))", valid_image, None)
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
        arr(f"pil-{mode}", make, valid_image, None)
    arr("pil-closed", "(lambda im: (im.close(), im)[1])(PIL.Image.open(IMAGE))", valid_image, image0)
    # other objects
    arr("object-None", "None")
    arr("object-int", "7")
    arr("object-bytes-of-png", "open(IMAGE, 'rb').read()")
    arr("object-nested-list", "[[0, 0, 0]]")
    arr("object-pathlib", "__import__('pathlib').Path(IMAGE)", valid_image, None)
    # files
    good_png, good_jpeg = png_bytes(), jpeg_bytes()

    def file(label, name, content, accept=None, reject="name"):
        cases.append(Case("image", label, "result = process(arg)", accept,
                          names(name) if reject == "name" else reject, FILE_ERRORS, image_file(name, content)))

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
    file("file-jpeg-ok", "ok.jpg", good_jpeg, valid_image, None)
    cases.append(Case("image", "file-directory", "result = process(arg)", None, names("imgdir"), FILE_ERRORS,
                      lambda where, s: (os.makedirs(os.path.join(where, "imgdir")), os.path.join(where, "imgdir"))[1]))
    return cases


# ---- the Python API -----------------------------------------------------------------------------

def api_cases() -> list[Case]:
    def api(label, code, accept=None, reject=None):
        return Case("api", label, code, accept, reject, API_ERRORS)

    gen = "result = generated(M.generate({b}, max_new_tokens={n}{kw}))"

    def g(label, batch="batch()", n="3", kw="", accept=None, reject=None, setup=""):
        return api(label, setup + gen.format(b=batch, n=n, kw=kw), accept, reject)

    def with_key(key, value):
        return f"b = batch(); b[{key!r}] = {value}\n"

    return [
        g("batch=None", batch="None", reject=names("batch")),
        g("batch=list", batch="[batch()]", reject=names("batch")),
        g("batch=str", batch="'caption en'", reject=names("batch")),
        g("batch=array", batch="batch()['input_ids']", reject=names("batch")),
        g("batch-without-input_ids", batch="b", setup="b = batch(); del b['input_ids']\n", reject=names("input_ids")),
        g("batch-without-pixel_values", batch="b", setup="b = batch(); del b['pixel_values']\n", reject=names("pixel_values")),
        g("batch-without-attention_mask", batch="b", setup="b = batch(); del b['attention_mask']\n", accept=greedy),
        g("max_new_tokens=2.5", n="2.5", reject=names("max_new_tokens")),
        g("max_new_tokens=str", n="'3'", reject=names("max_new_tokens")),
        g("max_new_tokens=None", n="None", reject=names("max_new_tokens")),
        g("max_new_tokens=-1", n="-1", reject=names("max_new_tokens")),
        g("max_new_tokens=1e12", n="10**12", reject=names("max_new_tokens")),
        g("max_new_tokens=np.int64", n="np.int64(3)", accept=greedy),
        g("temperature=nan", kw=", temperature=float('nan')", reject=names("temperature")),
        g("temperature=inf", kw=", temperature=float('inf')", reject=names("temperature")),
        g("temperature=-0.5", kw=", temperature=-0.5", reject=names("temperature")),
        g("temperature=str", kw=", temperature='0.7'", reject=names("temperature")),
        g("top_k=0", kw=", temperature=1.0, top_k=0", reject=names("top_k")),
        g("top_k=2.5", kw=", temperature=1.0, top_k=2.5", reject=names("top_k")),
        g("top_p=nan", kw=", temperature=1.0, top_p=float('nan')", reject=names("top_p")),
        g("top_p=1.5", kw=", temperature=1.0, top_p=1.5", reject=names("top_p")),
        g("seed=-1", kw=", temperature=1.0, seed=-1", accept=loads, reject=names("seed")),
        g("seed=str", kw=", temperature=1.0, seed='abc'", reject=names("seed")),
        g("token_type_ids=strings", batch="b", setup=with_key("token_type_ids", "b['token_type_ids'].astype(str)"),
          reject=names("token_type_ids")),
        g("token_type_ids=2", batch="b", setup=with_key("token_type_ids", "np.full_like(b['token_type_ids'], 2)"),
          reject=names("token_type_ids")),
        g("attention_mask-wrong-shape", batch="b", setup=with_key("attention_mask", "b['attention_mask'][:, 1:]"),
          reject=names("attention_mask")),
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
          reject=names("pixel_values")),
        g("pixel_values-inf", batch="b", setup=with_key("pixel_values", "np.full_like(b['pixel_values'], np.inf)"),
          reject=names("pixel_values")),
        g("pixel_values=strings", batch="b", setup=with_key("pixel_values", "b['pixel_values'].astype(str)"),
          reject=names("pixel_values")),
        g("pixel_values=nested-list", batch="b", setup=with_key("pixel_values", "b['pixel_values'].tolist()"),
          accept=greedy, reject=names("pixel_values")),
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

    def param(self):
        return pytest.param(self, id=f"{self.category}:{self.name}")


def flag_names(flag: str) -> Names:
    bare = flag.lstrip("-")
    return names(flag, bare.replace("-", "_"))


def same_greedy(res, fx) -> None:
    assert res.stdout.decode() == fx["greedy"], f"WRONG-RESULT: {res.stdout!r}, greedy gives {fx['greedy']!r}"


def any_success(res, fx) -> None:
    pass


def cli_cases() -> list[CliCase]:
    def flag(value_flag, value, *extra, accept=None, forbid=True):
        others = tuple(f for f in SAMPLING_FLAGS if f != value_flag) if forbid else ()
        return CliCase("cli", f"{value_flag}={value}", lambda w, fx: gen_args(value_flag, value, *extra),
                       accept, flag_names(value_flag), others)

    def generate_with(name, extra, reject, accept=None, model=TINY):
        return CliCase("cli", name, lambda w, fx: ["generate", "--model", model, "--image", IMAGE,
                                                   "--max-new-tokens", "3", *extra(w, fx)], accept, reject)

    long_prompt = " ".join(["what colour is the square"] * 60)  # 300 words: past the demo model's 256 positions
    return [
        flag("--temperature", "nan"),
        flag("--temperature", "inf"),
        flag("--temperature", "-1"),
        flag("--temperature", "1e-310", accept=same_greedy),
        flag("--top-k", "0", "--temperature", "1"),
        flag("--top-k", "-5", "--temperature", "1"),
        flag("--top-p", "0", "--temperature", "1"),
        flag("--top-p", "1.5", "--temperature", "1"),
        flag("--top-p", "nan", "--temperature", "1"),
        flag("--max-new-tokens", "-1"),
        flag("--max-new-tokens", str(10**12)),
        flag("--temperature", "abc", forbid=False),
        CliCase("cli", "--seed=-1", lambda w, fx: gen_args("--temperature", "1", "--seed", "-1"), any_success,
                flag_names("--seed")),
        CliCase("cli", "--draw=unknown-extension", lambda w, fx: gen_args("--draw", os.path.join(w, "boxes.xyz")),
                None, names("boxes.xyz")),
        CliCase("cli", "--draw=no-extension", lambda w, fx: gen_args("--draw", os.path.join(w, "boxes")),
                None, names("boxes")),
        CliCase("cli", "--draw=missing-directory", lambda w, fx: gen_args("--draw", os.path.join(w, "nodir", "b.png")),
                None, names("nodir")),
        CliCase("cli", "--draw=a-directory", lambda w, fx: gen_args("--draw", subdir(w, "drawdir")), None, names("drawdir")),
        CliCase("cli", "demo--out=unknown-extension", lambda w, fx: ["demo", "--out", os.path.join(w, "demo.xyz")],
                None, names("demo.xyz")),
        CliCase("cli", "demo--out=missing-directory", lambda w, fx: ["demo", "--out", os.path.join(w, "nodir", "d.png")],
                None, names("nodir")),
        generate_with("--prompt=empty", lambda w, fx: ["--prompt", ""], names("prompt")),
        generate_with("--prompt=whitespace", lambda w, fx: ["--prompt", "  \t "], names("prompt")),
        generate_with("--prompt=newline", lambda w, fx: ["--prompt", "\n"], names("prompt")),
        generate_with("--prompt=invalid-utf8", lambda w, fx: ["--prompt", b"caption \xff\xfe en"], names("prompt")),
        CliCase("cli", "--prompt=too-long", lambda w, fx: ["generate", "--image", IMAGE, "--prompt", long_prompt],
                None, names("prompt")),
        CliCase("cli", "dump--decode=-1", lambda w, fx: ["dump", "--model", TINY, "--image", IMAGE, "--prompt", "caption en",
                                                         "--decode", "-1", "--out", os.path.join(w, "d.npz")],
                None, flag_names("--decode")),
        CliCase("cli", "dump--decode=1e9", lambda w, fx: ["dump", "--model", TINY, "--image", IMAGE, "--prompt", "caption en",
                                                          "--decode", str(10**9), "--out", os.path.join(w, "d.npz")],
                None, flag_names("--decode")),
        CliCase("cli", "diff--b=missing-dump", lambda w, fx: diff_args("--b", os.path.join(w, "missing.npz")),
                None, names("missing.npz")),
        CliCase("cli", "diff--b=garbage-dump", lambda w, fx: diff_args("--b", write(w, "garbage.npz", random.Random(SEED).randbytes(3000))),
                None, names("garbage.npz")),
        CliCase("cli", "diff--b=npz-without-meta", lambda w, fx: diff_args("--b", npz(w, "nometa.npz", {"x": np.zeros(3)})),
                None, names("nometa.npz")),
        CliCase("cli", "diff--b=meta-not-json", lambda w, fx: diff_args("--b", npz(w, "badmeta.npz", {"meta.json": np.array("{")})),
                None, names("badmeta.npz")),
        CliCase("cli", "diff--b=dump-of-another-prompt",
                lambda w, fx: diff_args("--b", fx["dump"], prompt="detect square"), None, names("a.npz")),
        CliCase("cli", "diff--b=dump-with-mismatched-shapes",
                lambda w, fx: diff_args("--b", npz(w, "shapes.npz", {"prefill/logits": np.zeros((1, 2, 3), np.float32),
                                                                     "meta.json": np.array(json.dumps({"format": "refpg-activations/1"}))})),
                any_success, names("shapes.npz")),
        CliCase("cli", "diff--tol=nan", lambda w, fx: diff_args("--tol", "nan"), None, flag_names("--tol")),
        CliCase("cli", "diff--tol=-1", lambda w, fx: diff_args("--tol", "-1"), None, flag_names("--tol")),
        CliCase("cli", "diff--decode=-1", lambda w, fx: diff_args("--decode", "-1"), None, flag_names("--decode")),
        CliCase("cli", "--model=a-file", lambda w, fx: ["generate", "--model", os.path.join(TINY, "config.json"),
                                                        "--image", IMAGE, "--prompt", "caption en"],
                None, names(("config.json", "not a directory"), ("config.json", "not a checkpoint directory"))),
        CliCase("cli", "--backend=gpu", lambda w, fx: gen_args("--backend", "gpu"), None, names("gpu")),
        CliCase("cli", "--backend=matmul=", lambda w, fx: gen_args("--backend", "matmul="), None,
                names("matmul", "linear", "--backend")),
        CliCase("cli", "--backend=matmul-without-value", lambda w, fx: gen_args("--backend", "matmul=cpp,attention"),
                None, names("attention")),
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


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def missing_simd_path() -> str | None:
    """A REFPG_SIMD value this CPU lacks (amx on the AMD EPYC this was written on), or None."""
    flags = cpu_flags()
    for path, needs in (("amx", "amx_bf16"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if needs not in flags:
            return path
    return None


def env_cases() -> list[CliCase]:
    def env(var, value, accept=None, reject="name", args=None):
        return CliCase("env", f"{var}={value}", args or (lambda w, fx: gen_args()), accept,
                       names(var) if reject == "name" else reject, (), {var: value})

    lacking = missing_simd_path()
    return [
        env("REFPG_THREADS", "abc"),
        env("REFPG_THREADS", "2.5"),
        env("REFPG_THREADS", "0", accept=same_greedy),
        env("REFPG_THREADS", "-3"),
        env("REFPG_THREADS", str(10**6), accept=same_greedy),
        env("REFPG_THREADS", str(10**30), accept=same_greedy),
        env("REFPG_SIMD", "bogus"),
        env("REFPG_SIMD", lacking or "amx", reject=names(("REFPG_SIMD", lacking or "amx"))),
        env("REFPG_SIMD", "scalar", accept=same_greedy, reject=None),
        env("REFPG_SIMD", "", accept=same_greedy, reject=None),
        env("REFPG_SIMD", "AVX2", accept=same_greedy),
        env("REFPG_BACKEND", "garbage"),
        env("REFPG_BACKEND", "matmul=cpp,attention"),
        env("REFPG_BACKEND", "cuda"),
        env("REFPG_CHECK", "1", accept=lambda r, fx: checked(r, True), reject=None),
        env("REFPG_CHECK", "false", accept=lambda r, fx: checked(r, False)),
        env("REFPG_CHECK", "off", accept=lambda r, fx: checked(r, False)),
        env("REFPG_CHECK", "banana"),
    ]


def checked(res, want: bool) -> None:
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


def test_case_counts_are_fixed():
    """The fuzz is deterministic: the same seed draws the same cases, so each category's count is fixed."""
    got: dict[str, int] = {}
    for case in CONFIG_CASES + FILE_CASES + IMAGE_CASES + API_CASES + CLI_CASES + ENV_CASES:
        got[case.category] = got.get(case.category, 0) + 1
    ids = [f"{c.category}:{c.name}" for c in CONFIG_CASES + FILE_CASES + IMAGE_CASES + API_CASES + CLI_CASES + ENV_CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert got == COUNTS


def test_seeds_are_valid(worker, seeds):
    """The mutations start from checkpoints that load and run."""
    for name in ("tiny", "gemma2", "sharded"):
        res = worker.run(PIPELINE, {"d": seeds[name], "seed": seeds["tiny" if name == "sharded" else name]})
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

"""Backend selection, check mode, and bf16-rounded weights on the native backend (whole-model
parity of every backend: tests/test_parity_transformers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import case_inputs, load_reference, prefill, rel_err
from refpg import PaliGemma, backend
from refpg.backend import BackendMismatch, Selection, parse_spec
from refpg.backends.base import OP_NAMES, Backend
from refpg.formats import Format

needs_cpp = pytest.mark.skipif(backend.available("cpp") != list(backend.OP_NAMES),
                               reason=backend.UNAVAILABLE.get("cpp", "refpg._C lacks some kernels"))

# An f32 checkpoint rounded to bf16 weights: each weight moves by up to 2^-9 relative, which after
# 3 + 2 layers of this tiny model moves the logits by about 1% of their range (measured 0.5–1.5%
# over the single, batch and suffix cases of f32-hub-single and f32-hires).
BF16_ROUNDED_TOL = 3e-2


@needs_cpp
def test_f32_checkpoint_run_with_bf16_weights_stays_within_the_stated_bound(tiny_checkpoints):
    path = tiny_checkpoints["f32-hub-single"]
    ref = load_reference(path)
    model = PaliGemma.from_pretrained(path, backend="cpp", weight_dtype="bfloat16")
    assert model.weights.text.layers[0].gate_proj.weight.format is Format.BF16
    err = rel_err(prefill(model, case_inputs(ref, "single")), ref["single/logits"])
    assert 0 < err <= BF16_ROUNDED_TOL


@needs_cpp
def test_check_mode_passes_on_correct_kernels(tiny_checkpoints):
    path = tiny_checkpoints["f32-hub-single"]
    model = PaliGemma.from_pretrained(path, backend="cpp", check=True)
    prefill(model, case_inputs(load_reference(path), "single"))


def test_check_mode_names_the_op_and_the_layer_of_a_wrong_kernel(tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["f32-hub-single"]
    reference_geglu = backend.OPS["geglu"]["numpy"]

    class Broken(Backend):  # a backend with one op, 1 % off
        name = "broken"
        ops = {"geglu": lambda gate, up: reference_geglu(gate, up) * np.float32(1.01)}

    monkeypatch.setitem(backend.BACKENDS, "broken", Broken())
    monkeypatch.setitem(backend.OPS["geglu"], "broken", Broken.ops["geglu"])
    model = PaliGemma.from_pretrained(path, backend={**{op: "numpy" for op in OP_NAMES}, "geglu": "broken"},
                                      check=True)
    with pytest.raises(BackendMismatch, match=r"geglu \(broken\) after activation 'text.0.attn_out'.*NMSE"):
        prefill(model, case_inputs(load_reference(path), "single"))


def test_backend_selection_by_name_mapping_and_environment(monkeypatch):
    assert set(parse_spec("numpy").values()) == {"numpy"}
    monkeypatch.setenv("REFPG_BACKEND", "numpy")
    assert set(parse_spec(None).values()) == {"numpy"}
    mixed = parse_spec({"matmul": "numpy", "attention": "numpy"})
    assert mixed["linear"] == "numpy" and mixed["attention"] == "numpy"
    monkeypatch.setenv("REFPG_BACKEND", "matmul=numpy,rope=numpy")
    assert parse_spec(None)["rope"] == "numpy"
    monkeypatch.setenv("REFPG_CHECK", "1")
    assert Selection.from_spec("numpy").check
    with pytest.raises(ValueError, match="unknown op 'convolution'"):
        parse_spec({"convolution": "cpp"})
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        parse_spec("tpu")
    with pytest.raises(ValueError, match="cuda.*unavailable"):
        parse_spec({"attention": "cuda"})


def test_auto_prefers_the_native_backend_when_it_is_built():
    chosen = parse_spec("auto")
    expected = "numpy" if "cpp" in backend.UNAVAILABLE else "cpp"
    assert all(chosen[op] == expected for op in backend.available(expected))


def test_reference_runs_when_the_native_extension_is_missing(tiny_checkpoints):
    """refpg without refpg._C: auto falls back to numpy, and asking for cpp says why it cannot."""
    from conftest import run_python

    code = f"""
import sys, numpy as np
sys.modules["refpg._C"] = None  # as if the extension had never been built
from refpg import PaliGemma, Processor, backend
assert "cpp" in backend.UNAVAILABLE, backend.UNAVAILABLE
path = {tiny_checkpoints["f32-hub-single"]!r}
model = PaliGemma.from_pretrained(path)
assert set(model.selection.backends.values()) == {{"numpy"}}
proc = Processor.from_pretrained(path)
print(proc.decode(model.generate(proc(images=[path + "/image0.png"], prompts=["caption en"]), max_new_tokens=3)[0]))
try:
    PaliGemma.from_pretrained(path, backend="cpp")
except backend.BackendError as e:
    print("refused:", e)
"""
    result = run_python(["-c", code])
    assert result.returncode == 0, result.stderr
    assert "refused: backend 'cpp' for linear is unavailable: the native extension refpg._C is not importable" \
        in result.stdout

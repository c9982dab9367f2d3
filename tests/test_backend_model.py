"""Whole-model agreement of the native backends with the NumPy reference, backend selection, and
check mode."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import case_inputs, load_reference, parity_bound
from make_tiny_checkpoint import VARIANTS
from refpg import PaliGemma, backend
from refpg.backend import BackendMismatch, Selection, parse_spec
from refpg.backends.base import OP_NAMES, Backend
from refpg.formats import Format

needs_cpp = pytest.mark.skipif(backend.available("cpp") != list(backend.OP_NAMES),
                               reason=backend.UNAVAILABLE.get("cpp", "refpg._C lacks some kernels"))

# relative to max |logit|, as for the reference against transformers (conftest.PARITY_BOUND: 1e-5,
# 1e-4 where linear runs on AMX tiles)
LOGITS_TOL = parity_bound("cpp")
# An f32 checkpoint rounded to bf16 weights: each weight moves by up to 2^-9 relative, which after
# 3 + 2 layers of this tiny model moves the logits by about 1% of their range (measured 0.5–1.5%
# over the single, batch and suffix cases of f32-hub-single and f32-hires).
BF16_ROUNDED_TOL = 3e-2


def rel_err(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def prefill(model, inputs):
    return model(inputs["input_ids"], inputs["pixel_values"], token_type_ids=inputs["token_type_ids"],
                 attention_mask=inputs["attention_mask"])


@needs_cpp
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cpp_backend_reproduces_reference_logits_and_tokens(tiny_checkpoints, variant):
    path = tiny_checkpoints[variant]
    ref = load_reference(path)
    model = PaliGemma.from_pretrained(path, backend="cpp")
    assert set(model.selection.backends.values()) == {"cpp"}
    if variant.startswith("bf16"):
        # BF16 tensors go to the kernels as stored: the same values the reference decodes
        assert model.weights.text.layers[0].q_proj.weight.format is Format.BF16
    for case in ("single", "batch"):
        inputs = case_inputs(ref, case)
        real = inputs["attention_mask"].astype(bool)
        assert rel_err(prefill(model, inputs)[real], ref[f"{case}/logits"][real]) <= LOGITS_TOL
        np.testing.assert_array_equal(model.generate(inputs, max_new_tokens=ref[f"{case}/greedy"].shape[1]),
                                      ref[f"{case}/greedy"])


@needs_cpp
@pytest.mark.parametrize("variant", ["f16-gqa-sharded", "gemma2-bf16"])  # GQA; sliding window + caps
def test_cpp_suffix_through_kv_cache_matches_reference(tiny_checkpoints, variant):
    ref = load_reference(tiny_checkpoints[variant])
    model = PaliGemma.from_pretrained(tiny_checkpoints[variant], backend="cpp")
    inputs = case_inputs(ref, "suffix")
    ids, types = inputs["input_ids"], inputs["token_type_ids"]
    n = int((types[0] == 0).sum())
    cache = model.new_cache(1, ids.shape[1])
    steps = [model(ids[:, :n], inputs["pixel_values"], token_type_ids=types[:, :n], cache=cache)]
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(n, ids.shape[1])]
    assert rel_err(np.concatenate(steps, 1), ref["suffix/logits"]) <= LOGITS_TOL


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

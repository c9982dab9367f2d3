"""The cuda backend's data path, tested on any machine: refpg._C.cuda replaced by tests/fake_cuda.py
(device memory kept in NumPy, each op computed by refpg.ops, transfers counted).

What this proves: DeviceArray views, slicing, assignment and arithmetic agree with NumPy; the model
runs end to end on the cuda path with the same logits and tokens as the reference; weights are
uploaded once at load; a decode step moves a fixed handful of small arrays (ids, RoPE tables,
masks in; logits out) whatever the number of layers — no per-op copies; mixed selections and
check mode work. What it cannot prove: the CUDA kernels (tests/test_cuda.py, on a GPU).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import case_inputs, load_reference

from refpg import PaliGemma
from refpg.backend import Selection
from refpg.backends import cuda
from refpg.backends.cuda import DeviceArray

F32 = np.float32


def test_device_array_views_and_assignment_match_numpy(fake_gpu):
    rng = np.random.default_rng(0)
    host = rng.standard_normal((3, 5, 4, 6)).astype(F32)
    dev = cuda.as_device(host)
    for key in [(slice(None), slice(1, 4)), (1,), (-1, slice(None, None, 2)), (Ellipsis, 3), (2, 4, slice(1, 3), 0),
                (slice(None), slice(-1, None))]:
        np.testing.assert_array_equal(np.asarray(dev[key]), host[key], err_msg=str(key))
    np.testing.assert_array_equal(np.asarray(dev[:, 2:].reshape(3, -1)), host[:, 2:].reshape(3, -1))
    np.testing.assert_array_equal(np.asarray(dev.reshape(15, 24)), host.reshape(15, 24))
    with pytest.raises(IndexError):
        dev[3]
    with pytest.raises(ValueError):
        dev.reshape(7, -1)

    value = rng.standard_normal((3, 2, 4, 6)).astype(F32)
    dev[:, 1:3] = value  # a KV-cache append
    host[:, 1:3] = value
    np.testing.assert_array_equal(np.asarray(dev), host)
    rows = np.zeros((3, 5), bool)
    rows[0, 1] = rows[2, 3] = rows[2, 4] = True
    feats = rng.standard_normal((3, 4, 6)).astype(F32)
    dev[rows] = feats  # image features at the <image> positions
    host[rows] = feats
    np.testing.assert_array_equal(np.asarray(dev), host)
    with pytest.raises(ValueError):
        dev[:, 1:3] = value[:, :1]


def test_device_array_arithmetic_matches_numpy(fake_gpu):
    rng = np.random.default_rng(1)
    a, b, pos = (rng.standard_normal(s).astype(F32) for s in [(2, 3, 4), (2, 3, 4), (3, 4)])
    da, db = cuda.as_device(a), cuda.as_device(b)
    np.testing.assert_array_equal(np.asarray(da + db), a + b)
    np.testing.assert_array_equal(np.asarray(da + cuda.as_device(pos)), a + pos)  # position embedding
    np.testing.assert_array_equal(np.asarray(a + db), a + b)  # numpy on the left defers to DeviceArray
    assert isinstance(a + db, DeviceArray)
    np.testing.assert_array_equal(np.asarray(da * F32(1.5)), a * F32(1.5))
    np.testing.assert_array_equal(np.asarray(F32(1.5) * da), a * F32(1.5))
    c = da.copy()
    c[0] = b[1]
    np.testing.assert_array_equal(np.asarray(da), a)  # copy() is a copy


def run(model, inputs):
    return model(inputs["input_ids"], inputs["pixel_values"], token_type_ids=inputs["token_type_ids"],
                 attention_mask=inputs["attention_mask"])


@pytest.mark.parametrize("variant", ["f32-hub-single", "bf16-new-sharded", "gemma2-bf16"])
def test_model_on_the_cuda_path_matches_the_reference(fake_gpu, tiny_checkpoints, variant):
    path = tiny_checkpoints[variant]
    ref = load_reference(path)
    reference = PaliGemma.from_pretrained(path, backend="numpy")
    model = PaliGemma.from_pretrained(path, backend="cuda")
    assert isinstance(model.weights.text.layers[0].q_proj.weight.data, DeviceArray)
    assert model.weights.text.lm_head is model.weights.text.embed_tokens  # tied: uploaded once
    for case in ("single", "batch"):
        inputs = case_inputs(ref, case)
        np.testing.assert_allclose(run(model, inputs), run(reference, inputs), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(model.generate(inputs, max_new_tokens=4), reference.generate(inputs, max_new_tokens=4))


def n_arrays(tree) -> int:
    if isinstance(tree, np.ndarray):
        return 1
    if isinstance(tree, list):
        return sum(n_arrays(t) for t in tree)
    if dataclasses.is_dataclass(tree):
        return sum(n_arrays(getattr(tree, f.name)) for f in dataclasses.fields(tree))
    return 0


def transfers_of_a_prefill_and_a_decode_step(model, inputs, fake_gpu) -> list[dict[str, int]]:
    B, T = inputs["input_ids"].shape
    cache = model.new_cache(B, T + 2)
    counts = []
    fake_gpu.update(upload=0, download=0)
    model(inputs["input_ids"], inputs["pixel_values"], token_type_ids=inputs["token_type_ids"], cache=cache,
          last_only=True)
    counts.append(dict(fake_gpu))
    fake_gpu.update(upload=0, download=0)
    model(np.array([[5]]), token_type_ids=np.ones((1, 1), np.int64), cache=cache)
    counts.append(dict(fake_gpu))
    return counts


def test_weights_go_up_once_and_a_forward_pass_moves_as_many_arrays_whatever_the_depth(fake_gpu, tiny_checkpoints):
    """Transfers per pass do not grow with the layers: every op of every layer reads what is already
    on the device (weights, KV cache) or what the pass uploaded once (ids or patches, RoPE tables,
    masks); only the logits come down."""
    path = tiny_checkpoints["gemma2-bf16"]  # two masks per pass: full and sliding
    host = PaliGemma.from_pretrained(path, backend="numpy")
    deep = PaliGemma.from_pretrained(path, backend="cuda")
    assert fake_gpu["upload"] == n_arrays(host.weights) - 1 and fake_gpu["download"] == 0  # lm_head is embed_tokens

    # the same model cut to 1 vision layer and 2 text layers (one sliding, one full: both masks are read)
    cfg, w = host.config, host.weights
    assert cfg.text.layer_types[:2] == ("sliding_attention", "full_attention") and cfg.text.num_hidden_layers >= 3
    cut = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_hidden_layers=1),
                              text=dataclasses.replace(cfg.text, num_hidden_layers=2, layer_types=cfg.text.layer_types[:2]))
    cut_weights = dataclasses.replace(w, vision=dataclasses.replace(w.vision, layers=w.vision.layers[:1]),
                                      text=dataclasses.replace(w.text, layers=w.text.layers[:2]))
    selection = Selection.from_spec("cuda")
    shallow = PaliGemma(cut, selection.prepare_weights(cut_weights), selection)

    inputs = case_inputs(load_reference(path), "single")
    deep_counts = transfers_of_a_prefill_and_a_decode_step(deep, inputs, fake_gpu)
    assert deep_counts == transfers_of_a_prefill_and_a_decode_step(shallow, inputs, fake_gpu)
    assert [c["download"] for c in deep_counts] == [1, 1]  # the logits


def test_mixed_selection_and_check_mode_on_the_cuda_path(fake_gpu, tiny_checkpoints):
    path = tiny_checkpoints["f16-gqa-sharded"]
    inputs = case_inputs(load_reference(path), "batch")
    expected = run(PaliGemma.from_pretrained(path, backend="numpy"), inputs)
    mixed = PaliGemma.from_pretrained(path, backend={"matmul": "cuda", "attention": "numpy"})
    np.testing.assert_allclose(run(mixed, inputs), expected, rtol=0, atol=1e-5)
    checked = PaliGemma.from_pretrained(path, backend="cuda", check=True)
    np.testing.assert_allclose(run(checked, inputs), expected, rtol=0, atol=1e-5)


def test_diff_tool_compares_a_cuda_run_activation_by_activation(fake_gpu, tiny_checkpoints):
    from refpg import Processor
    from refpg.diff import diff_runs

    path = tiny_checkpoints["gemma2-bf16"]
    image = np.random.default_rng(3).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    result = diff_runs(PaliGemma.from_pretrained(path, backend="numpy"), PaliGemma.from_pretrained(path, backend="cuda"),
                       Processor.from_pretrained(path), image, "caption en", decode_steps=2, tol=1e-5)
    assert result.records and not any(r.divergent for r in result.records)
    assert any(r.name.startswith("decode.1/") for r in result.records)

"""The conformance suite's mlx-vlm adapter, tested as an adapter, not as a port: it returns the logits of
every phase and every activation it promises, with batch dimensions; on the cases where mlx-vlm
implements the rule (one row, no suffix) every activation agrees with the reference, which proves
the ids and pixels reach mlx-vlm as the reference gets them; in a batch the pixels and the
left-padded ids reach it row by row; recording changes nothing; the whole catalogue gives one
result per case. Where mlx-vlm departs from the reference (docs: its table in the README) nothing
here fails.

Needs mlx + mlx-vlm (`pip install "refpg[conform]"`): skipped without them, unless REFPG_REQUIRE_MLX=1
(CI sets it), which turns the skip into a failure. The tests without mlx run everywhere.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest

from conftest import reference_on, run_python
from refpg.conform.adapters import AdapterUnavailable, RefpgAdapter, make_adapter
from refpg.conform.cases import BY_NAME, CASES, Inputs, write_case_checkpoint
from refpg.conform.checkpoint import IMAGE_TOKEN
from refpg.conform.mlx_vlm_adapter import watched_modules
from refpg.conform.run import check, max_rel, run_case, run_suite

REQUIRE = "REFPG_REQUIRE_MLX"

# Worst max |mlx-vlm - refpg| / max |refpg| over every activation of the cases where mlx-vlm follows
# the rule, measured on this project's machine (mlx 0.32.4 CPU, mlx-vlm 0.7.10): core 2.1e-06,
# kv-cache-decode 2.1e-06, gqa 1.8e-06, image-tokens-448-shape 3.0e-06 (image-tokens-896-shape
# 3.4e-06). Part of it is mlx-vlm's SigLIP post-layernorm eps (1e-5 where the config says 1e-6,
# vision.py:87): with it fixed these cases measure <= 1.2e-06. float32 on both sides.
BOUND = 2e-5
CONFORMANT = ["core", "kv-cache-decode", "gqa", "image-tokens-448-shape"]


def mlx_adapter_or_skip():
    """The adapter; where mlx / mlx-vlm cannot be imported, a skip saying why — or a failure when
    REFPG_REQUIRE_MLX is set (in CI the adapter's tests must run)."""
    from refpg.conform.mlx_vlm_adapter import MlxVlmAdapter

    try:
        return MlxVlmAdapter()
    except AdapterUnavailable as e:
        if os.environ.get(REQUIRE):
            pytest.fail(f"{REQUIRE} is set, but {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def adapter():
    return mlx_adapter_or_skip()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("conform-mlx"))


def case_run(adapter, root: str, name: str):
    """(inputs, reference activations, mlx-vlm's activations) of a catalogue case."""
    case = BY_NAME[name]
    model_dir = write_case_checkpoint(case, root)
    inputs = case.inputs(case.config())
    return inputs, RefpgAdapter("numpy").run(name, model_dir, inputs), adapter.run(name, model_dir, inputs)


def test_describe_names_mlx_vlm_mlx_the_device_and_float32(adapter):
    assert re.fullmatch(r"mlx-vlm \d+\.\d+\.\d+\S* \(mlx \d+\.\d+\.\d+\S*, \w+, float32\)", adapter.describe()), \
        adapter.describe()


@pytest.mark.parametrize("name", CONFORMANT)
def test_where_mlx_vlm_follows_the_rule_every_activation_agrees_with_the_reference(adapter, root, name):
    result = run_case(adapter, BY_NAME[name], root, BOUND)
    assert result.status == "pass", result
    assert result.max_rel <= BOUND and result.compared > 0
    assert not result.not_exposed, f"the adapter does not expose {result.not_exposed[:3]}"


@pytest.mark.parametrize("name", ["left-padded-batch", "gemma2-decode-past-window"])
def test_every_phase_returns_logits_and_every_layer_with_batch_dims(adapter, root, name):
    inputs, want, got = case_run(adapter, root, name)
    (B, T), K = inputs.input_ids.shape, inputs.steps
    V = want["prefill/logits"].shape[-1]
    assert set(got) == set(want)  # every activation refpg names (Gemma 2's sandwich norms included)
    assert got["prefill/logits"].shape == (B, T, V)
    for k in range(K):
        assert got[f"decode.{k}/logits"].shape == (B, 1, V)
    for key, have in got.items():
        assert have.dtype == np.float32 and np.isfinite(have).all(), key
        assert have.shape[1:] == want[key].shape[1:], key
        # mlx-vlm's SigLIP keeps only the first image's states (vision.py:49): a batch of one there
        batch = (1, B) if key in ("prefill/vision.post_layernorm", "prefill/projector") else (B,)
        assert have.shape[0] in batch, (key, have.shape)
    if name.startswith("gemma2"):
        assert "prefill/text.0.post_attn_norm" in got and "decode.0/text.2.post_ff_norm" in got


def feeding_errors(inputs: Inputs, want: dict, got: dict) -> dict[str, float]:
    """What shows how a batch was fed, where mlx-vlm follows the reference whatever it does with the
    mask: the vision embeddings and encoder layers of each row (the pixels, NCHW, rows in order), and
    the scaled token embeddings at each row's text positions (the ids, left-padded, in place) in the
    prefill and at every decode step. Returns {activation: max rel error} for those beyond BOUND."""
    text = (inputs.attention_mask == 1) & (inputs.input_ids != IMAGE_TOKEN)  # [B, T]
    errors = {key: max_rel(want[key], got[key]) for key in want
              if re.fullmatch(r"prefill/vision\.(embeddings|\d+)", key)}
    errors["prefill/text.embeddings"] = max_rel(want["prefill/text.embeddings"][text],
                                                got["prefill/text.embeddings"][text])
    errors.update({f"decode.{k}/text.embeddings": max_rel(want[f"decode.{k}/text.embeddings"],
                                                          got[f"decode.{k}/text.embeddings"])
                   for k in range(inputs.steps)})
    return {key: e for key, e in errors.items() if not e <= BOUND}


def test_a_batch_reaches_mlx_vlm_row_by_row_with_its_left_padding(adapter, root):
    inputs, want, got = case_run(adapter, root, "left-padded-batch")
    assert inputs.attention_mask[0, 0] == 0 and inputs.attention_mask[1].all()  # row 0 is padded
    assert feeding_errors(inputs, want, got) == {}
    assert got["prefill/text.embeddings"].shape[:2] == inputs.input_ids.shape  # the padding fed too


def right_padded(i: Inputs) -> Inputs:
    """Each row's padding moved from the left to the right (the mask left as it was)."""
    ids = [np.roll(row, -int((mask == 0).sum())) for row, mask in zip(i.input_ids, i.attention_mask)]
    return replace(i, input_ids=np.stack(ids))


WRONG_FEEDING = {  # what an adapter could get wrong -> where feeding_errors sees it
    "pixels with height and width swapped": (
        lambda i: replace(i, pixel_values=np.ascontiguousarray(i.pixel_values.transpose(0, 1, 3, 2))),
        "prefill/vision.embeddings"),
    "the rows' images swapped": (lambda i: replace(i, pixel_values=i.pixel_values[::-1].copy()),
                                 "prefill/vision.embeddings"),
    "ids padded on the right": (right_padded, "prefill/text.embeddings"),
    "decode columns swapped between rows": (lambda i: replace(i, decode=i.decode[::-1].copy()),
                                            "decode.0/text.embeddings"),
}


@pytest.mark.parametrize("wrong", WRONG_FEEDING)
def test_feeding_errors_sees_a_batch_fed_wrongly(adapter, root, wrong):
    mutate, where = WRONG_FEEDING[wrong]
    case = BY_NAME["left-padded-batch"]
    inputs = case.inputs(case.config())
    want = RefpgAdapter("numpy").run(case.name, write_case_checkpoint(case, root), inputs)
    got = adapter.run(case.name, write_case_checkpoint(case, root), mutate(inputs))
    assert where in feeding_errors(inputs, want, got)


def test_recording_changes_nothing_and_leaves_the_model_as_it_was(adapter, root):
    import mlx.core as mx
    from mlx_vlm.models.cache import make_prompt_cache

    case = BY_NAME["kv-cache-decode"]
    model_dir = write_case_checkpoint(case, root)
    inputs = case.inputs(case.config())
    got = adapter.run(case.name, model_dir, inputs)
    model = adapter.model(model_dir)
    assert adapter.model(model_dir) is model  # loaded once per checkpoint
    assert not [m for m, _, _ in watched_modules(model) if type(m).__module__.startswith("refpg")]  # classes restored
    # the same calls, nothing recorded
    ids = mx.array(inputs.input_ids)
    emb = model.get_input_embeddings(ids, mx.array(inputs.pixel_values), mask=mx.array(inputs.attention_mask))
    cache = make_prompt_cache(model.language_model)
    plain = model.language_model(ids, inputs_embeds=emb.inputs_embeds, cache=cache).logits
    assert np.array_equal(np.array(plain), got["prefill/logits"])
    step = model.language_model(mx.array(inputs.decode[:, :1]), cache=cache).logits
    assert np.array_equal(np.array(step), got["decode.0/logits"])


def test_the_whole_catalogue_gives_one_result_per_case(adapter, root):
    results = run_suite(adapter, CASES, root, 1e-3)
    assert [r.case for r in results] == [c.name for c in CASES]
    for r in results:
        assert r.status in ("pass", "fail", "error"), r
        if r.status == "error":
            assert r.error and "\n" not in r.error, r.error
        if r.status == "fail" and r.activation:
            assert r.phase == "prefill" or r.phase.startswith("decode."), r


UP = b'"language_model.model.layers.1.mlp.up_proj.weight"'


def test_a_checkpoint_mlx_vlm_refuses_is_an_error_on_one_line_saying_where(adapter, root, tmp_path):
    case = BY_NAME["core"]
    intact = write_case_checkpoint(case, root)
    broken = write_case_checkpoint(case, str(tmp_path))
    path = os.path.join(broken, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    assert data.count(UP) == 1
    with open(path, "wb") as f:  # a tensor renamed in the header: mlx lists it on a line of its own
        f.write(data.replace(UP, UP.replace(b"up_proj", b"up_prox")))
    result = check(adapter, case.name, case.rule, broken, case.inputs(case.config()), 1.0,
                   reference=reference_on(intact))  # even at tol 1
    assert result.status == "error", result
    assert "\n" not in result.error and "layers.1.mlp.up_prox.weight" in result.error, result.error
    assert re.search(r"\(\w+\.py:\d+\)$", result.error), result.error


# ---- without mlx -----------------------------------------------------------------------------------

def test_importing_the_adapter_module_does_not_import_mlx():
    code = ("import sys, refpg.conform.mlx_vlm_adapter; "
            "assert not {'mlx', 'mlx.core', 'mlx_vlm'} & set(sys.modules), 'imported'")
    result = run_python(["-c", code])
    assert result.returncode == 0, result.stderr


def test_a_missing_package_makes_the_adapter_unavailable_with_one_line():
    from refpg.conform import mlx_vlm_adapter

    find = mlx_vlm_adapter.importlib.util.find_spec
    with mock.patch.object(mlx_vlm_adapter.importlib.util, "find_spec",
                           lambda name, *a: None if name == "mlx_vlm" else find(name, *a)):
        with pytest.raises(AdapterUnavailable) as e:
            make_adapter("mlx-vlm")
    missing = "mlx-vlm" if mlx_vlm_adapter.installed("mlx.core") else "mlx and mlx-vlm"
    assert str(e.value) == f'mlx-vlm adapter: {missing} not installed (pip install "refpg[conform]")'


def test_an_mlx_that_cannot_be_imported_makes_the_adapter_unavailable(monkeypatch):
    from refpg.conform import mlx_vlm_adapter

    monkeypatch.setattr(mlx_vlm_adapter.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # `import mlx.core` raises ImportError
    with pytest.raises(AdapterUnavailable) as e:
        mlx_vlm_adapter.MlxVlmAdapter()
    assert str(e.value).startswith("mlx-vlm adapter: cannot import mlx / mlx-vlm (ModuleNotFoundError: "), e.value
    assert "\n" not in str(e.value)


def test_without_mlx_the_tests_skip_unless_required(monkeypatch):
    from refpg.conform import mlx_vlm_adapter

    monkeypatch.setattr(mlx_vlm_adapter.importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.delenv(REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="mlx and mlx-vlm not installed"):
        mlx_adapter_or_skip()
    monkeypatch.setenv(REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE} is set, but mlx-vlm adapter: mlx and mlx-vlm"):
        mlx_adapter_or_skip()

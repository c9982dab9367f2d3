"""The conformance suite's transformers adapter: the catalogue's expectations (refpg's NumPy reference)
equal what transformers computes on every case, activation by activation; the adapter exposes every
layer of the prefill and of each decode step, and its KV-cache decode equals transformers' own single
pass over prompt + fed tokens; a checkpoint transformers loads only in part fails its case.
(Needs torch + transformers, installed in CI by the [test] extra: there these tests run.)"""

from __future__ import annotations

import os
import shutil
from unittest import mock

import numpy as np
import pytest

from conftest import reference_on, run_python
from refpg.conform.adapters import AdapterUnavailable, RefpgAdapter, make_adapter
from refpg.conform.cases import BY_NAME, CASES, Inputs, write_case_checkpoint
from refpg.conform.run import max_rel, run_case, run_suite

# Worst max |transformers - refpg| / max |refpg| per case, measured on this project's machine (torch
# 2.13 CPU, transformers 5.24): gemma2-config-defaults 9.7e-05 (its q/k and embeddings are scaled up
# so that the soft-caps matter: attention scores in the tens amplify float32 rounding, which reaches
# the capped logits; against transformers in float64 there, refpg's logits are off by 5.8e-05 and
# transformers' float32 ones by 1.2e-04: rounding, no departure); every other case 7.5e-07 .. 1.8e-06
# (loc-tokens, kv-cache-decode the highest).
# Bounds a few times above: float32 on both sides, only summation orders differ.
BOUND = 1e-5
BOUND_SCALED = {"gemma2-config-defaults": 3e-4}
# transformers' decode through its cache vs its single pass over prompt + fed tokens, every text
# activation: measured 1.2e-06 worst over the catalogue (gemma2-decode-past-window; left-padded-batch
# 5.8e-07)
ONE_PASS_BOUND = 1e-5


@pytest.fixture(scope="module")
def adapter():
    pytest.importorskip("torch", reason="the transformers adapter needs torch (pip install \"refpg[conform]\")")
    pytest.importorskip("transformers", reason="the transformers adapter needs transformers "
                                               "(pip install \"refpg[conform]\")")
    from refpg.conform.transformers_adapter import TransformersAdapter

    return TransformersAdapter()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("conform-transformers"))


def test_the_catalogue_expectations_equal_transformers(adapter, root):
    assert adapter.describe().startswith("transformers 5.")
    results = run_suite(adapter, CASES, root, max(BOUND_SCALED.values()))
    assert [r.status for r in results] == ["pass"] * len(CASES), [r for r in results if r.status != "pass"]
    for r in results:
        assert r.max_rel <= BOUND_SCALED.get(r.case, BOUND), r
        assert not r.not_exposed, f"{r.case}: transformers does not expose {r.not_exposed[:3]}"


def one_pass_inputs(inputs: Inputs) -> Inputs:
    """The fed tokens appended to the prompt as suffix (token type 1, mask 1): one pass, no cache."""
    ones = np.ones_like(inputs.decode)
    return Inputs(np.concatenate([inputs.input_ids, inputs.decode], 1), inputs.pixel_values,
                  np.concatenate([inputs.token_type_ids, ones], 1), np.concatenate([inputs.attention_mask, ones], 1),
                  inputs.decode[:, :0])


@pytest.mark.parametrize("name", ["left-padded-batch", "gemma2-decode-past-window"])
def test_every_layer_is_exposed_with_batch_dims_and_the_cache_decodes_like_one_pass(adapter, root, name):
    case = BY_NAME[name]
    model_dir = write_case_checkpoint(case, root)
    inputs = case.inputs(case.config())
    (B, T), K = inputs.input_ids.shape, inputs.steps
    got = adapter.run(name, model_dir, inputs)
    want = RefpgAdapter("numpy").run(name, model_dir, inputs)
    assert list(got) == list(want)  # every activation refpg names, in forward order
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    layers = case.config().text.num_hidden_layers
    for phase in ["prefill"] + [f"decode.{k}" for k in range(K)]:
        for i in range(layers):
            assert got[f"{phase}/text.{i}.attn_out"].shape[:2] == (B, T if phase == "prefill" else 1)
    assert got["prefill/vision.embeddings"].shape[0] == B and "decode.0/vision.embeddings" not in got

    # the same tokens in one pass, no cache: each decode step's activations are its position T + k
    single = adapter.run(name, model_dir, one_pass_inputs(inputs))
    errors = {key: max_rel(single[f"prefill/{key.split('/', 1)[1]}"][:, T + k], got[key][:, 0])
              for k in range(K) for key in got if key.startswith(f"decode.{k}/")}
    assert len(errors) == K * (3 + layers * (5 if case.config().text.model_type == "gemma2" else 3))
    assert max(errors.values()) <= ONE_PASS_BOUND, max(errors.items(), key=lambda kv: kv[1])
    assert max(errors.values()) > 0  # two different computations, not one result read twice


# ---- checkpoints transformers loads only in part ---------------------------------------------------

def edit_tensors(model_dir: str, edit) -> None:
    """Rewrite model_dir/model.safetensors after edit({name: array}) changed its tensors in place."""
    from safetensors.numpy import load_file, save_file

    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


UP = "language_model.model.layers.1.mlp.up_proj.weight"
DEFECTS = {  # what is done to the checkpoint -> what the error says
    "renamed": (lambda t: t.__setitem__(UP.replace("up_proj", "up_prox"), t.pop(UP)),
                ["1 weights missing from the checkpoint, randomly initialised", "layers.1.mlp.up_proj.weight",
                 "1 tensors of the checkpoint not loaded", "layers.1.mlp.up_prox.weight"]),
    "dropped": (lambda t: t.pop(UP), ["1 weights missing", "layers.1.mlp.up_proj.weight"]),
    "extra": (lambda t: t.__setitem__("language_model.model.extra.weight", np.zeros((2, 2), np.float32)),
              ["1 tensors of the checkpoint not loaded", "extra.weight"]),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_a_checkpoint_loaded_only_in_part_fails_its_case(adapter, root, tmp_path, defect):
    edit, says = DEFECTS[defect]
    case = BY_NAME["core"]
    intact = write_case_checkpoint(case, root)
    edit_tensors(shutil.copytree(intact, tmp_path / case.checkpoint), edit)
    result = run_case(adapter, case, str(tmp_path), 1.0, reference=reference_on(intact))  # even at tol 1
    assert result.status == "error", result
    assert "only in part" in result.error and "\n" not in result.error
    for needle in says:
        assert needle in result.error, result.error


# ---- without torch / transformers ------------------------------------------------------------------

def test_importing_the_adapter_module_imports_neither_torch_nor_transformers():
    code = ("import sys, refpg.conform.transformers_adapter; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
    result = run_python(["-c", code])
    assert result.returncode == 0, result.stderr


def test_a_missing_package_makes_the_adapter_unavailable_with_one_line():
    import importlib.util

    from refpg.conform import transformers_adapter

    find = importlib.util.find_spec
    with mock.patch.object(transformers_adapter.importlib.util, "find_spec",
                           lambda name, *a: None if name == "torch" else find(name, *a)):
        with pytest.raises(AdapterUnavailable) as e:
            make_adapter("transformers")
    assert str(e.value) == 'transformers adapter: torch not installed (pip install "refpg[conform]")'

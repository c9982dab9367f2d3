"""refpg conform: the catalogue passes on refpg's own backends, catches deliberately broken variants of
the reference at the activation and case where each rule breaks, and its CLI and dump adapter work.
(The catalogue's expectations against transformers: tests/test_conform_transformers.py; the mlx-vlm
adapter: tests/test_conform_mlx.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
from unittest import mock

import numpy as np
import pytest

import refpg.backend as B
import refpg.config as C
import refpg.gemma as G
import refpg.model as M
import refpg.weights as W
from conftest import run_cli
from refpg.conform.adapters import RefpgAdapter
from refpg.conform.cases import BY_NAME, CASES, RULES, export_cases
from refpg.conform.run import run_case, run_suite

TOL = 1e-3  # the CLI's default


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("conform"))


def test_every_case_names_a_known_rule_and_every_rule_has_a_case():
    assert {c.rule for c in CASES} == set(RULES)
    assert len(BY_NAME) == len(CASES)


def test_the_catalogue_passes_on_the_native_backend(root):
    pytest.importorskip("refpg._C", reason="the cpp backend needs the native extension")
    results = run_suite(RefpgAdapter("cpp"), CASES, root, TOL)
    assert [r.status for r in results] == ["pass"] * len(CASES), [r for r in results if r.status != "pass"]
    # measured on the AMD EPYC (AVX-512): 9.1e-5 worst (gemma2-config-defaults, whose weights are scaled up
    # so that soft-caps matter), ~1e-6 elsewhere
    assert max(r.max_rel for r in results) < 3e-4


# ---- deliberately broken variants of the reference ---------------------------------------------

class Broken(RefpgAdapter):
    """refpg's NumPy reference with one bug planted while it runs (the expected values are computed
    without it)."""

    def __init__(self, plant):
        super().__init__("numpy")
        self.plant = plant

    def run(self, *args):
        with self.plant():
            return super().run(*args)


def text_config(**fields):
    """The config reader, with fields of the text config overridden (a value, or a function of it)."""
    original = C.text_config_from_dict

    def read(d, path="text_config"):
        cfg = original(d, path)
        return dataclasses.replace(cfg, **{k: v(cfg) if callable(v) else v for k, v in fields.items()})

    return mock.patch.object(C, "text_config_from_dict", read)


def vision_eps_1e5():
    original = C.vision_config_from_dict
    return mock.patch.object(C, "vision_config_from_dict",
                             lambda d, path="vision_config": dataclasses.replace(original(d, path), layer_norm_eps=1e-5))


def prefix_mask(prefix_of):
    """prefix_lm_mask with the prefix flags replaced: zeros = causal everywhere, key_valid = bidirectional."""
    original = G.prefix_lm_mask
    return mock.patch.object(G, "prefix_lm_mask",
                             lambda valid, prefix, start, T, window=None: original(valid, prefix_of(valid, prefix),
                                                                                   start, T, window))


def positions_from_zero():
    original = G.KVCache.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.next_position[:] = 0

    return mock.patch.object(G.KVCache, "__init__", init)


def decode_positions_from_slots():
    """Prefill counts real tokens (1-based), decode uses the slot index: padding counted there only."""
    original = G.KVCache.reserve

    def reserve(self, valid, prefix):
        start = self.length
        positions = original(self, valid, prefix)
        return np.full_like(positions, start + 1) if valid.shape[1] == 1 else positions

    return mock.patch.object(G.KVCache, "reserve", reserve)


def image_features_scaled():
    original = M.merge_image_features
    return mock.patch.object(M, "merge_image_features", lambda embeds, ids, features, token: original(
        embeds, ids, None if features is None else features * np.float32(8.0), token))


def kv_heads_interleaved():
    """Query head h reads kv head h % kv_heads instead of h // (heads / kv_heads)."""
    original = B.OPS["attention"]["numpy"]

    def attention(q, k, v, mask, scale, cap=None):
        group = q.shape[2] // k.shape[2]
        return original(q, np.tile(k, (1, 1, group, 1)), np.tile(v, (1, 1, group, 1)), mask, scale, cap)

    return mock.patch.dict(B.OPS["attention"], {"numpy": attention})


def tf5_names_unknown():
    original = W.hub_name
    return mock.patch.object(W, "hub_name", lambda name: name if name.startswith("vision_tower.") and
                             not name.startswith("vision_tower.vision_model.") else original(name))


def bf16_read_as_f16():
    from refpg import safetensors_io as S

    return mock.patch.dict(S._DTYPES, {"BF16": np.dtype("<f2")})


# bug -> (a case that must catch it, where it must first diverge: phase/activation, or "error" at load)
PLANTED = {
    "head_dim = hidden / heads": (lambda: text_config(head_dim=lambda c: c.hidden_size // c.num_attention_heads),
                                  "head-dim-from-config", "error"),
    "attention soft-cap off": (lambda: text_config(attn_logit_softcapping=None),
                               "gemma2-config-defaults", "prefill/text.0.attn_out"),
    "final soft-cap off": (lambda: text_config(final_logit_softcapping=None), "gemma2-config-defaults", "prefill/logits"),
    "query_pre_attn_scalar = head_dim": (lambda: text_config(query_pre_attn_scalar=lambda c: c.head_dim),
                                         "gemma2-config-defaults", "prefill/text.0.attn_out"),
    "no sliding window": (lambda: text_config(sliding_window=None), "gemma2-decode-past-window",
                          "prefill/text.0.attn_out"),
    "causal prefix": (lambda: prefix_mask(lambda valid, prefix: np.zeros_like(prefix)), "core",
                      "prefill/text.0.attn_out"),
    "bidirectional everywhere": (lambda: prefix_mask(lambda valid, prefix: valid), "prefix-and-suffix-in-one-pass",
                                 "prefill/text.0.attn_out"),
    "decode positions count padding": (decode_positions_from_slots, "left-padded-batch", "decode.0/text.0.attn_out"),
    "rms_norm_eps 1e-5 instead of the default": (lambda: text_config(rms_norm_eps=1e-5), "norm-eps-defaults",
                                                 "prefill/text.0.attn_out"),
    "layer_norm_eps 1e-5 instead of the default": (vision_eps_1e5, "norm-eps-defaults", "prefill/vision.0.attn_out"),
    "rms_norm_eps ignored from the config": (lambda: text_config(rms_norm_eps=1e-6), "norm-eps-from-config",
                                             "prefill/text.0.attn_out"),
    "image features scaled by sqrt(hidden)": (image_features_scaled, "core", "prefill/text.embeddings"),
    "kv heads interleaved": (kv_heads_interleaved, "gqa", "prefill/text.0.attn_out"),
    "transformers 5 names unknown": (tf5_names_unknown, "f16-tf5-names-2-shards", "error"),
    "bf16 read as f16": (bf16_read_as_f16, "bf16-new-names-3-shards", "prefill/vision.embeddings"),
}


@pytest.mark.parametrize("bug", PLANTED)
def test_a_planted_bug_is_caught_by_its_case_where_its_rule_breaks(root, bug):
    plant, case, where = PLANTED[bug]
    result = run_case(Broken(plant), BY_NAME[case], root, TOL)
    if where == "error":
        assert result.status == "error", result
    else:
        assert result.status == "fail" and f"{result.phase}/{result.activation}" == where, result


def test_bidirectional_attention_is_invisible_without_a_suffix(root):
    """The plain prefill is all prefix: a port that is bidirectional everywhere passes `core` and is
    caught only where a suffix exists — which is why the catalogue has both."""
    plant = PLANTED["bidirectional everywhere"][0]
    assert run_case(Broken(plant), BY_NAME["core"], root, TOL).status == "pass"


def test_positions_from_zero_are_equivalent_to_from_one_under_rope(root):
    """Not a catchable bug: RoPE depends only on position differences, so shifting every position of a
    row by one changes no activation beyond rounding. The suite says so (README) instead of claiming
    to test it; a shift that differs between prefill and decode is caught (decode positions above)."""
    results = run_suite(Broken(positions_from_zero), CASES, root, TOL)
    assert all(r.status == "pass" for r in results)
    assert max(r.max_rel for r in results) < 1e-4  # measured 1.7e-5 (gemma2-config-defaults), rounding


# ---- CLI, dumps ------------------------------------------------------------------------------------

def test_cli_passes_on_refpg_and_writes_json(tmp_path):
    out = tmp_path / "c.json"
    result = run_cli("conform", "--impl", "refpg:numpy", "--cases", "core", "gqa", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "2 of 2 cases pass" in result.stdout
    report = json.loads(out.read_text())
    assert [r["case"] for r in report["results"]] == ["core", "gqa"]
    assert all(r["status"] == "pass" for r in report["results"])


def test_dumps_of_another_implementation_are_compared_and_a_missing_one_is_an_error(tmp_path):
    """--write-cases gives an outside implementation the checkpoints and inputs; its dumps are compared."""
    cases_dir, dumps = tmp_path / "cases", tmp_path / "dumps"
    result = run_cli("conform", "--write-cases", str(cases_dir), "--cases", "core", "kv-cache-decode", "gqa")
    assert result.returncode == 0, result.stderr
    dumps.mkdir()
    from refpg.conform.cases import Inputs

    for name in ("core", "kv-cache-decode"):  # gqa left out: no dump for it
        with np.load(cases_dir / f"{name}.inputs.npz") as z:
            inputs = Inputs(*(z[k] for k in ("input_ids", "pixel_values", "token_type_ids", "attention_mask", "decode")))
            model_dir = str(cases_dir / str(z["checkpoint"]))
        acts = RefpgAdapter("numpy").run(name, model_dir, inputs)
        if name == "kv-cache-decode":
            acts["decode.3/logits"] = acts["decode.3/logits"] + 1.0  # an outside implementation's slip
        np.savez(dumps / f"{name}.npz", **acts, **{"meta.json": np.array('{"format": "refpg-activations/1"}')})
    result = run_cli("conform", "--impl", f"dump:{dumps}", "--cases", "core", "kv-cache-decode", "gqa")
    assert result.returncode == 1
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()[:1] in
            (["core"], ["kv-cache-decode"], ["gqa"])}
    assert " pass " in rows["core"]
    assert "FAIL" in rows["kv-cache-decode"] and "decode.3/logits" in rows["kv-cache-decode"]
    assert "ERROR" in rows["gqa"] and "gqa.npz" in rows["gqa"]


@pytest.mark.parametrize("args, needle", [
    (["--impl", "nope"], "unknown implementation 'nope'"),
    (["--impl", "refpg", "--cases", "no-such-case"], "unknown case 'no-such-case'"),
    (["--impl", "dump:/no/such/dir"], "not a directory"),
    (["--impl", "refpg", "--tol", "0"], "--tol"),
    ([], "--impl is required"),
])
def test_cli_bad_arguments_are_one_line_errors(args, needle):
    from conftest import assert_one_line_error

    assert_one_line_error(run_cli("conform", *args), needle)


def test_checks_on_a_users_checkpoint_adapt_to_it(tiny_checkpoints):
    """--model: the rules run on the checkpoint at hand; a Gemma 2 one gets a suffix past its window."""
    result = run_cli("conform", "--impl", "refpg:numpy", "--model", tiny_checkpoints["gemma2-bf16"],
                     "--reference", "numpy")
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("prefill", "kv-cache-decode", "left-padded-batch", "prefix-and-suffix-in-one-pass",
                  "suffix-past-the-window"):
        assert f"\n{check} " in result.stdout


def test_export_writes_every_case_with_its_checkpoint(tmp_path):
    written = export_cases(CASES[:3], str(tmp_path))
    assert len(written) == 3
    with np.load(written[0]) as z:
        assert os.path.isfile(tmp_path / str(z["checkpoint"]) / "config.json")

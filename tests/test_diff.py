"""The layerwise diff tool: where two runs part ways."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from refpg import PaliGemma, Processor, backend, diff

PROMPT = "caption en"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return tiny_checkpoints["f32-hub-single"]


def image_of(path):
    return os.path.join(path, "image0.png")


def perturbed_copy(src: str, dst, tensor: str) -> str:
    """The checkpoint with one tensor nudged by 1% of its scale (every other byte unchanged)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    w = tensors[tensor]
    tensors[tensor] = (w + 0.01 * np.abs(w).max() * np.random.default_rng(0).standard_normal(w.shape)).astype(w.dtype)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_two_identical_runs_report_zero_divergence(tiny):
    model, proc = PaliGemma.from_pretrained(tiny, backend="numpy"), Processor.from_pretrained(tiny)
    result = diff.diff_runs(model, model, proc, image_of(tiny), PROMPT, decode_steps=2)
    assert result.first_divergent is None and not result.missing
    assert all(r.max_abs == 0 and r.cosine == pytest.approx(1.0) for r in result.records)
    names = [r.name for r in result.records]
    assert names[0] == "prefill/vision.embeddings" and names[-1] == "decode.1/logits"
    assert "prefill/projector" in names and "decode.0/text.2.mlp_out" in names


@pytest.mark.parametrize("tensor,first", [
    ("vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight", "prefill/vision.1.attn_out"),
    ("multi_modal_projector.linear.weight", "prefill/projector"),
    ("language_model.model.layers.1.mlp.down_proj.weight", "prefill/text.1.mlp_out"),
    ("language_model.model.layers.2.self_attn.v_proj.weight", "prefill/text.2.attn_out"),
])
def test_a_perturbed_weight_is_found_at_the_layer_that_uses_it(tiny, tmp_path, tensor, first):
    other = perturbed_copy(tiny, tmp_path / "perturbed", tensor)
    proc = Processor.from_pretrained(tiny)
    result = diff.diff_runs(PaliGemma.from_pretrained(tiny, backend="numpy"),
                            PaliGemma.from_pretrained(other, backend="numpy"), proc, image_of(tiny), PROMPT,
                            tol=1e-4)
    assert result.first_divergent == first
    before = [r for r in result.records[:[r.name for r in result.records].index(first)]]
    assert all(r.max_abs == 0 for r in before), "everything before the perturbed layer is bit-identical"


@pytest.mark.skipif(backend.available("cpp") != list(backend.OP_NAMES), reason="the cpp backend is not built")
def test_numpy_and_cpp_agree_on_every_activation(tiny):
    proc = Processor.from_pretrained(tiny)
    result = diff.diff_runs(PaliGemma.from_pretrained(tiny, backend="numpy"),
                            PaliGemma.from_pretrained(tiny, backend="cpp"), proc, image_of(tiny), PROMPT,
                            decode_steps=3, tol=1e-4)
    assert result.first_divergent is None, diff.format_table(result)
    assert all(r.top1_agree == 1.0 for r in result.records if r.top1_agree is not None)


def test_transformers_dump_diffs_within_tolerance(tiny, tmp_path):
    from transformers_dump import transformers_dump

    dump = str(tmp_path / "hf.npz")
    names = transformers_dump(tiny, image_of(tiny), PROMPT, dump, decode_steps=2)
    assert names[0] == "prefill/vision.embeddings" and names[-1] == "decode.1/logits"
    proc = Processor.from_pretrained(tiny)
    result = diff.diff_runs(PaliGemma.from_pretrained(tiny, backend="numpy"), None, proc, image_of(tiny), PROMPT,
                            decode_steps=2, tol=1e-4, dump_b=dump)
    assert result.first_divergent is None and not result.missing
    assert len(result.records) == len(names)


def test_refpg_dump_round_trips_and_a_wrong_prompt_is_refused(tiny, tmp_path):
    model, proc = PaliGemma.from_pretrained(tiny, backend="numpy"), Processor.from_pretrained(tiny)
    out = str(tmp_path / "run.npz")
    names = diff.dump(model, proc, image_of(tiny), PROMPT, out, decode_steps=1)
    d = diff.Dump(out)
    assert d.names == names and d.meta["format"] == diff.FORMAT and len(d.meta["tokens"]) == 1
    same = diff.diff_runs(model, None, proc, image_of(tiny), PROMPT, decode_steps=1, dump_b=out)
    assert same.first_divergent is None and all(r.max_abs == 0 for r in same.records)
    with pytest.raises(ValueError, match="other input ids"):
        diff.diff_runs(model, None, proc, image_of(tiny), "detect cat", dump_b=out)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an activation dump"):
        diff.Dump(str(tmp_path / "junk.npz"))


def test_cli_diff_writes_table_json_and_png(tiny, tmp_path):
    other = perturbed_copy(tiny, tmp_path / "perturbed", "language_model.model.layers.0.mlp.up_proj.weight")
    js, png = tmp_path / "diff.json", tmp_path / "diff.png"
    result = run_cli("diff", "--model", tiny, "--model-b", other, "--image", image_of(tiny), "--prompt", PROMPT,
                     "--decode", "2", "--tol", "1e-4", "--json", str(js), "--plot", str(png))
    assert result.returncode == 1, result.stderr  # a divergence, as cmp and diff say it
    assert "prefill/text.0.mlp_out" in result.stdout and "<-- first divergence" in result.stdout
    assert f"wrote {js}" in result.stderr and f"wrote {png}" in result.stderr
    report = json.loads(js.read_text())
    assert report["first_divergent"] == "prefill/text.0.mlp_out"
    assert [r["name"] for r in report["records"]][:2] == ["prefill/vision.embeddings", "prefill/vision.0.attn_out"]
    assert {"shape", "max_abs", "max_rel", "rms_rel", "cosine", "top1_agree", "divergent"} <= set(report["records"][0])
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 400

"""The whole pipeline a user runs: image file + prompt -> Processor -> model -> text, and the CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error, case_inputs, load_reference, run_cli
from make_tiny_checkpoint import PROMPTS
from refpg import PaliGemma, Processor


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return tiny_checkpoints["f32-hub-single"]


def test_image_file_through_processor_and_model_gives_transformers_logits(tiny):
    ref = load_reference(tiny)
    proc = Processor.from_pretrained(tiny)
    batch = proc(images=[os.path.join(tiny, "image0.png")], prompts=[PROMPTS[0]])
    want = case_inputs(ref, "single")
    np.testing.assert_array_equal(batch["input_ids"], want["input_ids"])
    np.testing.assert_allclose(batch["pixel_values"], want["pixel_values"], atol=1e-6, rtol=0)
    logits = PaliGemma.from_pretrained(tiny)(batch["input_ids"], batch["pixel_values"],
                                             token_type_ids=batch["token_type_ids"],
                                             attention_mask=batch["attention_mask"])
    assert np.abs(logits - ref["single/logits"]).max() <= 1e-4 * np.abs(ref["single/logits"]).max()


def test_cli_streams_the_greedy_answer(tiny):
    ref = load_reference(tiny)
    n = ref["single/greedy"].shape[1]
    result = run_cli("generate", "--model", tiny, "--image", os.path.join(tiny, "image0.png"),
                     "--prompt", PROMPTS[0], "--max-new-tokens", str(n))
    assert result.returncode == 0, result.stderr
    proc = Processor.from_pretrained(tiny)
    assert result.stdout == proc.decode(ref["single/greedy"][0]) + "\n"
    assert "loading weights" in result.stderr and "tokens in" in result.stderr


def test_cli_sampling_is_reproducible_with_a_seed(tiny):
    args = ["generate", "--model", tiny, "--image", os.path.join(tiny, "image0.png"), "--prompt", "caption en",
            "--max-new-tokens", "6", "--temperature", "1.5", "--top-k", "50", "--top-p", "0.9", "--seed", "7"]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_cli_missing_model_dir_is_a_one_line_error(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "nope"), "--image", "x.png",
                                  "--prompt", "caption en"), "does not exist")


def test_cli_unreadable_image_is_a_one_line_error(tiny, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert_one_line_error(run_cli("generate", "--model", tiny, "--image", str(bad), "--prompt", "caption en"),
                          "broken.png")
    assert_one_line_error(run_cli("generate", "--model", tiny, "--image", str(tmp_path / "missing.jpg"),
                                  "--prompt", "caption en"), "missing.jpg")


def test_cli_prompt_longer_than_the_model_allows_is_a_one_line_error(tiny, tmp_path):
    short = tmp_path / "short-context"
    shutil.copytree(tiny, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 40
    (short / "config.json").write_text(json.dumps(cfg))
    result = run_cli("generate", "--model", str(short), "--image", os.path.join(tiny, "image0.png"),
                     "--prompt", "a very long prompt " * 10, "--max-new-tokens", "4")
    assert_one_line_error(result, "exceeds the model's limit of 40")


def test_model_rejects_bad_inputs_with_clear_errors(tiny):
    from refpg.model import InputError

    model = PaliGemma.from_pretrained(tiny)
    ref = load_reference(tiny)
    inputs = case_inputs(ref, "single")
    with pytest.raises(InputError, match="no pixel_values"):
        model(inputs["input_ids"])
    with pytest.raises(InputError, match="pixel_values must be"):
        model(inputs["input_ids"], inputs["pixel_values"][:, :, :16])
    with pytest.raises(InputError, match="outside the vocabulary"):
        model(np.array([[2, 10**6]]))
    with pytest.raises(InputError, match="integer"):
        model(np.array([[2.0, 3.0]]))
    with pytest.raises(InputError, match="exactly 16 <image> tokens"):
        model(inputs["input_ids"][:, 1:], inputs["pixel_values"])
    cache = model.new_cache(batch_size=1, max_len=inputs["input_ids"].shape[1])
    model(inputs["input_ids"], inputs["pixel_values"], token_type_ids=inputs["token_type_ids"], cache=cache)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(np.array([[5]]), cache=cache)


def test_cli_runs_on_the_shipped_tiny_random_checkpoint():
    shipped = os.path.join(ROOT, "tests", "data", "tiny-random")
    result = run_cli("generate", "--model", shipped, "--image", os.path.join(shipped, "image0.png"),
                     "--prompt", "caption en")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the random model still answers something"
    assert "32 tokens in" in result.stderr  # the default --max-new-tokens, no <eos> from this model

"""The tiny trained PaliGemma shipped in refpg/data/demo: it loads like a published checkpoint, answers
held-out scenes of refpg.scenes correctly on every backend, and `refpg demo` runs.

Its full held-out accuracy (300 scenes) is measured by tools/eval_demo.py — for the shipped weights
caption 96.3 %, counting 100 %, colour 100 %, detection 100 % of objects (right label, IoU >= 0.7), every object
of the multi-class detection right on 100 % of the scenes; here a fixed set of thirty scenes that neither
training (seeds from 1000 up) nor that evaluation (0–299) used, with floors a little below what the shipped
weights score there (caption 27/30, every other kind all right), so that a loader or backend change that
degrades the answers fails.
"""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import pytest

from conftest import run_cli
from refpg import PaliGemma, Processor, scenes
from refpg import backend as backends
from refpg import DEMO_MODEL

SEEDS = range(600, 630)
FLOORS = {"caption": 0.85, "count": 0.95, "colour": 0.95, "detect": 0.95, "detect all": 0.95}  # fraction right, per kind
MAX_NEW_TOKENS = 24  # the longest answer, every box of three objects, is 19 tokens + <eos>


@pytest.fixture(scope="module")
def demo_dir():
    path = DEMO_MODEL
    assert os.path.isfile(os.path.join(path, "model.safetensors")), \
        f"{path} is missing the shipped demo model (tools/train_demo.py writes it)"
    return path


def ask_all(model: PaliGemma, proc: Processor) -> list[tuple[str, str, str]]:
    """(prompt, expected, answer) for every question about the test scenes, in one left-padded batch per kind."""
    by_kind: dict[str, list] = {}
    for seed in SEEDS:
        scene = scenes.scene_for_seed(seed)
        for prompt, expected in scenes.tasks(scene):
            by_kind.setdefault(scenes.task_kind(prompt), []).append((scene.image, prompt, expected))
    out = []
    for rows in by_kind.values():
        batch = proc(images=[r[0] for r in rows], prompts=[r[1] for r in rows])
        ids = model.generate(batch, max_new_tokens=MAX_NEW_TOKENS)
        out += [(prompt, expected, proc.decode(row)) for (_, prompt, expected), row in zip(rows, ids)]
    return out


def test_shipped_demo_model_loads_like_a_published_checkpoint(demo_dir):
    model = PaliGemma.from_pretrained(demo_dir, backend="numpy")
    proc = Processor.from_pretrained(demo_dir)
    assert model.config.vision.image_size == scenes.SIZE and model.config.num_image_tokens == 64
    assert model.config.image_token_index == proc.vocab_size            # <image> just past the vocabulary
    assert model.config.text.num_key_value_heads == 4                   # tools/train_demo.py: 4 kv heads (MHA)
    assert sorted(os.listdir(demo_dir)) == ["config.json", "model.safetensors", "preprocessor_config.json",
                                            "tokenizer.model"]
    assert sum(os.path.getsize(os.path.join(demo_dir, f)) for f in os.listdir(demo_dir)) < 8e6


@pytest.fixture(scope="module")
def numpy_answers(demo_dir):
    return ask_all(PaliGemma.from_pretrained(demo_dir, backend="numpy"), Processor.from_pretrained(demo_dir))


def test_demo_model_answers_held_out_scenes_with_the_numpy_reference(numpy_answers):
    for kind, floor in FLOORS.items():
        mine = [a for a in numpy_answers if scenes.task_kind(a[0]) == kind]
        wrong = [a for a in mine if not scenes.is_right(*a)]
        assert mine and 1 - len(wrong) / len(mine) >= floor, f"{kind}: {len(wrong)}/{len(mine)} wrong: {wrong}"


def test_cpp_backend_gives_the_numpy_answers(demo_dir, numpy_answers):
    if backends.available("cpp") != list(backends.OP_NAMES):
        pytest.skip(f"the cpp backend implements only {backends.available('cpp')} here, not every op "
                    f"({backends.UNAVAILABLE.get('cpp', 'ops missing')})")
    got = ask_all(PaliGemma.from_pretrained(demo_dir, backend="cpp"), Processor.from_pretrained(demo_dir))
    assert [a for _, _, a in got] == [a for _, _, a in numpy_answers]


def test_refpg_demo_prints_answers_and_writes_its_picture(tmp_path, demo_dir):
    result = run_cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "caption en \u2192 a " in result.stdout and "detect " in result.stdout
    with PIL.Image.open(tmp_path / "refpg-demo.png") as picture:
        assert picture.height == scenes.SIZE * 4 and picture.width > 3 * scenes.SIZE * 4
        assert np.asarray(picture.convert("RGB")).std() > 10  # not blank


def test_refpg_generate_without_model_uses_the_demo_model(tmp_path, demo_dir):
    scene = scenes.scene_for_seed(SEEDS[0])
    scene.image.save(tmp_path / "scene.png")
    result = run_cli("generate", "--image", "scene.png", "--prompt", scenes.COUNT, "--backend", "numpy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in scenes.NUMBERS.values()


def test_generate_pads_rows_that_ended_while_the_others_go_on(demo_dir):
    """In a batch, a row that has emitted <eos> gets <pad> on every later step (its own answer is
    over), the other rows keep their answers, and generation stops once every row has ended."""
    model = PaliGemma.from_pretrained(demo_dir, backend="numpy")
    proc = Processor.from_pretrained(demo_dir)
    image = scenes.scene_for_seed(SEEDS[0]).image
    short, long = (proc(images=[image], prompts=[p]) for p in (scenes.COUNT, scenes.DETECT_ALL))
    alone = [model.generate(b, max_new_tokens=MAX_NEW_TOKENS)[0] for b in (short, long)]
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    assert alone[0][-1] == eos and alone[1][-1] == eos and len(alone[0]) < len(alone[1])
    ids = model.generate(proc(images=[image, image], prompts=[scenes.COUNT, scenes.DETECT_ALL]),
                         max_new_tokens=MAX_NEW_TOKENS)
    assert ids.shape == (2, len(alone[1]))  # stopped at the longer answer's <eos>
    np.testing.assert_array_equal(ids[0, :len(alone[0])], alone[0])
    assert (ids[0, len(alone[0]):] == pad).all()
    np.testing.assert_array_equal(ids[1], alone[1])

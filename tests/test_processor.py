"""refpg.processor against transformers 5's PaliGemmaProcessor (SiglipImageProcessorPil + GemmaTokenizer
converted from the same tiny tokenizer.model): pixels, ids, token types, padding, decoding, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import random

import numpy as np
import PIL.Image
import pytest

from refpg.processor import Processor, ProcessorError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE, PATCH_SIZE = 32, 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2

PROMPTS = [
    "caption en",
    "answer en what is 2+2? 1234567 and 3.14",
    "detect cat ; dog",
    "Café naïve — déjà vu: 日本 🐱 ß",
    "segment <loc0123> car",
    "<loc0001><loc1023><seg127>",
    "trailing spaces   ",
    "  two leading and  inner   spaces",
    "tabs\tand\nnewlines\n\n",
    "punctuation!?,.;:()[]{}\"'",
    "",
    "control pieces written out: <eos> <bos><pad><unk><mask> stay tokens",
    "not quite special: <eos <loc12> <0x41> ▁word",
]
SUFFIXES = ["a red cat sitting on the grass", "<loc0010><loc0020><loc0500><loc0900> cat", "", "4", "ünïcode 🐱 "]


def _load_tiny_tokenizer_module():
    spec = importlib.util.spec_from_file_location("tiny_tokenizer", os.path.join(REPO, "tools", "tiny_tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tiny_paligemma"))
    path = _load_tiny_tokenizer_module().write_tiny_tokenizer(out)
    import sentencepiece as spm
    vocab = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    config = {"model_type": "paligemma", "image_token_index": vocab,
              "vision_config": {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "hidden_size": 16,
                                "num_attention_heads": 2},
              "text_config": {"vocab_size": vocab + 64, "hidden_size": 2048}}  # = the default projection_dim
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return out


@pytest.fixture(scope="session")
def proc(model_dir) -> Processor:
    return Processor.from_pretrained(model_dir)


def make_oracle(model_dir, **image_kwargs):
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle for these tests")
    transformers.utils.logging.set_verbosity_error()  # its "inferring image tokens" warning on every call
    tokenizer = transformers.GemmaTokenizer.from_pretrained(model_dir)  # converts tokenizer.model
    image_processor = transformers.SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=NUM_IMAGE_TOKENS, **image_kwargs)
    return transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def oracle(model_dir):
    return make_oracle(model_dir)


def oracle_batch(oracle, images, prompts, suffixes=None) -> dict[str, np.ndarray]:
    out = oracle(images=images, text=prompts, suffix=suffixes, padding="longest", return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------- images

def _rng_pixels(h, w, c, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


def _image(kind: str) -> PIL.Image.Image:
    if kind == "rgb_downscale_non_square":
        return PIL.Image.fromarray(_rng_pixels(50, 71, 3, 1))
    if kind == "rgb_upscale_odd":
        return PIL.Image.fromarray(_rng_pixels(7, 5, 3, 2))
    if kind == "rgb_exact_size":
        return PIL.Image.fromarray(_rng_pixels(IMAGE_SIZE, IMAGE_SIZE, 3, 3))
    if kind == "rgb_tall_thin":
        return PIL.Image.fromarray(_rng_pixels(97, 3, 3, 4))
    if kind == "rgba":
        return PIL.Image.fromarray(_rng_pixels(37, 45, 4, 5), mode="RGBA")
    if kind == "la":
        return PIL.Image.fromarray(_rng_pixels(41, 23, 2, 6), mode="LA")
    if kind == "l":
        return PIL.Image.fromarray(_rng_pixels(33, 29, 1, 8)[..., 0], mode="L")
    if kind == "p":
        return PIL.Image.fromarray(_rng_pixels(40, 40, 3, 9)).quantize(colors=16)
    if kind == "p_transparent":
        image = PIL.Image.fromarray(_rng_pixels(40, 44, 3, 10)).quantize(colors=16)
        image.info["transparency"] = 3
        return image
    if kind == "i16":
        values = np.random.default_rng(11).integers(0, 65536, (30, 20)).astype("<u2")
        return PIL.Image.frombytes("I;16", (20, 30), values.tobytes())
    if kind == "cmyk":
        return PIL.Image.frombytes("CMYK", (31, 25), _rng_pixels(25, 31, 4, 12).tobytes())
    if kind == "bilevel":
        return PIL.Image.fromarray(_rng_pixels(19, 40, 1, 13)[..., 0] > 127)
    raise KeyError(kind)


IMAGE_KINDS = ["rgb_downscale_non_square", "rgb_upscale_odd", "rgb_exact_size", "rgb_tall_thin", "rgba", "la",
               "l", "p", "p_transparent", "i16", "cmyk", "bilevel"]


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_pixel_values_match_transformers_bit_for_bit(proc, oracle, kind):
    image = _image(kind)
    ours = proc.encode_image(image)
    theirs = oracle_batch(oracle, [image], ["caption en"])["pixel_values"][0]
    assert ours.dtype == np.float32 and ours.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_array_equal(ours, theirs)


def test_uint8_array_image_matches_transformers(proc, oracle):
    array = _rng_pixels(45, 38, 3, 20)
    np.testing.assert_array_equal(proc.encode_image(array), oracle_batch(oracle, [array], ["x"])["pixel_values"][0])
    np.testing.assert_array_equal(proc.encode_image(array), proc.encode_image(PIL.Image.fromarray(array)))


def test_image_paths_load_like_transformers_exif_rotated_alpha_dropped(proc, oracle, tmp_path):
    png = tmp_path / "rgba.png"
    _image("rgba").save(png)
    jpeg = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise
    PIL.Image.fromarray(_rng_pixels(30, 50, 3, 21)).save(jpeg, exif=exif, quality=95)
    for path in (png, jpeg):
        theirs = oracle_batch(oracle, [str(path)], ["caption en"])["pixel_values"][0]
        np.testing.assert_array_equal(proc.encode_image(str(path)), theirs)
        np.testing.assert_array_equal(proc.encode_image(path), theirs)  # os.PathLike too
    # The same RGBA image given in memory is composited onto white instead (transformers does the same).
    assert not np.array_equal(proc.encode_image(png), proc.encode_image(_image("rgba")))


def test_preprocessor_config_mean_std_resample_are_used(model_dir, tmp_path):
    custom = tmp_path / "custom"
    custom.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (custom / name).write_bytes(open(os.path.join(model_dir, name), "rb").read())
    settings = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 2, "rescale_factor": 1 / 255, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                "image_seq_length": NUM_IMAGE_TOKENS}
    (custom / "preprocessor_config.json").write_text(json.dumps(settings))
    ours = Processor.from_pretrained(custom)
    oracle = make_oracle(model_dir, image_mean=settings["image_mean"], image_std=settings["image_std"], resample=2)
    image = _image("rgba")
    np.testing.assert_array_equal(ours.encode_image(image), oracle_batch(oracle, [image], ["x"])["pixel_values"][0])


def test_preprocessor_config_disagreeing_with_the_model_is_an_error(model_dir, tmp_path):
    for name in ("config.json", "tokenizer.model"):
        (tmp_path / name).write_bytes(open(os.path.join(model_dir, name), "rb").read())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_seq_length": 256}))
    with pytest.raises(ProcessorError, match="preprocessor_config.json.*image_seq_length"):
        Processor.from_pretrained(tmp_path)


@pytest.mark.parametrize("settings, needle", [
    ({"image_mean": [0.5, float("nan"), 0.5]}, "image_mean must be a finite number"),
    ({"image_std": 0}, "image_std must be a finite nonzero number"),
    ({"image_std": ["a", 1, 1]}, "image_std must be a finite nonzero number"),
    ({"rescale_factor": "1/255"}, "rescale_factor must be a finite nonzero number"),
    ({"size": [224, 224]}, "preprocessor_config.json"),
], ids=["nan-mean", "zero-std", "string-std", "string-rescale", "size-list"])
def test_preprocessor_config_values_that_would_poison_pixels_are_errors(model_dir, tmp_path, settings, needle):
    for name in ("config.json", "tokenizer.model"):
        (tmp_path / name).write_bytes(open(os.path.join(model_dir, name), "rb").read())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ProcessorError, match=needle) as e:
        Processor.from_pretrained(tmp_path)
    assert "preprocessor_config.json" in str(e.value)


# ---------------------------------------------------------------- text

def _tokenize_like_oracle(proc, oracle, prompt, suffix=None):
    ids, types = proc.tokenize_prompt(prompt, suffix)
    theirs = oracle_batch(oracle, [_image("l")], [prompt], None if suffix is None else [suffix])
    assert ids == theirs["input_ids"][0].tolist(), (prompt, suffix)
    assert types == theirs["token_type_ids"][0].tolist(), (prompt, suffix)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_and_token_types_match_transformers(proc, oracle, prompt):
    _tokenize_like_oracle(proc, oracle, prompt)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_prompt_with_suffix_matches_transformers(proc, oracle, suffix):
    for prompt in ("caption en", "detect cat", PROMPTS[3], "trailing spaces   "):
        _tokenize_like_oracle(proc, oracle, prompt, suffix)


def test_random_strings_tokenize_like_transformers(proc, oracle):
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'\"()[]-_\t\n    ") + [
        "é", "ï", "—", "日", "🐱", "ß", "\u00a0", "<loc0001>", "<seg012>", "<eos>", "<bos>", "<mask>", "<", ">", "▁"]
    words = ["cat", "dog", "red", "sitting", "caption", "answer", "detect", " the", " in the park", "There are"]
    rng = random.Random(0)
    prompts = ["".join(rng.choice(alphabet + words) for _ in range(rng.randint(0, 25))) for _ in range(300)]
    theirs = oracle_batch(oracle, [_image("l")] * len(prompts), prompts)
    ours = proc([_image("l")] * len(prompts), prompts)
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_layout_is_image_tokens_bos_prompt_newline_suffix_eos(proc):
    ids, types = proc.tokenize_prompt("caption en", "a cat")
    n = NUM_IMAGE_TOKENS
    newline = proc.sp.piece_to_id("\n")
    assert ids[:n] == [proc.image_token_index] * n and ids[n] == proc.bos_token_id
    prompt_end = ids.index(newline) + 1
    assert proc.decode(ids[n + 1:prompt_end]) == "caption en\n"
    assert ids[-1] == proc.eos_token_id and proc.decode(ids[prompt_end:-1]) == "a cat"
    assert types == [0] * prompt_end + [1] * (len(ids) - prompt_end)


def test_loc_tokens_in_a_prompt_are_single_pieces(proc):
    ids, _ = proc.tokenize_prompt("detect<loc0123>cat")
    assert proc.sp.piece_to_id("<loc0123>") in ids
    assert proc.sp.piece_to_id("<loc0123>") == proc.sp.piece_to_id("<loc0000>") + 123


def test_leading_image_token_in_prompt_is_accepted_like_transformers(proc, oracle):
    theirs = oracle_batch(oracle, [_image("l")], ["<image>caption en"])
    assert proc.tokenize_prompt("<image>caption en")[0] == theirs["input_ids"][0].tolist()
    assert proc.tokenize_prompt("<image>caption en") == proc.tokenize_prompt("caption en")


def test_batch_of_different_lengths_is_left_padded_like_transformers(proc, oracle):
    images = [_image(k) for k in ("rgb_downscale_non_square", "rgba", "l", "p")]
    prompts = ["caption en", "answer en what colour is the cat in the park?", "", PROMPTS[3]]
    for suffixes in (None, ["a cat", "", "a long answer with <loc0001> and more words", "x"]):
        ours = proc(images, prompts, suffixes)
        theirs = oracle_batch(oracle, images, prompts, suffixes)
        for name in ("input_ids", "token_type_ids", "attention_mask", "pixel_values"):
            assert ours[name].dtype == theirs[name].dtype, name
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
        assert ours["input_ids"].dtype == np.int64 and ours["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
        shortest = int(np.argmin(ours["attention_mask"].sum(1)))
        assert ours["input_ids"][shortest, 0] == proc.pad_token_id and ours["attention_mask"][shortest, 0] == 0


# ---------------------------------------------------------------- decoding

@pytest.mark.parametrize("prompt", [p for p in PROMPTS if "<eos>" not in p])
def test_decode_gives_back_the_prompt_and_suffix(proc, prompt):
    ids, _ = proc.tokenize_prompt(prompt, "a cat <loc0001>")
    # A literal "▁" in the text is the tokenizer's own space marker: it comes back as a space (as in transformers).
    assert proc.decode(ids) == prompt.replace("▁", " ") + "\n" + "a cat <loc0001>"


def test_decode_stops_at_eos_and_keeps_loc_and_seg_tokens_readable(proc):
    ids = proc.encode_text("<loc0010><loc0020><loc0500><loc0900> cat ; <seg005>") + [proc.eos_token_id]
    ids += proc.encode_text("after eos")
    assert proc.decode(ids) == "<loc0010><loc0020><loc0500><loc0900> cat ; <seg005>"
    assert proc.decode([proc.pad_token_id, proc.bos_token_id, proc.image_token_index, proc.vocab_size + 5] + ids[:1]) \
        == "<loc0010>"
    assert proc.decode([proc.bos_token_id, proc.image_token_index] + ids[:1] + [proc.eos_token_id],
                       skip_special_tokens=False) == "<bos><image><loc0010><eos>"


def test_random_ids_decode_like_transformers(proc, oracle):
    rng = random.Random(1)
    for _ in range(1000):
        ids = [i for i in (rng.randrange(proc.vocab_size) for _ in range(rng.randint(0, 12))) if i != proc.eos_token_id]
        assert proc.decode(ids) == oracle.tokenizer.decode(ids, skip_special_tokens=True), ids
        assert proc.decode(ids, skip_special_tokens=False) == oracle.tokenizer.decode(ids), ids


def test_decode_token_turns_the_word_marker_into_a_space(proc):
    assert proc.decode_token(proc.sp.piece_to_id("▁dog")) == " dog"
    assert proc.decode_token(proc.sp.piece_to_id("<0x41>")) == "A"
    assert proc.decode_token(proc.sp.piece_to_id("<0xE6>")) == "\ufffd"
    assert proc.decode_token(proc.sp.piece_to_id("<loc0042>")) == "<loc0042>"
    assert proc.decode_token(proc.eos_token_id) == "" and proc.decode_token(proc.image_token_index) == ""


def test_stream_emits_multibyte_characters_whole(proc):
    text = "Café 日本 🐱 cat <loc0003>"
    ids = proc.encode_text(text)
    stream = proc.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert "\ufffd" not in "".join(pieces)
    assert "".join(proc.decode_token(i) for i in proc.encode_text("caption en")) == "caption en"


# ---------------------------------------------------------------- errors

def test_corrupt_image_file_is_a_processor_error_naming_the_file(proc, tmp_path):
    path = tmp_path / "broken.png"
    _image("rgb_downscale_non_square").save(path)
    path.write_bytes(path.read_bytes()[:100])  # truncated mid-stream
    with pytest.raises(ProcessorError, match="broken.png"):
        proc([str(path)], ["caption en"])


def test_text_file_given_as_image_is_a_processor_error_naming_the_file(proc, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(ProcessorError, match="notes.txt"):
        proc.encode_image(path)
    with pytest.raises(ProcessorError, match="missing.jpg.*not found"):
        proc.encode_image(tmp_path / "missing.jpg")


def test_non_image_objects_are_processor_errors(proc):
    with pytest.raises(ProcessorError, match="image 1"):
        proc([_image("l"), 42], ["a", "b"])
    with pytest.raises(ProcessorError, match="uint8"):
        proc.encode_image(np.zeros((4, 4, 3), dtype=np.float32))


def test_missing_tokenizer_model_is_a_processor_error_naming_it(model_dir, tmp_path):
    (tmp_path / "config.json").write_bytes(open(os.path.join(model_dir, "config.json"), "rb").read())
    with pytest.raises(ProcessorError, match="tokenizer.model"):
        Processor.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(ProcessorError, match="tokenizer.model"):
        Processor.from_pretrained(tmp_path)


def test_images_and_prompts_count_mismatch_is_a_processor_error(proc):
    with pytest.raises(ProcessorError, match="2 images for 1 prompts"):
        proc([_image("l"), _image("l")], ["caption en"])
    with pytest.raises(ProcessorError, match="1 suffixes for 2 prompts"):
        proc([_image("l"), _image("l")], ["a", "b"], ["x"])


def test_image_token_inside_a_prompt_is_a_processor_error(proc):
    with pytest.raises(ProcessorError, match="<image>"):
        proc.tokenize_prompt("caption <image> en")


def test_processor_error_is_a_value_error():
    assert issubclass(ProcessorError, ValueError)


def test_tiny_tokenizer_is_deterministic_and_gemma_shaped(model_dir, tmp_path):
    import sentencepiece as spm
    again = _load_tiny_tokenizer_module().write_tiny_tokenizer(str(tmp_path))
    assert open(again, "rb").read() == open(os.path.join(model_dir, "tokenizer.model"), "rb").read()
    sp = spm.SentencePieceProcessor(model_file=again)
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    assert sp.encode("\n") == [sp.piece_to_id("\n")] and sp.encode("12") == [sp.piece_to_id("1"), sp.piece_to_id("2")]
    assert sp.encode("<loc1023><seg000>") == [sp.piece_to_id("<loc1023>"), sp.piece_to_id("<seg000>")]
    assert "".join(sp.encode("  x", out_type=str)) == "▁▁x"  # whitespace kept, no dummy prefix

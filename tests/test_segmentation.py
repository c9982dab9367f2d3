"""Segmentation: the NumPy VQ-VAE decoder equals the same network built from torch's nn layers (an
independent implementation, loaded strictly from the vae-oid.npz state dict); answers -> masks in
image pixels placed as big_vision's evaluator places them; invalid sequences reported, not crashed."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import assert_one_line_error, rel_err, run_cli
from refpg.errors import CheckpointError, InputError
from refpg.segmentation import (VQVAE, conv_transpose2d, encode_masks, encoder_outputs, load_vae, mask_in_image,
                                parse_segments)

torch = pytest.importorskip("torch")
nn = torch.nn


def vae_state_dict(rng, codes=128, dim=512, channels=128, scale=0.1) -> dict[str, np.ndarray]:
    """Random tensors with the names and PyTorch layouts of big_vision's vae-oid.npz (codebook
    [128, 512], 128 decoder channels), with an encoder (four stride-2 4×4 convs, two residual
    blocks, a 1×1 conv to the code vectors)."""
    def t(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    sd = {"_vq_vae._embedding": t(codes, dim)}
    c_in = 1
    for i, c_out in ((0, channels // 8), (2, channels // 4), (4, channels // 2), (6, channels)):
        sd[f"encoder.{i}.weight"], sd[f"encoder.{i}.bias"] = t(c_out, c_in, 4, 4) * 3, t(c_out)
        c_in = c_out
    for block in ("encoder.8.net", "encoder.9.net"):
        for i, k in ((0, 3), (2, 3), (4, 1)):
            sd[f"{block}.{i}.weight"], sd[f"{block}.{i}.bias"] = t(channels, channels, k, k), t(channels)
    sd["encoder.10.weight"], sd["encoder.10.bias"] = t(dim, channels, 1, 1), t(dim)
    sd["decoder.0.weight"], sd["decoder.0.bias"] = t(channels, dim, 1, 1), t(channels)
    for block in ("decoder.2.net", "decoder.3.net"):
        for i, k in ((0, 3), (2, 3), (4, 1)):
            sd[f"{block}.{i}.weight"], sd[f"{block}.{i}.bias"] = t(channels, channels, k, k), t(channels)
    c = channels
    for i, out in ((4, channels), (6, channels // 2), (8, channels // 4), (10, channels // 8)):
        sd[f"decoder.{i}.weight"], sd[f"decoder.{i}.bias"] = t(c, out, 4, 4), t(out)  # ConvTranspose: [in, out, k, k]
        c = out
    sd["decoder.12.weight"], sd["decoder.12.bias"] = t(1, c, 1, 1), t(1)
    return sd


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(c, c, 1))

    def forward(self, x):
        return x + self.net(x)


def torch_decoder(sd: dict[str, np.ndarray]):
    """UViM's mask decoder as a torch nn.Sequential whose parameter names are the file's, loaded strictly."""
    dim, c = sd["decoder.0.weight"].shape[1], sd["decoder.0.weight"].shape[0]
    layers = [nn.Conv2d(dim, c, 1), nn.ReLU(), ResBlock(c), ResBlock(c)]
    for c_in, c_out in ((c, c), (c, c // 2), (c // 2, c // 4), (c // 4, c // 8)):
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
    layers.append(nn.Conv2d(c // 8, 1, 1))
    decoder = nn.Sequential(*layers)
    decoder.load_state_dict({k[len("decoder."):]: torch.from_numpy(v) for k, v in sd.items()
                             if k.startswith("decoder.")}, strict=True)
    return decoder


def torch_codes(sd, masks: np.ndarray) -> np.ndarray:
    """The encoder as torch layers (stride-2 4×4 convs with padding 1: TensorFlow's SAME on even
    sizes), then the nearest codebook row."""
    c = [sd[f"encoder.{i}.weight"].shape[0] for i in (0, 2, 4, 6)]
    encoder = nn.Sequential(nn.Conv2d(1, c[0], 4, 2, 1), nn.ReLU(), nn.Conv2d(c[0], c[1], 4, 2, 1), nn.ReLU(),
                            nn.Conv2d(c[1], c[2], 4, 2, 1), nn.ReLU(), nn.Conv2d(c[2], c[3], 4, 2, 1), nn.ReLU(),
                            ResBlock(c[3]), ResBlock(c[3]), nn.Conv2d(c[3], sd["encoder.10.weight"].shape[0], 1))
    encoder.load_state_dict({k[len("encoder."):]: torch.from_numpy(v) for k, v in sd.items()
                             if k.startswith("encoder.")}, strict=True)
    with torch.no_grad():
        z = encoder(torch.from_numpy(2 * masks[:, None] - 1))  # [N, D, 4, 4]
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return torch.cdist(flat, torch.from_numpy(sd["_vq_vae._embedding"])).argmin(1).reshape(len(masks), 16).numpy()


def torch_masks(sd, codes: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(sd["_vq_vae._embedding"][codes].reshape(len(codes), 4, 4, -1)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return torch_decoder(sd)(x)[:, 0].numpy()  # [N, 64, 64]


def write(tmp_path, sd, name="vae.npz") -> str:
    path = str(tmp_path / name)
    np.savez(path, **sd)
    return path


@pytest.mark.parametrize("codes,dim,channels", [(128, 512, 128), (32, 8, 16)], ids=["vae-oid-shapes", "small"])
def test_decoder_equals_torch_nn_layers_on_the_vae_oid_layout(tmp_path, codes, dim, channels):
    rng = np.random.default_rng(codes)
    sd = vae_state_dict(rng, codes, dim, channels)
    vae = VQVAE.load(write(tmp_path, sd))
    ids = rng.integers(0, codes, size=(3, 16))
    ids[0, :] = codes - 1  # the codebook's last row too
    got, want = vae.decode(ids), torch_masks(sd, ids)
    assert got.shape == (3, 64, 64) and got.dtype == np.float32
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)
    assert np.abs(want).max() > 1e-3  # the comparison is not between two near-zero maps


def test_encoder_gives_the_codes_of_the_same_network_in_torch(tmp_path):
    from refpg.segmentation import encode_masks

    rng = np.random.default_rng(5)
    sd = vae_state_dict(rng, 64, 8, 16)
    vae = VQVAE.load(write(tmp_path, sd))
    masks = (rng.random((6, 64, 64)) < np.linspace(0.1, 0.9, 6)[:, None, None]).astype(np.float32)
    codes = encode_masks(vae, masks)
    assert codes.shape == (6, 16) and codes.dtype == np.int64
    np.testing.assert_array_equal(codes, torch_codes(sd, masks))
    assert len(np.unique(codes)) > 4  # not one code for everything
    no_encoder = VQVAE.from_state_dict({k: v for k, v in sd.items() if not k.startswith("encoder.")})
    with pytest.raises(InputError, match="no encoder"):
        encode_masks(no_encoder, masks)
    with pytest.raises(InputError, match=r"\[N, 64, 64\]"):
        encode_masks(vae, masks[:, :32])


@pytest.mark.parametrize("h,w,c_in,c_out", [(1, 1, 1, 1), (4, 4, 3, 5), (3, 5, 2, 4), (8, 8, 16, 8)])
def test_conv_transpose2d_equals_torch_conv_transpose2d(h, w, c_in, c_out):
    rng = np.random.default_rng(h * w + c_in)
    x = rng.standard_normal((2, h, w, c_in)).astype(np.float32)
    weight, bias = rng.standard_normal((c_in, c_out, 4, 4)).astype(np.float32), rng.standard_normal(c_out).astype(np.float32)
    layer = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
    layer.weight.data, layer.bias.data = torch.from_numpy(weight), torch.from_numpy(bias)
    with torch.no_grad():
        want = layer(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = conv_transpose2d(x, weight, bias)
    assert got.shape == (2, 2 * h, 2 * w, c_out)
    assert rel_err(got, want) <= 1e-6


def constant_vae(logit: float, codes: int = 128) -> VQVAE:
    """A decoder whose output is `logit` everywhere (all weights zero, the last bias = logit)."""
    sd = {k: np.zeros_like(v) for k, v in vae_state_dict(np.random.default_rng(0), codes, 8, 16).items()}
    sd["decoder.12.bias"][:] = logit
    return VQVAE.from_state_dict(sd)


def answer(y0, x0, y1, x1, label="cat", codes=(1,) * 16) -> str:
    return "".join(f"<loc{v:04d}>" for v in (y0, x0, y1, x1)) + "".join(f"<seg{c:03d}>" for c in codes) + " " + label


def test_mask_fills_the_box_big_vision_computes_in_pixels():
    # 200 wide, 100 high: y = int(v / 1023 * 100), x = int(v / 1023 * 200), as big_vision's evaluator
    (seg,) = parse_segments(answer(100, 300, 700, 1023), 200, 100, constant_vae(1.0))
    assert seg.problem is None and seg.label == "cat" and seg.codes == (1,) * 16
    assert (seg.box.y0, seg.box.x0, seg.box.y1, seg.box.x1) == (9, 58, 68, 200)
    want = np.zeros((100, 200), bool)
    want[9:68, 58:200] = True
    assert seg.mask.dtype == bool and seg.mask.shape == (100, 200)
    np.testing.assert_array_equal(seg.mask, want)
    for logit in (-1.0, 0.0):  # strictly above 0 is inside
        (empty,) = parse_segments(answer(100, 300, 700, 1023), 200, 100, constant_vae(logit))
        assert empty.problem is None and not empty.mask.any()


def test_logits_are_resized_bilinearly_into_the_box_and_thresholded_at_zero():
    logits = np.where(np.arange(64) < 32, 1.0, -1.0)[None, :].repeat(64, 0).astype(np.float32)  # left half +1
    from refpg.detection import Box

    mask = mask_in_image(logits, Box("x", 2, 3, 6, 13), 20, 10)  # a 10 x 4 box
    want = np.zeros((10, 20), bool)
    want[2:6, 3:8] = True  # the left 5 of its 10 columns
    np.testing.assert_array_equal(mask, want)


def test_several_objects_and_invalid_sequences_are_reported_not_crashed():
    vae = constant_vae(1.0, codes=64)
    text = " ; ".join([
        answer(0, 0, 512, 512, "a"),
        answer(0, 0, 512, 512, "b", codes=(1,) * 15),  # a <seg> token missing
        answer(600, 0, 500, 512, "c"),  # y2 <= y1
        answer(0, 0, 512, 512, "d", codes=(100,) + (1,) * 15),  # past this VQ-VAE's 64 codes
        "<loc1050><loc0000><loc0512><loc0512>" + "<seg001>" * 16 + " e",  # past <loc1023>
        "<seg001>" * 16 + "<loc0000><loc0000><loc0512><loc0512> f",  # out of order
        answer(0, 0, 1, 1, "g"),  # under one pixel of a 64 x 64 image
        answer(512, 512, 1023, 1023, "h"),
    ])
    segs = parse_segments(text, 64, 64, vae)
    assert [s.label for s in segs] == list("abcdefgh")
    problems = [s.problem for s in segs]
    assert problems[0] is None and problems[7] is None
    assert "16 <seg>" in problems[1] and "15 <seg>" in problems[1]
    assert "empty box" in problems[2]
    assert "<seg100>" in problems[3] and "64 codes" in problems[3]
    assert "<loc1050>" in problems[4]
    assert "out of order" in problems[5]
    assert "under one pixel" in problems[6]
    assert all(s.mask is None for s in segs[1:7])
    assert segs[0].mask[:32, :32].all() and not segs[0].mask[32:, :].any()
    assert segs[7].mask[32:, 32:].all() and not segs[7].mask[:32, :].any()
    assert parse_segments("a plain caption", 64, 64, vae) == []


def test_decode_refuses_codes_it_cannot_look_up():
    vae = constant_vae(1.0, codes=32)
    for bad, needle in [(np.zeros((2, 15), np.int64), "[N, 16]"), (np.zeros((16,), np.int64), "[N, 16]"),
                        (np.zeros((1, 16), np.float32), "integers"), (np.full((1, 16), 32), "[0, 31]"),
                        (np.full((1, 16), -1), "[0, 31]")]:
        with pytest.raises(InputError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            vae.decode(bad)
    assert vae.decode(np.zeros((0, 16), np.int64)).shape == (0, 64, 64)


@pytest.mark.parametrize("break_it,needle", [
    (lambda sd: sd.pop("decoder.6.weight"), "missing tensor 'decoder.6.weight'"),
    (lambda sd: sd.pop("_vq_vae._embedding"), "missing tensor '_vq_vae._embedding'"),
    (lambda sd: sd.__setitem__("decoder.0.weight", np.zeros((16, 9, 1, 1), np.float32)), "decoder.0.weight"),
    (lambda sd: sd.__setitem__("decoder.2.net.0.weight", np.zeros((16, 16, 5, 5), np.float32)), "decoder.2.net.0"),
    (lambda sd: sd.__setitem__("decoder.8.bias", np.zeros(3, np.float32)), "decoder.8"),
    (lambda sd: sd.__setitem__("decoder.12.weight", np.zeros((2, 2, 1, 1), np.float32)), "decoder.12"),
    (lambda sd: sd["decoder.4.weight"].__setitem__((0, 0, 0, 0), np.nan), "NaN"),
    (lambda sd: sd.__setitem__("decoder.4.bias", np.zeros(16, np.int32)), "float"),
])
def test_malformed_vae_files_are_named_errors(tmp_path, break_it, needle):
    sd = vae_state_dict(np.random.default_rng(1), 32, 8, 16)
    break_it(sd)
    with pytest.raises(CheckpointError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        VQVAE.load(write(tmp_path, sd))


def test_unreadable_vae_files_are_checkpoint_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        VQVAE.load(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        VQVAE.load(junk)
    monkeypatch.setenv("REFPG_VAE", str(junk))
    with pytest.raises(CheckpointError, match="REFPG_VAE"):
        load_vae()
    monkeypatch.setenv("REFPG_VAE", "")
    assert load_vae() is None


def test_cli_bad_vae_is_a_one_line_error(tmp_path):
    image = os.path.join(os.path.dirname(__file__), "data", "missing.png")  # never read: the VAE is checked first
    assert_one_line_error(run_cli("generate", "--image", image, "--prompt", "segment cat",
                                  "--vae", str(tmp_path / "nope.npz")), "does not exist")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"garbage")
    assert_one_line_error(run_cli("generate", "--image", image, "--prompt", "segment cat",
                                  env={"REFPG_VAE": str(junk)}), "REFPG_VAE")


def test_cli_draws_the_masks_of_a_segmentation_answer(tmp_path, monkeypatch, capsys):
    """The CLI's path from a segmentation answer to a drawn picture: the model's answer is scripted
    (the shipped demo model does not segment yet), everything after it is the real code."""
    from PIL import Image

    import refpg.cli
    from refpg.model import PaliGemma
    from refpg.processor import Processor

    image = tmp_path / "grey.png"
    Image.new("RGB", (80, 40), (128, 128, 128)).save(image)
    vae_path = write(tmp_path, {k: np.zeros_like(v) for k, v in vae_state_dict(np.random.default_rng(0), 128, 8, 16).items()}
                     | {"decoder.12.bias": np.ones(1, np.float32)})
    proc = Processor.from_pretrained(refpg.DEMO_MODEL)
    text = answer(0, 0, 512, 512, "cat") + " ; " + answer(0, 0, 512, 512, "dog", codes=(1,) * 15)
    scripted = proc.encode_text(text)
    assert proc.decode(scripted) == text

    def generate_stream(self, batch, max_new_tokens, **kw):
        for t in list(scripted) + [proc.eos_token_id]:
            yield np.array([t])

    monkeypatch.setattr(PaliGemma, "generate_stream", generate_stream)
    out = tmp_path / "drawn.png"
    code = refpg.cli.main(["generate", "--image", str(image), "--prompt", "segment cat", "--backend", "numpy",
                           "--vae", vae_path, "--draw", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "object 2 (dog): no mask" in err and "decoded 1 mask(s) of 2 objects" in err
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    inside, outside = drawn[10, 10], drawn[30, 60]  # the mask covers rows 0-19, columns 0-39
    assert tuple(outside) == (128, 128, 128)
    assert tuple(inside) != (128, 128, 128)  # tinted by the mask


@pytest.mark.parametrize("k,stride,size", [(3, 2, 8), (4, 2, 8), (3, 1, 5), (1, 1, 4), (4, 2, 5)])
def test_conv2d_pads_as_tensorflows_same(k, stride, size):
    """TensorFlow's SAME: output ⌈in / stride⌉, padding (out - 1)·stride + k - in in all, the smaller
    half before (e.g. k 3, stride 2, 8 pixels: 0 before, 1 after), which big_vision's encoder uses."""
    from refpg.segmentation import conv2d

    rng = np.random.default_rng(k * 10 + stride + size)
    x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    weight, bias = rng.standard_normal((5, 3, k, k)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    before, after = total // 2, total - total // 2
    padded = torch.nn.functional.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (before, after, before, after))
    want = torch.nn.functional.conv2d(padded, torch.from_numpy(weight), torch.from_numpy(bias), stride=stride)
    got = conv2d(x, weight, bias, stride=stride)
    assert got.shape == (2, out, out, 5)
    assert rel_err(got, want.permute(0, 2, 3, 1).numpy()) <= 1e-6


def test_a_vae_npz_beside_the_checkpoint_is_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("REFPG_VAE", raising=False)
    assert load_vae(None, beside=tmp_path) is None
    write(tmp_path, vae_state_dict(np.random.default_rng(2), 32, 8, 16), "vae.npz")
    assert load_vae(None, beside=tmp_path).num_codes == 32
    other = write(tmp_path, vae_state_dict(np.random.default_rng(3), 64, 8, 16), "other.npz")
    monkeypatch.setenv("REFPG_VAE", other)  # the environment, then --vae, come first
    assert load_vae(None, beside=tmp_path).num_codes == 64
    assert load_vae(os.path.join(tmp_path, "vae.npz"), beside=tmp_path).num_codes == 32


@pytest.mark.parametrize("side", [64, 37, 100, 1023])
def test_formatted_segments_read_back_as_the_same_pixel_boxes(side):
    """format_segments bins each whole-pixel edge so that big_vision's reading gives it back exactly."""
    from refpg.detection import Box
    from refpg.segmentation import format_segments

    vae = VQVAE.from_state_dict(vae_state_dict(np.random.default_rng(4), 128, 8, 16))
    rng = np.random.default_rng(side)
    for _ in range(40):
        y0, y1 = sorted(rng.choice(side + 1, 2, replace=False))
        x0, x1 = sorted(rng.choice(side + 1, 2, replace=False))
        codes = tuple(int(c) for c in rng.integers(0, 128, 16))
        text = format_segments([(Box("red circle", y0, x0, y1, x1), codes)], side, side)
        (seg,) = parse_segments(text, side, side, vae)
        assert seg.problem is None and seg.label == "red circle" and seg.codes == codes
        assert (seg.box.y0, seg.box.x0, seg.box.y1, seg.box.x1) == (y0, x0, y1, x1)
    edges = format_segments([(Box("a", 0, 0, side, side), (0,) * 16)], side, side)
    assert edges.startswith("<loc0000><loc0000><loc1023><loc1023>")


def test_a_scenes_segment_answers_are_its_boxes_and_the_codes_of_its_masks():
    from refpg import scenes

    vae = VQVAE.from_state_dict(vae_state_dict(np.random.default_rng(5), 128, 8, 16))
    scene = scenes.scene_for_seed(3, scenes.FREE_WORLD)
    answers = {p: a for p, a in scenes.tasks(scene, vae) if scenes.task_kind(p) == "segment"}
    assert len(answers) == len(scene.objects) and not any(scenes.task_kind(p) == "segment" for p, _ in scenes.tasks(scene))
    for (colour, shape, box), mask in zip(scene.objects, scene.masks):
        (seg,) = parse_segments(answers[f"segment {colour} {shape}"], scenes.SIZE, scenes.SIZE, vae)
        assert seg.label == f"{colour} {shape}" and (seg.box.y0, seg.box.x0, seg.box.y1, seg.box.x1) == \
            (box.y0, box.x0, box.y1, box.x1)
        assert seg.codes == tuple(encode_masks(vae, scenes.box_mask(mask, box)[None])[0])


def test_the_demo_vae_trainer_writes_the_network_refpg_reads():
    """tools/train_vae.py's torch modules (TensorFlow SAME padding by hand) and its state-dict names
    give, through refpg's NumPy encoder and decoder, what the torch network itself computes."""
    import train_vae

    torch.manual_seed(0)
    encoder, decoder = train_vae.build(torch)
    masks = np.random.default_rng(6).uniform(size=(8, 64, 64)).astype(np.float32)  # noise: every pixel counts
    with torch.no_grad():
        z = encoder(2 * (torch.from_numpy(masks)[:, None] - 0.5))                  # [8, D, 4, 4]
        codebook = z.permute(0, 2, 3, 1).reshape(-1, train_vae.CODE_DIM)[::2] + 0.01  # 64 codes near the vectors
        _, codes = train_vae.quantize(torch, z, codebook)
        q = codebook[codes].reshape(len(masks), 4, 4, -1).permute(0, 3, 1, 2)
        logits = decoder(q)[:, 0].numpy()
    vae = VQVAE.from_state_dict(train_vae.state_dict(encoder, decoder, codebook))
    assert rel_err(encoder_outputs(vae, masks), z.permute(0, 2, 3, 1).numpy()) <= 1e-5
    assert len(np.unique(codes.numpy())) > 16 and np.array_equal(encode_masks(vae, masks), codes.numpy())
    assert rel_err(vae.decode(codes.numpy()), logits) <= 1e-5


def test_a_segment_answers_mask_iou_is_scored_against_the_objects_true_pixels():
    """scenes.mask_iou (eval_demo's and test_demo's measure): a mask filling the answer's box scores
    the fraction of the box the shape covers; a mask of another object, an empty mask and an answer
    that does not decode score 0."""
    from refpg import scenes

    scene = next(s for s in map(lambda seed: scenes.scene_for_seed(seed, scenes.FREE_WORLD), range(100))
                 if len(s.objects) >= 2)
    tasks = [(p, a) for p, a in scenes.tasks(scene, constant_vae(1.0)) if scenes.task_kind(p) == "segment"]
    for (prompt, expected), (_, _, box), cover in zip(tasks, scene.objects, scene.masks):
        area = (box.y1 - box.y0) * (box.x1 - box.x0)
        assert scenes.mask_iou(scene, prompt, expected, constant_vae(1.0)) == pytest.approx((cover > 0.5).sum() / area)
        assert scenes.mask_iou(scene, prompt, expected, constant_vae(-1.0)) == 0.0
    (p0, a0), (p1, a1) = tasks[:2]
    assert scenes.mask_iou(scene, p0, a1, constant_vae(1.0)) == 0.0    # the other object's answer
    assert scenes.mask_iou(scene, p0, a0[:40], constant_vae(1.0)) == 0.0  # cut short: does not decode

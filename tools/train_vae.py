#!/usr/bin/env python3
"""Train the demo model's tiny VQ-VAE: the mask codec behind its `segment` answers.

PaliGemma answers `segment X` with sixteen <seg> codes per object, the indices of a VQ-VAE's
codebook (big_vision's vae-oid.npz; refpg.segmentation decodes them). The demo model's shapes
world needs its own, much smaller one in the same layout: this script trains it with torch on the
masks of the world's shapes and writes it as an .npz that `refpg.segmentation.VQVAE.load` reads
(encoder included, so that the training data's codes are refpg's own `encode_masks`).

What it learns: a segmentation answer's mask is the object's coverage inside its box, resized to
64 × 64 (what big_vision's training data encodes). A shape's box is a whole number of pixels on each
side, so that mask depends on the shape (circle, square, triangle) and the side (10…40 px) alone:
93 masks in all, every one of them in the training set. Channels 32/16/8/4 (vae-oid.npz: 128/64/32/16),
code vectors of 16 numbers, 128 codes (as many as PaliGemma's <seg> tokens).

The network is the layout refpg.segmentation reads — encoder: four 3×3 stride-2 convolutions with
ReLU, two residual blocks, a 1×1 convolution to the code vectors; decoder: 1×1 convolution and ReLU,
two residual blocks, four 4×4 stride-2 transposed convolutions with ReLU, a 1×1 convolution to the
mask logits — with TensorFlow's 'SAME' padding as refpg's NumPy convolutions have it. Loss: the
binary cross-entropy of the decoded logits against the soft mask, plus the VQ-VAE codebook and
commitment terms (β 0.25), straight-through gradients; the codebook starts from encoder outputs.

    python tools/train_vae.py --out refpg/data/demo/vae.npz      # ~1 min on two threads
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from refpg import scenes  # noqa: E402
from refpg.detection import Box  # noqa: E402

CHANNELS = 32     # C: the residual blocks' width (decoder up-convolutions: C/2, C/4, C/8, C/8)
CODE_DIM = 16     # D
NUM_CODES = 128   # PaliGemma has <seg000>…<seg127>


def world_masks() -> np.ndarray:
    """float32 [93, 64, 64]: every shape at every side of the free world, as a segmentation answer's mask."""
    masks = []
    for shape in scenes.SHAPES:
        for side in scenes.FREE_WORLD.sizes:
            box = Box("", 0.0, 0.0, float(side), float(side))
            masks.append(scenes.box_mask(scenes.coverage(shape, box), box))
    return np.stack(masks)


def build(torch):
    nn, F = torch.nn, torch.nn.functional

    def same(x, k, stride):  # TensorFlow's SAME padding: the smaller half before
        pad = max((-(-x.shape[-1] // stride) - 1) * stride + k - x.shape[-1], 0)
        return F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    class Conv(nn.Conv2d):
        def forward(self, x):
            return super().forward(same(x, self.kernel_size[0], self.stride[0]))

    class Res(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.net = nn.Sequential(Conv(c, c, 3), nn.ReLU(), Conv(c, c, 3), nn.ReLU(), Conv(c, c, 1))

        def forward(self, x):
            return self.net(x) + x

    c = CHANNELS
    encoder = nn.Sequential(Conv(1, c // 8, 3, 2), nn.ReLU(), Conv(c // 8, c // 4, 3, 2), nn.ReLU(),
                            Conv(c // 4, c // 2, 3, 2), nn.ReLU(), Conv(c // 2, c, 3, 2), nn.ReLU(),
                            Res(c), Res(c), Conv(c, CODE_DIM, 1))
    up = [(c, c // 2), (c // 2, c // 4), (c // 4, c // 8), (c // 8, c // 8)]
    decoder = nn.Sequential(Conv(CODE_DIM, c, 1), nn.ReLU(), Res(c), Res(c),
                            *[m for a, b in up for m in (nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ReLU())],
                            Conv(c // 8, 1, 1))
    return encoder, decoder


def quantize(torch, z, codebook):
    """z [N, D, 4, 4] -> (nearest codebook vectors, straight-through), codes [N, 16]."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])                      # [N·16, D]
    codes = torch.cdist(flat, codebook).argmin(1)
    q = codebook[codes].reshape(z.shape[0], 4, 4, -1).permute(0, 3, 1, 2)       # [N, D, 4, 4]
    return q, codes.reshape(len(z), 16)


def train(out: str, steps: int, seed: int, threads: int) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    masks = torch.from_numpy(world_masks())[:, None]                            # [M, 1, 64, 64]
    encoder, decoder = build(torch)
    with torch.no_grad():  # codebook from encoder outputs of random masks (no dead codes at the start)
        z = encoder(2 * (masks - 0.5)).permute(0, 2, 3, 1).reshape(-1, CODE_DIM)
        codebook = torch.nn.Parameter(z[torch.randint(len(z), (NUM_CODES,))].clone() + 0.01 * torch.randn(NUM_CODES, CODE_DIM))
    params = [*encoder.parameters(), *decoder.parameters(), codebook]
    opt = torch.optim.Adam(params, lr=2e-3)
    start = time.perf_counter()
    for step in range(steps):
        batch = masks[torch.randint(len(masks), (32,))]
        z = encoder(2 * (batch - 0.5))
        q, _ = quantize(torch, z, codebook)
        logits = decoder(z + (q - z).detach())
        loss = (F.binary_cross_entropy_with_logits(logits, batch) + F.mse_loss(q, z.detach())
                + 0.25 * F.mse_loss(z, q.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, **state_dict(encoder, decoder, codebook))
    report(out)


def state_dict(encoder, decoder, codebook) -> dict[str, np.ndarray]:
    """The vae-oid.npz names: nn.Sequential's indices are the file's (encoder.8.net.0.weight, …)."""
    state = {"_vq_vae._embedding": codebook.detach()}
    for prefix, net in (("encoder", encoder), ("decoder", decoder)):
        state |= {f"{prefix}.{k}": v.detach() for k, v in net.state_dict().items()}
    return {k: v.numpy().astype(np.float32) for k, v in state.items()}


def report(path: str) -> None:
    """The codec's own quality, with refpg's NumPy encoder and decoder: mask IoU of decode(encode(m))."""
    from refpg.segmentation import VQVAE, encode_masks

    vae = VQVAE.load(path)
    masks = world_masks()
    codes = encode_masks(vae, masks)
    decoded = vae.decode(codes) > 0
    truth = masks > 0.5
    ious = (decoded & truth).sum((1, 2)) / np.maximum((decoded | truth).sum((1, 2)), 1)
    print(f"wrote {path}: {len(np.unique(codes))} codes used; decode(encode(mask)) IoU mean {ious.mean():.3f}, "
          f"min {ious.min():.3f} over the {len(masks)} masks", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the .npz to write (vae-oid.npz layout)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    train(args.out, args.steps, args.seed, args.threads)


if __name__ == "__main__":
    main()

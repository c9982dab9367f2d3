#!/usr/bin/env python3
"""Time one full-width layer of PaliGemma-3B-224, refpg NumPy beside transformers fp32 (torch CPU).

Random weights with the real shapes: a SigLIP encoder layer (256 tokens × 1152, MLP 4304, 16 heads)
and a Gemma decoder layer (2048 wide, MLP 16384, 8 heads, 1 kv head, head_dim 256) for a prefill of
256 image + 10 prompt tokens and for one decode step over that cache. Both sides run in the same
process on the same inputs; outputs are compared so the timing is of the same computation.

    python tools/bench_layers.py --repeat 3
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from bench import best_of
from refpg import gemma, vision
from refpg.config import TextConfig, VisionConfig
from refpg.formats import Matrix, to_float32
from refpg.weights import Linear, Norm, TextLayer, VisionLayer

VISION_3B = VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=224, patch_size=14)
TEXT_3B = TextConfig(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                     num_key_value_heads=1, head_dim=256, vocab_size=257216)
PREFIX = 256 + 10


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))


def vision_layer_weights(rng, c: VisionConfig) -> VisionLayer:
    D, F = c.hidden_size, c.intermediate_size
    lin = lambda o, i: Linear(Matrix(rand(rng, o, i, scale=i ** -0.5)), rand(rng, o, scale=0.1))  # noqa: E731
    norm = lambda: Norm(1 + rand(rng, D, scale=0.1), rand(rng, D, scale=0.1))  # noqa: E731
    return VisionLayer(norm(), lin(D, D), lin(D, D), lin(D, D), lin(D, D), norm(), lin(F, D), lin(D, F))


def text_layer_weights(rng, c: TextConfig) -> TextLayer:
    H, F, hd = c.hidden_size, c.intermediate_size, c.head_dim
    lin = lambda o, i: Linear(Matrix(rand(rng, o, i, scale=i ** -0.5)))  # noqa: E731
    norm = lambda: Norm(rand(rng, H, scale=0.1))  # noqa: E731
    return TextLayer(norm(), lin(c.num_attention_heads * hd, H), lin(c.num_key_value_heads * hd, H),
                     lin(c.num_key_value_heads * hd, H), lin(H, c.num_attention_heads * hd), norm(),
                     lin(F, H), lin(F, H), lin(H, F))


def torch_vision_layer(w: VisionLayer, c: VisionConfig):
    import torch
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    cfg = SiglipVisionConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                             num_attention_heads=c.num_attention_heads, patch_size=c.patch_size)
    cfg._attn_implementation = "sdpa"
    layer = SiglipEncoderLayer(cfg).eval()
    sd = {"layer_norm1.weight": w.layer_norm1.weight, "layer_norm1.bias": w.layer_norm1.bias,
          "layer_norm2.weight": w.layer_norm2.weight, "layer_norm2.bias": w.layer_norm2.bias}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        sd[f"self_attn.{name}.weight"] = to_float32(getattr(w, name).weight)
        sd[f"self_attn.{name}.bias"] = getattr(w, name).bias
    for name in ("fc1", "fc2"):
        sd[f"mlp.{name}.weight"] = to_float32(getattr(w, name).weight)
        sd[f"mlp.{name}.bias"] = getattr(w, name).bias
    layer.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    return layer


def torch_text_layer(w: TextLayer, c: TextConfig):
    import torch
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaRotaryEmbedding

    cfg = GemmaConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                      head_dim=c.head_dim, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    layer = GemmaDecoderLayer(cfg, 0).eval()
    sd = {"input_layernorm.weight": w.input_layernorm.weight,
          "post_attention_layernorm.weight": w.post_attention_layernorm.weight}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        sd[f"self_attn.{name}.weight"] = to_float32(getattr(w, name).weight)
    for name in ("gate_proj", "up_proj", "down_proj"):
        sd[f"mlp.{name}.weight"] = to_float32(getattr(w, name).weight)
    layer.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    return layer, GemmaRotaryEmbedding(cfg)


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported")
    ap.add_argument("--no-torch", action="store_true", help="time refpg only")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []

    # ---- vision layer ----
    vw = vision_layer_weights(rng, VISION_3B)
    x = rand(rng, 1, VISION_3B.num_patches, VISION_3B.hidden_size)
    out_np = vision.encoder_layer(x, vw, VISION_3B, 0)
    t_np = best_of(lambda: vision.encoder_layer(x, vw, VISION_3B, 0), args.repeat)
    t_pt = err = None
    if not args.no_torch:
        import torch

        tl = torch_vision_layer(vw, VISION_3B)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            run = lambda: tl(xt, None)  # noqa: E731
            out = run()
            out_pt = (out[0] if isinstance(out, tuple) else out).numpy()
            t_pt = best_of(run, args.repeat)
        err = rel(out_np, out_pt)
    rows.append(("vision layer (256 tokens)", t_np, t_pt, err))

    # ---- decoder layer: prefill and one decode step ----
    tw = text_layer_weights(rng, TEXT_3B)
    h = rand(rng, 1, PREFIX, TEXT_3B.hidden_size)
    h1 = rand(rng, 1, 1, TEXT_3B.hidden_size)

    def np_layer(cache, xs):
        T = xs.shape[1]
        start = cache.length
        valid, prefix = np.ones((1, T), bool), np.full((1, T), start == 0)
        positions = cache.reserve(valid, prefix)
        cos, sin = gemma.rope_cos_sin(positions, TEXT_3B.head_dim, TEXT_3B.rope_theta)
        mask = gemma.prefix_lm_mask(cache.key_valid, cache.key_prefix, start, T)
        y = gemma.decoder_layer(xs, tw, TEXT_3B, cos, sin, mask, cache, 0)
        cache.commit(T)
        return y

    one_layer = TextConfig(**{**TEXT_3B.__dict__, "num_hidden_layers": 1})

    def np_prefill():
        return np_layer(gemma.KVCache(one_layer, 1, PREFIX + 1), h)

    def np_decode_setup():
        cache = gemma.KVCache(one_layer, 1, PREFIX + 1)
        np_layer(cache, h)
        return cache

    pre_np = np_prefill()
    t_pre_np = best_of(np_prefill, args.repeat)
    caches = [np_decode_setup() for _ in range(args.repeat)]
    dec_np = np_layer(np_decode_setup(), h1)
    t_dec_np = best_of(lambda: np_layer(caches.pop(), h1), args.repeat)
    t_pre_pt = t_dec_pt = e_pre = e_dec = None
    if not args.no_torch:
        import torch
        from transformers import DynamicCache

        layer, rot = torch_text_layer(tw, TEXT_3B)
        cfg = layer.self_attn.config
        ht, h1t = torch.from_numpy(h), torch.from_numpy(h1)
        pos = torch.arange(1, PREFIX + 1)[None]
        pos1 = torch.tensor([[PREFIX + 1]])
        with torch.no_grad():
            bidirectional = torch.zeros(1, 1, PREFIX, PREFIX)  # the whole prefill is prefix

            def pt_prefill(cache=None):
                return layer(ht, attention_mask=bidirectional, position_ids=pos, cache=cache,
                             position_embeddings=rot(ht, pos))

            def pt_setup():
                cache = DynamicCache(config=cfg)
                pt_prefill(cache)
                return cache

            def pt_decode(cache):
                return layer(h1t, attention_mask=None, position_ids=pos1, cache=cache,
                             position_embeddings=rot(h1t, pos1))

            out = pt_prefill()
            e_pre = rel(pre_np, (out[0] if isinstance(out, tuple) else out).numpy())
            t_pre_pt = best_of(pt_prefill, args.repeat)
            out = pt_decode(pt_setup())
            e_dec = rel(dec_np, (out[0] if isinstance(out, tuple) else out).numpy())
            pt_caches = [pt_setup() for _ in range(args.repeat)]
            t_dec_pt = best_of(lambda: pt_decode(pt_caches.pop()), args.repeat)
    rows.append((f"decoder layer prefill ({PREFIX} tokens, bidirectional)", t_pre_np, t_pre_pt, e_pre))
    rows.append((f"decoder layer decode (1 token, {PREFIX} cached)", t_dec_np, t_dec_pt, e_dec))

    print(f"PaliGemma-3B-224 shapes, random fp32 weights, best of {args.repeat}; "
          f"{os.cpu_count()} CPUs; numpy {np.__version__}")
    print(f"{'':52s} {'refpg numpy':>12s} {'transformers':>13s} {'ratio':>7s} {'rel diff':>9s}")
    for name, a, b, e in rows:
        bt = f"{b * 1000:10.1f} ms" if b is not None else f"{'-':>13s}"
        ratio = f"{a / b:6.2f}x" if b is not None else f"{'-':>7s}"
        es = f"{e:9.1e}" if e is not None else f"{'-':>9s}"
        print(f"{name:52s} {a * 1000:9.1f} ms {bt} {ratio} {es}")
    print("ratio = refpg time / transformers time (lower is faster for refpg)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark refpg on real PaliGemma shapes (random weights), side by side in one run.

Per op (the shapes one layer uses) and end to end — image encode, prefill of 256 image + 10 prompt
tokens, per-token decode, and what a short answer costs (prefill + 10 × decode, derived) — for: refpg numpy, refpg cpp with fp32 weights, refpg cpp with bf16
weights, and transformers on torch CPU (fp32 and bf16) when installed. Decode is also compared with
its memory-bandwidth roofline: the bytes of weights one token reads ÷ the measured read bandwidth.

With a GPU (the cuda backend available) it also runs refpg cuda with bf16 weights, and reports
decode against the HBM roofline (bytes per token ÷ the measured device copy bandwidth) and prefill
against the bf16 tensor-core peak (`--tc-peak-tflops`, default the H100/H200 SXM dense figure).

Fewer layers (`--vision-layers`, `--text-layers`) keep it to minutes; the LM head (257216 × 2048)
is always whole. Image encode and prefill times are the best of `--repeat` runs. The cpp runs
decode in `--decode-steps` interleaved rounds (one step of each run, batches included, and one
read-bandwidth measurement per round), so that the ratios compare steps taken under the same
conditions on a host whose bandwidth moves; decode times are the best step.

    python tools/bench.py --shape pg1-224 --text-layers 2 --vision-layers 2 --repeat 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

# --threads N must reach OpenBLAS (numpy), torch and refpg before they start their pools.
if "--threads" in sys.argv:
    _n = sys.argv[sys.argv.index("--threads") + 1]
    os.environ.update(OPENBLAS_NUM_THREADS=_n, OMP_NUM_THREADS=_n, MKL_NUM_THREADS=_n, REFPG_THREADS=_n)

import numpy as np  # noqa: E402

from refpg import backend  # noqa: E402
from refpg.backend import Selection  # noqa: E402
from refpg.backends import cuda  # noqa: E402
from refpg.backends.cpp import _C  # noqa: E402
from refpg.config import PaliGemmaConfig, TextConfig, VisionConfig  # noqa: E402
from refpg.model import PaliGemma  # noqa: E402
from refpg.formats import Format, Matrix, encode, quantize, to_float32  # noqa: E402
from refpg.weights import Linear, Norm, TextLayer, TextWeights, VisionLayer, VisionWeights, Weights  # noqa: E402

PROMPT_TOKENS = 10
ANSWER_TOKENS = 10  # a short caption
ANSWER = f"answer: prefill + {ANSWER_TOKENS} tokens"


SHAPES = {
    # name: (image size, text decoder, full layer counts (vision, text))
    "pg1-224": (224, dict(hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1), 18),
    "pg1-448": (448, dict(hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1), 18),
    "pg2-224": (224, dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                          num_key_value_heads=4, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                          query_pre_attn_scalar=256, sliding_window=4096), 26),
}


def config_for(shape: str, vision_layers: int, text_layers: int) -> PaliGemmaConfig:
    """Real PaliGemma shapes (SigLIP So400m/14 + Gemma 2B or Gemma 2 2B) with fewer layers."""
    image_size, text, _ = SHAPES[shape]
    vision = VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers,
                          num_attention_heads=16, image_size=image_size, patch_size=14)
    layer_types = None
    if text.get("model_type") == "gemma2":
        layer_types = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(text_layers))
    text_cfg = TextConfig(num_hidden_layers=text_layers, head_dim=256, vocab_size=257216, layer_types=layer_types,
                          **text)
    return PaliGemmaConfig(vision=vision, text=text_cfg, image_token_index=257152,
                           projection_dim=text["hidden_size"])


def random_weights(cfg: PaliGemmaConfig, seed: int = 0) -> Weights:
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=1.0):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    def lin(o, i, bias=True):
        return Linear(Matrix(rand(o, i, scale=i ** -0.5)), rand(o, scale=0.02) if bias else None)

    v, t = cfg.vision, cfg.text
    D, F = v.hidden_size, v.intermediate_size
    vision = VisionWeights(
        patch_embedding=lin(D, 3 * v.patch_size ** 2), position_embedding=rand(v.num_patches, D, scale=0.02),
        layers=[VisionLayer(Norm(1 + rand(D, scale=0.1), rand(D, scale=0.02)), lin(D, D), lin(D, D), lin(D, D),
                            lin(D, D), Norm(1 + rand(D, scale=0.1), rand(D, scale=0.02)), lin(F, D), lin(D, F))
                for _ in range(v.num_hidden_layers)],
        post_layernorm=Norm(1 + rand(D, scale=0.1), rand(D, scale=0.02)))
    H, hd = t.hidden_size, t.head_dim
    sandwich = t.model_type == "gemma2"
    layers = [TextLayer(Norm(rand(H, scale=0.1)), lin(t.num_attention_heads * hd, H, False),
                        lin(t.num_key_value_heads * hd, H, False), lin(t.num_key_value_heads * hd, H, False),
                        lin(H, t.num_attention_heads * hd, False), Norm(rand(H, scale=0.1)),
                        lin(t.intermediate_size, H, False), lin(t.intermediate_size, H, False),
                        lin(H, t.intermediate_size, False),
                        Norm(rand(H, scale=0.1)) if sandwich else None, Norm(rand(H, scale=0.1)) if sandwich else None)
              for _ in range(t.num_hidden_layers)]
    embed = Matrix(rand(t.vocab_size, H, scale=0.02))
    return Weights(vision=vision, projector=lin(H, D),
                   text=TextWeights(embed_tokens=embed, layers=layers, norm=Norm(rand(H, scale=0.1)), lm_head=embed))


def to_bf16(w: Weights) -> Weights:
    """The same weights with every matrix as bf16 bits (what a published BF16 checkpoint gives)."""
    def conv(obj):
        if isinstance(obj, Linear):
            return Linear(encode(to_float32(obj.weight), Format.BF16), obj.bias)
        if isinstance(obj, list):
            return [conv(o) for o in obj]
        if dataclasses.is_dataclass(obj) and not isinstance(obj, Norm):
            return type(obj)(**{f.name: conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        return obj
    out = conv(w)
    embed = encode(to_float32(w.text.embed_tokens), Format.BF16)
    out.text.embed_tokens = out.text.lm_head = embed
    return out


def to_affine(w: Weights, bits: int, group_size: int = 64) -> Weights:
    """The bf16 weights with the text model's matrices and embedding in MLX's affine quantization,
    quantized as `refpg quantize` does (refpg.formats.quantize, bf16 scales); the vision tower and
    projector stay bf16."""
    def q(m: Matrix) -> Matrix:
        return quantize(to_float32(m), bits, group_size, Format.BF16)

    text = w.text
    layers = [dataclasses.replace(layer, **{f.name: Linear(q(getattr(layer, f.name).weight))
                                            for f in dataclasses.fields(layer) if f.name.endswith("_proj")})
              for layer in text.layers]
    embed = q(text.embed_tokens)
    return dataclasses.replace(w, text=dataclasses.replace(text, layers=layers, embed_tokens=embed, lm_head=embed))


def weight_bytes_per_token(w: Weights) -> int:
    """Bytes of decoder weights one decode step reads: every text matrix and the LM head once."""
    total = w.text.lm_head.nbytes + w.text.norm.weight.nbytes
    for layer in w.text.layers:
        for f in dataclasses.fields(layer):
            part = getattr(layer, f.name)
            if part is not None:
                total += part.weight.nbytes
    return total


def bandwidth_probe(nbytes: int = 1 << 30):
    """A function giving bytes/s reading a matrix far larger than the caches, all cores, once: the
    better of a matrix-vector product with OpenBLAS (fp32) and with refpg._C (bf16), which read it
    once. Called between decode steps, so that each round of steps has its own figure."""
    w = np.full((nbytes // 4 // 4096, 4096), 0.5, np.float32)
    x = np.ones((4096, 1), np.float32)
    w16 = np.full((nbytes // 2 // 4096, 4096), 0x3f00, np.uint16)  # written: np.zeros pages would all map to one
    x16 = x.T.copy()

    def probe() -> float:
        bw = w.nbytes / best_of(lambda: w @ x, 1)
        if _C is not None and hasattr(_C, "linear"):
            bw = max(bw, w16.nbytes / best_of(lambda: _C.linear(x16, w16), 1))
        return bw
    return probe


def device_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes/s of GPU memory traffic in a device-to-device copy (each byte read once, written once)."""
    src = cuda.BACKEND.zeros((nbytes // 4,))
    src.copy()
    cuda.synchronize()

    def copy():
        src.copy()
        cuda.synchronize()

    return 2 * nbytes / best_of(copy, 5)


def prefill_flops(w: Weights, cfg: PaliGemmaConfig) -> float:
    """Matmul FLOPs of one prefill: every vision matrix for each patch, every text matrix for each of
    the image + prompt tokens, the LM head for the last one (attention scores not counted)."""
    def matrices(obj):
        if isinstance(obj, Linear):
            yield obj.weight
        elif isinstance(obj, list):
            for o in obj:
                yield from matrices(o)
        elif dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                yield from matrices(getattr(obj, f.name))

    n_img, n_txt = cfg.num_image_tokens, cfg.num_image_tokens + PROMPT_TOKENS
    def size(m: Matrix) -> int:
        return int(np.prod(m.shape))

    vision = sum(size(m) for m in matrices(w.vision)) + size(w.projector.weight)
    text = sum(size(m) for m in matrices(w.text.layers))
    return 2.0 * (vision * n_img + text * n_txt + size(w.text.lm_head))


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def inputs_for(cfg: PaliGemmaConfig, seed: int = 1):
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    ids = np.concatenate([np.full(n, cfg.image_token_index), [2], rng.integers(3, 250000, PROMPT_TOKENS - 1)])[None]
    pixels = rng.uniform(-1, 1, (1, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return ids.astype(np.int64), pixels, np.zeros_like(ids)


def time_prefill(model: PaliGemma, cfg, repeat: int, decode_steps: int):
    """Image encode and prefill (best of `repeat`) of the image + prompt, and a cache holding that
    prefill with room for `decode_steps` more tokens."""
    pixels = inputs_for(cfg)[1]
    out = {"image encode": best_of(lambda: model.encode_images(pixels), repeat),
           "prefill (image + prompt)": best_of(lambda: prefilled(model, cfg, decode_steps), repeat)}
    return out, prefilled(model, cfg, decode_steps)


def prefilled(model: PaliGemma, cfg, decode_steps: int, rows: int = 1):
    """A cache holding the prefill of `rows` copies of the image + prompt, with room for
    `decode_steps` more tokens."""
    ids, pixels, types = (np.repeat(a, rows, 0) for a in inputs_for(cfg))
    cache = model.new_cache(rows, ids.shape[1] + decode_steps + 1)
    model(ids, pixels, token_type_ids=types, cache=cache, last_only=True)
    return cache


def decode_step(model: PaliGemma, cache) -> float:
    """Seconds for one decode step: one token per row of the cache."""
    token = np.full((cache.batch_size, 1), 100)
    t = time.perf_counter()
    model(token, cache=cache, last_only=True)
    return time.perf_counter() - t


def time_refpg(model: PaliGemma, cfg, repeat: int, decode_steps: int) -> dict[str, float]:
    out, cache = time_prefill(model, cfg, repeat, decode_steps)
    out["decode, per token"] = min(decode_step(model, cache) for _ in range(decode_steps))
    return out


def time_decode_rounds(runs: dict, steps: int, probe) -> tuple[dict[str, list[float]], list[float]]:
    """Decode steps of several runs interleaved: each round times one step of every run (name ->
    (model, cache)) and the read bandwidth, so that every run of a round meets the same machine (a
    shared host's bandwidth moves by up to 2x within a minute). Returns the step times per run and the
    bandwidth per round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    bandwidth = []
    for _ in range(steps):
        for name, (model, cache) in runs.items():
            times[name].append(decode_step(model, cache))
        bandwidth.append(probe())
    return times, bandwidth


def time_threads(model: PaliGemma, cfg, repeat: int, decode_steps: int) -> dict[int, dict[str, float]]:
    """time_refpg with the native kernels on 1 thread, then on every core (refpg._C.set_num_threads)."""
    out = {}
    for n in sorted({1, os.cpu_count() or 1}):
        _C.set_num_threads(n)
        out[n] = time_refpg(model, cfg, repeat, decode_steps)
    _C.set_num_threads(0)  # back to the available cores
    return out


def time_torch(weights: Weights, cfg: PaliGemmaConfig, dtype: str, repeat: int, decode_steps: int) -> dict[str, float]:
    import torch
    from transformers import PaliGemmaConfig as HFConfig, PaliGemmaForConditionalGeneration

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    v, t = cfg.vision, cfg.text
    hf = HFConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                           patch_size=v.patch_size, image_size=v.image_size, vision_use_head=False),
        text_config=dict(model_type=t.model_type, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, vocab_size=t.vocab_size),
        image_token_index=cfg.image_token_index, projection_dim=cfg.projection_dim, vocab_size=t.vocab_size)
    model = PaliGemmaForConditionalGeneration(hf)
    sd = {}
    vt, lm = "model.vision_tower.", "model.language_model."
    pe = weights.vision.patch_embedding
    sd[vt + "embeddings.patch_embedding.weight"] = to_float32(pe.weight).reshape(v.hidden_size, 3, v.patch_size, v.patch_size)
    sd[vt + "embeddings.patch_embedding.bias"] = pe.bias
    sd[vt + "embeddings.position_embedding.weight"] = weights.vision.position_embedding
    for i, L in enumerate(weights.vision.layers):
        p = f"{vt}encoder.layers.{i}."
        for name in ("layer_norm1", "layer_norm2"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = getattr(L, name).weight, getattr(L, name).bias
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{name}.weight"], sd[p + f"self_attn.{name}.bias"] = to_float32(getattr(L, name).weight), getattr(L, name).bias
        for name in ("fc1", "fc2"):
            sd[p + f"mlp.{name}.weight"], sd[p + f"mlp.{name}.bias"] = to_float32(getattr(L, name).weight), getattr(L, name).bias
    sd[vt + "post_layernorm.weight"], sd[vt + "post_layernorm.bias"] = weights.vision.post_layernorm.weight, weights.vision.post_layernorm.bias
    sd["model.multi_modal_projector.linear.weight"] = to_float32(weights.projector.weight)
    sd["model.multi_modal_projector.linear.bias"] = weights.projector.bias
    sd[lm + "embed_tokens.weight"] = to_float32(weights.text.embed_tokens)
    sd[lm + "norm.weight"] = weights.text.norm.weight
    for i, L in enumerate(weights.text.layers):
        p = f"{lm}layers.{i}."
        sd[p + "input_layernorm.weight"] = L.input_layernorm.weight
        sd[p + "post_attention_layernorm.weight"] = L.post_attention_layernorm.weight
        if L.pre_feedforward_layernorm is not None:
            sd[p + "pre_feedforward_layernorm.weight"] = L.pre_feedforward_layernorm.weight
            sd[p + "post_feedforward_layernorm.weight"] = L.post_feedforward_layernorm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = to_float32(getattr(L, name).weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{name}.weight"] = to_float32(getattr(L, name).weight)
    tdtype = getattr(torch, dtype)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model = model.to(tdtype).eval()  # lm_head stays tied to the embeddings
    ids, pixels, types = inputs_for(cfg)
    ids_t, px, tt = torch.from_numpy(ids), torch.from_numpy(pixels).to(tdtype), torch.from_numpy(types)
    out = {}
    with torch.no_grad():
        out["image encode"] = best_of(lambda: model.model.get_image_features(px), repeat)

        def prefill():
            return model(input_ids=ids_t, pixel_values=px, token_type_ids=tt, use_cache=True, logits_to_keep=1)

        out["prefill (image + prompt)"] = best_of(prefill, repeat)
        cache = prefill().cache
        per_token, token = [], torch.tensor([[100]])
        for step in range(decode_steps):
            pos = torch.tensor([[ids.shape[1] + step + 1]])
            t0 = time.perf_counter()
            cache = model(input_ids=token, cache=cache, position_ids=pos, use_cache=True).cache
            per_token.append(time.perf_counter() - t0)
        out["decode, per token"] = min(per_token)
    return out


def time_ops(repeat: int) -> list[tuple[str, dict[str, float]]]:
    """Each op on one layer's real shapes, numpy vs every available backend."""
    rng = np.random.default_rng(2)
    x266 = rng.standard_normal((266, 2048), dtype=np.float32)
    x1 = x266[:1].copy()
    w_up = Matrix(rng.standard_normal((16384, 2048), dtype=np.float32) * np.float32(0.02))
    w_up16 = encode(w_up.data, Format.BF16)
    q = rng.standard_normal((1, 266, 8, 256), dtype=np.float32)
    kv = rng.standard_normal((1, 266, 1, 256), dtype=np.float32)
    mask = np.ones((1, 266, 266), bool)
    cases = [
        ("linear 266x2048 @ 2048x16384 (fp32 W)", "linear", (x266, w_up)),
        ("linear 266x2048 @ 2048x16384 (bf16 W)", "linear", (x266, w_up16)),
        ("linear 1x2048 @ 2048x16384 (fp32 W)", "linear", (x1, w_up)),
        ("linear 1x2048 @ 2048x16384 (bf16 W)", "linear", (x1, w_up16)),
        ("linear 1x2048 @ 2048x16384 (8-bit W)", "linear", (x1, quantize(w_up.data, 8, 64, Format.BF16))),
        ("linear 1x2048 @ 2048x16384 (4-bit W)", "linear", (x1, quantize(w_up.data, 4, 64, Format.BF16))),
        ("linear 1x2048 @ 2048x16384 (3-bit W)", "linear", (x1, quantize(w_up.data, 3, 64, Format.BF16))),
        ("linear 1x2048 @ 2048x16384 (6-bit W)", "linear", (x1, quantize(w_up.data, 6, 64, Format.BF16))),
        ("linear 266x2048 @ 2048x16384 (4-bit W)", "linear", (x266, quantize(w_up.data, 4, 64, Format.BF16))),
        ("attention prefill 266x266, 8 heads, MQA", "attention", (q, kv, kv, mask, 1 / 16, None)),
        ("attention decode 1x266, 8 heads, MQA", "attention", (q[:, -1:], kv, kv, mask[:, -1:], 1 / 16, None)),
        ("rms_norm 266x2048", "rms_norm", (x266, x266[0], 1e-6)),
        ("geglu 266x16384", "geglu", (np.resize(x266, (266, 16384)), np.resize(x266, (266, 16384)))),
    ]
    # Backend by backend, numpy last: OpenBLAS's threads keep spinning for a while after numpy's
    # matmuls and would slow whatever runs next on this machine's two cores.
    times_of: dict[str, dict[str, float]] = {name: {} for name, _, _ in cases}
    for be in ("cpp", "cuda", "numpy"):
        for name, op, args in cases:
            times = times_of[name]
            if be == "cuda" and any(isinstance(a, Matrix) and a.format is Format.AFFINE for a in args):
                continue  # quantized matrices go to the GPU through Selection.prepare_weights, not timed here
            if be in backend.OPS[op] and be not in backend.UNAVAILABLE:
                fn = backend.OPS[op][be]
                if be == "cuda":  # inputs already on the GPU; time until the kernels finish
                    dev_args = [cuda.as_device(a) if isinstance(a, np.ndarray) else
                                Matrix(cuda.as_device(a.data), a.format) if isinstance(a, Matrix) else a for a in args]

                    def run(fn=fn, dev_args=dev_args):
                        fn(*dev_args)
                        cuda.synchronize()
                else:
                    def run(fn=fn):
                        fn(*args)
                run()
                times[be] = best_of(run, repeat)
    return list(times_of.items())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="pg1-224", choices=sorted(SHAPES),
                    help="PaliGemma 1 at 224 or 448 pixels, or PaliGemma 2 at 224 (default pg1-224)")
    ap.add_argument("--vision-layers", type=int, default=27, help="SigLIP layers (27 in the real model)")
    ap.add_argument("--text-layers", type=int, default=None, help="decoder layers (default: all, 18 or 26)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true", help="skip transformers")
    ap.add_argument("--no-numpy", action="store_true", help="skip the (slow) NumPy reference end to end")
    ap.add_argument("--no-cpp", action="store_true", help="skip refpg cpp end to end")
    ap.add_argument("--no-quantized", action="store_true", help="skip the 8-bit and 4-bit (MLX affine) cpp runs")
    ap.add_argument("--batch-sizes", default="1,4,8", metavar="B,B,…",
                    help="decode batch sizes timed for cpp bf16 (default 1,4,8; empty: skip)")
    ap.add_argument("--no-threads", action="store_true", help="skip cpp bf16 on 1 thread vs every core")
    ap.add_argument("--skip-ops", action="store_true", help="skip the per-op table")
    ap.add_argument("--tc-peak-tflops", type=float, default=989.0,
                    help="bf16 dense tensor-core peak of the GPU, for the prefill fraction (default 989: H100/H200 SXM)")
    ap.add_argument("--threads", type=int, default=None,
                    help="compute threads for every library (OpenBLAS, torch, refpg); default: their own")
    args = ap.parse_args(argv)

    print(f"{os.cpu_count()} CPUs, threads per library: {args.threads or 'default'}; numpy {np.__version__}; refpg._C: "
          f"{'threads ' + str(_C.num_threads()) + ', linear on ' + _C.simd_path() if _C else 'not built'}")
    if not args.skip_ops:
        print("\nper op (one layer's shapes), best of", args.repeat)
        print(f"{'':44s} {'numpy':>10s} {'cpp':>10s} {'speedup':>8s} {'cuda':>10s} {'speedup':>8s}")
        for name, t in time_ops(args.repeat):
            cells = [f"{t['numpy'] * 1e3:8.2f}ms"]
            for be in ("cpp", "cuda"):
                cells.append(f"{t[be] * 1e3:8.3f}ms {t['numpy'] / t[be]:7.1f}x" if be in t else f"{'-':>10s} {'':8s}")
            print(f"{name:44s} " + " ".join(cells))

    full_text = SHAPES[args.shape][2]
    args.text_layers = args.text_layers or full_text
    cfg = config_for(args.shape, args.vision_layers, args.text_layers)
    w32 = random_weights(cfg)
    w16 = to_bf16(w32)
    runs: dict[str, dict[str, float]] = {}
    quantized: dict[int, Weights] = {}
    have_cpp = backend.available("cpp") == list(backend.OP_NAMES)
    decoding: dict[str, tuple] = {}  # the cpp runs' (model, cache), decoded in interleaved rounds below
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if have_cpp and not args.no_cpp:  # before numpy: see time_ops
        models = {"refpg cpp fp32": w32, "refpg cpp bf16": w16}
        for bits in () if args.no_quantized else (8, 4):
            quantized[bits] = to_affine(w16, bits)
            models[f"refpg cpp {bits}-bit"] = quantized[bits]
        for name, w in models.items():
            model = PaliGemma(cfg, w, Selection.from_spec("cpp"))
            runs[name], cache = time_prefill(model, cfg, args.repeat, args.decode_steps)
            decoding[name] = (model, cache)
        bf16_model = decoding["refpg cpp bf16"][0]
        for B in batch_sizes:
            if B != 1:
                decoding[f"bf16 x{B}"] = (bf16_model, prefilled(bf16_model, cfg, args.decode_steps, B))
    probe = bandwidth_probe()
    steps, bandwidth = time_decode_rounds(decoding, args.decode_steps, probe) if decoding else ({}, [probe()])
    for name in runs:
        runs[name]["decode, per token"] = min(steps[name])
    have_cuda = "cuda" not in backend.UNAVAILABLE
    if have_cuda:
        info = _C.cuda.device_info()
        print(f"GPU: {info['name']}, {info['sm_count']} SMs, {info['total_bytes'] / 2**30:.0f} GiB")
        gpu_model = PaliGemma(cfg, cuda.upload_weights(w16), Selection.from_spec("cuda"))
        runs["refpg cuda bf16"] = time_refpg(gpu_model, cfg, args.repeat, args.decode_steps)
        del gpu_model
    if not args.no_numpy:
        runs = {"refpg numpy": time_refpg(PaliGemma(cfg, w32, Selection.from_spec("numpy")), cfg, args.repeat,
                                          args.decode_steps), **runs}
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            runs["torch fp32"] = time_torch(w32, cfg, "float32", args.repeat, args.decode_steps)
            runs["torch bf16"] = time_torch(w32, cfg, "bfloat16", args.repeat, args.decode_steps)
        except ImportError:
            print("(transformers/torch not installed: skipped)")

    for t in runs.values():  # derived: what answering a short prompt costs
        t[ANSWER] = t["prefill (image + prompt)"] + ANSWER_TOKENS * t["decode, per token"]
    print(f"\nend to end, {args.shape} shapes with {args.vision_layers}/27 vision and {args.text_layers}/{full_text} "
          f"text layers (full LM head), {cfg.num_image_tokens} image + {PROMPT_TOKENS} prompt tokens, best of {args.repeat}")
    names = list(runs)
    print(f"{'':32s}" + "".join(f"{n:>26s}" for n in names))
    for stage in ("image encode", "prefill (image + prompt)", "decode, per token", ANSWER):
        print(f"{stage:32s}" + "".join(f"{runs[n][stage] * 1e3:23.1f} ms" for n in names))
    for base in ("refpg numpy", "torch bf16"):
        if base in runs:
            print(f"speedup over {base:19s}" + "".join(
                f"{' / '.join(f'{runs[base][st] / runs[n][st]:.2f}' for st in runs[n]):>26s}" for n in names))
    print(f"(speedups: image encode / prefill / decode / {ANSWER}; > 1 is faster)")

    if have_cuda:
        hbm = device_bandwidth()
        nbytes = weight_bytes_per_token(w16)
        floor = nbytes / hbm
        t_dec, t_pre = runs["refpg cuda bf16"]["decode, per token"], runs["refpg cuda bf16"]["prefill (image + prompt)"]
        flops = prefill_flops(w32, cfg)
        print(f"\nGPU decode roofline: measured device copy bandwidth {hbm / 1e9:.0f} GB/s; refpg cuda bf16 reads "
              f"{nbytes / 1e9:.2f} GB/token: roofline {floor * 1e3:.2f} ms, measured {t_dec * 1e3:.2f} ms = "
              f"{floor / t_dec * 100:.0f}% of roofline")
        print(f"GPU prefill: {flops / 1e12:.2f} TFLOP of matmuls in {t_pre * 1e3:.1f} ms = {flops / t_pre / 1e12:.0f} "
              f"TFLOP/s = {flops / t_pre / 1e12 / args.tc_peak_tflops * 100:.0f}% of {args.tc_peak_tflops:.0f} TFLOP/s "
              f"bf16 tensor-core peak")

    if decoding:
        rounds = len(bandwidth)
        print(f"\ndecode, {rounds} interleaved rounds (each times one step of every cpp run and the read bandwidth)")
        for name in runs:
            if name in steps and name != "refpg cpp bf16":
                ratio = np.array(steps["refpg cpp bf16"]) / np.array(steps[name])
                print(f"  {name:16s} vs refpg cpp bf16, per round: median {np.median(ratio):.2f}x "
                      f"(range {ratio.min():.2f}-{ratio.max():.2f}x; > 1 is faster)")
    if decoding and batch_sizes:
        one = np.array(steps["refpg cpp bf16"])
        print("\ndecode batches, refpg cpp bf16 (one token per row per step, through the cache; best step of the "
              "rounds above, ratios: median of per-round ratios)")
        print(f"{'rows':>6s} {'ms / step':>10s} {'tokens/s':>10s} {'step vs 1':>14s} {'tokens/s vs 1':>18s}")
        for B in batch_sizes:
            t = one if B == 1 else np.array(steps[f"bf16 x{B}"])
            ratio = np.median(t / one)
            print(f"{B:6d} {t.min() * 1e3:10.1f} {B / t.min():10.1f} {ratio:13.2f}x {B / ratio:17.2f}x")
    if have_cpp and not args.no_cpp and not args.no_threads:
        by_threads = time_threads(PaliGemma(cfg, w16, Selection.from_spec("cpp")), cfg, args.repeat, args.decode_steps)
        print("\nthreads, refpg cpp bf16 (refpg._C.set_num_threads)")
        for n, t in by_threads.items():
            print(f"  {n} thread(s): image encode {t['image encode'] * 1e3:8.1f} ms, prefill "
                  f"{t['prefill (image + prompt)'] * 1e3:8.1f} ms, decode {t['decode, per token'] * 1e3:6.1f} ms/token")
        if len(by_threads) > 1:
            a, b = by_threads[1], by_threads[max(by_threads)]
            print(f"  scaling 1 -> {max(by_threads)}: " + ", ".join(f"{k} {a[k] / b[k]:.2f}x" for k in a))

    if _C is not None:
        peak = max(_C.fma_peak(0.2) for _ in range(5))  # the best of several: other work on the machine only lowers it
        flops = prefill_flops(w32, cfg)
        print(f"\nprefill compute roofline: measured FMA peak {peak / 1e9:.0f} GFLOP/s ({_C.simd_path()}, "
              f"{_C.num_threads()} threads, refpg._C.fma_peak); one prefill is {flops / 1e9:.0f} GFLOP of matmuls")
        for n, t in runs.items():
            seconds = t["prefill (image + prompt)"]
            print(f"  {n:16s} {flops / seconds / 1e9:7.1f} GFLOP/s = {flops / seconds / peak * 100:3.0f}% of the FMA peak")

    bw = np.array(bandwidth)
    print(f"\ndecode roofline: measured read bandwidth {bw.min() / 1e9:.1f}-{bw.max() / 1e9:.1f} GB/s over "
          f"{len(bw)} round(s); a cpp run's fraction is the median over the rounds of its step against that round's "
          f"bandwidth, the others' against the best")
    for n, w in (("refpg cpp fp32", w32), ("refpg cpp bf16", w16), *((f"refpg cpp {b}-bit", quantized[b]) for b in quantized),
                 ("torch fp32", w32), ("torch bf16", w16), ("refpg numpy", w32)):
        if n in runs:
            nbytes = weight_bytes_per_token(w)
            t_dec = runs[n]['decode, per token']
            fraction = np.median(nbytes / bw / np.array(steps[n])) if n in steps else nbytes / bw.max() / t_dec
            print(f"  {n:16s} reads {nbytes / 1e9:.2f} GB/token: best step {t_dec * 1e3:.1f} ms "
                  f"({nbytes / t_dec / 1e9:.1f} GB/s) = {fraction * 100:.0f}% of roofline")


if __name__ == "__main__":
    main()

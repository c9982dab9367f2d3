#!/usr/bin/env python3
"""Mutation testing: plant plausible one-line bugs, one at a time, and check the test suite notices.

The catalogue below lists bugs someone could plausibly write into the NumPy reference, the
loader, the processor, the sampler or the C++ kernels: each is a file, an exact source snippet
(it must occur exactly once: otherwise the catalogue is stale and the mutation is reported as an
ERROR, never skipped), its replacement and what the bug is. For each one the tool

  1. copies the working tree (tracked and untracked, not ignored files) into a scratch directory
     under /tmp, once, and refreshes only the files that differ on later runs;
  2. applies the mutation there (never in the working tree), rebuilds `refpg._C` in a build
     directory kept beside it (CPU only, -DREFPG_CUDA=OFF; incremental, so only the mutated
     file recompiles) and runs `python -m pytest -x -q tests` in the copy with REFPG_REQUIRE_CPP=1
     and a per-mutation timeout;
  3. restores the file.

It prints one row per mutation — caught or SURVIVED, the first failing test, seconds — and exits 1
if any mutation survived (2 if the catalogue is stale, a run timed out, or the unmutated suite fails). The tiny
checkpoints are written once and reused by every run (tests/conftest.py's
REFPG_TEST_CHECKPOINT_CACHE).

C++ mutations only matter on the paths the suite runs on the machine at hand: the path the CPU
picks (`refpg._C.simd_path()`: for `linear` amx, avx512, avx2 or scalar; every other op runs its
AVX2 code on any vector path) plus the instruction sets tests/test_backend_ops.py forces with
refpg._C.set_simd_path (each one the CPU has). Each C++ mutation names the path its code runs on (`all`: code
every path shares; `scalar`: the portable loops, which the vector paths also use for their tails).
The catalogue was written on an AMD EPYC with AVX2 and AVX-512 but no AMX, so it has no mutation in
the AMX GEMM (csrc/cpu/matmul_amx.cpp): none could be caught, or missed, there.

    python tools/mutate.py --list
    python tools/mutate.py                      # every mutation (tens of minutes)
    python tools/mutate.py --only rms_norm_1_plus_w rope_sign
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRATCH = os.path.join("/tmp", "refpg-mutate-" + os.environ.get("USER", "user"))


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    what: str
    path: str = ""  # C++ only: the SIMD path its code runs on (all, avx2, avx512, scalar)


M = Mutation
CATALOGUE = [
    # ---- refpg/ops.py: the primitive ops of the reference ----------------------------------------
    M("layer_norm_eps_outside_sqrt", "refpg/ops.py",
      "return centered / np.sqrt(var + F32(eps)) * weight + bias",
      "return centered / (np.sqrt(var) + F32(eps)) * weight + bias",
      "LayerNorm divides by sqrt(var) + eps instead of sqrt(var + eps)"),
    M("layer_norm_uncentered_var", "refpg/ops.py",
      "var = (centered * centered).mean(-1, keepdims=True)",
      "var = (x * x).mean(-1, keepdims=True)",
      "LayerNorm variance as E[x^2] (not centered)"),
    M("rms_norm_1_plus_w", "refpg/ops.py",
      "return x / np.sqrt(ms + F32(eps)) * (F32(1) + weight)",
      "return x / np.sqrt(ms + F32(eps)) * weight",
      "RMSNorm scales by w instead of Gemma's (1 + w)"),
    M("rms_norm_eps_outside_sqrt", "refpg/ops.py",
      "return x / np.sqrt(ms + F32(eps)) * (F32(1) + weight)",
      "return x / (np.sqrt(ms) + F32(eps)) * (F32(1) + weight)",
      "RMSNorm divides by sqrt(ms) + eps instead of sqrt(ms + eps)"),
    M("softmax_no_max_subtraction", "refpg/ops.py",
      "x = x - x.max(axis=axis, keepdims=True)", "x = x",
      "softmax without subtracting the row max"),
    M("softcap_no_rescale", "refpg/ops.py",
      "return F32(cap) * np.tanh(x / F32(cap))", "return np.tanh(x / F32(cap))",
      "soft-cap forgets to multiply tanh by the cap"),
    M("rope_theta_exponent_half", "refpg/ops.py",
      "astype(F32) / F32(head_dim)", "astype(F32) / F32(head_dim // 2)",
      "RoPE inverse frequencies theta^(-2j/(hd/2)) instead of theta^(-2j/hd)"),
    M("rope_interleaved_table", "refpg/ops.py",
      "emb = np.concatenate([angles, angles], axis=-1)", "emb = np.repeat(angles, 2, axis=-1)",
      "RoPE tables for the interleaved (GPT-J) pairing instead of rotate-half"),
    M("rope_positions_not_float32", "refpg/ops.py",
      "angles = positions.astype(F32)[..., None] * inv_freq", "angles = positions[..., None] * inv_freq",
      "RoPE angles from int64 positions: silently float64"),
    M("rope_rotate_half_sign", "refpg/ops.py",
      "rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)",
      "rotated = np.concatenate([x[..., half:], -x[..., :half]], axis=-1)",
      "rotate_half with the sign on the wrong half"),
    M("attention_gqa_head_mapping", "refpg/ops.py",
      "qg = q.reshape(B, T, kv_heads, group, hd).transpose(0, 2, 3, 1, 4)",
      "qg = q.reshape(B, T, group, kv_heads, hd).transpose(0, 3, 2, 1, 4)",
      "GQA: query head h reads kv head h % kv_heads instead of h // group"),
    M("f32_to_bf16_round_half_up", "refpg/formats.py",
      "rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)",
      "rounded = (bits + np.uint32(0x8000)) >> np.uint32(16)",
      "float32 -> bf16 rounds half up instead of half to even"),

    # ---- refpg/gemma.py: decoder, prefix-LM mask, positions, KV cache ----------------------------
    M("mask_window_off_by_one", "refpg/gemma.py",
      "causal &= j > i - sliding_window", "causal &= j >= i - sliding_window",
      "sliding window one key wider than sliding_window"),
    M("mask_prefix_sees_suffix", "refpg/gemma.py",
      "both_prefix = key_prefix[:, start:S, None] & key_prefix[:, None, :S]",
      "both_prefix = key_prefix[:, start:S, None]",
      "prefix queries see every key, suffix ones included (bidirectional over the whole sequence)"),
    M("mask_padding_visible", "refpg/gemma.py",
      "return (causal[None] | both_prefix) & key_valid[:, None, :S]",
      "return causal[None] | both_prefix",
      "padding keys are not masked"),
    M("positions_zero_based", "refpg/gemma.py",
      "self.next_position = np.ones(batch_size, np.int64)",
      "self.next_position = np.zeros(batch_size, np.int64)",
      "positions count from 0 (PaliGemma's start at 1)"),
    M("positions_padding_advances", "refpg/gemma.py",
      "positions = self.next_position[:, None] - 1 + np.cumsum(valid, axis=1)",
      "positions = self.next_position[:, None] - 1 + np.cumsum(np.ones_like(valid), axis=1)",
      "left padding advances the positions of the real tokens"),
    M("positions_decode_counts_padding", "refpg/gemma.py",
      "self.next_position += valid.sum(axis=1)", "self.next_position += T",
      "after a padded prefill, decode positions count the padding"),
    M("cache_attends_only_new_keys", "refpg/gemma.py",
      "return self.k[layer][:, :end], self.v[layer][:, :end]",
      "return self.k[layer][:, self.length:end], self.v[layer][:, self.length:end]",
      "attention sees only this call's keys, not the cached ones (mask sliced to match)"),
    M("attn_scale_ignores_query_pre_attn_scalar", "refpg/gemma.py",
      "scale = (cfg.query_pre_attn_scalar or hd) ** -0.5", "scale = hd ** -0.5",
      "Gemma 2 scores scaled by head_dim^-1/2 instead of query_pre_attn_scalar^-1/2"),
    M("attn_scale_hidden_over_heads", "refpg/gemma.py",
      "scale = (cfg.query_pre_attn_scalar or hd) ** -0.5",
      "scale = (cfg.query_pre_attn_scalar or cfg.hidden_size // heads) ** -0.5",
      "scores scaled by (hidden/heads)^-1/2, which is not head_dim in every Gemma"),
    M("attn_softcap_uses_final_cap", "refpg/gemma.py",
      "out = attention(q, keys, values, mask, scale, cfg.attn_logit_softcapping)",
      "out = attention(q, keys, values, mask, scale, cfg.final_logit_softcapping)",
      "attention logits capped with the final-logit cap"),
    M("gemma2_pre_ff_norm_weight", "refpg/gemma.py",
      "mlp(rms_norm(x, layer.pre_feedforward_layernorm.weight, eps), layer)",
      "mlp(rms_norm(x, layer.post_attention_layernorm.weight, eps), layer)",
      "Gemma 2's MLP input normed with the post-attention norm's weight"),
    M("text_eps_hardcoded", "refpg/gemma.py",
      "eps = cfg.rms_norm_eps", "eps = 1e-6",
      "decoder layers use RMSNorm eps 1e-6 whatever the config says"),
    M("sliding_layers_swapped", "refpg/gemma.py",
      'cfg.layer_types[i] == "sliding_attention"', 'cfg.layer_types[i] == "full_attention"',
      "the window applied on the full-attention layers instead of the sliding ones"),
    # ---- refpg/vision.py: SigLIP and the projector ----------------------------------------------
    M("patchify_column_major", "refpg/vision.py",
      "return x.transpose(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * patch * patch)",
      "return x.transpose(0, 4, 2, 1, 3, 5).reshape(B, g * g, C * patch * patch)",
      "patches enumerated column by column"),
    M("vision_eps_hardcoded", "refpg/vision.py",
      "eps = cfg.layer_norm_eps", "eps = 1e-5",
      "SigLIP layer norms use eps 1e-5 whatever the config says"),
    # ---- refpg/model.py, refpg/weights.py: merge, embed scale, loader ----------------------------
    M("image_features_scaled", "refpg/model.py",
      "embeds[is_image] = image_features.reshape(B * N, -1)",
      "embeds[is_image] = image_features.reshape(B * N, -1) / np.float32(np.sqrt(image_features.shape[-1]))",
      "image features divided by sqrt(hidden) (an old transformers' normalization, half of it)"),
    M("image_features_batch_order", "refpg/model.py",
      "embeds[is_image] = image_features.reshape(B * N, -1)",
      "embeds[is_image] = image_features.transpose(1, 0, 2).reshape(B * N, -1)",
      "image features merged token-major across the batch"),
    M("embed_not_scaled", "refpg/model.py",
      "embeds = embedding(self.weights.text.embed_tokens, lookup) * embed_scale(t.hidden_size)",
      "embeds = embedding(self.weights.text.embed_tokens, lookup)",
      "token embeddings not multiplied by sqrt(hidden)"),
    M("generate_done_rows_continue", "refpg/model.py",
      "token = np.where(done, pad, pick_next(step_logits, rng, **sampling))",
      "token = pick_next(step_logits, rng, **sampling)",
      "rows that ended with <eos> keep generating instead of padding"),
    M("patch_embedding_channel_last", "refpg/weights.py",
      "values = values.reshape(want[0], -1)",
      "values = (values.transpose(0, 2, 3, 1) if values.ndim == 4 else values).reshape(want[0], -1)",
      "patch-embedding kernel flattened channel-last [D, P, P, 3]"),
    M("lm_head_old_name_not_mapped", "refpg/weights.py",
      '    ("language_model.lm_head.weight", LM_HEAD),\n', "",
      "transformers 4's `language_model.lm_head.weight` is not read as the LM head"),
    M("bf16_big_endian", "refpg/safetensors_io.py",
      '"BF16": np.dtype("<u2")', '"BF16": np.dtype(">u2")',
      "BF16 tensors read big-endian (safetensors is little-endian)"),
    M("stored_lm_head_overrides_tie", "refpg/weights.py",
      "if cfg.tie_word_embeddings:", "if cfg.tie_word_embeddings and LM_HEAD not in by_hub:",
      "a stored lm_head.weight is used even when the config ties it to the embeddings"),
    # ---- refpg/sampling.py, refpg/detection.py ---------------------------------------------------
    M("top_k_drops_kth", "refpg/sampling.py",
      "scores = np.where(scores < kth, -np.inf, scores)", "scores = np.where(scores <= kth, -np.inf, scores)",
      "top-k keeps k - 1 tokens"),
    M("top_p_drops_crossing_token", "refpg/sampling.py",
      "before = np.cumsum(sorted_probs, axis=-1) - sorted_probs",
      "before = np.cumsum(sorted_probs, axis=-1)",
      "top-p drops the token whose probability crosses p (and so can drop the top token)"),
    M("loc_bins_1023", "refpg/detection.py",
      "boxes.append(Box(label.strip(), y0 / LOC_BINS * height, x0 / LOC_BINS * width,",
      "boxes.append(Box(label.strip(), y0 / (LOC_BINS - 1) * height, x0 / (LOC_BINS - 1) * width,",
      "box corners from v/1023 instead of v/1024"),
    M("loc_x_y_swapped", "refpg/detection.py",
      "y0, x0, y1, x1 = (int(v) for v in", "x0, y0, x1, y1 = (int(v) for v in",
      "location tokens read as x, y instead of y, x"),

    # ---- refpg/processor.py -----------------------------------------------------------------------
    M("normalize_order", "refpg/processor.py",
      "x = (x - mean) / std", "x = x / std - mean",
      "normalize as x / std - mean instead of (x - mean) / std"),
    M("rescale_in_float32", "refpg/processor.py",
      "x = (x.astype(np.float64) * spec.rescale_factor).astype(np.float32)",
      "x = x.astype(np.float32) * np.float32(spec.rescale_factor)",
      "rescale in float32 (transformers rescales in float64, then casts)"),
    M("prompt_no_bos", "refpg/processor.py",
      "[self.bos_token_id] + self.encode_text(prompt + \"\\n\")",
      "self.encode_text(prompt + \"\\n\")",
      "prompt without <bos>"),
    M("prompt_no_newline", "refpg/processor.py",
      "self.encode_text(prompt + \"\\n\")", "self.encode_text(prompt)",
      "prompt without the trailing \\n"),
    M("suffix_no_eos", "refpg/processor.py",
      "+ [self.eos_token_id]\n", "\n",
      "suffix without <eos>"),
    M("right_padding", "refpg/processor.py",
      "start = length - len(ids)", "start = 0",
      "batches padded on the right"),
    # ---- csrc/cpu: the C++ kernels (path = the SIMD path the mutated code runs on) ----------------
    M("cpp_norms_eps_outside_sqrt", "csrc/cpu/norms.cpp",
      "return static_cast<float>(1.0 / std::sqrt(sum_squares / static_cast<double>(D) + eps));",
      "return static_cast<float>(1.0 / (std::sqrt(sum_squares / static_cast<double>(D)) + eps));",
      "rms_norm and layer_norm (their shared inv_rms): eps added outside the square root", path="all"),
    M("cpp_rms_norm_eps_outside_sqrt", "csrc/cpu/norms.cpp",
      "  const float inv = inv_rms(ss, D, eps);\n  const __m256 vinv = _mm256_set1_ps(inv), one",
      "  const float inv = static_cast<float>(1.0 / (std::sqrt(ss / static_cast<double>(D)) + eps));\n"
      "  const __m256 vinv = _mm256_set1_ps(inv), one",
      "rms_norm alone: eps added outside the square root", path="avx2"),
    M("cpp_rms_norm_1_plus_w", "csrc/cpu/norms.cpp",
      "const __m256 scale = _mm256_add_ps(one, _mm256_loadu_ps(w + i));",
      "const __m256 scale = _mm256_loadu_ps(w + i);",
      "rms_norm's vector loop scales by w, not 1 + w", path="avx2"),
    M("cpp_rms_norm_tail_not_summed", "csrc/cpu/norms.cpp",
      "  ss += sum_squares_scalar(x, i, D, 0.0f);\n", "\n",
      "rms_norm leaves the last D % 8 squares out of the sum", path="avx2"),
    M("cpp_layer_norm_uncentered", "csrc/cpu/norms.cpp",
      "double ss = sum_squares_avx2(x, D, mean, &i);", "double ss = sum_squares_avx2(x, D, 0.0f, &i);",
      "layer_norm's vector loop sums x^2 instead of (x - mean)^2", path="avx2"),
    M("cpp_layer_norm_scalar_no_bias", "csrc/cpu/norms.cpp",
      "for (int64_t i = i0; i < n; ++i) y[i] = (x[i] - mean) * inv * w[i] + b[i];",
      "for (int64_t i = i0; i < n; ++i) y[i] = (x[i] - mean) * inv * w[i];",
      "layer_norm's portable loop (and the vector path's tail) drops the bias", path="scalar"),
    M("cpp_gelu_cubic_constant", "csrc/cpu/activations.cpp",
      "constexpr float kGeluCubic = 0.044715f;", "constexpr float kGeluCubic = 0.0044715f;",
      "gelu with 0.0044715 for 0.044715", path="all"),
    M("cpp_exp_reduction_inexact", "csrc/cpu/activations.cpp",
      "  r = _mm256_fnmadd_ps(k, set1(-2.12194440e-4f), r);\n", "\n",
      "exp8 drops the low part of the ln 2 split (inexact range reduction)", path="avx2"),
    M("cpp_softmax_no_max_subtraction", "csrc/cpu/activations.cpp",
      "const __m256 vm = set1(max);", "const __m256 vm = set1(max = 0.0f);",
      "attention's softmax without subtracting the row max", path="avx2"),
    M("cpp_softmax_vector_lanes_no_max", "csrc/cpu/activations.cpp",
      "const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));",
      "const __m256 e = exp8(_mm256_loadu_ps(x + i));",
      "attention's softmax: the vector loop forgets the max subtraction (its n % 8 tail keeps it)",
      path="avx2"),
    M("cpp_attention_masked_zero", "csrc/cpu/attention.cpp",
      "if (!mask[s]) row[s] = kMasked;", "if (!mask[s]) row[s] = 0.0f;",
      "masked scores set to 0 instead of the most negative float", path="all"),
    M("cpp_attention_tile_gqa_mapping", "csrc/cpu/attention.cpp",
      "const int64_t t = r / group, h = kv * group + r % group;",
      "const int64_t t = r / group, h = kv + (r % group) * a.KV;",
      "decode / small-prefill tiles: query head h reads kv head h % KV instead of h / group", path="all"),
    M("cpp_attention_gemm_scale_off_by_one", "csrc/cpu/attention.cpp",
      "for (int64_t s = 0; s < a.S; ++s) row[s] *= a.scale;",
      "for (int64_t s = 1; s < a.S; ++s) row[s] *= a.scale;",
      "prefill by GEMM: the first key's score is not scaled", path="all"),
    M("cpp_attention_gemm_token_order", "csrc/cpu/attention.cpp",
      "auto token = [&](int64_t r) { return (r0 + r) / group; };",
      "auto token = [&](int64_t r) { return (r0 + r) % a.T; };",
      "prefill by GEMM: query rows taken head-major instead of token-major", path="all"),
    M("cpp_rope_sign", "csrc/cpu/rope.cpp",
      "y[j + half] = b * cos[j + half] + a * sin[j + half];",
      "y[j + half] = b * cos[j + half] - a * sin[j + half];",
      "RoPE's second half rotated the wrong way", path="all"),
    M("cpp_embedding_short_copy", "csrc/cpu/embedding.cpp",
      "D * sizeof(float));", "D * sizeof(uint16_t));",
      "float32 embedding rows copied with the bf16 row size (half of each row)", path="all"),
    M("cpp_matmul_avx512_dots_tail", "csrc/cpu/matmul.cpp",
      "float s = _mm512_reduce_add_ps(acc[r][c]);\n        for (int64_t t = k; t < kc; ++t)",
      "float s = _mm512_reduce_add_ps(acc[r][c]);\n        for (int64_t t = k + 1; t < kc; ++t)",
      "AVX-512 GEMV skips the first of the K % 16 leftover products", path="avx512"),
    M("cpp_matmul_avx2_dots_tail", "csrc/cpu/matmul.cpp",
      "float s = hsum(acc[r][c]);\n        for (int64_t t = k; t < kc; ++t)",
      "float s = hsum(acc[r][c]);\n        for (int64_t t = k + 1; t < kc; ++t)",
      "AVX2 GEMV skips the first of the K % 8 leftover products", path="avx2"),
    M("cpp_matmul_gemv_row_tail", "csrc/cpu/matmul.cpp",
      "for (; n < ne; ++n) gemv_tile<Isa, 1>", "for (; n + 1 < ne; ++n) gemv_tile<Isa, 1>",
      "GEMV leaves the last W row of a chunk that is not a whole number of tiles", path="all"),
    M("cpp_matmul_gemm_bias_every_block", "csrc/cpu/matmul.cpp",
      "const float* bias = first && p_.bias ? p_.bias + n : nullptr;",
      "const float* bias = p_.bias ? p_.bias + n : nullptr;",
      "GEMM adds the bias once per depth block of 256 instead of once", path="all"),
    M("cpp_matmul_bf16_widen_avx512", "csrc/cpu/simd.h",
      "return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));",
      "return _mm512_cvtepi32_ps(_mm512_slli_epi32(wide, 16));",
      "AVX-512 bf16 widening (the GEMV; AMX's split too) converts the integer instead of reinterpreting the bits",
      path="avx512"),
    M("cpp_matmul_bf16_widen_avx2", "csrc/cpu/simd.h",
      "return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));",
      "return _mm256_cvtepi32_ps(_mm256_slli_epi32(wide, 16));",
      "AVX2 bf16 widening (GEMV, and W packing on avx2 and avx512) converts instead of reinterpreting",
      path="avx2"),
    # ---- MLX's affine quantization: refpg/formats.py, the loader, csrc/cpu/affine.cpp -------------
    M("affine_dequant_single_rounding", "refpg/formats.py",
      "return round_to(round_to(codes * scales, fmt) + biases, fmt)",
      "return round_to(codes * scales + biases, fmt)",
      "q·s + b rounded once to the scales' dtype, not after the product and after the sum as MLX"),
    M("affine_codes_msb_first", "refpg/formats.py",
      "stream = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder=\"little\")",
      "stream = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder=\"big\")",
      "3-, 5- and 6-bit codes read from each byte's most significant bit first"),
    M("affine_quantize_bias_always_edge", "refpg/formats.py",
      "bias = np.where(exact, edge, np.float32(0)).astype(np.float32)",
      "bias = edge.astype(np.float32)",
      "quantize keeps the edge as the bias even where it rounds to code 0 (MLX then uses bias 0)"),
    M("affine_patch_embedding_transposed_wrong", "refpg/weights.py",
      "values = np.ascontiguousarray(values.transpose(0, 3, 1, 2))  # -> [D, 3, P, P]",
      "values = np.ascontiguousarray(values.transpose(0, 3, 2, 1))  # -> [D, 3, P, P]",
      "MLX's channel-last patch embedding read with the kernel's rows and columns swapped"),
    M("cpp_affine_nibbles_swapped", "csrc/cpu/affine.cpp",
      "d[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), x0, d[r][0]);",
      "d[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), x1, d[r][0]);",
      "4-bit decode GEMV: low nibbles multiplied by the high nibbles' x", path="avx2"),
    M("cpp_affine_dequant_no_inner_rounding", "csrc/cpu/affine.cpp",
      "out[j] = round_to(round_to(q * s, w.scale_format) + b, w.scale_format);",
      "out[j] = round_to(q * s + b, w.scale_format);",
      "scalar dequantization (embedding, prefill, odd widths) rounds q·s + b once", path="all"),
]
# Tried and removed as equivalent (they survived, and no test could catch them: the program's
# results are the same bits):
#  - refpg/formats.py bf16_to_f32 widening the bits to int32 instead of uint32: uint16 values fit
#    int32, and `<< 16` wraps into the sign bit, so the float32 bits are identical.
#  - csrc/cpu/matmul.cpp Gemm::tile copying C into the edge tile on the first depth block too
#    (`i < mr` for `i < mr && !first`): the first block's tile does not accumulate, so the copied
#    (uninitialized, but in-bounds) values are never read.


# ---- the scratch copy --------------------------------------------------------------------------

def check_catalogue(catalogue: list[Mutation], root: str = ROOT) -> dict[str, str]:
    """{name: error} for every mutation whose snippet is not found exactly once (a stale catalogue)."""
    errors = {}
    names = [m.name for m in catalogue]
    for m in catalogue:
        if names.count(m.name) > 1:
            errors[m.name] = "duplicate name in the catalogue"
            continue
        path = os.path.join(root, m.file)
        if not os.path.isfile(path):
            errors[m.name] = f"{m.file} does not exist"
            continue
        with open(path, encoding="utf-8") as f:
            count = f.read().count(m.old)
        if count != 1:
            errors[m.name] = f"snippet found {count} times in {m.file} (stale catalogue)"
    return errors


def tree_files(root: str) -> list[str]:
    """Tracked and untracked, not ignored files of the working tree (relative paths)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(root, p))]


def sync_copy(src: str, dst: str) -> None:
    """Make dst hold src's working tree; files already equal are left alone (their mtimes too, so
    the C++ build stays incremental), files gone from src are removed."""
    files = tree_files(src)
    wanted = set(files)
    for rel in files:
        a, b = os.path.join(src, rel), os.path.join(dst, rel)
        with open(a, "rb") as f:
            data = f.read()
        if os.path.isfile(b):
            with open(b, "rb") as f:
                if f.read() == data:
                    continue
        os.makedirs(os.path.dirname(b), exist_ok=True)
        with open(b, "wb") as f:
            f.write(data)
    for dirpath, dirnames, filenames in os.walk(dst):
        dirnames[:] = [d for d in dirnames if d not in ("__pycache__",)]
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), dst)
            if rel not in wanted and not name.endswith((".so", ".pyc")):
                os.remove(os.path.join(dirpath, name))


class Scratch:
    """One copy of the repository and one C++ build directory, reused by every mutation."""

    def __init__(self, base: str, jobs: int):
        self.src = os.path.join(base, "src")
        self.build = os.path.join(base, "build")
        self.checkpoints = os.path.join(base, "checkpoints")
        self.jobs = jobs
        os.makedirs(self.src, exist_ok=True)

    def prepare(self) -> None:
        sync_copy(ROOT, self.src)
        if not os.path.isfile(os.path.join(self.build, "CMakeCache.txt")):
            import pybind11

            subprocess.run(["cmake", "-S", self.src, "-B", self.build, "-DCMAKE_BUILD_TYPE=Release",
                            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
                            "-DREFPG_CUDA=OFF"], check=True, capture_output=True)

    def build_extension(self) -> tuple[bool, str]:
        """Rebuild _C (a no-op when nothing changed) and link it into the copy's package."""
        r = subprocess.run(["cmake", "--build", self.build, f"-j{self.jobs}"], capture_output=True, text=True)
        if r.returncode != 0:
            return False, r.stdout[-3000:] + r.stderr[-3000:]
        built = [f for f in os.listdir(self.build) if f.startswith("_C.") and f.endswith(".so")]
        link = os.path.join(self.src, "refpg", built[0])
        if not os.path.islink(link):
            if os.path.exists(link):
                os.remove(link)
            os.symlink(os.path.join(self.build, built[0]), link)
        return True, ""

    def run_tests(self, timeout: float, extra: list[str]) -> tuple[str, str, float]:
        """(outcome, first failing test or reason, seconds); outcome is pass, fail or timeout."""
        env = dict(os.environ, PYTHONPATH=self.src, REFPG_REQUIRE_CPP="1",
                   REFPG_TEST_CHECKPOINT_CACHE=self.checkpoints)
        env.pop("REFPG_SIMD", None)
        env.pop("REFPG_BACKEND", None)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "tests", *extra]
        try:
            r = subprocess.run(cmd, cwd=self.src, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", f"no result within {timeout:.0f} s", time.perf_counter() - start
        seconds = time.perf_counter() - start
        if r.returncode == 0:
            return "pass", "", seconds
        first = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", r.stdout, re.M)  # test ids may hold spaces
        if first:
            return "fail", first.group(1), seconds
        if r.returncode < 0:
            return "fail", f"pytest killed by signal {-r.returncode}", seconds
        tail = (r.stdout + r.stderr).strip().splitlines()
        return "fail", f"exit {r.returncode}: {tail[-1] if tail else ''}", seconds


def run_mutation(scratch: Scratch, m: Mutation, timeout: float, extra: list[str]) -> tuple[str, str, float]:
    path = os.path.join(scratch.src, m.file)
    with open(path, encoding="utf-8") as f:
        original = f.read()
    if original.count(m.old) != 1:
        return "ERROR", f"snippet found {original.count(m.old)} times in the copy", 0.0
    start = time.perf_counter()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original.replace(m.old, m.new))
        ok, log = scratch.build_extension()
        if not ok:
            # a mutation the compiler rejects is no test result: report it, the catalogue needs fixing
            return "ERROR", "does not compile: " + log.strip().splitlines()[-1][:120], time.perf_counter() - start
        outcome, first, _ = scratch.run_tests(timeout, extra)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    # a timeout is no verdict: a slow machine must not pass a survivor off as caught
    result = {"pass": "SURVIVED", "fail": "caught", "timeout": "TIMEOUT"}[outcome]
    return result, first, time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the catalogue (and any stale snippet), run nothing")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutation's test run (default 300)")
    ap.add_argument("--scratch", default=SCRATCH, help=f"where the copy and its build live (default {SCRATCH})")
    ap.add_argument("--build-jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="do not first check that the unmutated suite passes in the copy")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --), e.g. -k parity")
    args = ap.parse_args(argv)

    errors = check_catalogue(CATALOGUE)
    chosen = CATALOGUE
    if args.only:
        unknown = set(args.only) - {m.name for m in CATALOGUE}
        if unknown:
            ap.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
        chosen = [m for m in CATALOGUE if m.name in args.only]
    if args.list:
        for m in CATALOGUE:
            where = m.file + (f" [{m.path}]" if m.path else "")
            print(f"{m.name:44s} {where:40s} {m.what}" + (f"   ERROR: {errors[m.name]}" if m.name in errors else ""))
        print(f"{len(CATALOGUE)} mutations" + (f", {len(errors)} stale" if errors else ""))
        return 2 if errors else 0

    scratch = Scratch(args.scratch, args.build_jobs)
    print(f"copying the working tree to {scratch.src}, building _C in {scratch.build} ...", flush=True)
    scratch.prepare()
    ok, log = scratch.build_extension()
    if not ok:
        print(log, file=sys.stderr)
        return 2
    if not args.skip_baseline:
        outcome, first, seconds = scratch.run_tests(args.timeout, args.pytest_args)
        print(f"unmutated suite: {outcome} in {seconds:.0f} s {first}", flush=True)
        if outcome != "pass":
            print("the unmutated suite must pass before mutations mean anything", file=sys.stderr)
            return 2

    rows = []
    width = max(len(m.name) for m in chosen)
    print(f"{'mutation':{width}s}  {'file':26s} {'result':8s} {'seconds':>7s}  first failing test")
    for m in chosen:
        if m.name in errors:
            result, first, seconds = "ERROR", errors[m.name], 0.0
        else:
            result, first, seconds = run_mutation(scratch, m, args.timeout, args.pytest_args)
        rows.append((m, result, first, seconds))
        print(f"{m.name:{width}s}  {m.file:26s} {result:8s} {seconds:7.0f}  {first}", flush=True)
    # the copy is left with the unmutated sources; rebuild so the next run starts from them
    scratch.build_extension()

    survived = [m.name for m, result, _, _ in rows if result == "SURVIVED"]
    broken = [m.name for m, result, _, _ in rows if result in ("ERROR", "TIMEOUT")]
    caught = len(rows) - len(survived) - len(broken)
    print(f"\n{caught} caught, {len(survived)} survived, {len(broken)} errors or timeouts of {len(rows)} mutations")
    if survived:
        print("survived: " + ", ".join(survived))
    if broken:
        print("errors or timeouts (stale or broken catalogue entries, or a --timeout too short): " + ", ".join(broken))
    return 2 if broken else 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

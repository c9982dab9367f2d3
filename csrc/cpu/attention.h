// Fused masked multi-/grouped-query attention with the semantics of refpg.ops.attention:
//   for each batch row b, query token t and head h (kv head h / (H / KV)), over keys s < S:
//     score[s] = softcap((q[b,t,h] · k[b,s,kv]) · scale), or the most negative float where
//                mask[b,t,s] is false (a query that sees no key then averages all of v, never NaN)
//     out[b,t,h] = Σ_s softmax(score)[s] · v[b,s,kv]
// Prefill (32 or more query rows per kv head, 32 or more keys) runs as two matrix products on the
// linear kernels (AMX / AVX-512 / AVX2 GEMM): scores = q . k^T for up to 512 query rows at a time,
// then per row soft-cap, mask and softmax, then out = p . v (k and v copied to contiguous matrices
// first, v transposed). Decode and other small calls run the fused tiles below.
// Work unit: a tile of up to 4 query rows that share a kv head — the heads of one GQA group for a
// token, or consecutive tokens when each head has its own kv head — so every key and value row
// loaded serves the whole tile. Per tile: scores [rows, S] into per-thread scratch (AVX2 dot
// products over hd, several keys per step, register-blocked), then per row soft-cap, mask and a
// stable softmax (activations.h), then out = p · v, 16 value rows at a time in register-blocked
// slices of hd. Key and value rows are prefetched one step ahead (the cache rows of a long
// decode are far apart). Tiles run in parallel over batch × kv heads × tiles; tiles shrink below
// 4 rows when that is needed to give every thread work (decode: heads × batch). S is not split
// across threads. Every vector path (uses_avx2) runs the tiles with AVX2+FMA; the Scalar path does
// the same in plain C++, accumulating in float32 like the AVX2 path.
// Arguments are validated in csrc/bind_cpu.cpp; this function trusts them.
#pragma once
#include <cstdint>

#include "cpu/simd.h"

namespace refpg {

struct AttentionArgs {
  const float* q;        // [B, T, H, hd], (H, hd) packed; element strides of b and t:
  int64_t q_b, q_t;
  const float* k;        // [B, S, KV, hd], (KV, hd) packed — e.g. a view into a longer KV cache
  int64_t k_b, k_s;
  const float* v;        // [B, S, KV, hd], like k
  int64_t v_b, v_s;
  const uint8_t* mask;   // [B, T, S] booleans (nonzero = may attend), s packed; nullptr = every key visible
  int64_t m_b, m_t;
  float* out;            // [B, T, H, hd] contiguous, not overlapping the inputs
  int64_t B, T, S, H, KV, hd;  // S >= 1, KV >= 1, H a multiple of KV
  float scale;
  float softcap;         // 0: no soft-cap
};

// Runs on the threadpool; call without the GIL. `path`: the instruction set (linear's for the
// prefill GEMMs; AVX2 or scalar for the rest).
void attention(const AttentionArgs& args, SimdPath path);

}  // namespace refpg

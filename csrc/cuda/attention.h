// Fused masked multi-/grouped-query attention on the GPU, semantics of refpg.ops.attention:
//   for each batch row b, query token t and head h (kv head h / (H / KV)), over keys s < S:
//     score[s] = softcap((q[b,t,h] · k[b,s,kv]) · scale), or the most negative float where
//                mask[b,t,s] is false (a query that sees no key then averages all of v, never NaN)
//     out[b,t,h] = Σ_s softmax(score)[s] · v[b,s,kv]
// Prefill (T > 4): tiles of query rows with key/value tiles staged in shared memory and an online
// (flash-style) softmax, fp32 throughout. Decode (T <= 4): split-KV — the keys are cut into chunks
// processed by separate blocks, each leaving (max, sum, partial output), combined by a second kernel.
// All pointers are device pointers. Arguments are validated in csrc/bindings.cpp; this trusts them.
#pragma once
#include <cstdint>

namespace refpg::cuda {

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
  int64_t B, T, S, H, KV, hd;  // S >= 1, KV >= 1, H a multiple of KV, 1 <= hd <= 512
  float scale;
  float softcap;         // 0: no soft-cap
};

// Queues the work on the default stream; throws refpg::cuda::Error on a failed launch.
void attention(const AttentionArgs& args);

}  // namespace refpg::cuda

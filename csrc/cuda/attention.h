// Fused masked multi-/grouped-query attention on the GPU, semantics of refpg.ops.attention:
//   for each batch row b, query token t and head h (kv head h / (H / KV)), over keys s < S:
//     score[s] = softcap((q[b,t,h] · k[b,s,kv]) · scale), or the most negative float where
//                mask[b,t,s] is false (a query that sees no key then averages all of v, never NaN)
//     out[b,t,h] = Σ_s softmax(score)[s] · v[b,s,kv]
// Prefill (T > 4): tiles of query rows with key/value tiles staged in shared memory and an online
// (flash-style) softmax, fp32 throughout. Decode (T <= 4): split-KV — the keys are cut into chunks
// processed by separate blocks, each leaving (max, sum, partial output), combined by a second kernel.
// All pointers are device pointers. Arguments are validated in csrc/bind_cuda.cpp; this trusts them.
#pragma once
#include <cstdint>

#include "cpu/attention.h"

namespace refpg::cuda {

// AttentionArgs (the struct the CPU kernel takes, csrc/cpu/attention.h), here with device pointers;
// 1 <= hd <= 512.

// Queues the work on the default stream; throws refpg::cuda::Error on a failed launch.
void attention(const AttentionArgs& args);

}  // namespace refpg::cuda

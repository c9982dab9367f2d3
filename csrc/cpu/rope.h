// Rotary position embedding, rotate-half convention, with the semantics of refpg.ops.rope:
//   y = x·cos + rotate_half(x)·sin,  rotate_half(x) = cat(−x[hd/2:], x[:hd/2])
// computed pairwise — element j and j + hd/2 are read together before either is written — so y
// may be x itself. Each token's cos/sin row serves all its heads. One implementation: plain loops,
// vectorized by the compiler (memory bound: hand-written vectors would gain nothing), so every
// SimdPath runs the same code; tokens run in parallel. Arguments are validated in
// csrc/bind_cpu.cpp; this function trusts them.
#pragma once
#include <cstdint>

#include "cpu/simd.h"

namespace refpg {

// x, y: [tokens, heads, hd] contiguous, hd even (y may equal x); cos, sin: [tokens, hd]. Call
// without the GIL. `path` is taken like every op's; all paths run the same code.
void rope(const float* x, const float* cos, const float* sin, float* y, int64_t tokens, int64_t heads, int64_t hd,
          SimdPath path);

}  // namespace refpg

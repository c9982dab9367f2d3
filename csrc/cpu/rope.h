// Rotary position embedding, rotate-half convention, with the semantics of refpg.ops.rope:
//   y = x·cos + rotate_half(x)·sin,  rotate_half(x) = cat(−x[hd/2:], x[:hd/2])
// computed pairwise — element j and j + hd/2 are read together before either is written — so y
// may be x itself (the in-place rope_). Each token's cos/sin row serves all its heads. Plain
// loops, vectorized by the compiler; tokens run in parallel. Arguments are validated in
// csrc/bindings.cpp; this function trusts them.
#pragma once
#include <cstdint>

namespace refpg {

// x, y: [tokens, heads, hd] contiguous, hd even (y may equal x); cos, sin: [tokens, hd]. Call
// without the GIL.
void rope(const float* x, const float* cos, const float* sin, float* y, int64_t tokens, int64_t heads, int64_t hd);

}  // namespace refpg

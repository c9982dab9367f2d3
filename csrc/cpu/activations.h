// Elementwise activations, and the row softmax attention uses, float32, with the semantics of refpg.ops:
//   gelu_tanh(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))     geglu(g, u) = gelu_tanh(g)·u
//   softcap(x)   = cap·tanh(x / cap)                               softmax: e = exp(x − max), e / Σe
// Two implementations: every vector path (uses_avx2) evaluates tanh and exp eight lanes at a time
// with AVX2+FMA and Cephes' single-precision polynomials (a few ulp from the correctly rounded
// value); the Scalar path calls std::tanh / std::exp. Both sum softmax's exponentials in double. A
// softmax row holding a NaN or +inf, or only -inf, comes out all NaN, as NumPy's does. Arguments
// are validated in csrc/bind_cpu.cpp; these functions trust them.
#pragma once
#include <cstdint>

#include "cpu/simd.h"

namespace refpg {

// Whole arrays of n elements, in parallel chunks. Call without the GIL. y may equal x.
void gelu_tanh(const float* x, float* y, int64_t n, SimdPath path);
void geglu(const float* gate, const float* up, float* y, int64_t n, SimdPath path);
void softcap(const float* x, float* y, int64_t n, float cap, SimdPath path);

// One row on the calling thread (attention's building blocks). y may equal x.
void softcap_row(const float* x, float* y, int64_t n, float cap, SimdPath path);
void softmax_row(const float* x, float* y, int64_t n, SimdPath path);

}  // namespace refpg

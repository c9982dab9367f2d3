// Elementwise activations and the row softmax, float32, with the semantics of refpg.ops:
//   gelu_tanh(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))     geglu(g, u) = gelu_tanh(g)·u
//   softcap(x)   = cap·tanh(x / cap)                               softmax: e = exp(x − max), e / Σe
// Two paths, chosen by the caller (`avx2`, from run-time CPU detection): AVX2+FMA evaluates tanh
// and exp eight lanes at a time with Cephes' single-precision polynomials (a few ulp from the
// correctly rounded value); the portable path calls std::tanh / std::exp. Both sum softmax's
// exponentials in double. A softmax row holding a NaN or +inf, or only -inf, comes out all NaN,
// as NumPy's does. Arguments are validated in csrc/bindings.cpp; these functions trust them.
#pragma once
#include <cstdint>

namespace refpg {

// Whole arrays of n elements, in parallel chunks. Call without the GIL. y may equal x.
void gelu_tanh(const float* x, float* y, int64_t n, bool avx2);
void geglu(const float* gate, const float* up, float* y, int64_t n, bool avx2);
void softcap(const float* x, float* y, int64_t n, float cap, bool avx2);
void softmax(const float* x, float* y, int64_t rows, int64_t cols, bool avx2);  // over each row

// One row on the calling thread (attention's building blocks). y may equal x.
void softcap_row(const float* x, float* y, int64_t n, float cap, bool avx2);
void softmax_row(const float* x, float* y, int64_t n, bool avx2);

}  // namespace refpg

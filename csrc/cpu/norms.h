// Row norms over the last axis, float32, with the semantics of refpg.ops:
//   rms_norm:   y = x / sqrt(mean(x²) + eps) · (1 + w)                      (Gemma: note the 1 + w)
//   layer_norm: y = (x − mean) / sqrt(var + eps) · w + b, var = mean((x − mean)²)  (two passes)
// The row statistics (Σx², Σx, Σ(x − mean)²) are accumulated in double — x widened lane by lane
// on the AVX2 path — so they are exact to float precision whatever D; the normalized output is
// computed in float32. Rows run in parallel. Every vector path (uses_avx2) runs the AVX2+FMA code;
// Scalar, portable C++. Arguments are validated in csrc/bind_cpu.cpp; these functions trust them.
#pragma once
#include <cstdint>

#include "cpu/simd.h"

namespace refpg {

// x, y: [rows, D] contiguous (y may equal x); weight, bias: [D]. Call without the GIL.
void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t D, float eps, SimdPath path);
void layer_norm(const float* x, const float* weight, const float* bias, float* y, int64_t rows, int64_t D,
                float eps, SimdPath path);

}  // namespace refpg

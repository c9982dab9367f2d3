// linear and embedding on weights in MLX's affine group quantization (AffineWeight, in
// weight_format.h). Arguments are validated in csrc/bind_cpu.cpp; these functions trust them.
//
// * embedding and prefill (more than 8 x rows) dequantize exactly as refpg.formats.to_float32 and
//   mlx.core.dequantize do: q·s rounded to the scales' format, + b rounded again. Prefill then runs
//   the float32 GEMM of matmul.h on blocks of dequantized rows.
// * decode (up to 8 x rows) is a GEMV that reads each packed code once and never forms a weight:
//   per group, s·Σ x·q + b·Σ x, with Σ x per group computed once per call. It skips the two
//   roundings of the exact weight, so it differs from the reference by about a bf16 rounding of
//   each product (the op table states its bound). 4- and 8-bit codes have AVX2 code (float FMAs)
//   and, where the CPU has AVX-512 VNNI (the Avx512 and Amx paths), integer dot products on x in
//   16-bit fixed point per group (x's rounding <= 2^-15 of the group's largest |x|; see affine.cpp);
//   other widths, and the Scalar path, a portable loop.
#pragma once
#include <cstdint>

#include "cpu/matmul.h"
#include "cpu/simd.h"
#include "weight_format.h"

namespace refpg {

// y[M, N] = x[M, K] @ W.T (+ bias); p.weight and p.format are ignored, W is `w`.
void linear_affine(const LinearArgs& p, const AffineWeight& w, SimdPath path);

// out[i] = the exact float32 values of row ids[i] of `w` ([V, D]); out [n, D].
void embedding_affine(const AffineWeight& w, int64_t D, const int64_t* ids, int64_t n, float* out, SimdPath path);

}  // namespace refpg

// linear and embedding on weights in MLX's affine group quantization (AffineWeight, in
// weight_format.h). Arguments are validated in csrc/bind_cpu.cpp; these functions trust them.
//
// * embedding and prefill (more than 8 x rows) dequantize exactly as refpg.formats.to_float32 and
//   mlx.core.dequantize do: q·s rounded to the scales' format, + b rounded again. Prefill runs the
//   float32 GEMM of matmul.h (linear_spans) on 256-wide spans of W rows dequantized as it packs
//   them: x is packed once, no dequantized copy of W is kept (Amx CPUs run its AVX-512 GEMM).
// * decode (up to 8 x rows) is a GEMV that reads each packed code once and never forms a weight:
//   per group, s·Σ x·q + b·Σ x. It skips the two roundings of the exact weight, so it differs from
//   the reference by about a bf16 rounding of each product (the op table states its bound). 4-bit
//   codes (AVX2), and 4- and 8-bit codes where the CPU has AVX-512 VNNI (the Avx512 and Amx paths),
//   take integer dot products on x rounded to 16-bit fixed point per group (<= 2^-15 of the
//   group's largest |x|; see affine.cpp); 8-bit codes without VNNI a float loop (AVX2). 2-, 3-, 5-
//   and 6-bit codes are unpacked a tile of rows at a time to one byte each (AVX-512 VBMI byte
//   permutes, or AVX2 byte shuffles, or a scalar loop) and take the 8-bit loops. The Scalar path: a portable loop.
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

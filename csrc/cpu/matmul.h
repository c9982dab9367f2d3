// linear: y[M, N] = x[M, K] @ W[N, K].T (+ b), W float32 or bf16 bits, fp32 accumulation.
// Arguments are validated in csrc/bind_cpu.cpp; these functions trust them.
#pragma once
#include <cstdint>

#include "cpu/simd.h"
#include "weight_format.h"

namespace refpg {

struct LinearArgs {
  const float* x;       // [M, K], rows ldx floats apart
  int64_t ldx;
  const void* weight;   // [N, K] contiguous: float (F32) or uint16_t bf16 bits (BF16)
  WeightFormat format;
  const float* bias;    // [N] or nullptr
  float* y;             // [M, N], rows ldy floats apart; must not overlap the inputs
  int64_t ldy;
  int64_t M, N, K;      // any of them may be 0
};

// Runs on the threadpool; call without the GIL. `path`: Scalar, Avx2 and Avx512 run their own
// GEMV and GEMM; Amx its AMX GEMM (matmul_amx.h) for more than 8 rows, the Avx512 code otherwise.
void linear(const LinearArgs& args, SimdPath path);

}  // namespace refpg

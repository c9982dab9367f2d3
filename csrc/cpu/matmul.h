// linear: y[M, N] = x[M, K] @ W[N, K].T (+ b), W float32 or bf16 bits, fp32 accumulation.
// Arguments are validated in csrc/bind_cpu.cpp; these functions trust them.
#pragma once
#include <cstdint>
#include <functional>

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

// The GEMM's depth block: the longest span linear_spans asks for.
constexpr int64_t kWeightSpanDepth = 256;

// W handed over span by span: spans(n, cols, k0, kc, dst) writes W[n + j, k0 + k] to dst[j·kc + k]
// as float32, for j < cols <= 32 and k < kc <= kWeightSpanDepth, k0 a multiple of it (so kc is too,
// unless the span ends at K).
using WeightSpans = std::function<void(int64_t n, int64_t cols, int64_t k0, int64_t kc, float* dst)>;

// linear's prefill GEMM (any M > 0, K > 0) on W read through `spans` (args.weight and args.format
// are ignored): x is packed once, each span read once per kGemmRows rows of x. Scalar, Avx2 and
// Avx512 run their own FMA GEMM; Amx the Avx512 one.
void linear_spans(const LinearArgs& args, const WeightSpans& spans, SimdPath path);

}  // namespace refpg

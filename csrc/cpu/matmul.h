// linear: y[M, N] = x[M, K] @ W[N, K].T (+ b), W float32 or bf16 bits, fp32 accumulation.
// Arguments are validated in csrc/bindings.cpp; these functions trust them.
#pragma once
#include <cstdint>

namespace refpg {

// The instruction set linear runs with. REFPG_SIMD=amx|avx512|avx2|scalar forces one; unset (or
// "auto") takes the best this CPU has. Amx: AMX tiles for the GEMM (more than 8 rows), AVX-512 for
// the GEMV. Throws std::invalid_argument for an unknown value and std::runtime_error when the
// forced path cannot run on this CPU.
enum class SimdPath { Scalar, Avx2, Avx512, Amx };
SimdPath simd_path();
const char* simd_path_name(SimdPath path);

struct LinearArgs {
  const float* x;       // [M, K], rows ldx floats apart
  int64_t ldx;
  const void* weight;   // [N, K] contiguous: float, or uint16_t bf16 bits when weight_bf16
  bool weight_bf16;
  const float* bias;    // [N] or nullptr
  float* y;             // [M, N], rows ldy floats apart; must not overlap the inputs
  int64_t ldy;
  int64_t M, N, K;      // any of them may be 0
};

// Runs on the threadpool; call without the GIL.
void linear(const LinearArgs& args, SimdPath path);

}  // namespace refpg

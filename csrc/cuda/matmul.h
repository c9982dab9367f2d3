// linear on the GPU: y[M, N] = x[M, K] @ W[N, K].T (+ b), W float32 or bf16, fp32 accumulation.
//   M <= 8 (decode): a bandwidth-bound GEMV — each weight row is read once with 16-byte loads, the
//                    few activation rows sit in shared memory, products and sums in fp32 (exact
//                    for bf16 weights up to summation order);
//   M > 8 (prefill): bf16 tensor-core tiles (mma), activations (and fp32 weights) rounded to bf16
//                    when staged into shared memory, fp32 accumulation.
// All pointers are device pointers. Arguments are validated in csrc/bind_cuda.cpp; this trusts them.
#pragma once
#include <cstdint>

#include "cpu/matmul.h"

namespace refpg::cuda {

// LinearArgs (the struct the CPU kernel takes, csrc/cpu/matmul.h), here with device pointers.

// Queues the work on the default stream; throws refpg::cuda::Error on a failed launch.
void linear(const LinearArgs& args);

}  // namespace refpg::cuda

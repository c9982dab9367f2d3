// Elementwise activations on the GPU, the numerics of refpg.ops (tanhf, expf:
// accurate, not the fast intrinsics). Contiguous float32 device arrays; validated in csrc/bind_cuda.cpp.
#pragma once
#include <cstdint>

namespace refpg::cuda {

void gelu_tanh(const float* x, float* y, int64_t n);                   // 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))
void geglu(const float* gate, const float* up, float* y, int64_t n);   // gelu_tanh(gate) · up
void softcap(const float* x, float* y, int64_t n, float cap);          // cap · tanh(x / cap)
// Residual stream arithmetic: y = a + b, b repeated every nb elements of a (nb divides n: a
// trailing-shape broadcast such as [B, N, D] + [N, D]); y = a · s.
void add(const float* a, const float* b, float* y, int64_t n, int64_t nb);
void scale(const float* a, float s, float* y, int64_t n);

}  // namespace refpg::cuda

// Activations and residual arithmetic: see activations.h. Elementwise kernels use a grid-stride
// loop over n.
#include "cuda/activations.h"
#include "cuda/check.cuh"

namespace refpg::cuda {

namespace {

constexpr int kThreads = 256;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

__device__ float gelu_one(float x) { return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kGeluCubic * x * x * x))); }

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65536 ? b : 65536);  // grid-stride loops cover the rest
}

#define REFPG_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<int64_t>(gridDim.x) * blockDim.x)

__global__ void gelu_kernel(const float* x, float* y, int64_t n) {
  REFPG_GRID_STRIDE(i, n) y[i] = gelu_one(x[i]);
}

__global__ void geglu_kernel(const float* gate, const float* up, float* y, int64_t n) {
  REFPG_GRID_STRIDE(i, n) y[i] = gelu_one(gate[i]) * up[i];
}

__global__ void softcap_kernel(const float* x, float* y, int64_t n, float cap) {
  REFPG_GRID_STRIDE(i, n) y[i] = cap * tanhf(x[i] / cap);
}

__global__ void add_kernel(const float* a, const float* b, float* y, int64_t n, int64_t nb) {
  REFPG_GRID_STRIDE(i, n) y[i] = a[i] + b[i % nb];
}

__global__ void scale_kernel(const float* a, float s, float* y, int64_t n) {
  REFPG_GRID_STRIDE(i, n) y[i] = a[i] * s;
}

}  // namespace

void gelu_tanh(const float* x, float* y, int64_t n) {
  if (n == 0) return;
  gelu_kernel<<<blocks_for(n), kThreads>>>(x, y, n);
  REFPG_CUDA_LAUNCHED("gelu_kernel");
}

void geglu(const float* gate, const float* up, float* y, int64_t n) {
  if (n == 0) return;
  geglu_kernel<<<blocks_for(n), kThreads>>>(gate, up, y, n);
  REFPG_CUDA_LAUNCHED("geglu_kernel");
}

void softcap(const float* x, float* y, int64_t n, float cap) {
  if (n == 0) return;
  softcap_kernel<<<blocks_for(n), kThreads>>>(x, y, n, cap);
  REFPG_CUDA_LAUNCHED("softcap_kernel");
}

void add(const float* a, const float* b, float* y, int64_t n, int64_t nb) {
  if (n == 0) return;
  add_kernel<<<blocks_for(n), kThreads>>>(a, b, y, n, nb);
  REFPG_CUDA_LAUNCHED("add_kernel");
}

void scale(const float* a, float s, float* y, int64_t n) {
  if (n == 0) return;
  scale_kernel<<<blocks_for(n), kThreads>>>(a, s, y, n);
  REFPG_CUDA_LAUNCHED("scale_kernel");
}

}  // namespace refpg::cuda

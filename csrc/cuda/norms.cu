// rms_norm and layer_norm: see norms.h.
#include "cuda/check.cuh"
#include "cuda/norms.h"
#include "cuda/reduce.cuh"

namespace refpg::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void rms_norm_kernel(const float* x, const float* w, float* y, int64_t D, float eps) {
  __shared__ double scratch[32];
  const float* xr = x + blockIdx.x * D;
  float* yr = y + blockIdx.x * D;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) s += static_cast<double>(xr[i]) * xr[i];
  s = block_reduce(s, Sum{}, scratch);
  const float inv = static_cast<float>(1.0 / sqrt(s / static_cast<double>(D) + eps));
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) yr[i] = xr[i] * inv * (1.0f + w[i]);
}

__global__ void layer_norm_kernel(const float* x, const float* w, const float* b, float* y, int64_t D, float eps) {
  __shared__ double scratch[32];
  const float* xr = x + blockIdx.x * D;
  float* yr = y + blockIdx.x * D;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) s += xr[i];
  const float mean = static_cast<float>(block_reduce(s, Sum{}, scratch) / static_cast<double>(D));
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const double c = xr[i] - mean;  // the difference in float32, as NumPy's `centered`
    ss += c * c;
  }
  ss = block_reduce(ss, Sum{}, scratch);
  const float inv = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(D) + eps));
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
}

// Rows go on grid.x (up to 2^31 − 1).
dim3 row_grid(int64_t rows) { return dim3(static_cast<unsigned>(rows)); }

}  // namespace

void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t D, float eps) {
  if (rows == 0 || D == 0) return;
  rms_norm_kernel<<<row_grid(rows), kThreads>>>(x, w, y, D, eps);
  REFPG_CUDA_LAUNCHED("rms_norm_kernel");
}

void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t D, float eps) {
  if (rows == 0 || D == 0) return;
  layer_norm_kernel<<<row_grid(rows), kThreads>>>(x, w, b, y, D, eps);
  REFPG_CUDA_LAUNCHED("layer_norm_kernel");
}

}  // namespace refpg::cuda

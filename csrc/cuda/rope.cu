// rope: see rope.h. One thread per rotated pair (x[j], x[j + hd/2]) of one head of one token.
#include "cuda/check.cuh"
#include "cuda/rope.h"

namespace refpg::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void rope_kernel(const float* x, const float* cos, const float* sin, float* y, int64_t pairs,
                            int64_t heads, int64_t half) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = p % half, row = p / half;  // row = token · heads + head
    const int64_t t = row / heads;
    const float* xr = x + row * 2 * half;
    const float* c = cos + t * 2 * half;
    const float* s = sin + t * 2 * half;
    const float a = xr[j], b = xr[j + half];
    float* yr = y + row * 2 * half;
    yr[j] = a * c[j] - b * s[j];
    yr[j + half] = b * c[j + half] + a * s[j + half];
  }
}

}  // namespace

void rope(const float* x, const float* cos, const float* sin, float* y, int64_t tokens, int64_t heads, int64_t hd) {
  const int64_t pairs = tokens * heads * (hd / 2);
  if (pairs == 0) return;
  const int64_t blocks = (pairs + kThreads - 1) / kThreads;
  rope_kernel<<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), kThreads>>>(x, cos, sin, y, pairs, heads, hd / 2);
  REFPG_CUDA_LAUNCHED("rope_kernel");
}

}  // namespace refpg::cuda

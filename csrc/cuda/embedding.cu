// embedding: see embedding.h. One block per id; threads stride over the row.
#include "cuda/check.cuh"
#include "cuda/embedding.h"

namespace refpg::cuda {

namespace {

constexpr int kThreads = 256;

template <bool kBf16>
__global__ void embedding_kernel(const void* table, int64_t D, const int64_t* ids, float* out) {
  const int64_t row = ids[blockIdx.x];
  float* o = out + blockIdx.x * D;
  if constexpr (kBf16) {
    const uint16_t* t = static_cast<const uint16_t*>(table) + row * D;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) o[i] = __uint_as_float(static_cast<uint32_t>(t[i]) << 16);
  } else {
    const float* t = static_cast<const float*>(table) + row * D;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) o[i] = t[i];
  }
}

}  // namespace

void embedding(const void* table, WeightFormat format, int64_t D, const int64_t* ids, int64_t n, float* out) {
  if (n == 0 || D == 0) return;
  if (format == WeightFormat::BF16)
    embedding_kernel<true><<<static_cast<unsigned>(n), kThreads>>>(table, D, ids, out);
  else
    embedding_kernel<false><<<static_cast<unsigned>(n), kThreads>>>(table, D, ids, out);
  REFPG_CUDA_LAUNCHED("embedding_kernel");
}

}  // namespace refpg::cuda

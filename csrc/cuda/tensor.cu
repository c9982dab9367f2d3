// copy_strided and scatter_rows: see tensor.h.
#include <string>

#include "cuda/check.cuh"
#include "cuda/tensor.h"

namespace refpg::cuda {

namespace {

constexpr int kThreads = 256;

struct Layout {
  int64_t shape[kMaxDims], dst[kMaxDims], src[kMaxDims];
  int ndim;
};

// One thread per element: the flat index is unravelled over the shape (last dimension fastest).
template <typename T>
__global__ void copy_strided_kernel(T* dst, const T* src, Layout l, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rest = i, d_off = 0, s_off = 0;
    for (int k = l.ndim - 1; k >= 0; --k) {
      const int64_t idx = rest % l.shape[k];
      rest /= l.shape[k];
      d_off += idx * l.dst[k];
      s_off += idx * l.src[k];
    }
    dst[d_off] = src[s_off];
  }
}

__global__ void scatter_rows_kernel(float* dst, const int64_t* rows, const float* src, int64_t width) {
  float* d = dst + rows[blockIdx.x] * width;
  const float* s = src + blockIdx.x * width;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) d[j] = s[j];
}

template <typename T>
void launch_copy(void* dst, const void* src, const Layout& l, int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  copy_strided_kernel<T><<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), kThreads>>>(
      static_cast<T*>(dst), static_cast<const T*>(src), l, n);
  REFPG_CUDA_LAUNCHED("copy_strided_kernel");
}

}  // namespace

void copy_strided(void* dst, const int64_t* dst_strides, const void* src, const int64_t* src_strides,
                  const int64_t* shape, int ndim, int elem_bytes) {
  if (ndim < 0 || ndim > kMaxDims) throw Error("copy_strided: " + std::to_string(ndim) + " dimensions (at most 6)");
  Layout l{};
  l.ndim = ndim;
  int64_t n = 1;
  for (int k = 0; k < ndim; ++k) {
    l.shape[k] = shape[k];
    l.dst[k] = dst_strides[k];
    l.src[k] = src_strides[k];
    n *= shape[k];
  }
  if (n == 0) return;
  switch (elem_bytes) {
    case 1: launch_copy<uint8_t>(dst, src, l, n); break;
    case 2: launch_copy<uint16_t>(dst, src, l, n); break;
    case 4: launch_copy<uint32_t>(dst, src, l, n); break;
    default: launch_copy<uint64_t>(dst, src, l, n); break;
  }
}

void scatter_rows(float* dst, const int64_t* rows, const float* src, int64_t n, int64_t width) {
  if (n == 0 || width == 0) return;
  scatter_rows_kernel<<<static_cast<unsigned>(n), kThreads>>>(dst, rows, src, width);
  REFPG_CUDA_LAUNCHED("scatter_rows_kernel");
}

}  // namespace refpg::cuda

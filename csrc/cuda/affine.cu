// affine: see affine.h. The products and sums of a weight use __fmul_rn / __fadd_rn: no fused
// multiply-add may merge q·s + b, which MLX rounds after the product.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda/affine.h"
#include "cuda/check.cuh"
#include "cuda/matmul.h"
#include "cuda/runtime.h"

namespace refpg::cuda {

namespace {

constexpr int kWarps = 8;                 // GEMV: warps (W rows) per block
constexpr int kMaxRows = 8;               // GEMV: x rows
constexpr int64_t kDequantElems = 1 << 24;  // prefill: floats of dequantized W per block of rows (64 MB)

__device__ __forceinline__ float value_at(const void* p, WeightFormat f, int64_t i) {
  if (f == WeightFormat::BF16) return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16);
  if (f == WeightFormat::F16) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ float round_to(float v, WeightFormat f) {
  if (f == WeightFormat::BF16) return __bfloat162float(__float2bfloat16_rn(v));
  if (f == WeightFormat::F16) return __half2float(__float2half_rn(v));
  return v;
}

// Code k of a row's bit stream (least significant bit first).
__device__ __forceinline__ uint32_t code_at(const uint32_t* words, int bits, int64_t k) {
  const int64_t bit = k * bits;
  const int shift = static_cast<int>(bit & 31);
  uint64_t v = words[bit >> 5] >> shift;
  if (shift + bits > 32) v |= static_cast<uint64_t>(words[(bit >> 5) + 1]) << (32 - shift);
  return static_cast<uint32_t>(v) & ((1u << bits) - 1u);
}

// Weight k of row n, exactly.
__device__ __forceinline__ float weight_at(const AffineWeight& w, int64_t K, int64_t n, int64_t k) {
  const int64_t groups = K / w.group_size, g = n * groups + k / w.group_size;
  const float q = static_cast<float>(code_at(w.codes + n * (K * w.bits / 32), w.bits, k));
  const float s = value_at(w.scales, w.scale_format, g), b = value_at(w.biases, w.scale_format, g);
  return round_to(__fadd_rn(round_to(__fmul_rn(q, s), w.scale_format), b), w.scale_format);
}

// out[i, k] = W[row i, k], rows = ids[i] or first + i; one thread per element (grid-stride).
__global__ void dequantize_kernel(AffineWeight w, int64_t K, const int64_t* ids, int64_t first, int64_t count,
                                  float* out) {
  const int64_t total = count * K;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / K, k = e % K;
    out[e] = weight_at(w, K, ids ? ids[i] : first + i, k);
  }
}

void dequantize(const AffineWeight& w, int64_t K, const int64_t* ids, int64_t first, int64_t count, float* out) {
  const int64_t total = count * K;
  if (total == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 1 << 16));
  dequantize_kernel<<<blocks, 256>>>(w, K, ids, first, count, out);
  REFPG_CUDA_LAUNCHED("affine dequantize_kernel");
}

// y[m, n] = Σ_k x[m, k] · W[n, k] (+ bias[n]): warp `threadIdx.y` of block b takes row n = b·kWarps + y.
__global__ void gemv_kernel(LinearArgs p, AffineWeight w) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (n >= p.N) return;
  float acc[kMaxRows] = {};
  for (int64_t k = threadIdx.x; k < p.K; k += 32) {
    const float wk = weight_at(w, p.K, n, k);
    for (int m = 0; m < kMaxRows; ++m)
      if (m < p.M) acc[m] = fmaf(p.x[m * p.ldx + k], wk, acc[m]);
  }
  for (int m = 0; m < kMaxRows; ++m) {
    if (m >= p.M) break;
    float v = acc[m];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (threadIdx.x == 0) p.y[m * p.ldy + n] = v + (p.bias ? p.bias[n] : 0.0f);
  }
}

}  // namespace

void linear_affine(const LinearArgs& p, const AffineWeight& w) {
  if (p.M == 0 || p.N == 0) return;
  if (p.M <= kMaxRows) {
    const dim3 block(32, kWarps);
    gemv_kernel<<<static_cast<unsigned>((p.N + kWarps - 1) / kWarps), block>>>(p, w);
    REFPG_CUDA_LAUNCHED("affine gemv_kernel");
    return;
  }
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(p.N, kDequantElems / std::max<int64_t>(p.K, 1)));
  void* block = alloc(static_cast<size_t>(rows * std::max<int64_t>(p.K, 1)) * sizeof(float));
  try {
    for (int64_t n0 = 0; n0 < p.N; n0 += rows) {
      const int64_t count = std::min(rows, p.N - n0);
      dequantize(w, p.K, nullptr, n0, count, static_cast<float*>(block));
      LinearArgs part = p;
      part.weight = block;
      part.format = WeightFormat::F32;
      part.bias = p.bias ? p.bias + n0 : nullptr;
      part.y = p.y + n0;
      part.N = count;
      linear(part);
    }
  } catch (...) {
    release(block);
    throw;
  }
  release(block);  // stream-ordered: freed after the queued kernels that read it
}

void embedding_affine(const AffineWeight& w, int64_t D, const int64_t* ids, int64_t n, float* out) {
  dequantize(w, D, ids, 0, n, out);
}

}  // namespace refpg::cuda

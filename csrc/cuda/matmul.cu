// linear on the GPU: y[M, N] = x[M, K] @ W[N, K].T (+ b); see matmul.h. Two paths:
//
//  * Decode, M <= kGemvMaxRows (8): bandwidth bound, every weight byte is read once. gemv_kernel is
//    templated on MT (M rounded up to 1, 2, 4 or 8; rows past M are zeros in shared memory and never
//    written), the weight type and kVec (16-byte weight loads: each W row starts 16-byte aligned,
//    i.e. K * sizeof(W) % 16 == 0 and W itself 16-byte aligned; otherwise one element per load).
//    A block of 8 warps owns a group of columns: the warps are wc "column slots" of R columns each
//    times wk "depth slots" that split those columns' K (wk = 1 unless N is too small to give every
//    resident block a group; the wk partial sums then meet in shared memory). x[0:MT, chunk] sits in
//    shared memory (up to 64 KB; the whole of K whenever it fits, and then it is staged once per
//    block, the grid striding over the column groups). Each lane issues kGemvLoadsPerLane 16-byte
//    weight loads before using any, multiplies in fp32 (bf16 -> f32 is exact) and the lanes' sums
//    meet by warp shuffles: the result is the fp32 dot product up to summation order.
//  * Prefill, M > 8: bf16 tensor cores, mma.sync.m16n8k16 (row.col, fp32 accumulation), fragments
//    read from shared memory with ldmatrix. A block computes a BM x BN tile of y over K in steps of
//    kBK = 32: x rows are rounded to bf16 (round to nearest even) and W rows copied (bf16) or rounded
//    (fp32) into shared memory, zeros past M, N and K, so any shape works. Two buffers: while the
//    warps multiply step s (two k16 halves), step s + 1 is loaded into registers half by half and
//    stored to the other buffer after each half (one __syncthreads per step). Loads are 8-byte (x)
//    and 16-byte (W) when alignment allows (gemm_kernel<..., kFast>), else per element. Tiles:
//    128 x 128 with 8 warps of 64 x 32 when that gives at least one block per SM, else 64 x 64 with
//    4 warps of 32 x 32. The epilogue writes each accumulator (its (row, col) known from the mma
//    layout) plus the bias, bounds-checked.
// K == 0 writes the bias (or zeros). Everything is queued on the default stream, nothing synchronizes.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cuda/check.cuh"
#include "cuda/matmul.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "csrc/cuda/matmul.cu needs sm_80 or newer (bf16 mma.sync)"
#endif

namespace refpg::cuda {

namespace {

constexpr int64_t kGemvMaxRows = 8;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ============================================ decode ============================================

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kGemvXFloats = 16384;   // x chunk in shared memory, all MT rows together: 64 KB
constexpr int kGemvLoadsPerLane = 8;  // weight loads each lane issues before using them (R x U)

// Per MT: R columns per warp (more rows: more reuse of each x value read from shared memory, which
// keeps shared-memory traffic below the weight traffic), U loads per column in flight (half as many
// for MT = 8, whose 32 accumulators would otherwise spill), and the blocks per SM the registers must
// allow (3 blocks of 8 warps: at most 80 registers per thread; 2 blocks: 128).
template <int MT>
struct GemvShape {
  static constexpr int R = MT >= 4 ? MT / 2 : 1;
  static constexpr int U = (MT == 8 ? kGemvLoadsPerLane / 2 : kGemvLoadsPerLane) / R;
  static constexpr int kMinBlocks = MT <= 2 ? 3 : 2;
};

struct GemvParams {
  const float* x;
  int64_t ldx;
  const void* w;
  const float* bias;
  float* y;
  int64_t ldy;
  int M, N, K;
  int kc_cap;  // x floats per row per chunk: a multiple of 8; the shared x region is MT * kc_cap
  int wk;      // depth warps per column group: 1, 2, 4 or 8
};

// One weight "vector" as raw 32-bit words: kElems weights per load, element e as float by elem().
template <class Wt, bool kVec>
struct GemvW;
template <>
struct GemvW<float, true> {  // 4 floats, 16 bytes
  static constexpr int kElems = 4, kWords = 4;
  static __device__ __forceinline__ void load(const float* row, int v, uint32_t (&w)[kWords]) {
    const uint4 q = __ldcs(reinterpret_cast<const uint4*>(row) + v);
    w[0] = q.x, w[1] = q.y, w[2] = q.z, w[3] = q.w;
  }
  static __device__ __forceinline__ float elem(const uint32_t (&w)[kWords], int e) { return __uint_as_float(w[e]); }
};
template <>
struct GemvW<uint16_t, true> {  // 8 bf16, 16 bytes; element 2i is the low half of word i
  static constexpr int kElems = 8, kWords = 4;
  static __device__ __forceinline__ void load(const uint16_t* row, int v, uint32_t (&w)[kWords]) {
    const uint4 q = __ldcs(reinterpret_cast<const uint4*>(row) + v);
    w[0] = q.x, w[1] = q.y, w[2] = q.z, w[3] = q.w;
  }
  static __device__ __forceinline__ float elem(const uint32_t (&w)[kWords], int e) {
    return __uint_as_float((e & 1) ? (w[e >> 1] & 0xffff0000u) : (w[e >> 1] << 16));
  }
};
template <>
struct GemvW<float, false> {
  static constexpr int kElems = 1, kWords = 1;
  static __device__ __forceinline__ void load(const float* row, int v, uint32_t (&w)[kWords]) {
    w[0] = __float_as_uint(__ldcs(row + v));
  }
  static __device__ __forceinline__ float elem(const uint32_t (&w)[kWords], int) { return __uint_as_float(w[0]); }
};
template <>
struct GemvW<uint16_t, false> {
  static constexpr int kElems = 1, kWords = 1;
  static __device__ __forceinline__ void load(const uint16_t* row, int v, uint32_t (&w)[kWords]) {
    w[0] = __ldcs(row + v);
  }
  static __device__ __forceinline__ float elem(const uint32_t (&w)[kWords], int) { return __uint_as_float(w[0] << 16); }
};

// Where chunk element kk of an x row lives in that row's kc_cap floats of shared memory. With VE
// (elements per weight load) = 8, the 8 x values of load v are split in two float4s, kept in two
// halves of the row (v * 4 in each), so that lane-consecutive float4 reads are conflict free;
// VE = 4 and VE = 1 use the plain layout (slot = kk).
template <int VE>
__device__ __forceinline__ int x_slot(int kk, int kc_cap) {
  if constexpr (VE == 8)
    return ((kk & 7) >> 2) * (kc_cap / 2) + (kk >> 3) * 4 + (kk & 3);
  else
    return kk;
}

// x values xv[0:P] of piece `piece` of weight load v (chunk elements v * VE + piece * P + [0, P),
// P = min(VE, 4)) of one staged row, as laid out by x_slot.
template <int VE, int P = (VE < 4 ? VE : 4)>
__device__ __forceinline__ void x_piece(const float* xrow, int kc_cap, int v, int piece, float (&xv)[P]) {
  if constexpr (VE == 1) {
    xv[0] = xrow[v];
  } else {
    const float4 f = *reinterpret_cast<const float4*>(xrow + piece * (kc_cap / 2) + v * 4);
    xv[0] = f.x, xv[1] = f.y, xv[2] = f.z, xv[3] = f.w;
  }
}

// cp.async (sm_80+): a 4-byte global -> shared copy that completes asynchronously; cp_async_wait_all
// waits for this thread's copies (a __syncthreads must follow before other threads read them).
__device__ __forceinline__ void cp_async_4(float* smem, const float* gmem) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Dynamic shared memory: x chunk [MT][kc_cap] floats, then kGemvWarps * MT * R floats of partial
// sums for wk > 1. Grid: any number of blocks <= the number of column groups; blocks stride over them.
template <int MT, class Wt, bool kVec>
__global__ void __launch_bounds__(kGemvThreads, GemvShape<MT>::kMinBlocks) gemv_kernel(const GemvParams p) {
  using W = GemvW<Wt, kVec>;
  constexpr int R = GemvShape<MT>::R, U = GemvShape<MT>::U, VE = W::kElems, kOut = MT * R;
  constexpr int P = VE < 4 ? VE : 4;                         // elements per x read (a float4 piece)
  constexpr int kChains = kOut >= 4 ? 1 : 4 / kOut;          // independent sums per output (ILP)
  extern __shared__ float4 gemv_smem[];
  float* xs = reinterpret_cast<float*>(gemv_smem);
  float* partial = xs + MT * p.kc_cap;  // [warp][m * R + r]

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wk = warp % p.wk, wc = warp / p.wk;  // depth slot, column slot of this warp
  const int cols_per_block = (kGemvWarps / p.wk) * R;
  const int64_t groups = ceil_div(p.N, cols_per_block);
  const bool resident = p.K <= p.kc_cap;  // one chunk: x is staged once per block
  const Wt* weight = static_cast<const Wt*>(p.w);
  const int step = p.wk * 32;  // loads between one lane's consecutive loads of a row

  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t n_first = g * cols_per_block + static_cast<int64_t>(wc) * R;  // this warp's columns
    const Wt* wrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {  // columns past N read row N - 1 and are not written
      const int64_t n = n_first + r < p.N ? n_first + r : p.N - 1;
      wrow[r] = weight + n * p.K;
    }

    float acc[MT][R][kChains];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < kChains; ++c) acc[m][r][c] = 0.0f;

    for (int k0 = 0; k0 < p.K; k0 += p.kc_cap) {
      const int kc = min(p.kc_cap, p.K - k0);  // a multiple of VE on the kVec path
      if (!resident || g == blockIdx.x) {      // block-uniform
        __syncthreads();                       // the previous chunk has been read
        // Asynchronous 4-byte copies, all in flight at once (no registers held); rows past M are zeros.
        for (int m = 0; m < MT; ++m)
          for (int kk = threadIdx.x; kk < kc; kk += kGemvThreads) {
            float* dst = xs + m * p.kc_cap + x_slot<VE>(kk, p.kc_cap);
            if (m < p.M)
              cp_async_4(dst, p.x + m * p.ldx + k0 + kk);
            else
              *dst = 0.0f;
          }
        cp_async_wait_all();
        __syncthreads();
      }
      const int nv = kc / VE;  // weight loads per row in this chunk
      for (int v0 = wk * 32 + lane; v0 < nv; v0 += U * step) {
        uint32_t raw[U][R][W::kWords];  // all U * R loads are issued before any is used
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = v0 + u * step;
#pragma unroll
          for (int r = 0; r < R; ++r)
            if (v < nv) W::load(wrow[r] + k0, v, raw[u][r]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = v0 + u * step;
          if (v >= nv) continue;
#pragma unroll
          for (int piece = 0; piece < VE / P; ++piece) {
            float wf[R][P];  // this piece of the R weight loads, as floats
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
              for (int e = 0; e < P; ++e) wf[r][e] = W::elem(raw[u][r], piece * P + e);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              float xv[P];
              x_piece<VE>(xs + m * p.kc_cap, p.kc_cap, v, piece, xv);
#pragma unroll
              for (int r = 0; r < R; ++r)
#pragma unroll
                for (int e = 0; e < P; ++e) acc[m][r][u % kChains] = fmaf(xv[e], wf[r][e], acc[m][r][u % kChains]);
            }
          }
        }
      }
    }

    // Every lane gets the warp's sums; lane m * R + r writes (row m, column n_first + r).
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float sum = acc[m][r][0];
#pragma unroll
        for (int c = 1; c < kChains; ++c) sum += acc[m][r][c];
        acc[m][r][0] = warp_sum(sum);
      }
    if (p.wk == 1) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int64_t n = n_first + r;
          if (lane == m * R + r && m < p.M && n < p.N)
            p.y[m * p.ldy + n] = acc[m][r][0] + (p.bias ? p.bias[n] : 0.0f);
        }
    } else {  // block-uniform: the wk warps of a column slot add their depth slices
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r)
          if (lane == m * R + r) partial[warp * kOut + m * R + r] = acc[m][r][0];
      __syncthreads();
      const int outs = (kGemvWarps / p.wk) * kOut;  // <= 4 * 32 < kGemvThreads
      if (static_cast<int>(threadIdx.x) < outs) {
        const int c = threadIdx.x / kOut, j = threadIdx.x % kOut, m = j / R, r = j % R;
        float s = 0.0f;
        for (int q = 0; q < p.wk; ++q) s += partial[(c * p.wk + q) * kOut + j];
        const int64_t n = g * cols_per_block + static_cast<int64_t>(c) * R + r;
        if (m < p.M && n < p.N) p.y[m * p.ldy + n] = s + (p.bias ? p.bias[n] : 0.0f);
      }
      __syncthreads();  // `partial` is written again by the next group
    }
  }
}

int sm_count() {
  int device = 0, sms = 0;
  REFPG_CUDA_CHECK(cudaGetDevice(&device));
  REFPG_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

template <int MT, class Wt, bool kVec>
void launch_gemv(const LinearArgs& a, int sms) {
  constexpr int R = GemvShape<MT>::R;
  const auto kernel = gemv_kernel<MT, Wt, kVec>;
  GemvParams p;
  p.x = a.x, p.ldx = a.ldx, p.w = a.weight, p.bias = a.bias, p.y = a.y, p.ldy = a.ldy;
  p.M = static_cast<int>(a.M), p.N = static_cast<int>(a.N), p.K = static_cast<int>(a.K);
  p.kc_cap = static_cast<int>(std::min<int64_t>(kGemvXFloats / MT, ceil_div(a.K, 8) * 8));
  const size_t smem = sizeof(float) * (static_cast<size_t>(MT) * p.kc_cap + kGemvWarps * MT * R);
  if (smem > 48 * 1024)
    REFPG_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  REFPG_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kGemvThreads, smem));
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * sms;
  // Fewest depth warps per column group that still give every resident block a group.
  p.wk = 1;
  while (p.wk < kGemvWarps && ceil_div(a.N, (kGemvWarps / p.wk) * R) < resident) p.wk *= 2;
  const int64_t groups = ceil_div(a.N, (kGemvWarps / p.wk) * R);
  const int64_t rounds = ceil_div(groups, resident);  // groups per block, as even as can be
  const dim3 grid(static_cast<unsigned>(ceil_div(groups, rounds)));
  kernel<<<grid, kGemvThreads, smem>>>(p);
  REFPG_CUDA_LAUNCHED("gemv_kernel");
}

template <class Wt>
void gemv(const LinearArgs& a) {
  const int sms = sm_count();
  const bool vec = reinterpret_cast<uintptr_t>(a.weight) % 16 == 0 && (a.K * sizeof(Wt)) % 16 == 0;
  const int mt = a.M <= 1 ? 1 : a.M <= 2 ? 2 : a.M <= 4 ? 4 : 8;
  switch (mt * 2 + (vec ? 1 : 0)) {
    case 2: return launch_gemv<1, Wt, false>(a, sms);
    case 3: return launch_gemv<1, Wt, true>(a, sms);
    case 4: return launch_gemv<2, Wt, false>(a, sms);
    case 5: return launch_gemv<2, Wt, true>(a, sms);
    case 8: return launch_gemv<4, Wt, false>(a, sms);
    case 9: return launch_gemv<4, Wt, true>(a, sms);
    case 16: return launch_gemv<8, Wt, false>(a, sms);
    default: return launch_gemv<8, Wt, true>(a, sms);
  }
}

// ============================================ prefill ===========================================

constexpr int kBK = 32;           // depth per step: two k16 mma steps
constexpr int kPairs = kBK / 2;   // bf16 pairs (32-bit words) per tile row
constexpr int kLdw = kPairs + 4;  // words per shared tile row: rows 20 words apart make the
                                  // fragment loads (8 rows x 4 words per warp) conflict free
constexpr int kParts = 2;         // the next tile is staged in kParts parts, one per k16 step
static_assert(kBK / 16 == kParts, "one staged part per k16 step");

// BM x BN block tile, WARPS_M x WARPS_N warps, each a (BM / WARPS_M) x (BN / WARPS_N) warp tile of
// MF x NF mma tiles (16 x 8).
//
// Staging a tile of `rows` x kBK: thread tid owns depth pair tid % kPairs (word path: 2 elements,
// one 32-bit word of the bf16 tile) of rows tid / kPairs + i * kRowsPerPass, or, on the 16-byte
// path for W, chunk tid % CPR (E = 16 / sizeof(W) elements) of rows tid / CPR + i * (threads / CPR),
// CPR = kBK / E chunks per row. Index i = part * (per part) + ii runs over the thread's rows.
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int MIN_BLOCKS_>
struct GemmConfig {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MF = WM / 16, NF = WN / 8;
  static constexpr int kRowsPerPass = kThreads / kPairs;
  static constexpr int kAWords = BM / kRowsPerPass / kParts;  // per thread and part
  static constexpr int kBWords = BN / kRowsPerPass / kParts;
  template <class Wt>
  static constexpr int kChunksPerRow = kBK * static_cast<int>(sizeof(Wt)) / 16;
  template <class Wt>
  static constexpr int kChunkRowsPerPass = kThreads / kChunksPerRow<Wt>;
  template <class Wt>
  static constexpr int kBChunks = BN / kChunkRowsPerPass<Wt> / kParts;  // per thread and part
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile made of m16n8 mma tiles, in pairs along n");
  static_assert(kThreads % kPairs == 0 && kAWords * kRowsPerPass * kParts == BM &&
                    kBWords * kRowsPerPass * kParts == BN && kAWords * kParts <= 32 && kBWords * kParts <= 32,
                "whole words per thread and part, row masks in 32 bits");
  static_assert(kBChunks<float> * kChunkRowsPerPass<float> * kParts == BN &&
                    kBChunks<uint16_t> * kChunkRowsPerPass<uint16_t> * kParts == BN,
                "whole 16-byte chunks per thread and part");
};
using BigTile = GemmConfig<128, 128, 2, 4, 2>;
using SmallTile = GemmConfig<64, 64, 2, 2, 4>;

struct GemmParams {
  const float* x;
  int64_t ldx;
  const void* w;
  const float* bias;
  float* y;
  int64_t ldy;
  int M, N, K;
};

// The rows one thread stages from a row-major matrix: row i (< 32) of the thread is at
// base + i * row_step (depth 0 of the tile at k_off), inside the matrix when bit i of rows_ok is set.
template <class T>
struct TileSrc {
  const T* base;
  int64_t row_step;
  uint32_t rows_ok;
  int k_off;
};

template <class T>
__device__ __forceinline__ TileSrc<T> tile_src(const T* a, int64_t ld, int rows, int first_row, int rows_per_pass,
                                               int count, int k_off) {
  TileSrc<T> s;
  s.base = a + static_cast<int64_t>(first_row < rows ? first_row : rows - 1) * ld + k_off;  // valid when any row is
  s.row_step = static_cast<int64_t>(rows_per_pass) * ld;
  s.rows_ok = 0;
  for (int i = 0; i < count; ++i)
    if (first_row + i * rows_per_pass < rows) s.rows_ok |= 1u << i;
  s.k_off = k_off;
  return s;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low half
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  return u;
}

__device__ __forceinline__ uint32_t raw_bits(const float* p) { return __float_as_uint(__ldg(p)); }
__device__ __forceinline__ uint32_t raw_bits(const uint16_t* p) { return __ldg(p); }

// Word path, for A (x, fp32) and for W when kFast is off: the thread's rows i = part * kWords + ii,
// depths k0 + k_off and k0 + k_off + 1 -> raw[2 ii], raw[2 ii + 1] (zeros outside the matrix), as
// raw bits. kPair: one 8-byte load (x 8-byte aligned, ld and K even). The loads stay in flight in
// the registers until store_words.
template <int kWords, bool kPair, class T>
__device__ __forceinline__ void load_words(const TileSrc<T>& s, int K, int k0, int part, uint32_t (&raw)[2 * kWords]) {
  const bool k_ok = k0 + s.k_off < K, k1_ok = k0 + s.k_off + 1 < K;
  const T* src = s.base + k0 + part * kWords * s.row_step;  // row i = part * kWords; dereferenced only if inside
#pragma unroll
  for (int ii = 0; ii < kWords; ++ii, src += s.row_step) {
    const bool row_ok = (s.rows_ok >> (part * kWords + ii)) & 1u;
    uint32_t lo = 0u, hi = 0u;
    if constexpr (kPair) {
      static_assert(sizeof(T) == 4, "pair loads are for fp32");
      if (row_ok && k_ok) {  // K even: k + 1 < K too
        const float2 v = __ldg(reinterpret_cast<const float2*>(src));
        lo = __float_as_uint(v.x), hi = __float_as_uint(v.y);
      }
    } else {
      if (row_ok && k_ok) lo = raw_bits(src);
      if (row_ok && k1_ok) hi = raw_bits(src + 1);
    }
    raw[2 * ii] = lo, raw[2 * ii + 1] = hi;
  }
}

// tile[row][pair] <- the bf16 pair of raw words 2 ii, 2 ii + 1 (fp32 bits rounded to nearest even,
// or bf16 bits copied when kBf16). The lower depth goes to the low half, as mma expects.
template <class Cfg, int kWords, bool kBf16>
__device__ __forceinline__ void store_words(uint32_t (*tile)[kLdw], int part, const uint32_t (&raw)[2 * kWords]) {
#pragma unroll
  for (int ii = 0; ii < kWords; ++ii) {
    const int row = threadIdx.x / kPairs + (part * kWords + ii) * Cfg::kRowsPerPass;
    tile[row][threadIdx.x % kPairs] = kBf16 ? raw[2 * ii] | (raw[2 * ii + 1] << 16)
                                            : pack_bf16x2(__uint_as_float(raw[2 * ii]), __uint_as_float(raw[2 * ii + 1]));
  }
}

// 16-byte path for W (16-byte aligned, K * sizeof(W) % 16 == 0): chunk rows i = part * kBChunks + ii,
// depths k0 + k_off + [0, E) -> raw[4 ii .. 4 ii + 3].
template <class Cfg, class Wt>
__device__ __forceinline__ void load_chunks(const TileSrc<Wt>& s, int K, int k0, int part,
                                            uint32_t (&raw)[4 * Cfg::template kBChunks<Wt>]) {
  constexpr int kChunks = Cfg::template kBChunks<Wt>;
  const bool k_ok = k0 + s.k_off < K;  // K a multiple of E: the whole chunk is inside
  const Wt* src = s.base + k0 + part * kChunks * s.row_step;
#pragma unroll
  for (int ii = 0; ii < kChunks; ++ii, src += s.row_step) {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (((s.rows_ok >> (part * kChunks + ii)) & 1u) && k_ok) v = __ldg(reinterpret_cast<const uint4*>(src));
    raw[4 * ii] = v.x, raw[4 * ii + 1] = v.y, raw[4 * ii + 2] = v.z, raw[4 * ii + 3] = v.w;
  }
}

template <class Cfg, class Wt>
__device__ __forceinline__ void store_chunks(uint32_t (*tile)[kLdw], int part,
                                             const uint32_t (&raw)[4 * Cfg::template kBChunks<Wt>]) {
  constexpr int kChunks = Cfg::template kBChunks<Wt>, kCpr = Cfg::template kChunksPerRow<Wt>;
#pragma unroll
  for (int ii = 0; ii < kChunks; ++ii) {
    const int row = threadIdx.x / kCpr + (part * kChunks + ii) * Cfg::template kChunkRowsPerPass<Wt>;
    const int c = threadIdx.x % kCpr;
    if constexpr (sizeof(Wt) == 2) {  // 8 bf16 = 4 words at word 4c (byte 16c of an 80-byte row)
      *reinterpret_cast<uint4*>(&tile[row][4 * c]) =
          make_uint4(raw[4 * ii], raw[4 * ii + 1], raw[4 * ii + 2], raw[4 * ii + 3]);
    } else {  // 4 floats = 2 words at word 2c (byte 8c)
      *reinterpret_cast<uint2*>(&tile[row][2 * c]) =
          make_uint2(pack_bf16x2(__uint_as_float(raw[4 * ii]), __uint_as_float(raw[4 * ii + 1])),
                     pack_bf16x2(__uint_as_float(raw[4 * ii + 2]), __uint_as_float(raw[4 * ii + 3])));
    }
  }
}

// d = a (16 x 16, row) * b (16 x 8, col) + d. Fragments (g = lane / 4, t = lane % 4):
// a[0] (g, 2t..2t+1), a[1] (g+8, 2t..), a[2] (g, 2t+8..), a[3] (g+8, 2t+8..); b[0] (k 2t..2t+1, n g),
// b[1] (k 2t+8.., n g); d[0..1] (g, 2t..2t+1), d[2..3] (g+8, 2t..2t+1).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8 x 8 bf16 matrices from shared memory: lanes 8 q .. 8 q + 7 give the 16-byte rows of matrix
// q; r[q] of lane l then holds row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix q (the
// low half the lower column), which is the mma fragment layout above.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint32_t* row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// Block (blockIdx.x, blockIdx.y): y[BM * blockIdx.y + [0, BM), BN * blockIdx.x + [0, BN)).
// kFast: x read in 8-byte pairs and W in 16-byte chunks (see launch_gemm); otherwise element loads.
template <class Cfg, class Wt, bool kFast>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::MIN_BLOCKS) gemm_kernel(const GemmParams p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, MF = Cfg::MF, NF = Cfg::NF, T = Cfg::kThreads;
  constexpr int kAWords = Cfg::kAWords, kBWords = Cfg::kBWords, kBChunks = Cfg::template kBChunks<Wt>;
  constexpr int kCpr = Cfg::template kChunksPerRow<Wt>, kE = 16 / static_cast<int>(sizeof(Wt));
  constexpr int kBRaw = kFast ? 4 * kBChunks : 2 * kBWords;
  constexpr bool kBf16 = sizeof(Wt) == 2;
  __shared__ __align__(16) uint32_t a_tile[2][BM][kLdw];
  __shared__ __align__(16) uint32_t b_tile[2][BN][kLdw];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;  // accumulator fragment: rows g, g + 8; columns 2t, 2t + 1
  const int wm = (warp / Cfg::WARPS_N) * Cfg::WM, wn = (warp % Cfg::WARPS_N) * Cfg::WN;  // warp tile origin
  const int m_base = blockIdx.y * BM, n_base = blockIdx.x * BN;
  // The shared row (and word: 4 words = 8 depths) whose address this lane gives to ldmatrix, relative
  // to the 16 x 16 A or 16 (n) x 16 B piece being read; see the matrix orders in the main loop.
  const int a_row = lane % 8 + (lane / 8 % 2) * 8, a_word = lane / 16 * 4;
  const int b_row = lane % 8 + lane / 16 * 8, b_word = lane / 8 % 2 * 4;

  const TileSrc<float> a_src =
      tile_src(p.x, p.ldx, p.M, m_base + tid / kPairs, Cfg::kRowsPerPass, kAWords * kParts, 2 * (tid % kPairs));
  const Wt* weight = static_cast<const Wt*>(p.w);
  const TileSrc<Wt> b_src =
      kFast ? tile_src(weight, p.K, p.N, n_base + tid / kCpr, T / kCpr, kBChunks * kParts, kE * (tid % kCpr))
            : tile_src(weight, p.K, p.N, n_base + tid / kPairs, Cfg::kRowsPerPass, kBWords * kParts, 2 * (tid % kPairs));

  uint32_t a_raw[2 * kAWords], b_raw[kBRaw];
  const auto load = [&](int k0, int part) {
    load_words<kAWords, kFast>(a_src, p.K, k0, part, a_raw);
    if constexpr (kFast)
      load_chunks<Cfg, Wt>(b_src, p.K, k0, part, b_raw);
    else
      load_words<kBWords, false>(b_src, p.K, k0, part, b_raw);
  };
  const auto store = [&](int buf, int part) {
    store_words<Cfg, kAWords, false>(a_tile[buf], part, a_raw);
    if constexpr (kFast)
      store_chunks<Cfg, Wt>(b_tile[buf], part, b_raw);
    else
      store_words<Cfg, kBWords, kBf16>(b_tile[buf], part, b_raw);
  };

  float acc[MF][NF][4];
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int j = 0; j < NF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
  for (int part = 0; part < kParts; ++part) {
    load(0, part);
    store(0, part);
  }
  __syncthreads();

  const int steps = static_cast<int>(ceil_div(p.K, kBK));  // >= 1
  for (int s = 0; s < steps; ++s) {
    // Multiply from buffer `buf` while staging tile s + 1 into the other one, part ks around the
    // k16 step ks. The other buffer was last read in step s - 1, before the barrier that ended it.
    const int buf = s & 1;
    const bool next = s + 1 < steps;  // block-uniform
#pragma unroll
    for (int ks = 0; ks < kParts; ++ks) {
      if (next) load((s + 1) * kBK, ks);
      // B: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) of mma tiles j,
      // j + 1 give b[j][0], b[j][1], b[j + 1][0], b[j + 1][1].
      uint32_t b[NF][2];
#pragma unroll
      for (int j = 0; j < NF; j += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, &b_tile[buf][wn + j * 8 + b_row][ks * 8 + b_word]);
        b[j][0] = r[0], b[j][1] = r[1], b[j + 1][0] = r[2], b[j + 1][1] = r[3];
      }
      // A: matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15) give a[0..3].
#pragma unroll
      for (int i = 0; i < MF; ++i) {
        uint32_t a[4];
        ldmatrix_x4(a, &a_tile[buf][wm + i * 16 + a_row][ks * 8 + a_word]);
#pragma unroll
        for (int j = 0; j < NF; ++j) mma_bf16(acc[i][j], a, b[j]);
      }
      if (next) store(buf ^ 1, ks);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int j = 0; j < NF; ++j) {
      const int col = n_base + wn + j * 8 + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m_base + wm + i * 16 + g + 8 * h;
        if (row >= p.M) continue;
        float* out = p.y + row * p.ldy;
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (col + e < p.N) out[col + e] = acc[i][j][2 * h + e] + (p.bias ? p.bias[col + e] : 0.0f);
      }
    }
}

template <class Cfg, class Wt>
void launch_gemm(const LinearArgs& a) {
  // Fast loads: x rows 8-byte aligned (pointer, ldx even) with K even; W rows 16-byte aligned.
  const bool fast = reinterpret_cast<uintptr_t>(a.x) % 8 == 0 && a.ldx % 2 == 0 && a.K % 2 == 0 &&
                    reinterpret_cast<uintptr_t>(a.weight) % 16 == 0 && (a.K * sizeof(Wt)) % 16 == 0;
  GemmParams p;
  p.ldx = a.ldx, p.w = a.weight, p.bias = a.bias, p.ldy = a.ldy;
  p.N = static_cast<int>(a.N), p.K = static_cast<int>(a.K);
  const int64_t n_tiles = ceil_div(a.N, Cfg::BN);
  const int64_t max_rows = int64_t{65535} * Cfg::BM;  // grid.y limit; larger M takes several launches
  for (int64_t m0 = 0; m0 < a.M; m0 += max_rows) {
    p.x = a.x + m0 * a.ldx, p.y = a.y + m0 * a.ldy;  // ldx even keeps x 8-byte aligned
    p.M = static_cast<int>(std::min(max_rows, a.M - m0));
    const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(ceil_div(p.M, Cfg::BM)));
    if (fast)
      gemm_kernel<Cfg, Wt, true><<<grid, Cfg::kThreads>>>(p);
    else
      gemm_kernel<Cfg, Wt, false><<<grid, Cfg::kThreads>>>(p);
    REFPG_CUDA_LAUNCHED("gemm_kernel");
  }
}

template <class Wt>
void gemm(const LinearArgs& a) {
  const int64_t big_tiles = ceil_div(a.M, BigTile::BM) * ceil_div(a.N, BigTile::BN);
  if (big_tiles >= sm_count())
    launch_gemm<BigTile, Wt>(a);
  else
    launch_gemm<SmallTile, Wt>(a);
}

// ============================================ K == 0 ============================================

__global__ void fill_bias_kernel(float* y, int64_t ldy, const float* bias, int64_t M, int64_t N) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < M * N; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t m = i / N, n = i % N;
    y[m * ldy + n] = bias ? bias[n] : 0.0f;
  }
}

}  // namespace

void linear(const LinearArgs& a) {
  if (a.M <= 0 || a.N <= 0) return;
  constexpr int64_t kMaxDim = int64_t{1} << 30;  // int indices in the kernels, tile overhang included
  if (a.M > kMaxDim || a.N > kMaxDim || a.K > kMaxDim)
    throw Error("refpg::cuda::linear: M, N and K must each be at most 2^30");
  if (a.K == 0) {  // an empty sum: y = bias (or 0)
    constexpr int kThreads = 256;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(a.M * a.N, kThreads), 65536)));
    fill_bias_kernel<<<grid, kThreads>>>(a.y, a.ldy, a.bias, a.M, a.N);
    REFPG_CUDA_LAUNCHED("fill_bias_kernel");
    return;
  }
  if (a.M <= kGemvMaxRows) {
    if (a.format == WeightFormat::BF16)
      gemv<uint16_t>(a);
    else
      gemv<float>(a);
  } else {
    if (a.format == WeightFormat::BF16)
      gemm<uint16_t>(a);
    else
      gemm<float>(a);
  }
}

}  // namespace refpg::cuda

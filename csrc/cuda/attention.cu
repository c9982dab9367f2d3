// attention on the GPU: see attention.h. fp32 throughout, accurate expf / tanhf (no fast-math
// intrinsics). Two paths, both templated on NI = head-dim slots per lane (hd <= 32 · NI, NI in
// 1, 2, 4, 8, 16): lane j of a warp owns output dims d = j + 32 · c for c < NI (d < hd checked).
//
//  * Prefill, T > kDecodeMaxT: attention_prefill_kernel. The query rows of one (b, kv head) are
//    ordered r = t · group + g (head kv · group + g, as the CPU twin does), so heads sharing a kv
//    head share its key / value tiles. A block of kPrefillWarps warps owns kBlockRows = 16
//    consecutive rows, kRowsPerWarp = 4 per warp; rows past the end are zeros and never written.
//    Shared memory (dynamic; 160 KiB for hd = 512, 80 KiB for hd = 256):
//      qs [hd][kBlockRows]         the block's query rows, transposed: one float4 broadcast load
//                                  gives a warp's 4 rows at one d
//      ks [kKeyTile][hd | 1]       key tile; the odd row pitch keeps the lane-per-key reads of
//                                  ks[lane][d] free of bank conflicts
//      vs [kKeyTile][hd]           value tile (lanes read consecutive d)
//    For each tile of kKeyTile = 32 keys (zeros past S): lane j computes the 4 scores of key j,
//    then per row the online softmax step (below) and, key by key, p_j broadcast by __shfl_sync
//    times vs[j][d] into the lane's accumulators.
//  * Decode, T <= kDecodeMaxT: split-KV. attention_decode_kernel: one block per (query row,
//    split), query rows ordered (b, t, h) like out; split i owns keys [i · chunk, min(S, (i+1) ·
//    chunk)). Its kDecodeWarps warps interleave over the chunk (warp w, lane j, step it: key
//    chunk_start + kDecodeWarps · (32 · it + j) + w, so even a short chunk feeds every warp), each
//    lane computing one key's score straight from global memory (q in shared memory), and the
//    warps' (m, l, acc) meet in shared memory. With one split the block writes out directly;
//    otherwise it leaves (m, l) and acc[hd] in the workspace and attention_combine_kernel (one
//    block per row) merges the splits: m* = max m_i, out = Σ e^(m_i − m*) acc_i / Σ e^(m_i − m*) l_i.
//    Splits: enough blocks for kBlocksPerSm per SM when the rows alone do not fill the GPU, but at
//    least kMinSplitKeys keys per split; chunk = ceil(S / splits), then splits = ceil(S / chunk),
//    so no split is empty.
//
// Online softmax (per query row; every warp / lane keeps the same m and l for its row):
//   m = running max of the scores so far (starts at −inf), l = Σ e^(score − m), acc = Σ e^(score − m) v.
//   A step with scores x_j: m' = max(m, max_j x_j); α = e^(m − m'); p_j = e^(x_j − m');
//   l' = α l + Σ p_j; acc' = α acc + Σ p_j v_j. At the end out = acc / l.
//   Masked scores are the most negative float (kMasked = −FLT_MAX) as in refpg.ops.attention, and
//   keys past the end of a tile are −inf. Every step has at least one real key, so m' is finite
//   (≥ −FLT_MAX) and no −inf − (−inf) arises: a row with no visible key gets m = −FLT_MAX and
//   weights e^0 = 1 on every key (the uniform average, like NumPy), and once a visible key shows up
//   α = e^(−FLT_MAX − m') = 0 drops the masked keys exactly, as e^(−FLT_MAX − max) = 0 does in NumPy.
//
// Decode workspace: a device buffer kept in this file (g_workspace), grown on demand with
// refpg::cuda::alloc and never freed before the process ends. Not thread-safe: attention() must be
// called from one host thread at a time. Kernels queue on the default stream, which runs them in
// order, so a call may reuse the buffer while an earlier call's kernels are still pending; growing
// it releases the old buffer stream-ordered (runtime.cu), after the kernels queued before.
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "cuda/attention.h"
#include "cuda/check.cuh"
#include "cuda/reduce.cuh"

namespace refpg::cuda {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kMasked = -FLT_MAX;  // score of a masked key: e^(kMasked − m) is 0 for any real m, never NaN
constexpr int kMaxHeadDim = 512;
constexpr int kDecodeMaxT = 4;       // T up to this: split-KV decode path

// Prefill tiling.
constexpr int kPrefillWarps = 4;
constexpr int kRowsPerWarp = 4;  // one float4 of the transposed qs
constexpr int kBlockRows = kPrefillWarps * kRowsPerWarp;
constexpr int kPrefillThreads = kPrefillWarps * 32;
constexpr int kKeyTile = 32;     // one key per lane
static_assert(kRowsPerWarp == 4, "the score loop reads a warp's query rows as one float4");

// Decode split-KV.
constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kCombineThreads = 128;
constexpr int64_t kMinSplitKeys = 64;
constexpr int64_t kBlocksPerSm = 2;

constexpr size_t kDefaultSharedBytes = 48 * 1024;

// Online-softmax step for one query row of a warp. x: this lane's score (−inf for a lane without a
// key; at least one lane of the warp has one). Updates m, l and scales acc by α; returns this
// lane's weight p = e^(x − m').
template <int NI>
__device__ __forceinline__ float softmax_step(float x, float& m, float& l, float (&acc)[NI]) {
  const float m_new = fmaxf(m, warp_reduce(x, Max{}));  // finite: some lane has a real or masked score
  const float alpha = expf(m - m_new);                   // m = −inf on the first step: α = 0
  const float p = expf(x - m_new);                       // x = −inf (no key): 0
  l = l * alpha + warp_reduce(p, Sum{});
  m = m_new;
#pragma unroll
  for (int c = 0; c < NI; ++c) acc[c] *= alpha;
  return p;
}

// Raw dot product -> score as refpg.ops.attention: times scale, then the soft-cap, then the mask.
__device__ __forceinline__ float make_score(float dot, float scale, float softcap, bool visible) {
  float x = dot * scale;
  if (softcap != 0.0f) x = softcap * tanhf(x / softcap);
  return visible ? x : kMasked;
}

// ---- prefill -------------------------------------------------------------------------------------

size_t prefill_shared_bytes(int64_t hd) {
  return static_cast<size_t>(kBlockRows * hd + kKeyTile * (hd | 1) + kKeyTile * hd) * sizeof(float);
}

// grid.x = B · KV · row_tiles, block = kPrefillThreads, dynamic shared memory prefill_shared_bytes(hd).
template <int NI>
__global__ void __launch_bounds__(kPrefillThreads, 1) attention_prefill_kernel(const AttentionArgs a, int64_t row_tiles) {
  extern __shared__ float4 smem4[];  // float4: qs must be 16-byte aligned
  const int hd = static_cast<int>(a.hd);
  const int kpitch = hd | 1;  // odd
  float* qs = reinterpret_cast<float*>(smem4);  // [hd][kBlockRows]
  float* ks = qs + kBlockRows * hd;             // [kKeyTile][kpitch]
  float* vs = ks + kKeyTile * kpitch;           // [kKeyTile][hd]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t group = a.H / a.KV, rows = a.T * group;
  const int64_t tile = blockIdx.x % row_tiles, bkv = blockIdx.x / row_tiles;
  const int64_t b = bkv / a.KV, kv = bkv % a.KV;
  const int64_t row0 = tile * kBlockRows;

  // Stage the block's query rows transposed (coalesced global reads along d); zeros past the end.
  for (int idx = tid; idx < kBlockRows * hd; idx += kPrefillThreads) {
    const int r = idx / hd, d = idx - r * hd;
    const int64_t row = row0 + r;
    float x = 0.0f;
    if (row < rows) {
      const int64_t t = row / group, h = kv * group + row % group;
      x = a.q[b * a.q_b + t * a.q_t + h * a.hd + d];
    }
    qs[d * kBlockRows + r] = x;
  }

  // This warp's rows warp · kRowsPerWarp + i: their mask rows (nullptr: all visible, or no row).
  const uint8_t* mrow[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = row0 + warp * kRowsPerWarp + i;
    mrow[i] = (a.mask && row < rows) ? a.mask + b * a.m_b + (row / group) * a.m_t : nullptr;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][NI];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < NI; ++c) acc[i][c] = 0.0f;
  }

  const float* kbase = a.k + b * a.k_b + kv * a.hd;
  const float* vbase = a.v + b * a.v_b + kv * a.hd;
  const float4* q4 = reinterpret_cast<const float4*>(qs) + warp;  // + d · (kBlockRows / 4): rows of this warp at d
  const float* krow = ks + lane * kpitch;                          // this lane's key

  for (int64_t s0 = 0; s0 < a.S; s0 += kKeyTile) {  // same trip count in every thread
    const int n = static_cast<int>(a.S - s0 < kKeyTile ? a.S - s0 : kKeyTile);  // keys in this tile, >= 1
    __syncthreads();  // all warps are done with the previous tile (and, the first time, qs is complete)
    for (int idx = tid; idx < kKeyTile * hd; idx += kPrefillThreads) {
      const int j = idx / hd, d = idx - j * hd;
      float kx = 0.0f, vx = 0.0f;  // zeros past S: finite, and their weight is 0
      if (j < n) {
        kx = kbase[(s0 + j) * a.k_s + d];
        vx = vbase[(s0 + j) * a.v_s + d];
      }
      ks[j * kpitch + d] = kx;
      vs[j * hd + d] = vx;
    }
    __syncthreads();

    // Scores of key s0 + lane for the warp's 4 rows.
    float dot[kRowsPerWarp] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 4
    for (int d = 0; d < hd; ++d) {
      const float kx = krow[d];
      const float4 qv = q4[d * (kBlockRows / 4)];
      dot[0] = fmaf(qv.x, kx, dot[0]);
      dot[1] = fmaf(qv.y, kx, dot[1]);
      dot[2] = fmaf(qv.z, kx, dot[2]);
      dot[3] = fmaf(qv.w, kx, dot[3]);
    }
    float p[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      float x = -INFINITY;  // no key for this lane
      if (lane < n) x = make_score(dot[i], a.scale, a.softcap, !mrow[i] || mrow[i][s0 + lane]);
      p[i] = softmax_step<NI>(x, m[i], l[i], acc[i]);
    }

    // acc += p_j · v[j] for the tile's keys (n is the same in the whole block: no divergence).
    for (int j = 0; j < n; ++j) {
      float pj[kRowsPerWarp];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) pj[i] = __shfl_sync(kFullMask, p[i], j);
      const float* vrow = vs + j * hd;
#pragma unroll
      for (int c = 0; c < NI; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) {
          const float vx = vrow[d];
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i) acc[i][c] = fmaf(pj[i], vx, acc[i][c]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = row0 + warp * kRowsPerWarp + i;
    if (row >= rows) continue;
    const int64_t t = row / group, h = kv * group + row % group;
    float* o = a.out + ((b * a.T + t) * a.H + h) * a.hd;
#pragma unroll
    for (int c = 0; c < NI; ++c) {
      const int d = lane + 32 * c;
      if (d < hd) o[d] = acc[i][c] / l[i];  // l >= 1: the max key has weight 1
    }
  }
}

// ---- decode --------------------------------------------------------------------------------------

// grid.x = rows · splits (block row · splits + split), block = kDecodeThreads. Keys [split · chunk,
// min(S, (split + 1) · chunk)), non-empty. splits == 1: writes out; else (m, l) to part_ml[2 · blockIdx.x]
// and acc (relative to that m) to part_acc[blockIdx.x · hd, + hd).
template <int NI>
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_kernel(const AttentionArgs a, int splits, int64_t chunk, float* part_ml, float* part_acc) {
  __shared__ float qs[kMaxHeadDim];
  __shared__ float warp_acc[kDecodeWarps][kMaxHeadDim];
  __shared__ float warp_m[kDecodeWarps], warp_l[kDecodeWarps];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int hd = static_cast<int>(a.hd);
  const int64_t row = blockIdx.x / splits, split = blockIdx.x % splits;
  const int64_t h = row % a.H, t = row / a.H % a.T, b = row / a.H / a.T;
  const int64_t kv = h / (a.H / a.KV);

  const float* q = a.q + b * a.q_b + t * a.q_t + h * a.hd;
  for (int d = tid; d < hd; d += kDecodeThreads) qs[d] = q[d];
  __syncthreads();

  const uint8_t* mrow = a.mask ? a.mask + b * a.m_b + t * a.m_t : nullptr;
  const float* kbase = a.k + b * a.k_b + kv * a.hd;
  const float* vbase = a.v + b * a.v_b + kv * a.hd;
  const int64_t c0 = split * chunk;
  const int64_t c1 = c0 + chunk < a.S ? c0 + chunk : a.S;  // c0 < c1

  float m = -INFINITY, l = 0.0f, acc[NI];
#pragma unroll
  for (int c = 0; c < NI; ++c) acc[c] = 0.0f;

  // A step of warp `warp` covers keys base + kDecodeWarps · j, j < 32; lane j scores key j. The loop
  // condition is warp-uniform and base < c1 gives lane 0 a key.
  for (int64_t base = c0 + warp; base < c1; base += kDecodeWarps * 32) {
    const int64_t s = base + kDecodeWarps * lane;
    float x = -INFINITY;
    if (s < c1) {
      const float* krow = kbase + s * a.k_s;
      float dot = 0.0f;
#pragma unroll 4
      for (int d = 0; d < hd; ++d) dot = fmaf(qs[d], krow[d], dot);
      x = make_score(dot, a.scale, a.softcap, !mrow || mrow[s]);
    }
    const float p = softmax_step<NI>(x, m, l, acc);

    const int64_t left = (c1 - base + kDecodeWarps - 1) / kDecodeWarps;  // lanes with a key: j < left
    const int nk = static_cast<int>(left < 32 ? left : 32);
    for (int j = 0; j < nk; ++j) {  // warp-uniform
      const float pj = __shfl_sync(kFullMask, p, j);
      const float* vrow = vbase + (base + kDecodeWarps * j) * a.v_s;
#pragma unroll
      for (int c = 0; c < NI; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) acc[c] = fmaf(pj, vrow[d], acc[c]);
      }
    }
  }

  // Merge the warps (a warp without keys has m = −inf, l = 0, acc = 0: weight 0; warp 0 always has one).
  if (lane == 0) {
    warp_m[warp] = m;
    warp_l[warp] = l;
  }
#pragma unroll
  for (int c = 0; c < NI; ++c) {
    const int d = lane + 32 * c;
    if (d < hd) warp_acc[warp][d] = acc[c];
  }
  __syncthreads();
  float mb = warp_m[0];
#pragma unroll
  for (int w = 1; w < kDecodeWarps; ++w) mb = fmaxf(mb, warp_m[w]);  // finite
  float weight[kDecodeWarps], lb = 0.0f;
#pragma unroll
  for (int w = 0; w < kDecodeWarps; ++w) {
    weight[w] = expf(warp_m[w] - mb);
    lb += weight[w] * warp_l[w];
  }
  float* dst = splits == 1 ? a.out + row * a.hd : part_acc + static_cast<int64_t>(blockIdx.x) * a.hd;
  for (int d = tid; d < hd; d += kDecodeThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) sum += weight[w] * warp_acc[w][d];
    dst[d] = splits == 1 ? sum / lb : sum;
  }
  if (splits > 1 && tid == 0) {
    part_ml[2 * static_cast<int64_t>(blockIdx.x)] = mb;
    part_ml[2 * static_cast<int64_t>(blockIdx.x) + 1] = lb;
  }
}

// grid.x = rows, block = kCombineThreads: out[row] = Σ_i e^(m_i − m*) acc_i / Σ_i e^(m_i − m*) l_i.
// Every m_i is finite (>= −FLT_MAX): no NaN.
__global__ void __launch_bounds__(kCombineThreads)
    attention_combine_kernel(const float* part_ml, const float* part_acc, float* out, int splits, int64_t hd) {
  const int64_t row = blockIdx.x;
  const float* ml = part_ml + row * splits * 2;
  const float* acc = part_acc + row * splits * hd;
  float m = ml[0];
  for (int i = 1; i < splits; ++i) m = fmaxf(m, ml[2 * i]);
  float l = 0.0f;
  for (int i = 0; i < splits; ++i) l += expf(ml[2 * i] - m) * ml[2 * i + 1];
  for (int64_t d = threadIdx.x; d < hd; d += kCombineThreads) {
    float sum = 0.0f;
    for (int i = 0; i < splits; ++i) sum += expf(ml[2 * i] - m) * acc[i * hd + d];
    out[row * hd + d] = sum / l;
  }
}

// ---- host ----------------------------------------------------------------------------------------

float* g_workspace = nullptr;  // see the header comment
size_t g_workspace_bytes = 0;

float* workspace(size_t bytes) {
  if (bytes > g_workspace_bytes) {
    release(g_workspace);  // stream-ordered: freed after the queued kernels that may use it
    g_workspace = nullptr;
    g_workspace_bytes = 0;
    g_workspace = static_cast<float*>(alloc(bytes));
    g_workspace_bytes = bytes;
  }
  return g_workspace;
}

int sm_count() {
  int device = 0, sms = 0;
  REFPG_CUDA_CHECK(cudaGetDevice(&device));
  REFPG_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms > 0 ? sms : 1;
}

template <int NI>
void launch_prefill(const AttentionArgs& a) {
  const int64_t rows = a.T * (a.H / a.KV);  // per (b, kv head)
  const int64_t row_tiles = (rows + kBlockRows - 1) / kBlockRows;
  const int64_t blocks = a.B * a.KV * row_tiles;
  const size_t shared = prefill_shared_bytes(a.hd);
  if (shared > kDefaultSharedBytes)
    REFPG_CUDA_CHECK(cudaFuncSetAttribute(attention_prefill_kernel<NI>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared)));
  attention_prefill_kernel<NI><<<static_cast<unsigned>(blocks), kPrefillThreads, shared>>>(a, row_tiles);
  REFPG_CUDA_LAUNCHED("attention_prefill_kernel");
}

template <int NI>
void launch_decode(const AttentionArgs& a) {
  const int64_t rows = a.B * a.T * a.H;
  int64_t splits = 1;
  if (a.S > kMinSplitKeys) {
    const int64_t target = kBlocksPerSm * sm_count();
    const int64_t by_keys = (a.S + kMinSplitKeys - 1) / kMinSplitKeys;
    const int64_t by_rows = (target + rows - 1) / rows;  // >= 1
    splits = by_keys < by_rows ? by_keys : by_rows;
  }
  const int64_t chunk = (a.S + splits - 1) / splits;
  splits = (a.S + chunk - 1) / chunk;  // every split non-empty
  const int64_t blocks = rows * splits;

  float *part_ml = nullptr, *part_acc = nullptr;
  if (splits > 1) {
    part_ml = workspace(static_cast<size_t>(blocks * (2 + a.hd)) * sizeof(float));
    part_acc = part_ml + 2 * blocks;
  }
  attention_decode_kernel<NI><<<static_cast<unsigned>(blocks), kDecodeThreads>>>(a, static_cast<int>(splits), chunk,
                                                                                 part_ml, part_acc);
  REFPG_CUDA_LAUNCHED("attention_decode_kernel");
  if (splits > 1) {
    attention_combine_kernel<<<static_cast<unsigned>(rows), kCombineThreads>>>(part_ml, part_acc, a.out,
                                                                               static_cast<int>(splits), a.hd);
    REFPG_CUDA_LAUNCHED("attention_combine_kernel");
  }
}

template <int NI>
void launch(const AttentionArgs& a) {
  if (a.T <= kDecodeMaxT)
    launch_decode<NI>(a);
  else
    launch_prefill<NI>(a);
}

}  // namespace

void attention(const AttentionArgs& a) {
  if (a.B == 0 || a.T == 0 || a.H == 0) return;
  if (a.hd <= 32) return launch<1>(a);
  if (a.hd <= 64) return launch<2>(a);
  if (a.hd <= 128) return launch<4>(a);
  if (a.hd <= 256) return launch<8>(a);
  return launch<16>(a);  // hd <= kMaxHeadDim, checked by the bindings
}

}  // namespace refpg::cuda

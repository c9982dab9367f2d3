// linear: y[M, N] = x[M, K] @ W[N, K].T (+ b). W is float32 or bf16 bits, widened to float32 in
// registers or while packing (bf16 -> f32 is `bits << 16`); every sum is a float32 FMA chain.
//
// Two regimes, both parallel over W rows (or x rows) with parallel_for:
//  * Decode, M <= kGemvMaxRows: memory bound. Each thread streams its contiguous range of W rows
//    once, in chunks of kGemvChunk rows. Per chunk, for M > 2, K is cut in blocks whose x[:, block]
//    fits 16 KB of L1 (for one or two rows x stays in L2, and whole W rows stream: cutting them
//    measured 20% slower on K = 16384); a dot tile of C W rows (C = 4, or 3 when M > 2) keeps one
//    vector accumulator per (x row, W row) for each group of <= 4 x rows, so every W vector loaded serves all the rows of
//    the group, and the W rows of the next tile are prefetched meanwhile. Partial sums per depth
//    block are reduced horizontally and added up per chunk.
//  * Prefill, larger M: BLIS-style GEMM with B = W.T. x (up to kGemmRows rows at a time) is packed
//    once into micro-panels of MR rows per KC-deep block, laid out [k][MR] (rows past M are zeros).
//    Each thread owns a range of W rows (of x rows when N is small); per NC x KC block of W it packs
//    NR-row micro-panels laid out [k][NR] (8 x 8 transposes, bf16 converted, zero rows past N),
//    then runs the MR x NR register-tiled micro-kernel for every x micro-panel of an MC-row block.
//    KC = 256 keeps a W micro-panel (NR x KC floats, 16 KB for AVX2) in L1 and MC x KC floats of
//    packed x in L2. Edge tiles run on a local MR x NR tile and copy out the valid part.
//    linear_spans runs the same GEMM on W handed over in spans (matmul.h; the quantized prefill).
// Nothing outside the caller's arrays is read or written, whatever M, N, K.
// Instruction sets: Scalar (portable C++, 4x16 tiles), Avx2 (+FMA, 6x16), Avx512 (AVX-512F, 6x32),
// each a struct with the kernels `tile`, `pack_w` and `dots`; the drivers are shared. On CPUs with
// AMX the prefill GEMM runs on bf16 tiles instead (matmul_amx.cpp), the GEMV on Avx512.
#include "cpu/matmul.h"
#include "cpu/matmul_amx.h"

#include <algorithm>
#include <cstdlib>
#include <memory>

#include "cpu/simd.h"
#include "cpu/threadpool.h"

namespace refpg {

namespace {

constexpr int64_t kGemvMaxRows = 8;
constexpr int64_t kGemvChunk = 192;          // W rows whose partial sums are kept while K is blocked
constexpr int64_t kGemvXBlock = 16 * 1024 / sizeof(float);  // x floats per depth block: 16 KB of L1
constexpr int64_t KC = kWeightSpanDepth, MC = 144, NC = 512;
constexpr int64_t kGemmRows = 1536;  // x rows packed at once (each pass over them packs W again)
constexpr int64_t kMinParallelFma = 1 << 16;  // less work than this runs on the calling thread

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float[], AlignedFree>;
Buffer alloc_floats(int64_t n) {
  const size_t bytes = (static_cast<size_t>(n) * sizeof(float) + 63) / 64 * 64;
  auto* p = static_cast<float*>(std::aligned_alloc(64, std::max<size_t>(bytes, 64)));
  if (!p) throw std::bad_alloc();
  return Buffer(p);
}

// W rows [n0, n0 + cols), depth [k0, k0 + kc) -> dst[k][NR] as float32; columns past `cols` are zeros.
template <int NR, class Wt>
void pack_w_plain(const Wt* w, int64_t K, int64_t cols, int64_t k0, int64_t kc, float* dst) {
  for (int64_t j = 0; j < NR; ++j) {
    if (j < cols)
      for (int64_t k = 0; k < kc; ++k) dst[k * NR + j] = to_f32(w[j * K + k0 + k]);
    else
      for (int64_t k = 0; k < kc; ++k) dst[k * NR + j] = 0.0f;
  }
}

// ---- kernels: tile(kc, a, b, c, ldc, bias, accumulate) computes the MR x NR tile
// c = (accumulate ? c : 0) + (bias ? bias[0:NR] on every row : 0) + a.T @ b, with a = [kc][MR]
// and b = [kc][NR] packed panels. pack_w(w, K, cols, k0, kc, dst) is pack_w_plain<NR>.
// dots<R, C>(x, ldx, w, ldw, kc, ahead, out) sets out[r*C + c] = x[r, 0:kc] . w[c, 0:kc] for R rows
// of x (ldx apart) and C rows of W (ldw apart), prefetching the same span of the C rows at `ahead`.

struct Scalar {
  static constexpr int MR = 4, NR = 16;

  template <class Wt>
  static void pack_w(const Wt* w, int64_t K, int64_t cols, int64_t k0, int64_t kc, float* dst) {
    pack_w_plain<NR>(w, K, cols, k0, kc, dst);
  }

  static void tile(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                   const float* bias, bool accumulate) {
    float acc[MR][NR] = {};
    for (int64_t k = 0; k < kc; ++k, a += MR, b += NR)
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] += a[i] * b[j];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        c[i * ldc + j] = acc[i][j] + (accumulate ? c[i * ldc + j] : 0.0f) + (bias ? bias[j] : 0.0f);
  }

  template <int R, int C, class Wt>
  static void dots(const float* x, int64_t ldx, const Wt* w, int64_t ldw, int64_t kc, const Wt*, float* out) {
    float acc[R][C] = {};
    for (int64_t k = 0; k < kc; ++k)
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] += x[r * ldx + k] * to_f32(w[c * ldw + k]);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) out[r * C + c] = acc[r][c];
  }
};

REFPG_TARGET_AVX2 inline void transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// pack_w_plain<NR> with 8 x 8 block transposes (NR a multiple of 8; AVX-512F CPUs have AVX2 too).
template <int NR, class Wt>
REFPG_TARGET_AVX2 void pack_w_transposed(const Wt* w, int64_t K, int64_t cols, int64_t k0, int64_t kc, float* dst) {
  if (cols < NR) return pack_w_plain<NR>(w, K, cols, k0, kc, dst);
  for (int64_t j = 0; j < NR; j += 8) {
    const Wt* rows = w + j * K + k0;
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(rows + i * K + k);
      transpose8x8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (k + i) * NR + j, r[i]);
    }
    for (; k < kc; ++k)
      for (int i = 0; i < 8; ++i) dst[k * NR + j + i] = to_f32(rows[i * K + k]);
  }
}

struct Avx2 {
  static constexpr int MR = 6, NR = 16;

  template <class Wt>
  static void pack_w(const Wt* w, int64_t K, int64_t cols, int64_t k0, int64_t kc, float* dst) {
    pack_w_transposed<NR>(w, K, cols, k0, kc, dst);
  }

  REFPG_TARGET_AVX2 static void tile(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                                     const float* bias, bool accumulate) {
    __m256 acc[MR][2];
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      prefetch(c + i * ldc);  // the C tile is read back after the depth loop
      prefetch(c + i * ldc + NR - 1);
    }
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k, a += MR, b += NR) {
      const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        const __m256 ai = _mm256_broadcast_ss(a + i);
        acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
      }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        float* ci = c + i * ldc + 8 * h;
        __m256 v = acc[i][h];
        if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(ci));
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + 8 * h));
        _mm256_storeu_ps(ci, v);
      }
  }

  template <int R, int C, class Wt>
  REFPG_TARGET_AVX2 static void dots(const float* x, int64_t ldx, const Wt* w, int64_t ldw, int64_t kc, const Wt* ahead,
                                     float* out) {
    __m256 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8)
      for (int c = 0; c < C; ++c) {
        prefetch_l2(ahead + c * ldw + k);
        const __m256 wv = load8(w + c * ldw + k);
        for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + k), wv, acc[r][c]);
      }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        float s = hsum(acc[r][c]);
        for (int64_t t = k; t < kc; ++t) s += x[r * ldx + t] * to_f32(w[c * ldw + t]);
        out[r * C + c] = s;
      }
  }
};

// GCC 12 warns that its own AVX-512 intrinsics read an uninitialized value (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
struct Avx512 {
  static constexpr int MR = 6, NR = 32;

  template <class Wt>
  static void pack_w(const Wt* w, int64_t K, int64_t cols, int64_t k0, int64_t kc, float* dst) {
    pack_w_transposed<NR>(w, K, cols, k0, kc, dst);
  }

  REFPG_TARGET_AVX512 static void tile(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                                       const float* bias, bool accumulate) {
    __m512 acc[MR][2];
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; ++k, a += MR, b += NR) {
      const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        const __m512 ai = _mm512_set1_ps(a[i]);
        acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
      }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        float* ci = c + i * ldc + 16 * h;
        __m512 v = acc[i][h];
        if (accumulate) v = _mm512_add_ps(v, _mm512_loadu_ps(ci));
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + 16 * h));
        _mm512_storeu_ps(ci, v);
      }
  }

  template <int R, int C, class Wt>
  REFPG_TARGET_AVX512 static void dots(const float* x, int64_t ldx, const Wt* w, int64_t ldw, int64_t kc,
                                       const Wt* ahead, float* out) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= kc; k += 16)
      for (int c = 0; c < C; ++c) {
        prefetch_l2(ahead + c * ldw + k);
        const __m512 wv = load16(w + c * ldw + k);
        for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + k), wv, acc[r][c]);
      }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        float s = _mm512_reduce_add_ps(acc[r][c]);
        for (int64_t t = k; t < kc; ++t) s += x[r * ldx + t] * to_f32(w[c * ldw + t]);
        out[r * C + c] = s;
      }
  }
};

#pragma GCC diagnostic pop

// ---- decode: dot tiles over a range of W rows ------------------------------------------------

// Partial sums sums[i][r] += x[r, k0:k0+kc] . W[n+i, k0:k0+kc] for a tile of C W rows, read from
// memory once and then from L1 by each group of <= 4 x rows; prefetches the next tile meanwhile.
template <class Isa, int C, class Wt>
void gemv_tile(const LinearArgs& p, const Wt* w, int64_t n, int64_t k0, int64_t kc, const Wt* ahead, float* sums) {
  const Wt* wt = w + n * p.K + k0;
  float d[4 * C];
  for (int64_t m = 0; m < p.M; m += 4) {
    const float* x = p.x + m * p.ldx + k0;
    const int rows = static_cast<int>(std::min<int64_t>(4, p.M - m));
    switch (rows) {
      case 1: Isa::template dots<1, C>(x, p.ldx, wt, p.K, kc, ahead, d); break;
      case 2: Isa::template dots<2, C>(x, p.ldx, wt, p.K, kc, ahead, d); break;
      case 3: Isa::template dots<3, C>(x, p.ldx, wt, p.K, kc, ahead, d); break;
      default: Isa::template dots<4, C>(x, p.ldx, wt, p.K, kc, ahead, d); break;
    }
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < C; ++c) sums[c * kGemvMaxRows + m + r] += d[r * C + c];
  }
}

// y[:, n0:n1] in chunks of kGemvChunk W rows. Per chunk, depth blocks of kc: x[:, k0:k0+kc] stays in
// L1 while every tile of C W rows of the chunk runs over it (C = 4 for 1 or 2 x rows, else 3).
template <class Isa, int C, class Wt>
void gemv_rows(const LinearArgs& p, const Wt* w, int64_t n0, int64_t n1) {
  const int64_t kc_max = p.M <= 2 ? p.K : std::max<int64_t>(64, kGemvXBlock / p.M / 8 * 8);
  for (int64_t nc = n0; nc < n1; nc += kGemvChunk) {
    const int64_t ne = std::min(n1, nc + kGemvChunk);
    float sums[kGemvChunk * kGemvMaxRows] = {};  // [W row in chunk][x row]
    for (int64_t k0 = 0; k0 < p.K; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, p.K - k0);
      int64_t n = nc;
      for (; n + C <= ne; n += C) {
        const Wt* ahead = w + std::min(n + C, ne - C) * p.K + k0;
        gemv_tile<Isa, C>(p, w, n, k0, kc, ahead, sums + (n - nc) * kGemvMaxRows);
      }
      for (; n < ne; ++n) gemv_tile<Isa, 1>(p, w, n, k0, kc, w + n * p.K + k0, sums + (n - nc) * kGemvMaxRows);
    }
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t n = nc; n < ne; ++n)
        p.y[m * p.ldy + n] = sums[(n - nc) * kGemvMaxRows + m] + (p.bias ? p.bias[n] : 0.0f);
  }
}

template <class Isa, class Wt>
void gemv(const LinearArgs& p, const Wt* w) {
  const int64_t grain = std::max<int64_t>(12, (kMinParallelFma / (p.K * p.M) + 11) / 12 * 12);
  parallel_for(p.N, grain, [&](int64_t n0, int64_t n1) {
    if (p.M <= 2)
      gemv_rows<Isa, 4>(p, w, n0, n1);
    else
      gemv_rows<Isa, 3>(p, w, n0, n1);
  });
}

// ---- prefill: packing and the blocked GEMM ---------------------------------------------------

// x rows [m0, m0 + rows), depth [k0, k0 + kc) -> dst[k][MR]; rows past `rows` are zeros.
template <int MR>
void pack_x(const float* x, int64_t ldx, int64_t rows, int64_t k0, int64_t kc, float* dst) {
  for (int64_t k = 0; k < kc; ++k)
    for (int i = 0; i < MR; ++i) dst[k * MR + i] = i < rows ? x[i * ldx + k0 + k] : 0.0f;
}

// Where the GEMM's W micro-panels come from: pack(n, cols, k0, kc, dst) packs W rows
// [n, n + cols) at depth [k0, k0 + kc) as Isa::pack_w does (cols <= NR, kc <= KC).
template <class Isa, class Wt>
struct StoredW {  // W in memory, float32 or bf16 bits
  const Wt* w;
  int64_t K;
  void pack(int64_t n, int64_t cols, int64_t k0, int64_t kc, float* dst) const {
    Isa::pack_w(w + n * K, K, cols, k0, kc, dst);
  }
};

template <class Isa>
struct SpannedW {  // W written span by span by a WeightSpans (matmul.h), then packed as float32
  const WeightSpans& spans;
  void pack(int64_t n, int64_t cols, int64_t k0, int64_t kc, float* dst) const {
    alignas(64) float rows[Isa::NR * KC];  // [cols][kc]
    spans(n, cols, k0, kc, rows);
    Isa::pack_w(rows, kc, cols, 0, kc, dst);
  }
};

template <class Isa, class Source>
class Gemm {
  static constexpr int MR = Isa::MR, NR = Isa::NR;

 public:
  Gemm(const LinearArgs& p, const Source& w)
      : p_(p), w_(w), m_pad_((p.M + MR - 1) / MR * MR), xp_(alloc_floats(m_pad_ * p.K)) {}

  void run() {
    const int64_t m_panels = m_pad_ / MR, n_panels = (p_.N + NR - 1) / NR;
    const bool serial = p_.M * p_.N * p_.K < kMinParallelFma;
    parallel_for(m_panels, serial ? m_panels : 1, [&](int64_t b, int64_t e) {
      for (int64_t ip = b; ip < e; ++ip) pack_x_panel(ip);
    });
    if (serial) {
      block(0, p_.M, 0, p_.N);
    } else if (n_panels >= 4 * num_threads() || n_panels >= m_panels) {
      parallel_for(n_panels, 1, [&](int64_t b, int64_t e) { block(0, p_.M, b * NR, std::min(e * NR, p_.N)); });
    } else {
      parallel_for(m_panels, 1, [&](int64_t b, int64_t e) { block(b * MR, std::min(e * MR, p_.M), 0, p_.N); });
    }
  }

 private:
  // Packed x: depth block [k0, k0 + kc) starts at k0 * m_pad_; micro-panel of row m (a multiple of
  // MR) at + m * kc.
  float* x_panel(int64_t k0, int64_t kc, int64_t m) const { return xp_.get() + k0 * m_pad_ + m * kc; }

  void pack_x_panel(int64_t ip) {
    const int64_t m = ip * MR;
    for (int64_t k0 = 0; k0 < p_.K; k0 += KC) {
      const int64_t kc = std::min(KC, p_.K - k0);
      pack_x<MR>(p_.x + m * p_.ldx, p_.ldx, std::min<int64_t>(MR, p_.M - m), k0, kc, x_panel(k0, kc, m));
    }
  }

  // y[m0:m1, n0:n1] for m0 a multiple of MR (n0 of NR, unless it is the only block).
  void block(int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    Buffer wp = alloc_floats(KC * (std::min(NC, n1 - n0) + NR));
    for (int64_t jc = n0; jc < n1; jc += NC) {
      const int64_t nb = std::min(NC, n1 - jc);
      for (int64_t k0 = 0; k0 < p_.K; k0 += KC) {
        const int64_t kc = std::min(KC, p_.K - k0);
        for (int64_t j = 0; j < nb; j += NR)
          w_.pack(jc + j, std::min<int64_t>(NR, nb - j), k0, kc, wp.get() + j * kc);
        for (int64_t ic = m0; ic < m1; ic += MC)
          for (int64_t j = 0; j < nb; j += NR)
            for (int64_t i = ic; i < std::min(ic + MC, m1); i += MR)
              tile(kc, x_panel(k0, kc, i), wp.get() + j * kc, i, std::min<int64_t>(MR, m1 - i), jc + j,
                   std::min<int64_t>(NR, n1 - jc - j), k0 == 0);
      }
    }
  }

  // The tile at (m, n) of mr x nr valid elements; `first`: the first depth block (adds the bias).
  void tile(int64_t kc, const float* a, const float* b, int64_t m, int64_t mr, int64_t n, int64_t nr, bool first) {
    float* c = p_.y + m * p_.ldy + n;
    const float* bias = first && p_.bias ? p_.bias + n : nullptr;
    if (mr == MR && nr == NR) {
      Isa::tile(kc, a, b, c, p_.ldy, bias, !first);
      return;
    }
    alignas(64) float t[MR * NR] = {}, tb[NR] = {};
    for (int64_t i = 0; i < mr && !first; ++i) std::copy(c + i * p_.ldy, c + i * p_.ldy + nr, t + i * NR);
    if (bias) std::copy(bias, bias + nr, tb);
    Isa::tile(kc, a, b, t, NR, bias ? tb : nullptr, !first);
    for (int64_t i = 0; i < mr; ++i) std::copy(t + i * NR, t + i * NR + nr, c + i * p_.ldy);
  }

  const LinearArgs& p_;
  const Source& w_;
  const int64_t m_pad_;
  Buffer xp_;
};

template <class Isa, class Source>
void gemm(const LinearArgs& p, const Source& w) {
  for (int64_t m = 0; m < p.M; m += kGemmRows) {  // bounds the packed copy of x
    LinearArgs rows = p;
    rows.x += m * p.ldx;
    rows.y += m * p.ldy;
    rows.M = std::min(kGemmRows, p.M - m);
    Gemm<Isa, Source>(rows, w).run();
  }
}

template <class Isa, class Wt>
void linear_with(const LinearArgs& p, const Wt* w) {
  if (p.M <= kGemvMaxRows) return gemv<Isa>(p, w);
  gemm<Isa>(p, StoredW<Isa, Wt>{w, p.K});
}

template <class Isa>
void linear_with(const LinearArgs& p) {
  switch (p.format) {
    case WeightFormat::F32: return linear_with<Isa>(p, static_cast<const float*>(p.weight));
    case WeightFormat::BF16: return linear_with<Isa>(p, static_cast<const uint16_t*>(p.weight));
    default: return;  // Affine matrices take linear_affine (affine.h); F16 is only ever their scales
  }
}

}  // namespace

void linear(const LinearArgs& p, SimdPath path) {
  if (p.M == 0 || p.N == 0) return;
  if (p.K == 0) {  // an empty sum: y = bias (or 0)
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t n = 0; n < p.N; ++n) p.y[m * p.ldy + n] = p.bias ? p.bias[n] : 0.0f;
    return;
  }
  switch (path) {
    case SimdPath::Scalar: return linear_with<Scalar>(p);
    case SimdPath::Avx2: return linear_with<Avx2>(p);
    case SimdPath::Avx512: return linear_with<Avx512>(p);
    case SimdPath::Amx:  // the GEMV is memory bound: AVX-512 reads W as fast
      if (p.M <= kGemvMaxRows || !linear_amx(p)) linear_with<Avx512>(p);
      return;
  }
}

void linear_spans(const LinearArgs& p, const WeightSpans& spans, SimdPath path) {
  if (p.M == 0 || p.N == 0) return;
  if (p.K == 0) return linear(p, path);  // y = bias (or 0); W is not read
  switch (path) {
    case SimdPath::Scalar: return gemm<Scalar>(p, SpannedW<Scalar>{spans});
    case SimdPath::Avx2: return gemm<Avx2>(p, SpannedW<Avx2>{spans});
    case SimdPath::Avx512:
    case SimdPath::Amx: return gemm<Avx512>(p, SpannedW<Avx512>{spans});
  }
}

}  // namespace refpg

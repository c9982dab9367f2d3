// linear's prefill GEMM on Intel AMX: y[M, N] = x[M, K] @ W[N, K].T (+ b) with bf16 tile products,
// accurate to float32.
//
// An AMX tile product C[16 x 16] += A[16 x 32] . B[32 x 16] multiplies bf16 and accumulates in
// float32; every product of two bf16 is exact in float32. To keep float32 accuracy, each float32
// operand is split into two bf16 parts, v = hi + lo with hi = bf16(v), lo = bf16(v - hi), so that
// |v - hi - lo| <= 2^-16 |v|, and the products that matter are summed:
//   bf16 weights (exact as they are):  x . W = x_hi . W + x_lo . W                   (2 products)
//   float32 weights:                   x . W ~ x_hi . W_hi + x_lo . W_hi + x_hi . W_lo  (3; the
//                                      dropped x_lo . W_lo is below 2^-16 of each term)
// That is 2-3x the work of a plain bf16 GEMM (which would round x to bf16: NMSE ~1e-6), still
// several times the float32 FMA rate.
//
// Layout. A is row-major (16 rows of 32 bf16) and B is in VNNI form (16 rows, each 16 columns of a
// k pair), so W plays A — W rows need only copying into tiles, no transposing — and x plays B,
// packed once per call into 16 x 32 tiles [m block][k step][hi, lo]. A tile of C is then a 16 x 16
// block of y.T, written back transposed.
// Blocking: AmxGemm. Four accumulator tiles hold 32 W rows x 32 x rows; W tiles in registers 4-5,
// x tiles in 6-7 (block_kernel). W blocks are packed into contiguous tiles (bf16 copied, float32
// split) just before their products; nothing outside the caller's arrays is read.
// Measured on a 2-core Xeon with AMX: 266 x 2048 @ 2048 x 16384 with bf16 W in ~18 ms, ~3.4x the
// AVX-512 float32 FMA GEMM; the tile products run at the unit's rate (~1.9 TFLOP/s per core on
// real data), and packing W from memory costs the rest.
// Non-finite values: packing notices them and linear_amx returns false (see matmul_amx.h). bf16
// subnormals (below 1.2e-38) are flushed to zero by the conversion and by the tile unit.
#include "cpu/matmul_amx.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"
#include "cpu/threadpool.h"

namespace refpg {

namespace {

constexpr int64_t kTile = 16;                // rows of a tile; also the columns of a C tile
constexpr int64_t kStep = 32;                // depth of one tile product (bf16 per A row)
constexpr int64_t kTileElems = kTile * kStep;  // bf16 per A or B tile (1 KB)
constexpr int64_t kWRows = 2 * kTile;        // W rows per register block
constexpr int64_t kBlockSteps = 8;           // k steps per depth block: 256 deep
constexpr int64_t kSuper = 8;                // W blocks a thread runs per x block
constexpr int64_t kMaxRows = 512;            // x rows packed at once (more: W is read again)
constexpr int64_t kMinParallelFma = 1 << 16;

// Palette 1, all 8 tiles 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = kTile;
    }
  }
};

// Tile state for the calling thread, released on scope exit (so the kernel need not save 8 KB
// of tile data at every context switch afterwards).
struct TileScope {
  REFPG_TARGET_AMX TileScope() {
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  REFPG_TARGET_AMX ~TileScope() { _tile_release(); }
};

template <class T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, std::max<size_t>((n * sizeof(T) + 63) / 64 * 64, 64));
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};

// The packed x, kept per calling thread and only ever grown (to 4 bytes per element of the largest
// x chunk: kMaxRows x K, 32 MB at K = 16384): a fresh allocation per call would cost a page fault
// per 4 KB, as much as packing itself.
uint16_t* packed_x(int64_t n) {
  thread_local std::vector<uint16_t, AlignedAllocator<uint16_t>> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// 16 floats -> (hi, lo) bf16 parts, the hi parts widened back to float (widen_bf16) for the remainder.
// v0 = v[0:16], v1 = v[16:32] -> hi and lo, 32 bf16 each in k order (16 k pairs = 16 uint32).
// False when a hi part is not finite (inf, NaN, or beyond the bf16 range).
REFPG_TARGET_AVX512BF16 inline bool split32(__m512 v0, __m512 v1, __m512i* hi, __m512i* lo) {
  const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);
  const __m512 h0 = widen_bf16(_mm512_castsi512_si256(h)), h1 = widen_bf16(_mm512_extracti64x4_epi64(h, 1));
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  // lo = 0 where hi is inf or NaN: the remainder would be NaN
  const __mmask16 f0 = _mm512_cmpneq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(h0), exponent), exponent);
  const __mmask16 f1 = _mm512_cmpneq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(h1), exponent), exponent);
  const __m512 d0 = _mm512_maskz_sub_ps(f0, v0, h0), d1 = _mm512_maskz_sub_ps(f1, v1, h1);
  *hi = h;
  *lo = (__m512i)_mm512_cvtne2ps_pbh(d1, d0);
  return (f0 & f1) == 0xffff;
}

// x rows [16 mb, 16 mb + 16) -> their B tiles [k step][hi, lo][k pair][row][2] (rows past M and
// depth past K are zeros). False when some x is not finite or beyond the bf16 range.
REFPG_TARGET_AVX512BF16 bool pack_x_block(const LinearArgs& p, int64_t mb, int64_t steps, uint16_t* dst) {
  alignas(64) uint32_t hi[kTile][kTile], lo[kTile][kTile];  // [row][k pair]
  bool finite = true;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t k0 = s * kStep;
    const int64_t left = std::min<int64_t>(kStep, p.K - k0);
    const __mmask16 m0 = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 m1 = left <= 16 ? 0 : left >= 32 ? 0xffff : static_cast<__mmask16>((1u << (left - 16)) - 1);
    for (int64_t r = 0; r < kTile; ++r) {
      const int64_t m = mb * kTile + r;
      __m512i h = _mm512_setzero_si512(), l = _mm512_setzero_si512();
      if (m < p.M) {
        const float* x = p.x + m * p.ldx + k0;
        finite &= split32(_mm512_maskz_loadu_ps(m0, x), _mm512_maskz_loadu_ps(m1, x + 16), &h, &l);
      }
      _mm512_store_si512(hi[r], h);
      _mm512_store_si512(lo[r], l);
    }
    auto* out = reinterpret_cast<uint32_t*>(dst + s * 2 * kTileElems);  // [hi, lo][k pair][row]
    for (int64_t j = 0; j < kTile; ++j)
      for (int64_t r = 0; r < kTile; ++r) {
        out[j * kTile + r] = hi[r][j];
        out[kTileElems / 2 + j * kTile + r] = lo[r][j];
      }
  }
  return finite;
}

// Row r of the W block at row n0, depth [k0, k0 + 32 steps) -> its rows of the block's A tiles
// [k step][part][32 rows][32] (bf16; part 0 the hi parts and, float32 W only, part 1 the lo
// parts); zeros past N and K. Tiles are contiguous (rows 64 bytes apart): W's own rows, thousands
// of bytes apart, would all fall in the same few L1 sets. False when some W is not finite (or, for
// float32 W, beyond the bf16 range).
template <class Wt>
REFPG_TARGET_AVX512BF16 bool pack_w_row(const LinearArgs& p, const Wt* w, int64_t n0, int64_t r, int64_t k0,
                                        int64_t steps, uint16_t* dst) {
  constexpr int64_t kParts = std::is_same_v<Wt, uint16_t> ? 1 : 2;
  const bool real = n0 + r < p.N;
  const Wt* src = w + (real ? n0 + r : 0) * p.K;
  bool finite = true;
  for (int64_t s = 0; s < steps; ++s) {
    uint16_t* hi = dst + s * kParts * 2 * kTileElems + r * kStep;
    const int64_t k = k0 + s * kStep;
    const int64_t left = real ? std::max<int64_t>(0, std::min<int64_t>(kStep, p.K - k)) : 0;
    if constexpr (kParts == 1) {
      const __mmask32 m = left >= 32 ? 0xffffffffu : static_cast<__mmask32>((1u << left) - 1);
      const __m512i v = _mm512_maskz_loadu_epi16(m, src + k), exponent = _mm512_set1_epi16(0x7f80);
      finite &= _mm512_cmpeq_epi16_mask(_mm512_and_si512(v, exponent), exponent) == 0;
      _mm512_storeu_si512(hi, v);
    } else {
      const __mmask16 m0 = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
      const __mmask16 m1 = left <= 16 ? 0 : left >= 32 ? 0xffff : static_cast<__mmask16>((1u << (left - 16)) - 1);
      __m512i h, l;
      finite &= split32(_mm512_maskz_loadu_ps(m0, src + k), _mm512_maskz_loadu_ps(m1, src + k + 16), &h, &l);
      _mm512_storeu_si512(hi, h);
      _mm512_storeu_si512(hi + 2 * kTileElems, l);
    }
  }
  return finite;
}

// The register block: C tiles (0: W rows 0-15 x m block 0, 1: rows 0-15 x block 1, 2 and 3: rows
// 16-31) += W[32 rows, steps k steps] . x blocks^T. w: the packed A tiles (pack_w_row, with the
// lo parts when kLo); x0, x1: the packed B tiles of the (one or two, MB) m blocks.
// c: the 4 C tiles [tile][16 W rows][16 x rows], loaded first unless `zero`, stored after.
template <int MB, bool kLo>
REFPG_TARGET_AMX void block_kernel(const uint16_t* w, const uint16_t* x0, const uint16_t* x1, int64_t steps, float* c,
                                   bool zero) {
  constexpr int64_t kC = kTile * kTile, kWStep = (kLo ? 2 : 1) * 2 * kTileElems;
  // GCC's tile load/store intrinsics declare no memory access: fence them against the packing
  // stores before and the reads of c after, should this function ever be inlined.
  __asm__ __volatile__("" ::: "memory");
  if (zero) {
    _tile_zero(0); _tile_zero(2);
    if (MB == 2) { _tile_zero(1); _tile_zero(3); }
  } else {
    _tile_loadd(0, c, 64); _tile_loadd(2, c + 2 * kC, 64);
    if (MB == 2) { _tile_loadd(1, c + kC, 64); _tile_loadd(3, c + 3 * kC, 64); }
  }
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* a = w + s * kWStep;
    const uint16_t* b0 = x0 + s * 2 * kTileElems;
    _tile_loadd(4, a, 64);
    _tile_loadd(5, a + kTileElems, 64);
    _tile_loadd(6, b0, 64);                // x_hi
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    _tile_loadd(7, b0 + kTileElems, 64);   // x_lo
    _tile_dpbf16ps(0, 4, 7);
    _tile_dpbf16ps(2, 5, 7);
    if constexpr (MB == 2) {
      const uint16_t* b1 = x1 + s * 2 * kTileElems;
      _tile_loadd(6, b1, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(3, 5, 6);
      _tile_loadd(7, b1 + kTileElems, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    if constexpr (kLo) {  // + W_lo . x_hi
      _tile_loadd(4, a + 2 * kTileElems, 64);
      _tile_loadd(5, a + 3 * kTileElems, 64);
      _tile_loadd(6, b0, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (MB == 2) {
        _tile_loadd(7, x1 + s * 2 * kTileElems, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, c, 64); _tile_stored(2, c + 2 * kC, 64);
  if (MB == 2) { _tile_stored(1, c + kC, 64); _tile_stored(3, c + 3 * kC, 64); }
  __asm__ __volatile__("" ::: "memory");
}

// dst rows [0, 16) ld apart = the 16 x 16 block src [16][16] transposed, + bias[row] (or 0).
REFPG_TARGET_AVX512BF16 void transpose16_store(const float* src, float* dst, int64_t ld, const float* bias) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(src + 16 * i);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int i = 0; i < 8; ++i) {
    _mm512_storeu_ps(dst + i * ld, _mm512_add_ps(_mm512_shuffle_f32x4(t[i], t[i + 8], 0x88), b));
    _mm512_storeu_ps(dst + (i + 8) * ld, _mm512_add_ps(_mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd), b));
  }
}

// Threads share out the 32-row W blocks (contiguous ranges: each streams its part of W). A thread
// takes kSuper of its blocks at a time (a group) and walks depth in blocks of kBlockSteps k steps;
// for every pair of x blocks it runs each W block of the group. Partial sums wait in a per-thread
// buffer of C tiles and go to y, transposed, after the last depth block. The W panels of a (group,
// depth block) are packed just before its tile products (measured: interleaving the packing of the
// next panels with the products, or prefetching W rows into L2 ahead, made it no faster).
template <class Wt>
class AmxGemm {
  static constexpr bool kLo = !std::is_same_v<Wt, uint16_t>;  // float32 W: hi and lo parts
  static constexpr int64_t kC = kTile * kTile;                 // floats per C tile
  static constexpr int64_t kPanelPerStep = (kLo ? 2 : 1) * 2 * kTileElems;  // bf16 per W block per k step

 public:
  AmxGemm(const LinearArgs& p, const Wt* w)
      : p_(p), w_(w), m_blocks_((p.M + kTile - 1) / kTile), m_pairs_((m_blocks_ + 1) / 2),
        steps_((p.K + kStep - 1) / kStep), xp_(packed_x(m_blocks_ * steps_ * 2 * kTileElems)) {}

  // False (y then unspecified) when x or W holds a value the bf16 split cannot carry.
  bool run() {
    const bool serial = p_.M * p_.N * p_.K < kMinParallelFma;
    parallel_for(m_blocks_, serial ? m_blocks_ : 1, [&](int64_t b, int64_t e) {
      bool finite = true;
      for (int64_t mb = b; mb < e; ++mb) finite &= pack_x_block(p_, mb, steps_, x_block(mb));
      if (!finite) finite_ = false;
    });
    if (!finite_) return false;
    const int64_t n_blocks = (p_.N + kWRows - 1) / kWRows;
    parallel_for(n_blocks, serial ? n_blocks : 1, [&](int64_t b, int64_t e) {
      TileScope tiles;
      blocks(b, e);
    });
    return finite_;
  }

 private:
  // A group of W blocks [b, e) at one depth block [s0, s0 + steps) k steps.
  struct Item {
    int64_t b, e, s0, steps;
    int64_t rows() const { return (e - b) * kWRows; }
  };

  uint16_t* x_block(int64_t mb) const { return xp_ + mb * steps_ * 2 * kTileElems; }

  // The item's W blocks -> its panels (one per W block, steps * kPanelPerStep).
  void pack(const Item& it, uint16_t* panels) {
    bool finite = true;
    for (int64_t q = 0; q < it.rows(); ++q) {
      const int64_t i = q / kWRows;
      finite &= pack_w_row(p_, w_, (it.b + i) * kWRows, q % kWRows, it.s0 * kStep, it.steps,
                           panels + i * it.steps * kPanelPerStep);
    }
    if (!finite) finite_ = false;
  }

  // y[:, 32 b : 32 e] = x . W[those rows]^T (+ bias)
  void blocks(int64_t b, int64_t e) {
    thread_local std::vector<uint16_t, AlignedAllocator<uint16_t>> panels;  // tile rows = cache lines
    thread_local std::vector<float, AlignedAllocator<float>> sums;
    panels.resize(kSuper * kBlockSteps * kPanelPerStep);
    sums.resize(kSuper * m_pairs_ * 4 * kC);
    for (int64_t g = b; g < e; g += kSuper)
      for (int64_t s0 = 0; s0 < steps_; s0 += kBlockSteps) {
        const Item it{g, std::min(e, g + kSuper), s0, std::min(kBlockSteps, steps_ - s0)};
        pack(it, panels.data());
        const bool first = it.s0 == 0, last = it.s0 + it.steps == steps_;
        for (int64_t mp = 0; mp < m_pairs_; ++mp) {
          const int64_t mb = 2 * mp;
          const uint16_t* x0 = x_block(mb) + it.s0 * 2 * kTileElems;
          const bool pair = mb + 1 < m_blocks_;
          const uint16_t* x1 = pair ? x_block(mb + 1) + it.s0 * 2 * kTileElems : nullptr;
          for (int64_t i = 0; i < it.e - it.b; ++i) {
            float* c = sums.data() + (i * m_pairs_ + mp) * 4 * kC;
            const uint16_t* w = panels.data() + i * it.steps * kPanelPerStep;
            if (pair)
              block_kernel<2, kLo>(w, x0, x1, it.steps, c, first);
            else
              block_kernel<1, kLo>(w, x0, x1, it.steps, c, first);
            if (last) store(c, (it.b + i) * kWRows, mb, pair ? 2 : 1);
          }
        }
      }
  }


  // C tiles [4][16 W rows][16 x rows] of W rows n0.., x blocks mb.. -> y (transposed, + bias).
  void store(const float* c, int64_t n0, int64_t mb, int MB) {
    for (int t = 0; t < 4; ++t) {
      if (t % 2 >= MB) continue;
      const int64_t nt = n0 + (t / 2) * kTile, mt = (mb + t % 2) * kTile;
      const int64_t nr = std::min(kTile, p_.N - nt), mr = std::min(kTile, p_.M - mt);
      if (nr <= 0) continue;
      const float* tile = c + t * kC;
      const float* bias = p_.bias ? p_.bias + nt : nullptr;
      if (nr == kTile && mr == kTile) {
        transpose16_store(tile, p_.y + mt * p_.ldy + nt, p_.ldy, bias);
        continue;
      }
      for (int64_t i = 0; i < mr; ++i) {
        float* y = p_.y + (mt + i) * p_.ldy + nt;
        for (int64_t j = 0; j < nr; ++j) y[j] = tile[j * kTile + i] + (bias ? bias[j] : 0.0f);
      }
    }
  }

  const LinearArgs& p_;
  const Wt* w_;
  const int64_t m_blocks_, m_pairs_, steps_;
  uint16_t* const xp_;
  std::atomic<bool> finite_{true};
};

}  // namespace

bool linear_amx(const LinearArgs& p) {
  for (int64_t m = 0; m < p.M; m += kMaxRows) {  // bounds the packed copy of x
    LinearArgs rows = p;
    rows.x += m * p.ldx;
    rows.y += m * p.ldy;
    rows.M = std::min(kMaxRows, p.M - m);
    const bool done = p.format == WeightFormat::BF16
                          ? AmxGemm<uint16_t>(rows, static_cast<const uint16_t*>(p.weight)).run()
                          : AmxGemm<float>(rows, static_cast<const float*>(p.weight)).run();
    if (!done) return false;
  }
  return true;
}

}  // namespace refpg

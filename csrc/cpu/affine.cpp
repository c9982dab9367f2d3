// affine: see affine.h. Compiled with -ffp-contract=off (CMakeLists.txt): q·s + b must round after
// the product, as MLX's does, never fuse into one FMA.
#include "cpu/affine.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/threadpool.h"

namespace refpg {

namespace {

constexpr int64_t kGemvMaxRows = 8;    // as in matmul.cpp: more x rows are a prefill
constexpr int64_t kDequantRows = 256;  // W rows dequantized per GEMM block: 256 · K floats (2 MB at K 2048)

// ---- exact values ---------------------------------------------------------------------------------

// float32 -> the nearest bfloat16, as a float32 (round to nearest even; the values are finite).
inline float round_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

inline float round_to(float v, WeightFormat f) {
  switch (f) {
    case WeightFormat::BF16: return round_bf16(v);
    case WeightFormat::F16: return static_cast<float>(static_cast<_Float16>(v));
    default: return v;
  }
}

inline float value_at(const void* p, WeightFormat f, int64_t i) {
  switch (f) {
    case WeightFormat::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case WeightFormat::F16: return static_cast<float>(static_cast<const _Float16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// values_at(p, f, first + i) for i < n into out (the format switch outside the loop).
void values_at(const void* p, WeightFormat f, int64_t first, int64_t n, float* out) {
  switch (f) {
    case WeightFormat::BF16:
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(static_cast<const uint16_t*>(p)[first + i]);
      return;
    case WeightFormat::F16:
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<const _Float16*>(p)[first + i]);
      return;
    default: std::memcpy(out, static_cast<const float*>(p) + first, static_cast<size_t>(n) * sizeof(float));
  }
}

// Σ a_i·b_i in four interleaved partial sums (independent chains, not one n-long one).
float sum_of_products(const float* a, const float* b, int64_t n) {
  float acc[4] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) acc[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Code i of a row's bit stream (least significant bit first).
inline uint32_t code_at(const uint32_t* words, int bits, int64_t i) {
  const int64_t bit = i * bits;
  const int shift = static_cast<int>(bit & 31);
  uint64_t v = words[bit >> 5] >> shift;
  if (shift + bits > 32) v |= static_cast<uint64_t>(words[(bit >> 5) + 1]) << (32 - shift);
  return static_cast<uint32_t>(v) & ((1u << bits) - 1u);
}

int64_t words_per_row(const AffineWeight& w, int64_t K) { return K * w.bits / 32; }

// Row n of W [.., K] as its exact float32 values (refpg.formats.to_float32).
void dequantize_row(const AffineWeight& w, int64_t K, int64_t n, float* out) {
  const int64_t groups = K / w.group_size;
  const uint32_t* codes = w.codes + n * words_per_row(w, K);
  for (int64_t g = 0; g < groups; ++g) {
    const float s = value_at(w.scales, w.scale_format, n * groups + g);
    const float b = value_at(w.biases, w.scale_format, n * groups + g);
    for (int64_t j = g * w.group_size; j < (g + 1) * w.group_size; ++j) {
      const float q = static_cast<float>(code_at(codes, w.bits, j));
      out[j] = round_to(round_to(q * s, w.scale_format) + b, w.scale_format);
    }
  }
}

// The same, 8 or 16 weights at a time, for 4- and 8-bit codes with F32 or BF16 scales (every
// rounding as in the scalar code: the results are the same floats, which the op table's exact
// embedding cases check on each path).
template <WeightFormat S>
REFPG_TARGET_AVX2 inline __m256 round8(__m256 v) {
  if constexpr (S == WeightFormat::BF16) {
    __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  return v;
}

template <WeightFormat S>
REFPG_TARGET_AVX2 inline void store_values(__m256 q, __m256 s, __m256 b, float* out) {
  _mm256_storeu_ps(out, round8<S>(_mm256_add_ps(round8<S>(_mm256_mul_ps(q, s)), b)));
}

template <WeightFormat S>
REFPG_TARGET_AVX2 void dequantize_row_avx2(const uint8_t* bytes, int bits, int gs, int64_t groups, const float* scales,
                                           const float* biases, float* out) {
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 s = _mm256_set1_ps(scales[g]), b = _mm256_set1_ps(biases[g]);
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
      if (bits == 8) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + k));
        store_values<S>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), s, b, out + k);
        store_values<S>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))), s, b, out + k + 8);
      } else {  // 4 bits: byte i holds codes 2i (low nibble) and 2i+1
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + k / 2)));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
        const __m256 a = _mm256_unpacklo_ps(lo, hi), c = _mm256_unpackhi_ps(lo, hi);  // pairs, per 128-bit lane
        store_values<S>(_mm256_permute2f128_ps(a, c, 0x20), s, b, out + k);
        store_values<S>(_mm256_permute2f128_ps(a, c, 0x31), s, b, out + k + 8);
      }
    }
  }
}

// Row n into out with the vector code where it applies; false where it does not.
bool dequantize_row_vector(const AffineWeight& w, int64_t K, int64_t n, float* out, SimdPath path, float* scratch) {
  if (!uses_avx2(path) || (w.bits != 4 && w.bits != 8) || w.scale_format == WeightFormat::F16) return false;
  const int64_t groups = K / w.group_size;
  float* s = scratch;
  float* b = scratch + groups;
  values_at(w.scales, w.scale_format, n * groups, groups, s);
  values_at(w.biases, w.scale_format, n * groups, groups, b);
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(w.codes + n * words_per_row(w, K));
  if (w.scale_format == WeightFormat::BF16)
    dequantize_row_avx2<WeightFormat::BF16>(bytes, w.bits, w.group_size, groups, s, b, out);
  else
    dequantize_row_avx2<WeightFormat::F32>(bytes, w.bits, w.group_size, groups, s, b, out);
  return true;
}

// `count` rows of W, exactly, into out (rows K floats apart): rows ids[i], or first + i without ids.
void dequantize_rows(const AffineWeight& w, int64_t K, int64_t count, const int64_t* ids, int64_t first, float* out,
                     SimdPath path) {
  std::vector<float> scratch(static_cast<size_t>(2 * (K / w.group_size) + 1));
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = ids ? ids[i] : first + i;
    if (!dequantize_row_vector(w, K, n, out + i * K, path, scratch.data())) dequantize_row(w, K, n, out + i * K);
  }
}

// ---- prefill: exact rows, then the float32 GEMM ------------------------------------------------------

void gemm(const LinearArgs& p, const AffineWeight& w, SimdPath path) {
  std::vector<float> block(static_cast<size_t>(std::min(kDequantRows, p.N) * p.K));
  for (int64_t n0 = 0; n0 < p.N; n0 += kDequantRows) {
    const int64_t rows = std::min(kDequantRows, p.N - n0);
    parallel_for(rows, 1, [&](int64_t r0, int64_t r1) {
      dequantize_rows(w, p.K, r1 - r0, nullptr, n0 + r0, block.data() + r0 * p.K, path);
    });
    LinearArgs part = p;
    part.weight = block.data();
    part.format = WeightFormat::F32;
    part.bias = p.bias ? p.bias + n0 : nullptr;
    part.y = p.y + n0;
    part.N = rows;
    linear(part, path);
  }
}

// ---- decode: s·Σ x·q + b·Σ x per group ------------------------------------------------------------

// What every row's dot product needs of one x row: x itself, reordered for the vector code
// (`block` codes at a time: the low nibbles' x, then the high nibbles'), and Σ x per group.
struct XRow {
  std::vector<float> x;     // [K], in the order the codes are read
  std::vector<float> sums;  // [K / group_size]
};

XRow prepare_x(const float* x, int64_t K, int group_size, int nibble_block) {
  XRow r{std::vector<float>(x, x + K), std::vector<float>(static_cast<size_t>(K / group_size), 0.0f)};
  for (int64_t k = 0; k < K; ++k) r.sums[k / group_size] += x[k];
  if (nibble_block)  // block of 2h codes = h bytes: code 2i sits in byte i's low nibble, 2i+1 in its high
    for (int64_t k0 = 0; k0 < K; k0 += nibble_block)
      for (int i = 0; i < nibble_block / 2; ++i) {
        r.x[k0 + i] = x[k0 + 2 * i];
        r.x[k0 + nibble_block / 2 + i] = x[k0 + 2 * i + 1];
      }
  return r;
}

// One row's Σ_g s_g · Σ x·q: `s`, `b` the row's scales and biases as float32.
float dot_scalar(const uint32_t* codes, int bits, int gs, int64_t groups, const float* x, const float* s) {
  float acc = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    float d = 0.0f;
    for (int64_t j = g * gs; j < (g + 1) * gs; ++j) d += x[j] * static_cast<float>(code_at(codes, bits, j));
    acc += s[g] * d;
  }
  return acc;
}

// The vector dot products: R rows of W at once (independent accumulators, x loaded once for all),
// each row's Σ_g s_g · Σ_{k in g} x_k·q_k into out[r]. `bytes` points at row 0's codes, rows
// `stride` bytes apart; s[r * groups + g] are the rows' scales as float32.
template <int R>
REFPG_TARGET_AVX2 void dot4_avx2(const uint8_t* bytes, int64_t stride, int gs, int64_t groups, const float* x,
                                 const float* s, const uint8_t* ahead, float* out) {
  const __m256i low = _mm256_set1_epi32(0xF);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 d[R][2];
    for (int r = 0; r < R; ++r) d[r][0] = d[r][1] = _mm256_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {  // 16 codes in 8 bytes
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int r = 0; r < R; ++r) {
        if ((k & 127) == 0) prefetch(ahead + r * stride + k / 2);  // one per 64-byte line
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + r * stride + k / 2));
        const __m256i v = _mm256_cvtepu8_epi32(b);
        d[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), x0, d[r][0]);
        d[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), x1, d[r][1]);
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_add_ps(d[r][0], d[r][1]), _mm256_set1_ps(s[r * groups + g]), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

template <int R>
REFPG_TARGET_AVX2 void dot8_avx2(const uint8_t* bytes, int64_t stride, int gs, int64_t groups, const float* x,
                                 const float* s, const uint8_t* ahead, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 d[R][2];
    for (int r = 0; r < R; ++r) d[r][0] = d[r][1] = _mm256_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {  // 16 codes in 16 bytes
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int r = 0; r < R; ++r) {
        if ((k & 63) == 0) prefetch(ahead + r * stride + k);  // one per 64-byte line
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + r * stride + k));
        d[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), x0, d[r][0]);
        d[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))), x1, d[r][1]);
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_add_ps(d[r][0], d[r][1]), _mm256_set1_ps(s[r * groups + g]), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

template <int R>
REFPG_TARGET_AVX512 void dot4_avx512(const uint8_t* bytes, int64_t stride, int gs, int64_t groups, const float* x,
                                     const float* s, const uint8_t* ahead, float* out) {
  const __m512i low = _mm512_set1_epi32(0xF);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 d[R][2];
    for (int r = 0; r < R; ++r) d[r][0] = d[r][1] = _mm512_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {  // 32 codes in 16 bytes
      const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
      for (int r = 0; r < R; ++r) {
        if ((k & 127) == 0) prefetch(ahead + r * stride + k / 2);  // one per 64-byte line
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + r * stride + k / 2)));
        d[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), x0, d[r][0]);
        d[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), x1, d[r][1]);
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_add_ps(d[r][0], d[r][1]), _mm512_set1_ps(s[r * groups + g]), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

template <int R>
REFPG_TARGET_AVX512 void dot8_avx512(const uint8_t* bytes, int64_t stride, int gs, int64_t groups, const float* x,
                                     const float* s, const uint8_t* ahead, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 d[R][2];
    for (int r = 0; r < R; ++r) d[r][0] = d[r][1] = _mm512_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {  // 32 codes in 32 bytes
      const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
      for (int r = 0; r < R; ++r) {
        const uint8_t* row = bytes + r * stride + k;
        if ((k & 63) == 0) prefetch(ahead + r * stride + k);  // one per 64-byte line
        const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
        const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16)));
        d[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), x0, d[r][0]);
        d[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), x1, d[r][1]);
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_add_ps(d[r][0], d[r][1]), _mm512_set1_ps(s[r * groups + g]), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

enum class Dot { Scalar, Avx2x4, Avx2x8, Avx512x4, Avx512x8 };

Dot choose_dot(const AffineWeight& w, SimdPath path) {
  const bool wide = path == SimdPath::Avx512 || path == SimdPath::Amx;
  if (w.bits == 4 && uses_avx2(path)) return wide ? Dot::Avx512x4 : Dot::Avx2x4;
  // groups of 32 are one 32-code step of the AVX-512 8-bit loop, two of the AVX2 one
  if (w.bits == 8 && uses_avx2(path)) return wide ? Dot::Avx512x8 : Dot::Avx2x8;
  return Dot::Scalar;
}

constexpr int kRows = 4;  // W rows per vector dot call

template <int R>
void dot_rows(Dot dot, const uint8_t* bytes, int64_t stride, int gs, int64_t groups, const float* x, const float* s,
              const uint8_t* ahead, float* out) {
  switch (dot) {
    case Dot::Avx2x4: return dot4_avx2<R>(bytes, stride, gs, groups, x, s, ahead, out);
    case Dot::Avx2x8: return dot8_avx2<R>(bytes, stride, gs, groups, x, s, ahead, out);
    case Dot::Avx512x4: return dot4_avx512<R>(bytes, stride, gs, groups, x, s, ahead, out);
    case Dot::Avx512x8: return dot8_avx512<R>(bytes, stride, gs, groups, x, s, ahead, out);
    case Dot::Scalar: break;
  }
}

void gemv(const LinearArgs& p, const AffineWeight& w, SimdPath path) {
  const Dot dot = choose_dot(w, path);
  const int nibble_block = dot == Dot::Avx2x4 ? 16 : dot == Dot::Avx512x4 ? 32 : 0;
  std::vector<XRow> xs;
  for (int64_t m = 0; m < p.M; ++m) xs.push_back(prepare_x(p.x + m * p.ldx, p.K, w.group_size, nibble_block));
  const int64_t groups = p.K / w.group_size, words = words_per_row(w, p.K), stride = words * 4;
  parallel_for(p.N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> s(static_cast<size_t>(kRows * groups)), b(static_cast<size_t>(kRows * groups));
    for (int64_t n = n0; n < n1; n += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, n1 - n));
      values_at(w.scales, w.scale_format, n * groups, rows * groups, s.data());
      values_at(w.biases, w.scale_format, n * groups, rows * groups, b.data());
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(w.codes + n * words);
      // the next tile's rows, fetched while this one is computed (itself for the last tile)
      const uint8_t* ahead = n + 2 * kRows <= n1 ? bytes + kRows * stride : bytes;
      for (int64_t m = 0; m < p.M; ++m) {
        const float* x = xs[m].x.data();
        float d[kRows] = {};
        if (dot == Dot::Scalar) {
          for (int r = 0; r < rows; ++r)
            d[r] = dot_scalar(w.codes + (n + r) * words, w.bits, w.group_size, groups, x, s.data() + r * groups);
        } else if (rows == kRows) {
          dot_rows<kRows>(dot, bytes, stride, w.group_size, groups, x, s.data(), m + 1 == p.M ? ahead : bytes, d);
        } else {
          for (int r = 0; r < rows; ++r)
            dot_rows<1>(dot, bytes + r * stride, stride, w.group_size, groups, x, s.data() + r * groups, bytes, d + r);
        }
        for (int r = 0; r < rows; ++r) {
          const float biases = sum_of_products(b.data() + r * groups, xs[m].sums.data(), groups);  // Σ_g b_g · Σ x over g
          p.y[m * p.ldy + n + r] = d[r] + biases + (p.bias ? p.bias[n + r] : 0.0f);
        }
      }
    }
  });
}

}  // namespace

void linear_affine(const LinearArgs& p, const AffineWeight& w, SimdPath path) {
  if (p.M == 0 || p.N == 0) return;
  if (p.M > kGemvMaxRows) return gemm(p, w, path);
  gemv(p, w, path);
}

void embedding_affine(const AffineWeight& w, int64_t D, const int64_t* ids, int64_t n, float* out, SimdPath path) {
  parallel_for(n, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(D, 1)), [&](int64_t i0, int64_t i1) {
    dequantize_rows(w, D, i1 - i0, ids + i0, 0, out + i0 * D, path);
  });
}

}  // namespace refpg

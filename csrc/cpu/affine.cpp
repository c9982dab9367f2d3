// affine: see affine.h. Compiled with -ffp-contract=off (CMakeLists.txt): q·s + b must round after
// the product, as MLX's does, never fuse into one FMA.
#include "cpu/affine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/threadpool.h"

namespace refpg {

namespace {

constexpr int64_t kGemvMaxRows = 8;    // as in matmul.cpp: more x rows are a prefill

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

REFPG_TARGET_AVX2 void bf16_values_avx2(const uint16_t* p, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8(p + i));
  for (; i < n; ++i) out[i] = bf16_to_f32(p[i]);
}

// values_at(p, f, first + i) for i < n into out (the format switch outside the loop).
void values_at(const void* p, WeightFormat f, int64_t first, int64_t n, float* out, SimdPath path) {
  switch (f) {
    case WeightFormat::BF16:
      if (uses_avx2(path)) return bf16_values_avx2(static_cast<const uint16_t*>(p) + first, n, out);
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(static_cast<const uint16_t*>(p)[first + i]);
      return;
    case WeightFormat::F16:
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<const _Float16*>(p)[first + i]);
      return;
    default: std::memcpy(out, static_cast<const float*>(p) + first, static_cast<size_t>(n) * sizeof(float));
  }
}

// Σ a_i·b_i in four interleaved partial sums (independent chains, not one n-long one); AVX2: eight.
REFPG_TARGET_AVX2 float sum_of_products_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return hsum(acc) + tail;
}

float sum_of_products(const float* a, const float* b, int64_t n, SimdPath path) {
  if (uses_avx2(path)) return sum_of_products_avx2(a, b, n);
  float acc[4] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) acc[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// c[r·n + i] = s[r·n + i] · t[i] for `rows` rows of n.
REFPG_TARGET_AVX2 void scale_rows_avx2(const float* s, const float* t, int rows, int64_t n, float* c) {
  for (int r = 0; r < rows; ++r) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(c + r * n + i, _mm256_mul_ps(_mm256_loadu_ps(s + r * n + i), _mm256_loadu_ps(t + i)));
    for (; i < n; ++i) c[r * n + i] = s[r * n + i] * t[i];
  }
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

// W[n, k0 : k0 + kc] ([.., K], k0 and kc multiples of the group size) as its exact float32 values
// (refpg.formats.to_float32) into out.
void dequantize_span(const AffineWeight& w, int64_t K, int64_t n, int64_t k0, int64_t kc, float* out) {
  const int64_t groups = K / w.group_size;
  const uint32_t* codes = w.codes + n * words_per_row(w, K);
  for (int64_t g = k0 / w.group_size; g < (k0 + kc) / w.group_size; ++g) {
    const float s = value_at(w.scales, w.scale_format, n * groups + g);
    const float b = value_at(w.biases, w.scale_format, n * groups + g);
    for (int64_t j = g * w.group_size; j < (g + 1) * w.group_size; ++j) {
      const float q = static_cast<float>(code_at(codes, w.bits, j));
      out[j - k0] = round_to(round_to(q * s, w.scale_format) + b, w.scale_format);
    }
  }
}

// ---- 2-, 3-, 5- and 6-bit codes: unpacked to one byte each, for the 8-bit code paths ---------

// B-bit codes (8 codes in B bytes, least significant bit first) of `rows` rows `stride` bytes apart
// into one byte per code, rows K bytes apart (K: a multiple of 32); prefetches the rows at `ahead`.
template <int B>
void unpack_rows_scalar(const uint8_t* bytes, int64_t stride, int rows, int64_t K, const uint8_t* ahead,
                        uint8_t* out) {
  for (int r = 0; r < rows; ++r)
    for (int64_t i = 0; i < K / 8; ++i) {
      if (i % 8 == 0) prefetch_l2(ahead + r * stride + i * B);
      uint64_t v = 0;  // little-endian: code j at bits j·B; 8 bytes read where the row has them
      std::memcpy(&v, bytes + r * stride + i * B, i * B + 8 <= stride ? 8 : B);
      for (int j = 0; j < 8; ++j) out[r * K + 8 * i + j] = static_cast<uint8_t>((v >> (j * B)) & ((1u << B) - 1));
    }
}

// The same, 64 codes a step: vpermb puts the B bytes of each 8 codes in their own quadword,
// vpmultishiftqb takes code j from bit j·B of it.
template <int B>
REFPG_TARGET_AVX512VBMI void unpack_rows_vbmi(const uint8_t* bytes, int64_t stride, int rows, int64_t K,
                                              const uint8_t* ahead, uint8_t* out) {
  alignas(64) uint8_t gather[64], shifts[64];
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      gather[8 * i + j] = static_cast<uint8_t>(i * B + j);
      shifts[8 * i + j] = static_cast<uint8_t>(j * B);
    }
  const __m512i g = _mm512_load_si512(gather), sh = _mm512_load_si512(shifts);
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << B) - 1));
  for (int r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; k += 64) {  // the last step may hold 32 codes
      const int64_t n = std::min<int64_t>(64, K - k);
      const uint8_t* p = bytes + r * stride + k / 8 * B;
      prefetch_l2(ahead + r * stride + k / 8 * B);
      const __m512i v = _mm512_maskz_loadu_epi8((1ull << (n / 8 * B)) - 1, p);  // n / 8 · B <= 48 bytes
      const __m512i codes = _mm512_and_si512(_mm512_multishift_epi64_epi8(sh, _mm512_permutexvar_epi8(g, v)), mask);
      _mm512_mask_storeu_epi8(out + r * K + k, n == 64 ? ~0ull : (1ull << n) - 1, codes);
    }
}

// The groups of 8 B-bit codes at p and p + B as 16 codes in 16-bit words (see unpack_rows_avx2).
template <int B>
REFPG_TARGET_AVX2 inline __m256i codes16(const uint8_t* p, __m256i pick, __m256i mul) {
  const __m256i v = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + B)), 1);
  return _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(v, pick), mul), 8);
}

// The same with AVX2, 32 codes (four groups of 8 codes in B bytes) a step: each 128-bit lane holds
// one group's bytes from its first; vpshufb puts the two bytes holding code j (bits j·B …
// j·B + B − 1) in 16-bit word j, vpmullw by 2^(8 − j·B mod 8) then a shift right by 8 leaves code j
// in its low bits (B <= 6: a code spans two bytes at most). A step reads 16 bytes from the last
// group's first; near a row's end (where that passes the row) the step's 4·B bytes are copied to a
// zeroed buffer first.
template <int B>
REFPG_TARGET_AVX2 void unpack_rows_avx2(const uint8_t* bytes, int64_t stride, int rows, int64_t K,
                                        const uint8_t* ahead, uint8_t* out) {
  alignas(32) uint8_t window[32];
  alignas(32) uint16_t scale[16];
  for (int lane = 0; lane < 2; ++lane)
    for (int j = 0; j < 8; ++j) {
      window[16 * lane + 2 * j] = static_cast<uint8_t>(j * B / 8);
      window[16 * lane + 2 * j + 1] = static_cast<uint8_t>(j * B / 8 + 1);
      scale[8 * lane + j] = static_cast<uint16_t>(1u << (8 - j * B % 8));
    }
  const __m256i pick = _mm256_load_si256(reinterpret_cast<const __m256i*>(window));
  const __m256i mul = _mm256_load_si256(reinterpret_cast<const __m256i*>(scale));
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << B) - 1));
  alignas(16) uint8_t tail[4 * B + 16] = {};  // a step's bytes near a row's end; past them zeros
  for (int r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; k += 32) {
      const int64_t at = k / 8 * B;
      const uint8_t* p = bytes + r * stride + at;
      if (at + 3 * B + 16 > stride) p = static_cast<const uint8_t*>(std::memcpy(tail, p, 4 * B));
      if (k % 64 == 0) prefetch_l2(ahead + r * stride + at);
      // bytes per 128-bit lane: groups 0, 2 | 1, 3 -> quadwords 0, 2, 1, 3 -> in order
      const __m256i packed = _mm256_packus_epi16(codes16<B>(p, pick, mul), codes16<B>(p + 2 * B, pick, mul));
      const __m256i codes = _mm256_and_si256(_mm256_permute4x64_epi64(packed, 0xD8), mask);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * K + k), codes);
    }
}

bool unpacks(const AffineWeight& w, SimdPath path) { return w.bits != 4 && w.bits != 8 && uses_avx2(path); }

void unpack_rows(int bits, const uint8_t* bytes, int64_t stride, int rows, int64_t K, const uint8_t* ahead,
                 uint8_t* out, SimdPath path) {
  const bool vbmi = (path == SimdPath::Avx512 || path == SimdPath::Amx) && cpu_features().avx512vbmi;
  const auto run = [&](auto width) {
    constexpr int B = decltype(width)::value;
    if (vbmi) return unpack_rows_vbmi<B>(bytes, stride, rows, K, ahead, out);
    if (uses_avx2(path)) return unpack_rows_avx2<B>(bytes, stride, rows, K, ahead, out);
    unpack_rows_scalar<B>(bytes, stride, rows, K, ahead, out);
  };
  switch (bits) {
    case 2: return run(std::integral_constant<int, 2>{});
    case 3: return run(std::integral_constant<int, 3>{});
    case 5: return run(std::integral_constant<int, 5>{});
    default: return run(std::integral_constant<int, 6>{});
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

// The same with the vector code where it applies (false where it does not); scratch: 2 · kc / group
// size floats; codes: kc bytes (2-, 3-, 5- and 6-bit codes are unpacked there and read as 8-bit).
bool dequantize_span_vector(const AffineWeight& w, int64_t K, int64_t n, int64_t k0, int64_t kc, float* out,
                            SimdPath path, float* scratch, uint8_t* codes) {
  if (!uses_avx2(path) || w.scale_format == WeightFormat::F16) return false;
  const int64_t groups = kc / w.group_size, first = n * (K / w.group_size) + k0 / w.group_size;
  float* s = scratch;
  float* b = scratch + groups;
  values_at(w.scales, w.scale_format, first, groups, s, path);
  values_at(w.biases, w.scale_format, first, groups, b, path);
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(w.codes + n * words_per_row(w, K)) + k0 * w.bits / 8;
  int bits = w.bits;
  if (unpacks(w, path)) {
    unpack_rows(w.bits, bytes, kc * w.bits / 8, 1, kc, bytes, codes, path);
    bytes = codes;
    bits = 8;
  }
  if (w.scale_format == WeightFormat::BF16)
    dequantize_row_avx2<WeightFormat::BF16>(bytes, bits, w.group_size, groups, s, b, out);
  else
    dequantize_row_avx2<WeightFormat::F32>(bytes, bits, w.group_size, groups, s, b, out);
  return true;
}

// `count` rows of W, exactly, into out (rows K floats apart): rows ids[i].
void dequantize_rows(const AffineWeight& w, int64_t K, int64_t count, const int64_t* ids, float* out, SimdPath path) {
  std::vector<float> scratch(static_cast<size_t>(2 * (K / w.group_size) + 1));
  std::vector<uint8_t> codes(static_cast<size_t>(K));
  for (int64_t i = 0; i < count; ++i)
    if (!dequantize_span_vector(w, K, ids[i], 0, K, out + i * K, path, scratch.data(), codes.data()))
      dequantize_span(w, K, ids[i], 0, K, out + i * K);
}

// ---- prefill: the float32 GEMM on exact spans of W -----------------------------------------------

void gemm(const LinearArgs& p, const AffineWeight& w, SimdPath path) {
  linear_spans(p, [&](int64_t n, int64_t cols, int64_t k0, int64_t kc, float* dst) {
    float scratch[2 * kWeightSpanDepth / 32];  // two floats per group of a span, groups >= 32
    uint8_t codes[kWeightSpanDepth];
    for (int64_t j = 0; j < cols; ++j)
      if (!dequantize_span_vector(w, p.K, n + j, k0, kc, dst + j * kc, path, scratch, codes))
        dequantize_span(w, p.K, n + j, k0, kc, dst + j * kc);
  }, path);
}

// ---- decode: s·Σ x·q + b·Σ x per group ------------------------------------------------------------

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

// The float loop: R rows of W at once (independent accumulators, x loaded once for all), each row's
// Σ_g s_g · Σ_{k in g} x_k·q_k into out[r]. `bytes` points at row 0's 8-bit codes, rows `stride` bytes
// apart; s[r * groups + g] are the rows' scales as float32.
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
        if ((k & 63) == 0) prefetch_l2(ahead + r * stride + k);  // one per 64-byte line
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

// ---- decode in fixed point: integer dot products (4-bit AVX2; 4- and 8-bit AVX-512 VNNI) -----------
//
// Each group of x is written as t_g · m_k with t_g a power of two and m_k an integer of at most
// 15 bits + sign (|m| <= 32639), split into two signed bytes m = 256·hi + lo. The integer products
// (vpmaddubsw + vpmaddwd, or vpdpbusd) of the codes (unsigned bytes) by those bytes sum a group's
// Σ q·m exactly; the one approximation is m's rounding: |x_k − t_g·m_k| <= t_g/2 <= 2^-15 · max|x| over
// the group (a float loop rounds each product to float32 instead). Σ x per group is Σ t_g·m_k too, so
// the result is Σ w·x̃ with w = s·q + b unrounded. Rows of x with an Inf or NaN take the float loop
// (dot8_avx2, or the scalar one for 4-bit codes), which makes their results Inf or NaN.

constexpr int64_t kChunkBytes = 64;  // XPieces are laid out per 64 bytes of a row's codes (a cache line)

struct XPieces {
  std::vector<int8_t> bytes;  // per chunk, in the order its codes are read: 4-bit hi(even k) hi(odd k)
                              // lo(even k) lo(odd k), 64 bytes each; 8-bit hi, lo; zeros past K
  std::vector<float> step;    // t_g per group
};

// m's two signed bytes (m = 256·hi + lo, both in [-128, 127]) for eight m: hi to hi[0..7], lo to lo[0..7].
REFPG_TARGET_AVX2 inline void store_pieces(__m256i m, int8_t* hi, int8_t* lo) {
  const __m256i h = _mm256_srai_epi32(_mm256_add_epi32(m, _mm256_set1_epi32(128)), 8);
  const __m256i l = _mm256_sub_epi32(m, _mm256_slli_epi32(h, 8));
  // packs (in range: exact) per 128-bit lane: bytes h0-3 l0-3 h0-3 l0-3 | h4-7 l4-7 h4-7 l4-7
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(h, l), _mm256_setzero_si256());
  const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(hi), _mm256_castsi256_si128(ordered));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(lo), _mm_srli_si128(_mm256_castsi256_si128(ordered), 8));
}

// x[0..7] / t (exact: t a power of two) rounded to the nearest integer, ties to even: |m| <= 32639.
REFPG_TARGET_AVX2 inline __m256i fixed_point(const float* x, __m256 inv_t) {
  return _mm256_cvtps_epi32(
      _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), inv_t), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// x as XPieces for `bits`-bit codes, and Σ t_g·m_k per group into sums (the b·Σx terms take the
// same x as the codes' sums); false if x holds an Inf or a NaN. AVX2: the integer loops need it.
REFPG_TARGET_AVX2 bool prepare_pieces(const float* x, int64_t K, int gs, int bits, XPieces& out,
                                      std::vector<float>& sums) {
  const int chunk_shift = bits == 4 ? 7 : 6;  // codes per chunk: 128 (4-bit) or 64 (8-bit)
  const int64_t per_chunk = int64_t{1} << chunk_shift, chunks = (K + per_chunk - 1) / per_chunk;
  const int64_t hi_to_lo = (bits == 4 ? 2 : 1) * kChunkBytes, chunk_bytes = 2 * hi_to_lo;
  out.bytes.assign(static_cast<size_t>(chunks * chunk_bytes), 0);
  out.step.assign(static_cast<size_t>(K / gs), 0.0f);
  sums.assign(static_cast<size_t>(K / gs), 0.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(INFINITY);
  // within a 4-bit chunk byte i holds codes 2i (low nibble) and 2i+1: x's even k and odd k apart
  const __m256i even_odd = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int64_t g = 0; g < K / gs; ++g) {  // gs: a multiple of 16
    const float* xg = x + g * gs;
    __m256 top8 = _mm256_setzero_ps(), finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int j = 0; j < gs; j += 8) {
      const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + j));
      finite = _mm256_and_ps(finite, _mm256_cmp_ps(a, inf, _CMP_LT_OQ));  // false for Inf and NaN
      top8 = _mm256_max_ps(top8, a);
    }
    if (_mm256_movemask_ps(finite) != 0xFF) return false;
    int e = 0;
    const float f = std::frexp(hmax(top8), &e);  // top = f · 2^e, f in [0.5, 1)
    const int t_exp = std::max(f * 32768.0f <= 32639.0f ? e - 15 : e - 14, -126);
    const float t = std::ldexp(1.0f, t_exp);  // an exact power of two, as is 1 / t
    out.step[static_cast<size_t>(g)] = t;
    const __m256 inv_t = _mm256_set1_ps(std::ldexp(1.0f, -t_exp));
    __m256i total = _mm256_setzero_si256();
    for (int j = 0; j < gs; j += 16) {
      const __m256i m0 = fixed_point(xg + j, inv_t), m1 = fixed_point(xg + j + 8, inv_t);
      total = _mm256_add_epi32(total, _mm256_add_epi32(m0, m1));
      const int64_t k = g * gs + j, i = k & (per_chunk - 1);
      int8_t* c = out.bytes.data() + (k >> chunk_shift) * chunk_bytes;
      if (bits == 4) {
        const __m256i p0 = _mm256_permutevar8x32_epi32(m0, even_odd), p1 = _mm256_permutevar8x32_epi32(m1, even_odd);
        store_pieces(_mm256_permute2x128_si256(p0, p1, 0x20), c + i / 2, c + hi_to_lo + i / 2);
        store_pieces(_mm256_permute2x128_si256(p0, p1, 0x31), c + kChunkBytes + i / 2,
                     c + hi_to_lo + kChunkBytes + i / 2);
      } else {
        store_pieces(m0, c + i, c + hi_to_lo + i);
        store_pieces(m1, c + i + 8, c + hi_to_lo + i + 8);
      }
    }
    const __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    const __m128i t2 = _mm_add_epi32(t4, _mm_srli_si128(t4, 8));
    const int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_srli_si128(t2, 4)));
    sums[static_cast<size_t>(g)] = t * static_cast<float>(sum);  // exact: |sum| < 2^24
  }
  return true;
}

// Lane j of a chunk's int32 sums covers codes [j·per_lane, (j+1)·per_lane) of the chunk: its group,
// counted from the chunk's first (groups of 2^gs_shift codes; no division: this runs once per tile).
REFPG_TARGET_AVX512VNNI inline __m512i lane_groups(int per_lane, int gs_shift) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_srl_epi32(_mm512_mullo_epi32(lanes, _mm512_set1_epi32(per_lane)), _mm_cvtsi32_si128(gs_shift));
}

// Σ_g c_g · Σ_{k in g} m_k·q_k for R rows at once: `c` holds row r's c_g = s_g·t_g at c + r·groups
// (and 16 readable floats past the last row's). Code 2i of a row sits in byte i's low nibble, 2i+1
// in its high one. The AVX2 loop takes 64 codes (32 bytes, half a chunk) a step: vpmaddubsw sums
// code·piece pairs into 16 bits (|sum| <= 2·15·128), vpmaddwd pairs of those into the lanes' int32.
// A step for R rows is one inlined function (the last, of 32 codes, its own instance), so that the
// rows' loop has no branch and the accumulators stay in registers; Fetch: the step starting a
// 64-byte line of each row prefetches the line `ahead`.
template <int R, bool Half, bool Fetch>
REFPG_TARGET_AVX2 __attribute__((always_inline)) inline void dot4_fixed_avx2_step(
    __m256 (&acc)[R], const uint8_t* bytes, int64_t stride, int64_t at, int gs_shift, int64_t groups,
    const int8_t* xq, const float* c, const uint8_t* ahead, __m256i idx) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int8_t* xp = xq + (at / 128) * 256 + (at % 128) / 2;
  const __m256i he = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
  const __m256i ho = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 64));
  const __m256i le = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 128));
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 192));
  const int64_t first = at >> gs_shift;
  for (int r = 0; r < R; ++r) {
    const uint8_t* p = bytes + r * stride + at / 2;
    if (Fetch) prefetch_l2(ahead + r * stride + at / 2);
    const __m256i v = Half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i even = _mm256_and_si256(v, low), odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    const __m256i h = _mm256_madd_epi16(
        _mm256_add_epi16(_mm256_maddubs_epi16(even, he), _mm256_maddubs_epi16(odd, ho)), ones);
    const __m256i l = _mm256_madd_epi16(
        _mm256_add_epi16(_mm256_maddubs_epi16(even, le), _mm256_maddubs_epi16(odd, lo)), ones);
    const __m256 d = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(h, 8), l));  // exact: |d| < 2^22
    const __m256 scale = _mm256_permutevar8x32_ps(_mm256_loadu_ps(c + r * groups + first), idx);
    acc[r] = _mm256_fmadd_ps(d, scale, acc[r]);
  }
}

template <int R>
REFPG_TARGET_AVX2 void dot4_fixed_avx2(const uint8_t* bytes, int64_t stride, int64_t K, int gs, int64_t groups,
                                       const int8_t* xq, const float* c, const uint8_t* ahead, float* out) {
  const int gs_shift = __builtin_ctz(static_cast<unsigned>(gs));
  const __m256i idx = _mm256_srl_epi32(_mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56), _mm_cvtsi32_si128(gs_shift));
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t at = 0;
  for (; at + 128 <= K; at += 128) {  // a 64-byte line of each row in two steps of 64 codes
    dot4_fixed_avx2_step<R, false, true>(acc, bytes, stride, at, gs_shift, groups, xq, c, ahead, idx);
    dot4_fixed_avx2_step<R, false, false>(acc, bytes, stride, at + 64, gs_shift, groups, xq, c, ahead, idx);
  }
  if (at + 64 <= K) {
    dot4_fixed_avx2_step<R, false, true>(acc, bytes, stride, at, gs_shift, groups, xq, c, ahead, idx);
    at += 64;
  }
  if (at < K) dot4_fixed_avx2_step<R, true, true>(acc, bytes, stride, at, gs_shift, groups, xq, c, ahead, idx);
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

// The same with AVX-512 VNNI, 128 codes (one chunk) a step: vpdpbusd sums four code·piece products
// into each int32 lane. One step for R rows is one inlined function, the partial last chunk (masked
// loads) its own instance: no branch in the rows' loop, so the accumulators stay in registers.
template <int R, bool Partial>
REFPG_TARGET_AVX512VNNI __attribute__((always_inline)) inline void dot4_vnni_step(
    __m512 (&acc)[R], const uint8_t* bytes, int64_t stride, int64_t at, int64_t K, int gs_shift, int64_t groups,
    const int8_t* xq, const float* c, const uint8_t* ahead, __m512i idx) {
  const __m512i low = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  const int8_t* xp = xq + at * 2;
  const __m512i he = _mm512_loadu_si512(xp), ho = _mm512_loadu_si512(xp + 64);
  const __m512i le = _mm512_loadu_si512(xp + 128), lo = _mm512_loadu_si512(xp + 192);
  const __mmask64 valid = Partial ? (1ull << ((K - at) / 2)) - 1 : ~0ull;
  const int64_t first = at >> gs_shift;
  for (int r = 0; r < R; ++r) {
    const uint8_t* p = bytes + r * stride + at / 2;
    if (!Partial) prefetch_l2(ahead + r * stride + at / 2);
    const __m512i v = Partial ? _mm512_maskz_loadu_epi8(valid, p) : _mm512_loadu_si512(p);
    const __m512i even = _mm512_and_si512(v, low), odd = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    const __m512i h = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, even, he), odd, ho);
    // h·256 + Σ code·lo: exact, |d| < 2^22
    const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(h, 8), even, le), odd, lo);
    const __m512 scale = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(c + r * groups + first));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[r]);
  }
}

template <int R>
REFPG_TARGET_AVX512VNNI void dot4_vnni(const uint8_t* bytes, int64_t stride, int64_t K, int gs, int64_t groups,
                                       const int8_t* xq, const float* c, const uint8_t* ahead, float* out) {
  const int gs_shift = __builtin_ctz(static_cast<unsigned>(gs));
  const __m512i idx = lane_groups(8, gs_shift);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t at = 0;
  for (; at + 2 * kChunkBytes <= K; at += 2 * kChunkBytes)  // 128 codes in 64 bytes
    dot4_vnni_step<R, false>(acc, bytes, stride, at, K, gs_shift, groups, xq, c, ahead, idx);
  if (at < K) dot4_vnni_step<R, true>(acc, bytes, stride, at, K, gs_shift, groups, xq, c, ahead, idx);
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

template <int R, bool Partial>
REFPG_TARGET_AVX512VNNI __attribute__((always_inline)) inline void dot8_vnni_step(
    __m512 (&acc)[R], const uint8_t* bytes, int64_t stride, int64_t at, int64_t K, int gs_shift, int64_t groups,
    const int8_t* xq, const float* c, const uint8_t* ahead, __m512i idx) {
  const int8_t* xp = xq + at * 2;
  const __m512i hi = _mm512_loadu_si512(xp), lo = _mm512_loadu_si512(xp + 64);
  const __mmask64 valid = Partial ? (1ull << (K - at)) - 1 : ~0ull;
  const int64_t first = at >> gs_shift;
  for (int r = 0; r < R; ++r) {
    const uint8_t* p = bytes + r * stride + at;
    if (!Partial) prefetch_l2(ahead + r * stride + at);
    const __m512i v = Partial ? _mm512_maskz_loadu_epi8(valid, p) : _mm512_loadu_si512(p);
    const __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, hi);
    const __m512i d = _mm512_dpbusd_epi32(_mm512_slli_epi32(h, 8), v, lo);  // |d| < 2^26: one rounding below
    const __m512 scale = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(c + r * groups + first));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[r]);
  }
}

template <int R>
REFPG_TARGET_AVX512VNNI void dot8_vnni(const uint8_t* bytes, int64_t stride, int64_t K, int gs, int64_t groups,
                                       const int8_t* xq, const float* c, const uint8_t* ahead, float* out) {
  const int gs_shift = __builtin_ctz(static_cast<unsigned>(gs));
  const __m512i idx = lane_groups(4, gs_shift);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t at = 0;
  for (; at + kChunkBytes <= K; at += kChunkBytes)  // 64 codes in 64 bytes
    dot8_vnni_step<R, false>(acc, bytes, stride, at, K, gs_shift, groups, xq, c, ahead, idx);
  if (at < K) dot8_vnni_step<R, true>(acc, bytes, stride, at, K, gs_shift, groups, xq, c, ahead, idx);
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// Float8: the float loop; Fixed*: the integer loops on x in fixed point (XPieces).
enum class Dot { Scalar, Float8, Fixed4Avx2, Fixed4Vnni, Fixed8Vnni };

bool is_fixed(Dot dot) { return dot == Dot::Fixed4Avx2 || dot == Dot::Fixed4Vnni || dot == Dot::Fixed8Vnni; }

// 2/3/5/6-bit codes take the 8-bit loops on their unpacked bytes (unpacks).
Dot choose_dot(const AffineWeight& w, SimdPath path) {
  if (!uses_avx2(path)) return Dot::Scalar;
  const bool vnni = (path == SimdPath::Avx512 || path == SimdPath::Amx) && cpu_features().avx512vnni;
  if (w.bits == 4) return vnni ? Dot::Fixed4Vnni : Dot::Fixed4Avx2;
  // 8-bit codes times a signed byte overflow vpmaddubsw's 16-bit pair sums: without VNNI, floats
  return vnni ? Dot::Fixed8Vnni : Dot::Float8;  // groups of 32 are two 16-code steps of the float loop
}

// A float loop for the same codes (rows of x with an Inf or a NaN, see prepare_pieces).
Dot float_dot(Dot dot) { return !is_fixed(dot) ? dot : dot == Dot::Fixed8Vnni ? Dot::Float8 : Dot::Scalar; }

constexpr int kRows = 4;  // W rows per vector dot call
// How far ahead the GEMV prefetches codes: at least one tile, else this many bytes (a 4-row tile of
// 4-bit codes at K = 2048 is one 4 KB page, which the hardware prefetchers do not cross).
constexpr int64_t kPrefetchBytes = 16 * 1024;

// What one row of x brings to the dot products.
struct XRow {
  Dot dot;                  // the loop it takes
  std::vector<float> x;     // [K] for the float loops
  XPieces pieces;           // for the integer loops
  std::vector<float> sums;  // Σ x per group (of the fixed-point x for the integer loops)
};

XRow prepare_row(const float* x, int64_t K, int gs, int bits, Dot dot) {
  XRow row{dot, {}, {}, {}};
  if (is_fixed(dot) && prepare_pieces(x, K, gs, bits, row.pieces, row.sums)) return row;
  row.dot = float_dot(dot);
  row.x.assign(x, x + K);
  row.sums.assign(static_cast<size_t>(K / gs), 0.0f);
  for (int64_t k = 0; k < K; ++k) row.sums[static_cast<size_t>(k / gs)] += x[k];
  return row;
}

// R rows' Σ_g s_g · Σ x·q (c: the rows' scales, times t_g for the integer loops) into out.
template <int R>
void dot_rows(const XRow& x, const uint8_t* bytes, int64_t stride, int64_t K, int gs, const float* c,
              const uint8_t* ahead, float* out) {
  const int64_t groups = K / gs;
  switch (x.dot) {
    case Dot::Float8: return dot8_avx2<R>(bytes, stride, gs, groups, x.x.data(), c, ahead, out);
    case Dot::Fixed4Avx2: return dot4_fixed_avx2<R>(bytes, stride, K, gs, groups, x.pieces.bytes.data(), c, ahead, out);
    case Dot::Fixed4Vnni: return dot4_vnni<R>(bytes, stride, K, gs, groups, x.pieces.bytes.data(), c, ahead, out);
    case Dot::Fixed8Vnni: return dot8_vnni<R>(bytes, stride, K, gs, groups, x.pieces.bytes.data(), c, ahead, out);
    case Dot::Scalar: break;
  }
}

void gemv(const LinearArgs& p, const AffineWeight& w, SimdPath path) {
  const Dot dot = choose_dot(w, path);
  std::vector<XRow> xs;
  const bool unpacked = unpacks(w, path);  // then the loops read a tile's codes as bytes, rows K apart
  for (int64_t m = 0; m < p.M; ++m)
    xs.push_back(prepare_row(p.x + m * p.ldx, p.K, w.group_size, unpacked ? 8 : w.bits, dot));
  const int64_t groups = p.K / w.group_size, words = words_per_row(w, p.K), stride = words * 4;
  const int64_t tiles_ahead = std::max<int64_t>(1, kPrefetchBytes / (kRows * std::max<int64_t>(stride, 1)));
  parallel_for(p.N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> s(static_cast<size_t>(kRows * groups)), b(static_cast<size_t>(kRows * groups));
    std::vector<float> c(static_cast<size_t>(kRows * groups + 16), 0.0f);  // + 16: see dot4_fixed_avx2
    std::vector<uint8_t> codes(unpacked ? static_cast<size_t>(kRows * p.K) : 0);
    for (int64_t n = n0; n < n1; n += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, n1 - n));
      values_at(w.scales, w.scale_format, n * groups, rows * groups, s.data(), path);
      values_at(w.biases, w.scale_format, n * groups, rows * groups, b.data(), path);
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(w.codes + n * words);
      // the rows `tiles_ahead` tiles on, fetched while this one is computed (itself near the end)
      const uint8_t* ahead = n + (tiles_ahead + 1) * kRows <= n1 ? bytes + tiles_ahead * kRows * stride : bytes;
      int64_t row_bytes = stride;
      if (unpacked) {  // (the packed rows ahead are prefetched by the unpacking)
        unpack_rows(w.bits, bytes, stride, rows, p.K, ahead, codes.data(), path);
        bytes = ahead = codes.data();
        row_bytes = p.K;
      }
      for (int64_t m = 0; m < p.M; ++m) {
        const XRow& x = xs[m];
        const float* scales = s.data();
        if (is_fixed(x.dot)) {  // c_g = s_g · t_g (the integer loops have AVX2)
          scale_rows_avx2(s.data(), x.pieces.step.data(), rows, groups, c.data());
          scales = c.data();
        }
        float d[kRows] = {};
        if (x.dot == Dot::Scalar) {
          for (int r = 0; r < rows; ++r)
            d[r] = dot_scalar(w.codes + (n + r) * words, w.bits, w.group_size, groups, x.x.data(), scales + r * groups);
        } else if (rows == kRows) {
          dot_rows<kRows>(x, bytes, row_bytes, p.K, w.group_size, scales, m + 1 == p.M ? ahead : bytes, d);
        } else {
          for (int r = 0; r < rows; ++r)
            dot_rows<1>(x, bytes + r * row_bytes, row_bytes, p.K, w.group_size, scales + r * groups, bytes, d + r);
        }
        for (int r = 0; r < rows; ++r) {
          const float biases = sum_of_products(b.data() + r * groups, x.sums.data(), groups, path);  // Σ_g b_g · Σ x over g
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
    dequantize_rows(w, D, i1 - i0, ids + i0, out + i0 * D, path);
  });
}

}  // namespace refpg

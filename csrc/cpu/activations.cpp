// gelu_tanh, geglu, softcap and the softmax row: see activations.h. Each AVX2 loop runs over whole
// vectors of 8 and hands the last n % 8 elements to the portable loop.
#include "cpu/activations.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/simd.h"
#include "cpu/threadpool.h"

namespace refpg {

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;
constexpr int64_t kGrain = 1 << 14;  // elements per parallel chunk: less work stays on one thread
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---- portable path -------------------------------------------------------------------------------

inline float gelu_one(float x) {
  return 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + kGeluCubic * x * x * x)));
}

void gelu_scalar(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_one(x[i]);
}

void geglu_scalar(const float* gate, const float* up, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_one(gate[i]) * up[i];
}

void softcap_scalar(const float* x, float* y, int64_t n, float cap) {
  for (int64_t i = 0; i < n; ++i) y[i] = cap * std::tanh(x[i] / cap);
}

// NumPy's outcome for rows it cannot normalize: max is NaN, or x − max is NaN somewhere.
bool softmax_undefined(bool any_nan, float max) { return any_nan || !std::isfinite(max); }

void softmax_scalar(const float* x, float* y, int64_t n) {
  float max = -std::numeric_limits<float>::infinity();
  bool any_nan = false;
  for (int64_t i = 0; i < n; ++i) {
    any_nan = any_nan || std::isnan(x[i]);
    max = std::max(max, x[i]);
  }
  if (softmax_undefined(any_nan, max)) {
    std::fill(y, y + n, kNaN);
    return;
  }
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    y[i] = std::exp(x[i] - max);  // subtract the max: exp never overflows
    sum += y[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) y[i] *= inv;
}

// ---- AVX2 + FMA path -----------------------------------------------------------------------------

REFPG_TARGET_AVX2 inline __m256 set1(float v) { return _mm256_set1_ps(v); }

// e^x for x <= 88 (Cephes expf): x = k·ln2 + r with |r| <= ln2/2 (ln2 split in two for an exact
// reduction), e^r from a degree-6 polynomial, 2^k written into the exponent bits. Below -87 the
// result flushes to 0 (true value < 1.7e-38). Not for NaN.
REFPG_TARGET_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, set1(-87.0f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, set1(-87.0f)), set1(88.0f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, set1(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, set1(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, set1(-2.12194440e-4f), r);
  __m256 p = set1(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, set1(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, set1(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, set1(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, set1(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, set1(5.0000001201e-1f));
  const __m256 er = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, set1(1.0f)));
  const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(er, _mm256_castsi256_ps(two_k)));
}

// tanh (Cephes tanhf): an odd polynomial below |x| = 0.625, else (1 − e) / (1 + e) with
// e = exp(−2|x|) <= 0.29, so there is no cancellation; the sign is copied back. NaN stays NaN.
REFPG_TARGET_AVX2 inline __m256 tanh8(__m256 x) {
  const __m256 sign = set1(-0.0f), one = set1(1.0f);
  const __m256 ax = _mm256_andnot_ps(sign, x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = set1(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, set1(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, set1(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, set1(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, set1(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
  const __m256 e = exp8(_mm256_mul_ps(ax, set1(-2.0f)));
  const __m256 large = _mm256_or_ps(_mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e)),
                                    _mm256_and_ps(x, sign));
  const __m256 y = _mm256_blendv_ps(large, small, _mm256_cmp_ps(ax, set1(0.625f), _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

REFPG_TARGET_AVX2 inline __m256 gelu8(__m256 x) {
  const __m256 cubic = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(set1(kGeluCubic), x), x), x);
  const __m256 t = tanh8(_mm256_mul_ps(set1(kSqrt2OverPi), _mm256_add_ps(x, cubic)));
  return _mm256_mul_ps(_mm256_mul_ps(set1(0.5f), x), _mm256_add_ps(set1(1.0f), t));
}

REFPG_TARGET_AVX2 void gelu_avx2(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu8(_mm256_loadu_ps(x + i)));
  gelu_scalar(x + i, y + i, n - i);
}

REFPG_TARGET_AVX2 void geglu_avx2(const float* gate, const float* up, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(gelu8(_mm256_loadu_ps(gate + i)), _mm256_loadu_ps(up + i)));
  geglu_scalar(gate + i, up + i, y + i, n - i);
}

REFPG_TARGET_AVX2 void softcap_avx2(const float* x, float* y, int64_t n, float cap) {
  const __m256 c = set1(cap);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(c, tanh8(_mm256_div_ps(_mm256_loadu_ps(x + i), c))));
  softcap_scalar(x + i, y + i, n - i, cap);
}

REFPG_TARGET_AVX2 void softmax_avx2(const float* x, float* y, int64_t n) {
  __m256 vmax = set1(-std::numeric_limits<float>::infinity()), vnan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vmax = _mm256_max_ps(vmax, v);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float max = hmax(vmax);
  bool any_nan = _mm256_movemask_ps(vnan) != 0;
  for (; i < n; ++i) {
    any_nan = any_nan || std::isnan(x[i]);
    max = std::max(max, x[i]);
  }
  if (softmax_undefined(any_nan, max)) {
    std::fill(y, y + n, kNaN);
    return;
  }
  const __m256 vm = set1(max);
  __m256d sum_lo = _mm256_setzero_pd(), sum_hi = _mm256_setzero_pd();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));  // subtract the max: no overflow
    _mm256_storeu_ps(y + i, e);
    sum_lo = _mm256_add_pd(sum_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    sum_hi = _mm256_add_pd(sum_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  double sum = hsum(_mm256_add_pd(sum_lo, sum_hi));
  for (int64_t j = i; j < n; ++j) {
    y[j] = std::exp(x[j] - max);
    sum += y[j];
  }
  const float inv = static_cast<float>(1.0 / sum);
  const __m256 vinv = set1(inv);
  for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(y + i), vinv));
  for (; i < n; ++i) y[i] *= inv;
}

}  // namespace

void softcap_row(const float* x, float* y, int64_t n, float cap, SimdPath path) {
  uses_avx2(path) ? softcap_avx2(x, y, n, cap) : softcap_scalar(x, y, n, cap);
}

void softmax_row(const float* x, float* y, int64_t n, SimdPath path) {
  uses_avx2(path) ? softmax_avx2(x, y, n) : softmax_scalar(x, y, n);
}

void gelu_tanh(const float* x, float* y, int64_t n, SimdPath path) {
  parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
    uses_avx2(path) ? gelu_avx2(x + b, y + b, e - b) : gelu_scalar(x + b, y + b, e - b);
  });
}

void geglu(const float* gate, const float* up, float* y, int64_t n, SimdPath path) {
  parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
    uses_avx2(path) ? geglu_avx2(gate + b, up + b, y + b, e - b) : geglu_scalar(gate + b, up + b, y + b, e - b);
  });
}

void softcap(const float* x, float* y, int64_t n, float cap, SimdPath path) {
  parallel_for(n, kGrain, [&](int64_t b, int64_t e) { softcap_row(x + b, y + b, e - b, cap, path); });
}

}  // namespace refpg

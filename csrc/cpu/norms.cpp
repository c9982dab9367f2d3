// rms_norm and layer_norm: see norms.h. Per row: the statistics pass (double sums), then one
// float32 pass writing the output. AVX2 loops run over whole vectors of 8; the last D % 8
// elements go through the portable loops.
#include "cpu/norms.h"

#include <algorithm>
#include <cmath>

#include "cpu/simd.h"
#include "cpu/threadpool.h"

namespace refpg {

namespace {

constexpr int64_t kGrain = 1 << 13;  // elements per parallel chunk

// 1 / sqrt(sum_squares / D + eps), in double.
float inv_rms(double sum_squares, int64_t D, float eps) {
  return static_cast<float>(1.0 / std::sqrt(sum_squares / static_cast<double>(D) + eps));
}

// ---- portable path: sums over x[i0, n), outputs for [i0, n) ---------------------------------------

double sum_squares_scalar(const float* x, int64_t i0, int64_t n, float center) {
  double s = 0.0;
  for (int64_t i = i0; i < n; ++i) {
    const double c = x[i] - center;  // the difference in float32, as NumPy's `centered`
    s += c * c;
  }
  return s;
}

double sum_scalar(const float* x, int64_t i0, int64_t n) {
  double s = 0.0;
  for (int64_t i = i0; i < n; ++i) s += x[i];
  return s;
}

void rms_out_scalar(const float* x, const float* w, float* y, int64_t i0, int64_t n, float inv) {
  for (int64_t i = i0; i < n; ++i) y[i] = x[i] * inv * (1.0f + w[i]);
}

void layer_out_scalar(const float* x, const float* w, const float* b, float* y, int64_t i0, int64_t n,
                      float mean, float inv) {
  for (int64_t i = i0; i < n; ++i) y[i] = (x[i] - mean) * inv * w[i] + b[i];
}

void rms_row_scalar(const float* x, const float* w, float* y, int64_t D, float eps) {
  rms_out_scalar(x, w, y, 0, D, inv_rms(sum_squares_scalar(x, 0, D, 0.0f), D, eps));
}

void layer_row_scalar(const float* x, const float* w, const float* b, float* y, int64_t D, float eps) {
  const float mean = static_cast<float>(sum_scalar(x, 0, D) / static_cast<double>(D));
  layer_out_scalar(x, w, b, y, 0, D, mean, inv_rms(sum_squares_scalar(x, 0, D, mean), D, eps));
}

// ---- AVX2 + FMA path -----------------------------------------------------------------------------

// Σ (x − center)² over whole vectors of 8; returns where the vectors stopped in *end.
REFPG_TARGET_AVX2 double sum_squares_avx2(const float* x, int64_t D, float center, int64_t* end) {
  const __m256 c = _mm256_set1_ps(center);
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + i), c);
    const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), b = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    lo = _mm256_fmadd_pd(a, a, lo);
    hi = _mm256_fmadd_pd(b, b, hi);
  }
  *end = i;
  return hsum(_mm256_add_pd(lo, hi));
}

REFPG_TARGET_AVX2 double sum_avx2(const float* x, int64_t D, int64_t* end) {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  *end = i;
  return hsum(_mm256_add_pd(lo, hi));
}

REFPG_TARGET_AVX2 void rms_row_avx2(const float* x, const float* w, float* y, int64_t D, float eps) {
  int64_t i;
  double ss = sum_squares_avx2(x, D, 0.0f, &i);
  ss += sum_squares_scalar(x, i, D, 0.0f);
  const float inv = inv_rms(ss, D, eps);
  const __m256 vinv = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.0f);
  for (i = 0; i + 8 <= D; i += 8) {
    const __m256 scale = _mm256_add_ps(one, _mm256_loadu_ps(w + i));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv), scale));
  }
  rms_out_scalar(x, w, y, i, D, inv);
}

REFPG_TARGET_AVX2 void layer_row_avx2(const float* x, const float* w, const float* b, float* y, int64_t D, float eps) {
  int64_t i;
  double sum = sum_avx2(x, D, &i);
  sum += sum_scalar(x, i, D);
  const float mean = static_cast<float>(sum / static_cast<double>(D));
  double ss = sum_squares_avx2(x, D, mean, &i);
  ss += sum_squares_scalar(x, i, D, mean);
  const float inv = inv_rms(ss, D, eps);
  const __m256 vmean = _mm256_set1_ps(mean), vinv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= D; i += 8) {
    const __m256 normed = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmean), vinv);
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(normed, _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i)));
  }
  layer_out_scalar(x, w, b, y, i, D, mean, inv);
}

int64_t row_grain(int64_t D) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(D, 1)); }

}  // namespace

void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t D, float eps, SimdPath path) {
  const bool avx2 = uses_avx2(path);
  parallel_for(rows, row_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      avx2 ? rms_row_avx2(x + r * D, weight, y + r * D, D, eps) : rms_row_scalar(x + r * D, weight, y + r * D, D, eps);
  });
}

void layer_norm(const float* x, const float* weight, const float* bias, float* y, int64_t rows, int64_t D,
                float eps, SimdPath path) {
  const bool avx2 = uses_avx2(path);
  parallel_for(rows, row_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      avx2 ? layer_row_avx2(x + r * D, weight, bias, y + r * D, D, eps)
           : layer_row_scalar(x + r * D, weight, bias, y + r * D, D, eps);
  });
}

}  // namespace refpg

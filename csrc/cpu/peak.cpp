// peak: see peak.h.
#include "cpu/peak.h"

#include <atomic>
#include <chrono>
#include <cmath>

#include "cpu/threadpool.h"

namespace refpg {

namespace {

constexpr int kChains = 12;       // independent accumulators: enough to cover the FMA latency
constexpr int64_t kRounds = 1 << 16;

// kRounds rounds of kChains FMAs of `lanes` floats each; returns a value depending on them all
// (so nothing is optimized away).
REFPG_TARGET_AVX512 float run_avx512() {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t r = 0; r < kRounds; ++r)
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  __m512 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

REFPG_TARGET_AVX2 float run_avx2() {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(1.0f + i * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t r = 0; r < kRounds; ++r)
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  __m256 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm256_add_ps(s, acc[i]);
  return hsum(s);
}

float run_scalar() {
  float acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = 1.0f + i * 1e-3f;
  for (int64_t r = 0; r < kRounds; ++r)
    for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * 0.999999f + 1e-7f;
  float s = 0.0f;
  for (int i = 0; i < kChains; ++i) s += acc[i];
  return s;
}

}  // namespace

double fma_peak(double seconds, SimdPath path) {
  const int lanes = path == SimdPath::Avx512 || path == SimdPath::Amx ? 16 : path == SimdPath::Avx2 ? 8 : 1;
  const int threads = num_threads();
  std::atomic<int64_t> batches{0};
  std::atomic<float> sink{0.0f};
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0.0;
  while (elapsed < seconds) {
    parallel_for(threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const float v = lanes == 16 ? run_avx512() : lanes == 8 ? run_avx2() : run_scalar();
        sink.store(v, std::memory_order_relaxed);
        batches.fetch_add(1, std::memory_order_relaxed);
      }
    });
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  const double fmas = static_cast<double>(batches.load()) * kRounds * kChains * lanes;
  return std::isfinite(sink.load()) ? 2.0 * fmas / elapsed : 0.0;
}

}  // namespace refpg

// The one SIMD layer of the CPU kernels: which instruction set runs (SimdPath, chosen once per
// process), the target attributes that let one function use it, and the small vector helpers every
// kernel shares (horizontal reductions, bf16 loads). No kernel repeats any of it.
//
// The module is compiled without -march, so it runs on any x86-64 CPU: a function that uses wider
// instructions carries a target attribute below, and is only called on the path that has them.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <string>

#define REFPG_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define REFPG_TARGET_AVX512 __attribute__((target("avx512f")))
#define REFPG_TARGET_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define REFPG_TARGET_AVX512VBMI __attribute__((target("avx512f,avx512bw,avx512vbmi")))
#define REFPG_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define REFPG_TARGET_AMX __attribute__((target("amx-tile,amx-bf16")))

namespace refpg {

// ---- the path ------------------------------------------------------------------------------------

// The instruction set the kernels run with. Every vector path includes AVX2 + FMA (packing and the
// ops other than linear run their AVX2 code on it); Avx512 adds AVX-512F to linear's GEMV and GEMM;
// Amx runs linear's GEMM on AMX tiles and its GEMV on AVX-512.
enum class SimdPath { Scalar, Avx2, Avx512, Amx };

// The process-wide current path. The first call chooses it, once: REFPG_SIMD=amx|avx512|avx2|scalar
// forces one, unset, empty or "auto" takes the best this CPU has (cpu_features). A REFPG_SIMD naming
// no path, or one this CPU lacks, throws std::invalid_argument with a message starting "REFPG_SIMD",
// on this call and every later one until set_simd_path chooses a path. The bindings read it once per
// call and pass it to the kernel, so a change never reaches a kernel already running.
SimdPath simd_path();
// Makes `name` (amx, avx512, avx2, scalar or auto) the current path; throws std::invalid_argument,
// the message starting with `what` ("name" here, "REFPG_SIMD" for the variable), for an unknown
// name or a path this CPU lacks, and then changes nothing.
void set_simd_path(const std::string& name, const std::string& what);
const char* simd_path_name(SimdPath path);

// Whether the path runs the AVX2 + FMA kernels (every vector path does).
inline bool uses_avx2(SimdPath path) { return path != SimdPath::Scalar; }

// ---- bf16 loads: bf16 is the high half of a float32, so widening is exact (bits << 16) ---------

inline float bf16_to_f32(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }

// 8 floats, from float32 or from bf16 bits.
REFPG_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
REFPG_TARGET_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// 16 bf16 (16-bit lanes) widened to 16 floats; 16 floats from float32 or bf16 bits.
REFPG_TARGET_AVX512 inline __m512 widen_bf16(__m256i bits) {
  const __m512i wide = _mm512_cvtepu16_epi32(bits);
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
REFPG_TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
REFPG_TARGET_AVX512 inline __m512 load16(const uint16_t* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Into L1 ahead of use (SSE: every x86-64 CPU has it).
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// Into L2 only: for data fetched far ahead (an L1 prefetch holds one of the core's few L1 miss
// buffers until its line arrives; measured on Zen 4, the 4-bit GEMV's 16 KB-ahead prefetches into
// L2 read 2× the bytes per second of the same prefetches into L1).
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

// ---- horizontal reductions (AVX-512: _mm512_reduce_add_ps) ---------------------------------------

REFPG_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

REFPG_TARGET_AVX2 inline double hsum(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

REFPG_TARGET_AVX2 inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

}  // namespace refpg

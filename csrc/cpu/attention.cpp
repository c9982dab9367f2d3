// attention: see attention.h.
#include "cpu/attention.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/activations.h"
#include "cpu/matmul.h"
#include "cpu/simd.h"
#include "cpu/threadpool.h"

namespace refpg {

namespace {

constexpr int kMaxTile = 4;                   // query rows per tile
constexpr int64_t kMinParallelFma = 1 << 16;  // less work per tile than this: several tiles per chunk
constexpr int64_t kChunk = 16;                // value rows summed per pass over hd
constexpr int64_t kMinGemmRows = 32;  // query rows (and keys) from which prefill runs as two GEMMs
constexpr int64_t kGemmRows = 512;    // query rows per pair of GEMMs (bounds the scores buffer)
constexpr float kMasked = std::numeric_limits<float>::lowest();  // exp(kMasked − max) is 0, not NaN

// Up to kMaxTile query rows sharing the kv head whose first key and value rows are k and v.
struct Tile {
  int rows = 0;
  const float* q[kMaxTile];
  const uint8_t* mask[kMaxTile];
  float* out[kMaxTile];
  const float* k;
  const float* v;
};

// ---- portable path -------------------------------------------------------------------------------

void scores_scalar(const Tile& tile, int64_t k_s, int64_t S, int64_t hd, float scale, float* scores) {
  for (int i = 0; i < tile.rows; ++i)
    for (int64_t s = 0; s < S; ++s) {
      const float* key = tile.k + s * k_s;
      float dot = 0.0f;
      for (int64_t d = 0; d < hd; ++d) dot += tile.q[i][d] * key[d];
      scores[i * S + s] = dot * scale;
    }
}

void weighted_sum_scalar(const Tile& tile, const float* p, int64_t v_s, int64_t S, int64_t hd) {
  for (int i = 0; i < tile.rows; ++i) {
    float* out = tile.out[i];
    std::fill(out, out + hd, 0.0f);
    for (int64_t s = 0; s < S; ++s) {
      const float w = p[i * S + s];
      const float* value = tile.v + s * v_s;
      for (int64_t d = 0; d < hd; ++d) out[d] += w * value[d];
    }
  }
}

// ---- AVX2 + FMA path -----------------------------------------------------------------------------

// Keys per step of the score loop, and 8-float value slices per step of the weighted sum, for M
// query rows: M·n accumulators plus n key (value) vectors plus one more fit the 16 ymm registers.
constexpr int vectors_per_step(int M) { return M == 1 ? 8 : M == 2 ? 4 : 3; }

// dots[i * N + j] = q[i] · key[j] for M query rows and N key rows (k_s floats apart), hd long,
// prefetching the next N key rows.
template <int M, int N>
REFPG_TARGET_AVX2 inline void dot_block(const float* const* q, const float* key, int64_t k_s, int64_t hd, float* dots) {
  __m256 acc[M][N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= hd; d += 8) {
    __m256 kv[N];
    for (int j = 0; j < N; ++j) {
      kv[j] = _mm256_loadu_ps(key + j * k_s + d);
      prefetch(key + (j + N) * k_s + d);
    }
    for (int i = 0; i < M; ++i) {
      const __m256 qv = _mm256_loadu_ps(q[i] + d);
      for (int j = 0; j < N; ++j) acc[i][j] = _mm256_fmadd_ps(qv, kv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float dot = hsum(acc[i][j]);
      for (int64_t e = d; e < hd; ++e) dot += q[i][e] * key[j * k_s + e];
      dots[i * N + j] = dot;
    }
}

// scores[i][s] = (q[i] · k[s]) · scale, vectors_per_step(M) keys at a time.
template <int M>
REFPG_TARGET_AVX2 void scores_avx2(const Tile& tile, int64_t k_s, int64_t S, int64_t hd, float scale, float* scores) {
  constexpr int N = vectors_per_step(M);
  float dots[M * N];
  int64_t s = 0;
  for (; s + N <= S; s += N) {
    dot_block<M, N>(tile.q, tile.k + s * k_s, k_s, hd, dots);
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) scores[i * S + s + j] = dots[i * N + j] * scale;
  }
  for (; s < S; ++s) {
    dot_block<M, 1>(tile.q, tile.k + s * k_s, k_s, hd, dots);
    for (int i = 0; i < M; ++i) scores[i * S + s] = dots[i] * scale;
  }
}

// out[i][d0 : d0 + 8W] += Σ_{s0 <= s < s1} p[i][s] · v[s][d0 : d0 + 8W] for the M rows of the
// tile (from zero when s0 == 0), prefetching the same slice of the next chunk's value rows.
template <int M, int W>
REFPG_TARGET_AVX2 inline void weighted_slice(const Tile& tile, const float* p, int64_t v_s, int64_t S, int64_t s0,
                                             int64_t s1, int64_t d0) {
  __m256 acc[M][W];
  for (int i = 0; i < M; ++i)
    for (int w = 0; w < W; ++w) acc[i][w] = s0 ? _mm256_loadu_ps(tile.out[i] + d0 + 8 * w) : _mm256_setzero_ps();
  int64_t s = s0;
  do {  // s0 < s1; as a for loop, GCC 12 stores the accumulators to the stack on every iteration
    const float* value = tile.v + s * v_s + d0;
    prefetch(value + kChunk * v_s);
    __m256 vv[W];
    for (int w = 0; w < W; ++w) vv[w] = _mm256_loadu_ps(value + 8 * w);
    for (int i = 0; i < M; ++i) {
      const __m256 pi = _mm256_broadcast_ss(p + i * S + s);
      for (int w = 0; w < W; ++w) acc[i][w] = _mm256_fmadd_ps(pi, vv[w], acc[i][w]);
    }
  } while (++s < s1);
  for (int i = 0; i < M; ++i)
    for (int w = 0; w < W; ++w) _mm256_storeu_ps(tile.out[i] + d0 + 8 * w, acc[i][w]);
}

// out = p · v, kChunk value rows at a time (a chunk stays in L1 while its hd slices are summed),
// in slices of vectors_per_step(M) vectors.
template <int M>
REFPG_TARGET_AVX2 void weighted_sum_avx2(const Tile& tile, const float* p, int64_t v_s, int64_t S, int64_t hd) {
  constexpr int W = vectors_per_step(M);
  for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
    const int64_t s1 = std::min(S, s0 + kChunk);
    int64_t d = 0;
    for (; d + 8 * W <= hd; d += 8 * W) weighted_slice<M, W>(tile, p, v_s, S, s0, s1, d);
    for (; d + 8 <= hd; d += 8) weighted_slice<M, 1>(tile, p, v_s, S, s0, s1, d);
  }
  for (int64_t d = hd / 8 * 8; d < hd; ++d)  // hd % 8 leftover columns
    for (int i = 0; i < M; ++i) {
      float sum = 0.0f;
      for (int64_t s = 0; s < S; ++s) sum += p[i * S + s] * tile.v[s * v_s + d];
      tile.out[i][d] = sum;
    }
}

// One row of scores [S] -> probabilities, in place: soft-cap, mask (null: every key), softmax.
void probabilities_row(float* row, const uint8_t* mask, const AttentionArgs& a, SimdPath path) {
  if (a.softcap != 0.0f) softcap_row(row, row, a.S, a.softcap, path);
  if (mask)
    for (int64_t s = 0; s < a.S; ++s)
      if (!mask[s]) row[s] = kMasked;
  softmax_row(row, row, a.S, path);
}

// Scores [rows, S] -> probabilities, in place, row by row.
void probabilities(const Tile& tile, const AttentionArgs& a, float* scores, SimdPath path) {
  for (int i = 0; i < tile.rows; ++i) probabilities_row(scores + i * a.S, tile.mask[i], a, path);
}

template <int M>
REFPG_TARGET_AVX2 void tile_avx2(const Tile& tile, const AttentionArgs& a, float* scores, SimdPath path) {
  scores_avx2<M>(tile, a.k_s, a.S, a.hd, a.scale, scores);
  probabilities(tile, a, scores, path);
  weighted_sum_avx2<M>(tile, scores, a.v_s, a.S, a.hd);
}

// One tile, start to end; `scores` is scratch for kMaxTile x S floats.
void run_tile(const Tile& tile, const AttentionArgs& a, float* scores, SimdPath path) {
  if (!uses_avx2(path)) {
    scores_scalar(tile, a.k_s, a.S, a.hd, a.scale, scores);
    probabilities(tile, a, scores, path);
    weighted_sum_scalar(tile, scores, a.v_s, a.S, a.hd);
    return;
  }
  switch (tile.rows) {
    case 1: return tile_avx2<1>(tile, a, scores, path);
    case 2: return tile_avx2<2>(tile, a, scores, path);
    case 3: return tile_avx2<3>(tile, a, scores, path);
    default: return tile_avx2<4>(tile, a, scores, path);
  }
}

// Query rows of one (b, kv head) in order r = t * group + g (head kv * group + g); tile `index`
// holds rows [index * tile_rows, ...).
Tile make_tile(const AttentionArgs& a, int64_t b, int64_t kv, int64_t index, int64_t tile_rows) {
  const int64_t group = a.H / a.KV, rows = a.T * group;
  const int64_t r0 = index * tile_rows, r1 = std::min(rows, r0 + tile_rows);
  Tile tile;
  tile.rows = static_cast<int>(r1 - r0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = r / group, h = kv * group + r % group;
    tile.q[r - r0] = a.q + b * a.q_b + t * a.q_t + h * a.hd;
    tile.mask[r - r0] = a.mask ? a.mask + b * a.m_b + t * a.m_t : nullptr;
    tile.out[r - r0] = a.out + ((b * a.T + t) * a.H + h) * a.hd;
  }
  tile.k = a.k + b * a.k_b + kv * a.hd;
  tile.v = a.v + b * a.v_b + kv * a.hd;
  return tile;
}

// Rows per tile: kMaxTile, or fewer when full tiles would leave threads idle.
int64_t tile_rows_for(const AttentionArgs& a) {
  const int64_t rows = a.T * (a.H / a.KV), outer = a.B * a.KV;
  const int64_t want_tiles_per_outer = (num_threads() + outer - 1) / outer;
  return std::clamp<int64_t>(rows / want_tiles_per_outer, 1, kMaxTile);
}

// Prefill: per batch row and kv head, the query rows of its heads in chunks of kGemmRows, as two
// matrix products on the linear kernels — scores = q . k^T, then out = p . v — with the soft-cap,
// mask and softmax in between. k and v are first copied (v transposed) into contiguous matrices,
// since linear reads its weight rows packed; q rows are gathered and out rows scattered likewise.
void attention_by_gemm(const AttentionArgs& a, SimdPath path) {
  const int64_t group = a.H / a.KV, rows = a.T * group, chunk = std::min(rows, kGemmRows);
  // With a (batch row, kv head) for every thread, one per thread, its products then on that thread;
  // with fewer (MQA, one image), one after the other, each product spread over the threads.
  const int64_t units = a.B * a.KV;
  auto run_units = [&](int64_t u0, int64_t u1) {
    std::vector<float> k(a.S * a.hd), vt(a.hd * a.S), q(chunk * a.hd), p(chunk * a.S), o(chunk * a.hd);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / a.KV, kv = u % a.KV;
      parallel_for(a.S, 64, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s) {
          const float* key = a.k + b * a.k_b + s * a.k_s + kv * a.hd;
          const float* value = a.v + b * a.v_b + s * a.v_s + kv * a.hd;
          std::copy(key, key + a.hd, k.data() + s * a.hd);
          for (int64_t d = 0; d < a.hd; ++d) vt[d * a.S + s] = value[d];
        }
      });
      for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t n = std::min(chunk, rows - r0);
        auto token = [&](int64_t r) { return (r0 + r) / group; };
        auto head = [&](int64_t r) { return kv * group + (r0 + r) % group; };
        for (int64_t r = 0; r < n; ++r) {
          const float* src = a.q + b * a.q_b + token(r) * a.q_t + head(r) * a.hd;
          std::copy(src, src + a.hd, q.data() + r * a.hd);
        }
        linear({q.data(), a.hd, k.data(), WeightFormat::F32, nullptr, p.data(), a.S, n, a.S, a.hd}, path);
        parallel_for(n, 8, [&](int64_t i0, int64_t i1) {
          for (int64_t r = i0; r < i1; ++r) {
            float* row = p.data() + r * a.S;
            for (int64_t s = 0; s < a.S; ++s) row[s] *= a.scale;
            probabilities_row(row, a.mask ? a.mask + b * a.m_b + token(r) * a.m_t : nullptr, a, path);
          }
        });
        linear({p.data(), a.S, vt.data(), WeightFormat::F32, nullptr, o.data(), a.hd, n, a.hd, a.S}, path);
        for (int64_t r = 0; r < n; ++r)
          std::copy(o.data() + r * a.hd, o.data() + (r + 1) * a.hd, a.out + ((b * a.T + token(r)) * a.H + head(r)) * a.hd);
      }
    }
  };
  if (units >= num_threads())
    parallel_for(units, 1, run_units);
  else
    run_units(0, units);
}

}  // namespace

void attention(const AttentionArgs& a, SimdPath path) {
  if (a.B == 0 || a.T == 0 || a.H == 0) return;
  if (a.T * (a.H / a.KV) >= kMinGemmRows && a.S >= kMinGemmRows) return attention_by_gemm(a, path);
  const int64_t tile_rows = tile_rows_for(a);
  const int64_t tiles = (a.T * (a.H / a.KV) + tile_rows - 1) / tile_rows;
  const int64_t fma_per_tile = 2 * tile_rows * a.S * std::max<int64_t>(a.hd, 1);
  const int64_t grain = std::max<int64_t>(1, kMinParallelFma / fma_per_tile);
  parallel_for(a.B * a.KV * tiles, grain, [&](int64_t u0, int64_t u1) {
    std::vector<float> scores(kMaxTile * a.S);  // per-thread scratch
    for (int64_t u = u0; u < u1; ++u) {
      run_tile(make_tile(a, u / (a.KV * tiles), u / tiles % a.KV, u % tiles, tile_rows), a, scores.data(), path);
    }
  });
}

}  // namespace refpg

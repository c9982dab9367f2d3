// rope: see rope.h.
#include "cpu/rope.h"

#include <algorithm>

#include "cpu/threadpool.h"

namespace refpg {

namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per parallel chunk

// One head: the pair (a, b) = (x[j], x[j + half]) becomes (a·cos[j] − b·sin[j], b·cos[j + half] + a·sin[j + half]).
void rotate_head(const float* x, const float* cos, const float* sin, float* y, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const float a = x[j], b = x[j + half];
    y[j] = a * cos[j] - b * sin[j];
    y[j + half] = b * cos[j + half] + a * sin[j + half];
  }
}

}  // namespace

void rope(const float* x, const float* cos, const float* sin, float* y, int64_t tokens, int64_t heads, int64_t hd,
          SimdPath) {
  const int64_t row = heads * hd;
  parallel_for(tokens, std::max<int64_t>(1, kGrain / std::max<int64_t>(row, 1)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t h = 0; h < heads; ++h)
        rotate_head(x + t * row + h * hd, cos + t * hd, sin + t * hd, y + t * row + h * hd, hd / 2);
  });
}

}  // namespace refpg

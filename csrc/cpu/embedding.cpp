// embedding: see embedding.h.
#include "cpu/embedding.h"

#include <algorithm>
#include <cstring>

#include "cpu/threadpool.h"

namespace refpg {

namespace {

constexpr int64_t kGrain = 1 << 14;  // floats per parallel chunk

void bf16_row_to_f32(const uint16_t* bits, float* out, int64_t D) {
  for (int64_t j = 0; j < D; ++j) out[j] = bf16_to_f32(bits[j]);
}

}  // namespace

void embedding(const void* table, WeightFormat format, int64_t D, const int64_t* ids, int64_t n, float* out,
               SimdPath) {
  parallel_for(n, std::max<int64_t>(1, kGrain / std::max<int64_t>(D, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      switch (format) {
        case WeightFormat::F32:
          std::memcpy(out + i * D, static_cast<const float*>(table) + ids[i] * D, D * sizeof(float));
          break;
        case WeightFormat::BF16:
          bf16_row_to_f32(static_cast<const uint16_t*>(table) + ids[i] * D, out + i * D, D);
          break;
        default:  // Affine tables take embedding_affine (affine.h); F16 is only ever their scales
          break;
      }
    }
  });
}

}  // namespace refpg

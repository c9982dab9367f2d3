// Embedding lookup on the GPU: out[i] = table[ids[i]] as float32 (bf16 rows widened exactly).
// ids are device int64, already checked to lie in [0, V) by csrc/bind_cuda.cpp.
#pragma once
#include <cstdint>

#include "weight_format.h"

namespace refpg::cuda {

void embedding(const void* table, WeightFormat format, int64_t D, const int64_t* ids, int64_t n, float* out);

}  // namespace refpg::cuda

// Embedding lookup on the GPU: out[i] = table[ids[i]] as float32 (bf16 rows widened exactly).
// ids are device int64, already checked to lie in [0, V) by csrc/bindings.cpp.
#pragma once
#include <cstdint>

namespace refpg::cuda {

void embedding(const void* table, bool bf16, int64_t D, const int64_t* ids, int64_t n, float* out);

}  // namespace refpg::cuda

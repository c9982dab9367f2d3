// Embedding lookup with the semantics of refpg.ops.embedding: out[i] = table[ids[i]] as float32,
// the table float32 or bfloat16 bit patterns (widened exactly, bf16_to_f32 in simd.h). Rows are
// copied in parallel. One implementation (a copy, memory bound), so every SimdPath runs the same
// code. The ids are range-checked in csrc/bind_cpu.cpp before this runs; this function trusts them.
#pragma once
#include <cstdint>

#include "cpu/simd.h"
#include "weight_format.h"

namespace refpg {

// table: [V, D] contiguous in `format`; ids: [n] with 0 <= id < V; out: [n, D] contiguous. Call
// without the GIL. `path` is taken like every op's; all paths run the same code.
void embedding(const void* table, WeightFormat format, int64_t D, const int64_t* ids, int64_t n, float* out,
               SimdPath path);

}  // namespace refpg

// Embedding lookup with the semantics of refpg.ops.embedding: out[i] = table[ids[i]] as float32,
// the table float32 or bfloat16 bit patterns (a bf16 value is the high half of a float32, so the
// conversion is exact: bits << 16). Rows are copied in parallel. The ids are range-checked in
// csrc/bindings.cpp before this runs; this function trusts them.
#pragma once
#include <cstdint>

namespace refpg {

// table: [V, D] contiguous, float or uint16_t bf16 bits when table_bf16; ids: [n] with 0 <= id < V;
// out: [n, D] contiguous. Call without the GIL.
void embedding(const void* table, bool table_bf16, int64_t D, const int64_t* ids, int64_t n, float* out);

}  // namespace refpg

// RoPE on the GPU, rotate-half convention, the numerics of refpg.ops.rope: x [tokens, heads, hd]
// and cos/sin [tokens, hd] contiguous float32 device arrays, y like x (may be x: in place).
#pragma once
#include <cstdint>

namespace refpg::cuda {

void rope(const float* x, const float* cos, const float* sin, float* y, int64_t tokens, int64_t heads, int64_t hd);

}  // namespace refpg::cuda

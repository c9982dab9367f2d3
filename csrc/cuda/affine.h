// linear and embedding on the GPU for weights in MLX's affine group quantization (AffineWeight in
// weight_format.h; device pointers). Every weight is dequantized exactly as refpg.formats.to_float32
// and mlx.core.dequantize do (q·s rounded to the scales' format, + b rounded again):
//   embedding: the rows at ids, exactly;
//   linear, M <= 8 (decode): one warp per W row reads its packed codes once, dequantizes each weight
//     in registers and accumulates x·w in fp32 for every x row;
//   linear, M > 8 (prefill): blocks of W rows dequantized to fp32 in device memory, then the float32
//     linear of matmul.h (its tensor-core path, activations rounded to bf16).
// Arguments are validated in csrc/bind_cuda.cpp; these functions trust them.
#pragma once
#include <cstdint>

#include "cpu/matmul.h"
#include "weight_format.h"

namespace refpg::cuda {

// args.weight and args.format are ignored: W is `w` ([N, K]).
void linear_affine(const LinearArgs& args, const AffineWeight& w);

// out [n, D] = the exact rows ids[i] (device int64, checked to lie in [0, V)) of `w` [V, D].
void embedding_affine(const AffineWeight& w, int64_t D, const int64_t* ids, int64_t n, float* out);

}  // namespace refpg::cuda

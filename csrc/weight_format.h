// How a weight matrix (linear's W, embedding's table) is stored; the CPU and CUDA kernels take it
// as this enum. The bindings deduce it from the numpy dtype or device tensor dtype (float32 = F32,
// uint16 = BF16 bits, float16 = F16) or, for Affine, from the codes' scales and biases beside them.
#pragma once
#include <cstdint>

namespace refpg {

enum class WeightFormat {
  F32,     // float32
  BF16,    // bfloat16 bit patterns (uint16): the high half of a float32, widened exactly (bits << 16)
  F16,     // IEEE float16 (only as the scales and biases of an Affine matrix)
  Affine,  // MLX's affine group quantization: AffineWeight
};

// MLX's affine group quantization (refpg/formats.py says it in full): row n of a [N, K] matrix is
// K / group_size groups, each with a scale s and a bias b in `scale_format` (F32, BF16 or F16); a
// weight is an unsigned `bits`-bit code q standing for q·s + b, the product and then the sum each
// rounded to `scale_format`. The codes of a row are one bit stream, least significant bit first,
// in K·bits/32 little-endian uint32 words.
struct AffineWeight {
  const uint32_t* codes;  // [N, K * bits / 32]
  const void* scales;     // [N, K / group_size]
  const void* biases;     // [N, K / group_size]
  WeightFormat scale_format;
  int bits;               // 2, 3, 4, 5, 6 or 8
  int group_size;         // 32, 64 or 128
};

}  // namespace refpg

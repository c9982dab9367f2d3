// How a weight matrix (linear's W, embedding's table) is stored; the CPU and CUDA kernels take it
// as this enum. The bindings deduce it from the numpy dtype or device tensor dtype (float32 = F32,
// uint16 = BF16 bits). Packed quantized formats (blocks of 4- or 8-bit values with their scales)
// would join here, each with the kernels that read it.
#pragma once

namespace refpg {

enum class WeightFormat {
  F32,   // float32
  BF16,  // bfloat16 bit patterns (uint16): the high half of a float32, widened exactly (bits << 16)
};

}  // namespace refpg

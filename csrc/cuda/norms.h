// rms_norm and layer_norm on the GPU, the numerics of refpg.ops: one block per row of x[rows, D]
// (contiguous), statistics summed in double, outputs in float32. Device pointers; arguments are
// validated in csrc/bind_cuda.cpp.
#pragma once
#include <cstdint>

namespace refpg::cuda {

// y = x / sqrt(mean(x²) + eps) * (1 + w)
void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t D, float eps);
// y = (x − mean) / sqrt(var + eps) * w + b, two-pass variance
void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t D, float eps);

}  // namespace refpg::cuda

// Data movement for refpg.backends.cuda.DeviceArray views: a strided copy (making a view contiguous,
// writing into a KV-cache slice) and a row scatter (placing image features at the <image>
// positions). Device pointers; element offsets and strides checked in csrc/bind_cuda.cpp.
#pragma once
#include <cstdint>

namespace refpg::cuda {

constexpr int kMaxDims = 6;

// dst[i0..] = src[i0..] over `shape` (ndim <= kMaxDims), strides in elements of `elem_bytes`
// (1, 2, 4 or 8 bytes). dst must not overlap src nor itself (no zero stride). More than kMaxDims
// dimensions throw refpg::cuda::Error.
void copy_strided(void* dst, const int64_t* dst_strides, const void* src, const int64_t* src_strides,
                  const int64_t* shape, int ndim, int elem_bytes);

// dst[rows[i], :] = src[i, :] for i < n; rows of `width` floats, contiguous; rows[] on the device,
// distinct (checked by the binding).
void scatter_rows(float* dst, const int64_t* rows, const float* src, int64_t n, int64_t width);

}  // namespace refpg::cuda

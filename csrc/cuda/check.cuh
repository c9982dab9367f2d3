// Error checking for the .cu files: REFPG_CUDA_CHECK(call) throws refpg::cuda::Error (OutOfMemory for
// cudaErrorMemoryAllocation) naming the call; REFPG_CUDA_LAUNCHED("kernel") after a launch reports a
// bad launch configuration at once, naming the kernel.
#pragma once
#include <cuda_runtime.h>

#include "cuda/runtime.h"

namespace refpg::cuda {
[[noreturn]] void throw_error(cudaError_t err, const char* call, const char* file, int line);
}  // namespace refpg::cuda

#define REFPG_CUDA_CHECK(call)                                                            \
  do {                                                                                    \
    const cudaError_t refpg_err_ = (call);                                                \
    if (refpg_err_ != cudaSuccess) ::refpg::cuda::throw_error(refpg_err_, #call, __FILE__, __LINE__); \
  } while (0)

#define REFPG_CUDA_LAUNCHED(kernel_name)                                                  \
  do {                                                                                    \
    const cudaError_t refpg_err_ = cudaGetLastError();                                    \
    if (refpg_err_ != cudaSuccess)                                                        \
      ::refpg::cuda::throw_error(refpg_err_, "launch of " kernel_name, __FILE__, __LINE__); \
  } while (0)

// The CUDA runtime as the rest of refpg sees it: plain C++ (no CUDA headers), so csrc/bind_cuda.cpp
// compiles with g++. Every failing runtime call throws; the message names the call.
#pragma once
#include <cstddef>
#include <stdexcept>
#include <string>

namespace refpg::cuda {

// A CUDA runtime call failed; what() names the call, where it was made and CUDA's error string.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// cudaMalloc could not allocate; what() gives the request and the device's free / total memory.
struct OutOfMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Usable devices: 0, with *why saying what is missing (no driver, no GPU, ...), when there is none.
int device_count(std::string* why);

struct DeviceInfo {
  std::string name;
  int sm_count = 0, cc_major = 0, cc_minor = 0;
  size_t total_bytes = 0, free_bytes = 0;
};
DeviceInfo device_info();

// Stream-ordered on the default stream (see runtime.cu): release() does not wait for the GPU.
void* alloc(size_t bytes);      // throws OutOfMemory
void release(void* p) noexcept;
void copy_to_device(void* dst, const void* src, size_t bytes);
void copy_to_host(void* dst, const void* src, size_t bytes);
void copy_on_device(void* dst, const void* src, size_t bytes);
// dst rows of `row_bytes` `dst_pitch` apart <- src rows `src_pitch` apart, all on the device.
void copy_rows_on_device(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
                         size_t rows);
void zero(void* dst, size_t bytes);
// Waits for every queued kernel; throws the first asynchronous error.
void synchronize();

}  // namespace refpg::cuda

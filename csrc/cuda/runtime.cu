// runtime: see runtime.h.
#include <cstdint>
#include <cstdio>
#include <string>

#include "cuda/check.cuh"
#include "cuda/runtime.h"

namespace refpg::cuda {

void throw_error(cudaError_t err, const char* call, const char* file, int line) {
  (void)cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  std::string where = std::string(call) + " (" + file + ":" + std::to_string(line) + ")";
  if (err == cudaErrorMemoryAllocation) {
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    throw OutOfMemory("CUDA out of memory in " + where + ": " + std::to_string(free_b >> 20) + " MiB free of " +
                      std::to_string(total_b >> 20) + " MiB");
  }
  throw Error("CUDA error in " + where + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

int device_count(std::string* why) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    if (why) *why = std::string("no usable CUDA device (cudaGetDeviceCount: ") + cudaGetErrorString(err) + ")";
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA device is present";
  return n;
}

DeviceInfo device_info() {
  int dev = 0;
  REFPG_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp p{};
  REFPG_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  DeviceInfo info;
  info.name = p.name;
  info.sm_count = p.multiProcessorCount;
  info.cc_major = p.major;
  info.cc_minor = p.minor;
  REFPG_CUDA_CHECK(cudaMemGetInfo(&info.free_bytes, &info.total_bytes));
  return info;
}

// Allocations are stream-ordered (cudaMallocAsync / cudaFreeAsync on the default stream, which runs
// every kernel): freeing a temporary does not wait for the GPU, and memory freed while kernels that
// read it are still queued is reused only after them. The device's default pool keeps what is
// freed (release threshold: never), so steady-state forward passes allocate without the driver.
namespace {
void keep_freed_memory_in_pool() {
  static const bool done = [] {
    int dev = 0;
    REFPG_CUDA_CHECK(cudaGetDevice(&dev));
    cudaMemPool_t pool;
    REFPG_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, dev));
    uint64_t never = UINT64_MAX;
    REFPG_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &never));
    return true;
  }();
  (void)done;
}
}  // namespace

void* alloc(size_t bytes) {
  void* p = nullptr;
  if (bytes == 0) return nullptr;
  keep_freed_memory_in_pool();
  cudaError_t err = cudaMallocAsync(&p, bytes, 0);
  if (err == cudaErrorMemoryAllocation) {
    // the pool may hold freed blocks of other sizes: hand them back and try once more
    (void)cudaGetLastError();
    int dev = 0;
    cudaMemPool_t pool;
    if (cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetDefaultMemPool(&pool, dev) == cudaSuccess &&
        cudaDeviceSynchronize() == cudaSuccess)
      cudaMemPoolTrimTo(pool, 0);
    (void)cudaGetLastError();
    err = cudaMallocAsync(&p, bytes, 0);
  }
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    throw OutOfMemory("CUDA out of memory: allocating " + std::to_string(bytes >> 20) + " MiB failed with " +
                      std::to_string(free_b >> 20) + " MiB free of " + std::to_string(total_b >> 20) + " MiB");
  }
  if (err != cudaSuccess) throw_error(err, "cudaMallocAsync", __FILE__, __LINE__);
  return p;
}

void release(void* p) noexcept {
  if (p && cudaFreeAsync(p, 0) != cudaSuccess) (void)cudaGetLastError();  // not to be blamed on the next launch
}

void copy_to_device(void* dst, const void* src, size_t bytes) {
  if (bytes) REFPG_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}

void copy_to_host(void* dst, const void* src, size_t bytes) {
  if (bytes) REFPG_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

void copy_on_device(void* dst, const void* src, size_t bytes) {
  if (bytes) REFPG_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0));
}

void copy_rows_on_device(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
                         size_t rows) {
  if (row_bytes && rows)
    REFPG_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, rows, cudaMemcpyDeviceToDevice, 0));
}

void zero(void* dst, size_t bytes) {
  if (bytes) REFPG_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, 0));
}

void synchronize() { REFPG_CUDA_CHECK(cudaDeviceSynchronize()); }

}  // namespace refpg::cuda

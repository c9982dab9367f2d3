// DeviceTensor: a strided view of GPU memory, what refpg.backends.cuda.DeviceArray holds. Plain C++ (no CUDA
// headers). Views share their storage; `view()` refuses any view reaching outside it, so a kernel
// given a DeviceTensor that passed the binding's shape checks stays inside its allocation.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind.h"
#include "cuda/runtime.h"

namespace refpg::cuda {

struct Storage {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit Storage(size_t n) : ptr(alloc(n)), bytes(n) {}
  ~Storage() { release(ptr); }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
};

inline int elem_bytes(DType d) {
  switch (d) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::U32: return 4;
    case DType::I64: return 8;
    case DType::BOOL: return 1;
  }
  return 1;
}

struct DeviceTensor {
  std::shared_ptr<Storage> storage;
  int64_t offset = 0;                     // elements from the start of the storage
  std::vector<int64_t> shape, strides;    // strides in elements
  DType dtype = DType::F32;

  // Element counts, offsets and strides stay below 2^47, so no product of them in a binding or a
  // kernel's index math can overflow int64.
  static constexpr int64_t kMaxElems = int64_t{1} << 47;

  static DeviceTensor empty(const std::vector<int64_t>& shape, DType dtype) {
    DeviceTensor t;
    t.shape = shape;
    t.dtype = dtype;
    t.strides.assign(shape.size(), 1);
    int64_t n = 1;
    for (size_t i = shape.size(); i-- > 0;) {
      if (shape[i] < 0) throw std::invalid_argument("negative dimension in a device tensor's shape");
      t.strides[i] = n;
      if (shape[i] > 0 && n > kMaxElems / shape[i])
        throw std::invalid_argument("a device tensor of more than 2^47 elements");
      n *= shape[i];
    }
    t.storage = std::make_shared<Storage>(static_cast<size_t>(n) * elem_bytes(dtype));
    return t;
  }

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  int64_t storage_elems() const { return static_cast<int64_t>(storage->bytes / elem_bytes(dtype)); }
  bool contiguous() const {
    int64_t expect = 1;
    for (size_t i = shape.size(); i-- > 0;) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  // The last `inner` dimensions densely packed; the outer strides free.
  bool inner_contiguous(int inner) const {
    int64_t expect = 1;
    for (int i = static_cast<int>(shape.size()) - 1, k = 0; i >= 0 && k < inner; --i, ++k) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  void* data() const { return static_cast<char*>(storage->ptr) + offset * elem_bytes(dtype); }
  template <typename T>
  T* as() const { return static_cast<T*>(data()); }

  // A view sharing this storage; throws std::out_of_range when it would reach outside it.
  DeviceTensor view(int64_t new_offset, const std::vector<int64_t>& new_shape,
                    const std::vector<int64_t>& new_strides) const {
    if (new_shape.size() != new_strides.size()) throw std::invalid_argument("view: shape and strides differ in rank");
    bool empty_view = false;
    for (size_t i = 0; i < new_shape.size(); ++i) {
      if (new_shape[i] < 0 || new_strides[i] < 0) throw std::out_of_range("view: negative size or stride");
      if (new_shape[i] > kMaxElems || new_strides[i] > kMaxElems) throw std::out_of_range("view: size or stride too large");
      empty_view = empty_view || new_shape[i] == 0;
    }
    // An empty view reads nothing, wherever it starts (a[:, 1:] of an empty a starts past the end):
    // its offset is only required to be non-negative, and it is kept at 0, inside the allocation.
    if (new_offset < 0 || (!empty_view && new_offset > storage_elems()))
      throw std::out_of_range("view: offset outside the storage");
    int64_t last = new_offset, n = 1;
    for (size_t i = 0; i < new_shape.size() && !empty_view; ++i) {
      // both factors < 2^47 and the sum is checked at each step: no int64 overflow
      if (new_shape[i] - 1 > 0 && new_strides[i] > (kMaxElems - last) / (new_shape[i] - 1))
        throw std::out_of_range("view reaches past 2^47 elements");
      last += (new_shape[i] - 1) * new_strides[i];
      n *= new_shape[i];
      if (n > kMaxElems) throw std::out_of_range("view of more than 2^47 elements");
    }
    if (!empty_view && last >= storage_elems())
      throw std::out_of_range("view reaches element " + std::to_string(last) + " of a storage of " +
                              std::to_string(storage_elems()));
    DeviceTensor t = *this;
    t.offset = empty_view ? 0 : new_offset;
    t.shape = new_shape;
    t.strides = new_strides;
    return t;
  }
};

}  // namespace refpg::cuda

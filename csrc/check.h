// Argument checks for the bindings: every kernel's inputs are validated here, before any kernel
// reads or writes memory, and a failure is a Python ValueError naming the op and the argument.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace refpg {

namespace py = pybind11;

enum class DType { F32, BF16, I64, BOOL };  // BF16 travels as numpy uint16 bit patterns

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16 (as uint16 bits)";
    case DType::I64: return "int64";
    case DType::BOOL: return "bool";
  }
  return "?";
}

inline bool has_dtype(const py::array& a, DType d) {
  switch (d) {
    case DType::F32: return a.dtype().is(py::dtype::of<float>());
    case DType::BF16: return a.dtype().is(py::dtype::of<uint16_t>());
    case DType::I64: return a.dtype().is(py::dtype::of<int64_t>());
    case DType::BOOL: return a.dtype().is(py::dtype::of<bool>());
  }
  return false;
}

[[noreturn]] inline void fail(const std::string& op, const std::string& msg) {
  throw py::value_error(op + ": " + msg);
}

inline std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << "]";
  return s.str();
}

// Checks dtype and rank; returns the shape. -1 in `want` means any size.
inline std::vector<int64_t> check_array(const std::string& op, const char* name, const py::array& a,
                                        std::initializer_list<DType> dtypes, std::vector<int64_t> want) {
  bool ok = false;
  for (DType d : dtypes) ok = ok || has_dtype(a, d);
  if (!ok) {
    std::string names;
    for (DType d : dtypes) names += (names.empty() ? "" : " or ") + std::string(dtype_name(d));
    fail(op, std::string(name) + " must be " + names + ", got " + std::string(py::str(a.dtype())));
  }
  if (a.ndim() != static_cast<py::ssize_t>(want.size()))
    fail(op, std::string(name) + " must have " + std::to_string(want.size()) + " dimensions, got shape " + shape_str(a));
  std::vector<int64_t> shape(a.ndim());
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    shape[i] = a.shape(i);
    if (want[i] >= 0 && shape[i] != want[i])
      fail(op, std::string(name) + " has shape " + shape_str(a) + ", dimension " + std::to_string(i) +
                   " must be " + std::to_string(want[i]));
  }
  return shape;
}

// Requires the last `inner` dimensions to be densely packed (C order); outer strides may be anything.
inline void check_inner_contiguous(const std::string& op, const char* name, const py::array& a, int inner) {
  if (a.size() == 0) return;  // numpy gives empty arrays zero strides; nothing will be read
  py::ssize_t expect = a.itemsize();
  for (py::ssize_t i = a.ndim() - 1; i >= a.ndim() - inner && i >= 0; --i) {
    if (a.shape(i) > 1 && a.strides(i) != expect)
      fail(op, std::string(name) + " must be contiguous in its last " + std::to_string(inner) + " dimension(s)");
    expect *= a.shape(i);
  }
  for (py::ssize_t i = 0; i < a.ndim(); ++i)
    if (a.strides(i) < 0 || a.strides(i) % a.itemsize() != 0)
      fail(op, std::string(name) + " has negative or misaligned strides");
}

inline void check_contiguous(const std::string& op, const char* name, const py::array& a) {
  if (!(a.flags() & py::array::c_style)) fail(op, std::string(name) + " must be C-contiguous");
}

inline void check_writeable(const std::string& op, const char* name, const py::array& a) {
  if (!a.writeable()) fail(op, std::string(name) + " must be writeable");
}

// Strides in elements, for kernels that take a strided outer dimension.
inline int64_t elem_stride(const py::array& a, int dim) { return a.strides(dim) / a.itemsize(); }

}  // namespace refpg

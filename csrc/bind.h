// What the binding files share. csrc/module.cpp makes the module _C from bind_cpu (csrc/bind_cpu.cpp)
// and, in a CUDA build, bind_cuda (csrc/bind_cuda.cpp, the submodule _C.cuda). Argument handling:
// every kernel's inputs are validated here, before any kernel reads or writes memory, and a failure
// is a Python ValueError (TypeError for a wrong kind of object) naming the op and the argument.
// check_*: tests on numpy arrays; Arg: Python objects turned into validated arrays, numbers, the
// weight format and the SIMD path.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/simd.h"
#include "weight_format.h"

namespace refpg {

namespace py = pybind11;

void bind_cpu(py::module_& m);   // the CPU kernels, into _C itself
void bind_cuda(py::module_& c);  // the GPU kernels and device tensors, into _C.cuda (CUDA builds only)

enum class DType { F32, BF16, F16, U32, I64, BOOL };  // BF16 travels as numpy uint16 bit patterns

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16 (as uint16 bits)";
    case DType::F16: return "float16";
    case DType::U32: return "uint32";
    case DType::I64: return "int64";
    case DType::BOOL: return "bool";
  }
  return "?";
}

inline bool has_dtype(const py::array& a, DType d) {
  switch (d) {
    case DType::F32: return a.dtype().is(py::dtype::of<float>());
    case DType::BF16: return a.dtype().is(py::dtype::of<uint16_t>());
    case DType::F16: return a.dtype().is(py::dtype("float16"));
    case DType::U32: return a.dtype().is(py::dtype::of<uint32_t>());
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


struct Arg {
  // `o` as a numpy array: ValueError when it is not one or is misaligned.
  static py::array array(const std::string& op, const char* name, const py::object& o) {
    if (!py::isinstance<py::array>(o))
      fail(op, std::string(name) + " must be a numpy array, got " + std::string(py::str(py::type::handle_of(o))));
    py::array a = py::reinterpret_borrow<py::array>(o);
    if (!a.attr("flags").attr("aligned").cast<bool>()) fail(op, std::string(name) + " must be aligned");
    return a;
  }
  // A C-contiguous array of any shape with at least `min_rank` dimensions.
  static py::array dense(const std::string& op, const char* name, const py::object& o,
                         std::initializer_list<DType> dtypes, int min_rank) {
    const py::array a = array(op, name, o);
    if (a.ndim() < min_rank)
      fail(op, std::string(name) + " needs at least " + std::to_string(min_rank) + " dimension(s), got shape " +
                   shape_str(a));
    check_array(op, name, a, dtypes, std::vector<int64_t>(a.ndim(), -1));
    check_contiguous(op, name, a);
    return a;
  }
  // A contiguous float32 vector of n elements (a norm's weight or bias).
  static py::array vec(const std::string& op, const char* name, const py::object& o, int64_t n) {
    const py::array a = array(op, name, o);
    check_array(op, name, a, {DType::F32}, {n});
    check_contiguous(op, name, a);
    return a;
  }
  static std::vector<py::ssize_t> shape(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }
  static const float* f32(const py::array& a) { return static_cast<const float*>(a.data()); }
  // A Python integer (or numpy integer; not a bool) up to `max`: ValueError naming the limit
  // beyond it, TypeError for anything else. Values below INT_MIN come back as INT_MIN.
  static int integer_at_most(const std::string& op, const char* name, const py::object& o, int max,
                             const char* unit) {
    if (py::isinstance<py::bool_>(o) || !PyIndex_Check(o.ptr()))
      throw py::type_error(op + ": " + name + " must be an integer, got " + std::string(py::str(py::type::handle_of(o))));
    const py::int_ i = py::reinterpret_steal<py::int_>(PyNumber_Index(o.ptr()));
    if (!i) throw py::error_already_set();
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
    if (overflow > 0 || v > max)
      fail(op, std::string(name) + " = " + std::string(py::str(i)) + " is beyond the limit of " + std::to_string(max) + unit);
    return overflow < 0 || v < INT_MIN ? INT_MIN : static_cast<int>(v);
  }
  // A float32 number: TypeError for a non-number (a bool included), ValueError when it is not finite
  // as a float32 (1e39 is not), or outside its range: eps >= 0, a soft-cap nonzero.
  enum Range { Any, NonNegative, NonZero };
  static float number(const std::string& op, const char* name, const py::object& o, Range range = Any) {
    double v = 0.0;
    try {
      if (py::isinstance<py::bool_>(o)) throw py::cast_error();
      v = o.cast<double>();
    } catch (const py::cast_error&) {
      throw py::type_error(op + ": " + name + " must be a number, got " + std::string(py::str(py::type::handle_of(o))));
    }
    const float f = static_cast<float>(v);
    if (!std::isfinite(f) || (range == NonNegative && f < 0) || (range == NonZero && f == 0))
      fail(op, std::string(name) + " must be a finite float32" + (range == NonNegative ? " >= 0" : "") +
                   (range == NonZero ? " other than 0" : "") + ", got " + std::string(py::str(o)));
    return f;
  }
  // The current instruction set (csrc/cpu/simd.h), read once per call; a REFPG_SIMD naming no path,
  // or one this CPU lacks, is a ValueError naming the op.
  static SimdPath path(const std::string& op) {
    try {
      return simd_path();
    } catch (const std::exception& e) {
      fail(op, e.what());
    }
  }
  // A weight's format from its dtype, already checked to be float32 or uint16 (bf16 bits).
  static WeightFormat format(const py::array& weight) {
    return has_dtype(weight, DType::BF16) ? WeightFormat::BF16 : WeightFormat::F32;
  }
  // MLX affine quantization's code width: 2, 3, 4, 5, 6 or 8 (ValueError otherwise).
  static int affine_bits(const std::string& op, const py::object& bits_arg) {
    const int bits = integer_at_most(op, "bits", bits_arg, 8, "");
    if (bits < 2 || bits == 7) fail(op, "bits must be 2, 3, 4, 5, 6 or 8, got " + std::to_string(bits));
    return bits;
  }
  // Its group size: 32, 64 or 128, dividing the matrix's `cols` columns (ValueError otherwise).
  static int affine_group_size(const std::string& op, const py::object& group_arg, int64_t cols) {
    const int group_size = integer_at_most(op, "group_size", group_arg, 128, "");
    if (group_size != 32 && group_size != 64 && group_size != 128)
      fail(op, "group_size must be 32, 64 or 128, got " + std::to_string(group_size));
    if (cols % group_size)
      fail(op, "group_size " + std::to_string(group_size) + " does not divide the matrix's " + std::to_string(cols) +
                   " columns");
    return group_size;
  }
};

}  // namespace refpg

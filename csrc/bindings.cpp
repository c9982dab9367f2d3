// The one binding file: every kernel is exposed here, and every argument is validated here
// (csrc/check.h) before a kernel touches memory. Kernels live one op per file pair in csrc/cpu/ and,
// when the build found nvcc, csrc/cuda/ (the submodule _C.cuda, on device tensors).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::vector <-> list / tuple: shapes and strides of the cuda bindings

#include <climits>

#include "check.h"
#include "cpu/activations.h"
#include "cpu/attention.h"
#include "cpu/cpu_features.h"
#include "cpu/embedding.h"
#include "cpu/matmul.h"
#include "cpu/norms.h"
#include "cpu/rope.h"
#include "cpu/threadpool.h"
#ifdef REFPG_WITH_CUDA
#include <algorithm>

#include "cuda/activations.h"
#include "cuda/attention.h"
#include "cuda/device_tensor.h"
#include "cuda/embedding.h"
#include "cuda/matmul.h"
#include "cuda/norms.h"
#include "cuda/rope.h"
#include "cuda/tensor.h"
#endif

namespace py = pybind11;
using namespace refpg;

// Argument handling shared by the bindings (beyond csrc/check.h): turning Python objects into
// validated arrays and numbers.
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
  // The instruction set the kernels run with (REFPG_SIMD, or the best of this CPU); a REFPG_SIMD
  // naming no path, or one this CPU lacks, is a ValueError naming the op.
  static SimdPath path(const std::string& op) {
    try {
      return simd_path();
    } catch (const std::exception& e) {
      fail(op, e.what());
    }
  }
  // The AVX2+FMA kernels unless the path is scalar (simd_path() picks no vector path without them).
  static bool avx2(const std::string& op) { return path(op) != SimdPath::Scalar; }
};

// ---- CUDA: device tensors and the GPU kernels (csrc/cuda/), in the submodule _C.cuda ---------------
#ifdef REFPG_WITH_CUDA
namespace {

using cuda::DeviceTensor;

// Argument handling for device tensors, like Arg for numpy arrays.
struct Dev {
  static const DeviceTensor& tensor(const std::string& op, const char* name, const py::object& o) {
    if (!py::isinstance<DeviceTensor>(o))
      fail(op, std::string(name) + " must be a refpg device tensor, got " + std::string(py::str(py::type::handle_of(o))));
    return o.cast<const DeviceTensor&>();
  }
  static std::string shape_of(const DeviceTensor& t) {
    std::string s = "[";
    for (size_t i = 0; i < t.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
    return s + "]";
  }
  // dtype and rank (want: -1 = any size); returns the shape.
  static std::vector<int64_t> check(const std::string& op, const char* name, const DeviceTensor& t,
                                    std::initializer_list<DType> dtypes, const std::vector<int64_t>& want) {
    bool ok = false;
    for (DType d : dtypes) ok = ok || t.dtype == d;
    if (!ok) fail(op, std::string(name) + " has the wrong dtype (" + dtype_name(t.dtype) + ")");
    if (t.shape.size() != want.size())
      fail(op, std::string(name) + " must have " + std::to_string(want.size()) + " dimensions, got shape " + shape_of(t));
    for (size_t i = 0; i < want.size(); ++i)
      if (want[i] >= 0 && t.shape[i] != want[i])
        fail(op, std::string(name) + " has shape " + shape_of(t) + ", dimension " + std::to_string(i) + " must be " +
                     std::to_string(want[i]));
    return t.shape;
  }
  // A contiguous float32 tensor of any shape with at least min_rank dimensions.
  static const DeviceTensor& dense(const std::string& op, const char* name, const py::object& o, int min_rank,
                                   DType dtype = DType::F32) {
    const DeviceTensor& t = tensor(op, name, o);
    if (static_cast<int>(t.shape.size()) < min_rank)
      fail(op, std::string(name) + " needs at least " + std::to_string(min_rank) + " dimension(s), got " + shape_of(t));
    if (t.dtype != dtype) fail(op, std::string(name) + " must be " + dtype_name(dtype) + ", got " + dtype_name(t.dtype));
    if (!t.contiguous()) fail(op, std::string(name) + " must be contiguous");
    return t;
  }
  static const DeviceTensor& vec(const std::string& op, const char* name, const py::object& o, int64_t n) {
    const DeviceTensor& t = dense(op, name, o, 1);
    check(op, name, t, {DType::F32}, {n});
    return t;
  }
  static DType dtype_of(const py::array& a) {
    for (DType d : {DType::F32, DType::BF16, DType::I64, DType::BOOL})
      if (has_dtype(a, d)) return d;
    throw py::type_error("device tensors hold float32, bfloat16 (uint16 bits), int64 or bool, not " +
                         std::string(py::str(a.dtype())));
  }
  static py::dtype numpy_dtype(DType d) {
    switch (d) {
      case DType::F32: return py::dtype::of<float>();
      case DType::BF16: return py::dtype::of<uint16_t>();
      case DType::I64: return py::dtype::of<int64_t>();
      case DType::BOOL: return py::dtype::of<bool>();
    }
    return py::dtype::of<float>();
  }
  static DeviceTensor like(const DeviceTensor& t) { return DeviceTensor::empty(t.shape, DType::F32); }
  // Row kernels put one block per row on grid.x: at most 2^31 - 1 of them.
  static void launchable(const std::string& op, int64_t rows) {
    if (rows > INT32_MAX) fail(op, std::to_string(rows) + " rows: at most 2^31 - 1 per call");
  }
  // ids as a host int64 array checked against [0, V), uploaded.
  // distinct: no id twice (a scatter's destinations).
  static DeviceTensor ids(const std::string& op, const py::object& o, int64_t V, bool distinct = false) {
    const py::array a = Arg::dense(op, "ids", o, {DType::I64}, 0);
    const int64_t* id = static_cast<const int64_t*>(a.data());
    for (int64_t i = 0; i < a.size(); ++i)
      if (id[i] < 0 || id[i] >= V)
        fail(op, "ids holds " + std::to_string(id[i]) + " (flat index " + std::to_string(i) +
                     "), outside [0, " + std::to_string(V) + ")");
    launchable(op, a.size());
    if (distinct) {
      std::vector<int64_t> sorted(id, id + a.size());
      std::sort(sorted.begin(), sorted.end());
      if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) fail(op, "ids holds a row twice");
    }
    DeviceTensor t = DeviceTensor::empty(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()), DType::I64);
    cuda::copy_to_device(t.data(), a.data(), a.size() * sizeof(int64_t));
    return t;
  }
};

void bind_cuda(py::module_& c) {
  py::register_exception<cuda::Error>(c, "CudaError", PyExc_RuntimeError);
  py::register_exception<cuda::OutOfMemory>(c, "OutOfMemory", PyExc_MemoryError);
  c.attr("compiled") = true;
  c.def("device_count", [] { return cuda::device_count(nullptr); }, "usable CUDA devices (0 when none)");
  c.def("unavailable_reason", [] {
    std::string why;
    return cuda::device_count(&why) > 0 ? std::string() : why;
  }, "why no CUDA device can be used here, or '' when one can");
  c.def("device_info", [] {
    const cuda::DeviceInfo i = cuda::device_info();
    py::dict d;
    d["name"] = i.name;
    d["sm_count"] = i.sm_count;
    d["compute_capability"] = std::to_string(i.cc_major) + "." + std::to_string(i.cc_minor);
    d["total_bytes"] = i.total_bytes;
    d["free_bytes"] = i.free_bytes;
    return d;
  });
  c.def("synchronize", &cuda::synchronize, "wait for every queued kernel; raises the first asynchronous error");

  py::class_<DeviceTensor>(c, "Tensor", "A strided view of GPU memory (refpg.cuda.DeviceArray wraps it).")
      .def_property_readonly("shape", [](const DeviceTensor& t) { return py::tuple(py::cast(t.shape)); })
      .def_property_readonly("strides", [](const DeviceTensor& t) { return py::tuple(py::cast(t.strides)); })
      .def_property_readonly("offset", [](const DeviceTensor& t) { return t.offset; })
      .def_property_readonly("dtype", [](const DeviceTensor& t) { return Dev::numpy_dtype(t.dtype); })
      .def_property_readonly("contiguous", &DeviceTensor::contiguous)
      .def("same_storage", [](const DeviceTensor& a, const DeviceTensor& b) { return a.storage == b.storage; })
      .def("view", [](const DeviceTensor& t, int64_t offset, std::vector<int64_t> shape, std::vector<int64_t> strides) {
        try {
          return t.view(offset, shape, strides);
        } catch (const std::exception& e) {
          throw py::index_error(e.what());
        }
      }, py::arg("offset"), py::arg("shape"), py::arg("strides"),
      "a view of the same memory (element offset and strides); IndexError when it would reach outside it");

  c.def("empty", [](std::vector<int64_t> shape, const py::object& dtype) {
    return DeviceTensor::empty(shape, Dev::dtype_of(py::array(py::dtype::from_args(dtype), std::vector<py::ssize_t>{0})));
  }, py::arg("shape"), py::arg("dtype") = py::dtype::of<float>(), "uninitialised device memory");
  c.def("zeros", [](std::vector<int64_t> shape, const py::object& dtype) {
    DeviceTensor t = DeviceTensor::empty(shape, Dev::dtype_of(py::array(py::dtype::from_args(dtype), std::vector<py::ssize_t>{0})));
    cuda::zero(t.data(), t.storage->bytes);
    return t;
  }, py::arg("shape"), py::arg("dtype") = py::dtype::of<float>(), "zero-filled device memory");
  c.def("upload", [](const py::array& host) {
    const py::array a = py::array::ensure(host, py::array::c_style);
    DeviceTensor t = DeviceTensor::empty(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()), Dev::dtype_of(a));
    cuda::copy_to_device(t.data(), a.data(), static_cast<size_t>(a.nbytes()));
    return t;
  }, py::arg("array"), "a device copy of a numpy array (float32, uint16 = bf16 bits, int64 or bool)");
  c.def("download", [](const DeviceTensor& t) {
    py::array out(Dev::numpy_dtype(t.dtype), std::vector<py::ssize_t>(t.shape.begin(), t.shape.end()));
    if (t.numel() == 0) return out;
    if (t.contiguous()) {
      cuda::copy_to_host(out.mutable_data(), t.data(), out.nbytes());
    } else {
      if (static_cast<int>(t.shape.size()) > cuda::kMaxDims) fail("download", "a strided view of more than 6 dimensions");
      DeviceTensor packed = DeviceTensor::empty(t.shape, t.dtype);
      cuda::copy_strided(packed.data(), packed.strides.data(), t.data(), t.strides.data(), t.shape.data(),
                         static_cast<int>(t.shape.size()), cuda::elem_bytes(t.dtype));
      cuda::copy_to_host(out.mutable_data(), packed.data(), out.nbytes());
    }
    return out;
  }, py::arg("tensor"), "a numpy copy (waits for the kernels that write it)");
  c.def("copy", [](const py::object& dst_arg, const py::object& src_arg) {
    const std::string op = "copy";
    const DeviceTensor& dst = Dev::tensor(op, "dst", dst_arg);
    const DeviceTensor& src = Dev::tensor(op, "src", src_arg);
    if (dst.shape != src.shape || dst.dtype != src.dtype)
      fail(op, "dst " + Dev::shape_of(dst) + " and src " + Dev::shape_of(src) + " differ in shape or dtype");
    if (static_cast<int>(dst.shape.size()) > cuda::kMaxDims) fail(op, "more than 6 dimensions");
    if (dst.storage == src.storage) fail(op, "dst and src share memory");
    for (size_t i = 0; i < dst.shape.size(); ++i)
      if (dst.shape[i] > 1 && dst.strides[i] == 0) fail(op, "dst repeats elements (a zero stride)");
    cuda::copy_strided(dst.data(), dst.strides.data(), src.data(), src.strides.data(), dst.shape.data(),
                       static_cast<int>(dst.shape.size()), cuda::elem_bytes(dst.dtype));
  }, py::arg("dst"), py::arg("src"), "dst[...] = src[...] on the device (views of different storage, same shape)");
  c.def("scatter_rows", [](const py::object& dst_arg, const py::object& rows_arg, const py::object& src_arg) {
    const std::string op = "scatter_rows";
    const DeviceTensor& dst = Dev::dense(op, "dst", dst_arg, 2);
    const DeviceTensor& src = Dev::dense(op, "src", src_arg, 2);
    const int64_t R = Dev::check(op, "dst", dst, {DType::F32}, {-1, -1})[0], W = dst.shape[1];
    const int64_t n = Dev::check(op, "src", src, {DType::F32}, {-1, W})[0];
    const DeviceTensor rows = Dev::ids(op, rows_arg, R, /*distinct=*/true);
    if (rows.numel() != n) fail(op, "rows holds " + std::to_string(rows.numel()) + " indices for " + std::to_string(n) + " source rows");
    if (dst.storage == src.storage) fail(op, "dst and src share memory");
    cuda::scatter_rows(dst.as<float>(), rows.as<int64_t>(), src.as<float>(), n, W);
  }, py::arg("dst"), py::arg("rows"), py::arg("src"), "dst[rows[i]] = src[i]; rows a host int64 array");

  // ---- the ops, twins of refpg.ops (the Python side, refpg/cuda.py, handles numpy inputs) -----------
  c.def("linear", [](const py::object& x_arg, const py::object& w_arg, const py::object& b_arg) {
    const std::string op = "linear";
    const DeviceTensor& x = Dev::tensor(op, "x", x_arg);
    const auto xs = Dev::check(op, "x", x, {DType::F32}, {-1, -1});
    if (!x.inner_contiguous(1) || (xs[0] > 1 && x.strides[0] < xs[1])) fail(op, "x rows must be packed and not overlap");
    const DeviceTensor& w = Dev::tensor(op, "weight", w_arg);
    const int64_t M = xs[0], K = xs[1], N = Dev::check(op, "weight", w, {DType::F32, DType::BF16}, {-1, K})[0];
    if (!w.contiguous()) fail(op, "weight must be contiguous");
    const DeviceTensor* b = b_arg.is_none() ? nullptr : &Dev::vec(op, "bias", b_arg, N);
    DeviceTensor y = DeviceTensor::empty({M, N}, DType::F32);
    cuda::linear({x.as<float>(), x.strides[0], w.data(), w.dtype == DType::BF16, b ? b->as<float>() : nullptr,
                  y.as<float>(), N, M, N, K});
    return y;
  }, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), "x[M, K] @ weight[N, K].T (+ bias)");
  c.def("rms_norm", [](const py::object& x_arg, const py::object& w_arg, const py::object& eps_arg) {
    const DeviceTensor& x = Dev::dense("rms_norm", "x", x_arg, 1);
    const int64_t D = x.shape.back();
    const DeviceTensor& w = Dev::vec("rms_norm", "weight", w_arg, D);
    const float eps = Arg::number("rms_norm", "eps", eps_arg, Arg::NonNegative);
    Dev::launchable("rms_norm", D ? x.numel() / D : 0);
    DeviceTensor y = Dev::like(x);
    cuda::rms_norm(x.as<float>(), w.as<float>(), y.as<float>(), D ? x.numel() / D : 0, D, eps);
    return y;
  }, py::arg("x"), py::arg("weight"), py::arg("eps"));
  c.def("layer_norm", [](const py::object& x_arg, const py::object& w_arg, const py::object& b_arg,
                         const py::object& eps_arg) {
    const DeviceTensor& x = Dev::dense("layer_norm", "x", x_arg, 1);
    const int64_t D = x.shape.back();
    const DeviceTensor& w = Dev::vec("layer_norm", "weight", w_arg, D);
    const DeviceTensor& b = Dev::vec("layer_norm", "bias", b_arg, D);
    const float eps = Arg::number("layer_norm", "eps", eps_arg, Arg::NonNegative);
    Dev::launchable("layer_norm", D ? x.numel() / D : 0);
    DeviceTensor y = Dev::like(x);
    cuda::layer_norm(x.as<float>(), w.as<float>(), b.as<float>(), y.as<float>(), D ? x.numel() / D : 0, D, eps);
    return y;
  }, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  c.def("gelu_tanh", [](const py::object& x_arg) {
    const DeviceTensor& x = Dev::dense("gelu_tanh", "x", x_arg, 0);
    DeviceTensor y = Dev::like(x);
    cuda::gelu_tanh(x.as<float>(), y.as<float>(), x.numel());
    return y;
  }, py::arg("x"));
  c.def("geglu", [](const py::object& g_arg, const py::object& u_arg) {
    const DeviceTensor& g = Dev::dense("geglu", "gate", g_arg, 0);
    const DeviceTensor& u = Dev::dense("geglu", "up", u_arg, 0);
    if (g.shape != u.shape) fail("geglu", "gate " + Dev::shape_of(g) + " and up " + Dev::shape_of(u) + " must match");
    DeviceTensor y = Dev::like(g);
    cuda::geglu(g.as<float>(), u.as<float>(), y.as<float>(), g.numel());
    return y;
  }, py::arg("gate"), py::arg("up"));
  c.def("softcap", [](const py::object& x_arg, const py::object& cap_arg) {
    const DeviceTensor& x = Dev::dense("softcap", "x", x_arg, 0);
    const float cap = Arg::number("softcap", "cap", cap_arg, Arg::NonZero);
    DeviceTensor y = Dev::like(x);
    cuda::softcap(x.as<float>(), y.as<float>(), x.numel(), cap);
    return y;
  }, py::arg("x"), py::arg("cap"));
  c.def("softmax", [](const py::object& x_arg) {
    const DeviceTensor& x = Dev::dense("softmax", "x", x_arg, 1);
    const int64_t cols = x.shape.back();
    if (cols == 0) fail("softmax", "the softmax axis is empty");
    Dev::launchable("softmax", x.numel() / cols);
    DeviceTensor y = Dev::like(x);
    cuda::softmax(x.as<float>(), y.as<float>(), x.numel() / cols, cols);
    return y;
  }, py::arg("x"), "softmax over the last axis");
  c.def("add", [](const py::object& a_arg, const py::object& b_arg) {
    const DeviceTensor& a = Dev::dense("add", "a", a_arg, 0);
    const DeviceTensor& b = Dev::dense("add", "b", b_arg, 0);
    const size_t ra = a.shape.size(), rb = b.shape.size();
    if (rb > ra || !std::equal(b.shape.begin(), b.shape.end(), a.shape.end() - rb))
      fail("add", "b " + Dev::shape_of(b) + " must match the trailing dimensions of a " + Dev::shape_of(a));
    DeviceTensor y = Dev::like(a);
    if (a.numel()) cuda::add(a.as<float>(), b.as<float>(), y.as<float>(), a.numel(), b.numel());
    return y;
  }, py::arg("a"), py::arg("b"), "a + b, b broadcast over a's leading dimensions");
  c.def("scale", [](const py::object& a_arg, float s) {
    const DeviceTensor& a = Dev::dense("scale", "a", a_arg, 0);
    DeviceTensor y = Dev::like(a);
    cuda::scale(a.as<float>(), s, y.as<float>(), a.numel());
    return y;
  }, py::arg("a"), py::arg("s"));
  c.def("rope", [](const py::object& x_arg, const py::object& cos_arg, const py::object& sin_arg) {
    const std::string op = "rope";
    const DeviceTensor& x = Dev::dense(op, "x", x_arg, 4);
    const auto xs = Dev::check(op, "x", x, {DType::F32}, {-1, -1, -1, -1});
    if (xs[3] % 2) fail(op, "x has shape " + Dev::shape_of(x) + ": head_dim must be even");
    const DeviceTensor& cos = Dev::dense(op, "cos", cos_arg, 3);
    const DeviceTensor& sin = Dev::dense(op, "sin", sin_arg, 3);
    Dev::check(op, "cos", cos, {DType::F32}, {xs[0], xs[1], xs[3]});
    Dev::check(op, "sin", sin, {DType::F32}, {xs[0], xs[1], xs[3]});
    DeviceTensor y = Dev::like(x);
    cuda::rope(x.as<float>(), cos.as<float>(), sin.as<float>(), y.as<float>(), xs[0] * xs[1], xs[2], xs[3]);
    return y;
  }, py::arg("x"), py::arg("cos"), py::arg("sin"));
  c.def("embedding", [](const py::object& table_arg, const py::object& ids_arg) {
    const std::string op = "embedding";
    const DeviceTensor& table = Dev::tensor(op, "table", table_arg);
    const auto ts = Dev::check(op, "table", table, {DType::F32, DType::BF16}, {-1, -1});
    if (!table.contiguous()) fail(op, "table must be contiguous");
    const DeviceTensor ids = Dev::ids(op, ids_arg, ts[0]);
    std::vector<int64_t> shape = ids.shape;
    shape.push_back(ts[1]);
    DeviceTensor out = DeviceTensor::empty(shape, DType::F32);
    cuda::embedding(table.data(), table.dtype == DType::BF16, ts[1], ids.as<int64_t>(), ids.numel(), out.as<float>());
    return out;
  }, py::arg("table"), py::arg("ids"), "table[V, D] rows at host int64 ids (checked, then uploaded)");
  c.def("attention", [](const py::object& q_arg, const py::object& k_arg, const py::object& v_arg,
                        const py::object& mask_arg, const py::object& scale_arg, const py::object& softcap_arg) {
    const std::string op = "attention";
    const DeviceTensor& q = Dev::tensor(op, "q", q_arg);
    const DeviceTensor& k = Dev::tensor(op, "k", k_arg);
    const DeviceTensor& v = Dev::tensor(op, "v", v_arg);
    const auto qs = Dev::check(op, "q", q, {DType::F32}, {-1, -1, -1, -1});
    const int64_t B = qs[0], T = qs[1], H = qs[2], hd = qs[3];
    const auto ks = Dev::check(op, "k", k, {DType::F32}, {B, -1, -1, hd});
    const int64_t S = ks[1], KV = ks[2];
    Dev::check(op, "v", v, {DType::F32}, {B, S, KV, hd});
    if (S < 1) fail(op, "k and v hold no keys (S = 0)");
    if (KV < 1 || H % KV != 0) fail(op, "q's heads must be a multiple of k's kv heads");
    if (hd < 1 || hd > 512) fail(op, "head_dim must be in 1..512");
    Dev::launchable(op, B * T * H);  // query rows (the decode kernel also splits them by keys)
    for (const auto& [name, t] : {std::pair{"q", &q}, {"k", &k}, {"v", &v}})
      if (!t->inner_contiguous(2)) fail(op, std::string(name) + " must be contiguous in its last 2 dimensions");
    const uint8_t* mask_ptr = nullptr;
    int64_t m_b = 0, m_t = 0;
    if (!mask_arg.is_none()) {
      const DeviceTensor& mask = Dev::tensor(op, "mask", mask_arg);
      Dev::check(op, "mask", mask, {DType::BOOL}, {B, T, S});
      if (!mask.inner_contiguous(1)) fail(op, "mask must be contiguous in its last dimension");
      mask_ptr = mask.as<uint8_t>();
      m_b = mask.strides[0];
      m_t = mask.strides[1];
    }
    const float scale = Arg::number(op, "scale", scale_arg);
    const float cap = softcap_arg.is_none() ? 0.0f : Arg::number(op, "logit_softcap", softcap_arg, Arg::NonZero);
    DeviceTensor out = DeviceTensor::empty({B, T, H, hd}, DType::F32);
    if (B * T == 0) return out;
    cuda::attention({q.as<float>(), q.strides[0], q.strides[1], k.as<float>(), k.strides[0], k.strides[1],
                     v.as<float>(), v.strides[0], v.strides[1], mask_ptr, m_b, m_t, out.as<float>(),
                     B, T, S, H, KV, hd, scale, cap});
    return out;
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("scale"), py::arg("logit_softcap") = py::none());
}

}  // namespace
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "refpg native CPU kernels; each has a NumPy twin in refpg.ops";
#ifdef REFPG_SANITIZED
  m.attr("sanitized") = true;  // built with -DREFPG_SANITIZE=ON (tools/sanitize.sh)
#else
  m.attr("sanitized") = false;
#endif
  m.def("cpu_features", []() {
    const auto& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bf16"] = f.avx512bf16;
    d["amx_bf16"] = f.amx_bf16;
    return d;
  }, "SIMD features of this CPU, detected at run time (CPUID + XGETBV).");
  m.def("num_threads", &num_threads, "threads the kernels use");
  m.def(
      "set_num_threads",
      [](const py::object& n_arg) {
        const std::string op = "set_num_threads";
        const int n = Arg::integer_at_most(op, "n", n_arg, kMaxThreads, " threads");
        py::gil_scoped_release unlocked;  // waits for a job another thread is running
        set_num_threads(n);
      },
      py::arg("n"),
      "set the kernels' thread count, at most 1024 (n <= 0: the number of available cores); waits for a "
      "kernel running in another thread, and the new threads start with the next kernel");

  // ---- matmul / linear ------------------------------------------------------------------------
  m.def("simd_path", [] {
          try {
            return std::string(simd_path_name(simd_path()));
          } catch (const std::exception& e) {
            throw py::value_error(e.what());  // REFPG_SIMD's own message: no op to name
          }
        },
        "instruction set linear runs with: REFPG_SIMD (amx | avx512 | avx2 | scalar) or the best of this CPU");
  m.def(
      "linear",
      [](const py::object& x_arg, const py::object& weight_arg, const py::object& bias_arg,
         const py::object& out_arg) -> py::object {
        const std::string op = "linear";
        const py::array x = Arg::array(op, "x", x_arg), weight = Arg::array(op, "weight", weight_arg);
        const auto xs = check_array(op, "x", x, {DType::F32}, {-1, -1});
        check_inner_contiguous(op, "x", x, 1);
        const int64_t M = xs[0], K = xs[1];
        const int64_t N = check_array(op, "weight", weight, {DType::F32, DType::BF16}, {-1, K})[0];
        check_contiguous(op, "weight", weight);
        std::optional<py::array> bias;
        if (!bias_arg.is_none()) {
          bias = Arg::array(op, "bias", bias_arg);
          check_array(op, "bias", *bias, {DType::F32}, {N});
          check_contiguous(op, "bias", *bias);
        }
        py::array out;
        if (out_arg.is_none()) {
          out = py::array_t<float>(std::vector<py::ssize_t>{M, N});
        } else {
          out = Arg::array(op, "out", out_arg);
          check_array(op, "out", out, {DType::F32}, {M, N});
          check_writeable(op, "out", out);
          check_inner_contiguous(op, "out", out, 1);
          if (M > 1 && elem_stride(out, 0) < N) fail(op, "out has overlapping rows");
          const py::object shares = py::module_::import("numpy").attr("may_share_memory");
          for (const auto& [name, in] : {std::pair{"x", &x}, {"weight", &weight}, {"bias", bias ? &*bias : nullptr}})
            if (in && shares(out, *in).cast<bool>()) fail(op, std::string("out must not overlap ") + name);
        }
        const LinearArgs args{static_cast<const float*>(x.data()), elem_stride(x, 0), weight.data(),
                              has_dtype(weight, DType::BF16), bias ? static_cast<const float*>(bias->data()) : nullptr,
                              static_cast<float*>(out.mutable_data()), elem_stride(out, 0), M, N, K};
        const SimdPath path = Arg::path(op);
        {
          py::gil_scoped_release unlocked;
          linear(args, path);
        }
        return std::move(out);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("out") = py::none(),
      "y[M, N] = x[M, K] @ weight[N, K].T (+ bias[N]); weight float32 or bf16 bits (uint16), fp32 "
      "accumulation; writes into `out` when given. Twin of refpg.ops.linear.");

  // ---- norms, activations, rope, softmax, embedding --------------------------------------------

  m.def(
      "rms_norm",
      [](const py::object& x_arg, const py::object& weight_arg, const py::object& eps_arg) {
        const std::string op = "rms_norm";
        const py::array x = Arg::dense(op, "x", x_arg, {DType::F32}, 1);
        const int64_t D = x.shape(x.ndim() - 1), rows = D ? x.size() / D : 0;
        const py::array weight = Arg::vec(op, "weight", weight_arg, D);
        const float eps = Arg::number(op, "eps", eps_arg, Arg::NonNegative);
        py::array_t<float> y(Arg::shape(x));
        float* out = y.mutable_data();
        const bool avx2 = Arg::avx2("rms_norm");
        {
          py::gil_scoped_release unlocked;
          rms_norm(Arg::f32(x), Arg::f32(weight), out, rows, D, eps, avx2);
        }
        return y;
      },
      py::arg("x"), py::arg("weight"), py::arg("eps"),
      "x[..., D] / sqrt(mean(x²) + eps) * (1 + weight[D]); statistics in double. Twin of refpg.ops.rms_norm.");
  m.def(
      "layer_norm",
      [](const py::object& x_arg, const py::object& weight_arg, const py::object& bias_arg, const py::object& eps_arg) {
        const std::string op = "layer_norm";
        const py::array x = Arg::dense(op, "x", x_arg, {DType::F32}, 1);
        const int64_t D = x.shape(x.ndim() - 1), rows = D ? x.size() / D : 0;
        const py::array weight = Arg::vec(op, "weight", weight_arg, D), bias = Arg::vec(op, "bias", bias_arg, D);
        const float eps = Arg::number(op, "eps", eps_arg, Arg::NonNegative);
        py::array_t<float> y(Arg::shape(x));
        float* out = y.mutable_data();
        const bool avx2 = Arg::avx2("layer_norm");
        {
          py::gil_scoped_release unlocked;
          layer_norm(Arg::f32(x), Arg::f32(weight), Arg::f32(bias), out, rows, D, eps, avx2);
        }
        return y;
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
      "(x - mean) / sqrt(var + eps) * weight + bias over the last axis of x[..., D] (two-pass variance, "
      "statistics in double). Twin of refpg.ops.layer_norm.");
  m.def(
      "gelu_tanh",
      [](const py::object& x_arg) {
        const py::array x = Arg::dense("gelu_tanh", "x", x_arg, {DType::F32}, 0);
        py::array_t<float> y(Arg::shape(x));
        float* out = y.mutable_data();
        const bool avx2 = Arg::avx2("gelu_tanh");
        {
          py::gil_scoped_release unlocked;
          gelu_tanh(Arg::f32(x), out, x.size(), avx2);
        }
        return y;
      },
      py::arg("x"), "0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), any shape. Twin of refpg.ops.gelu_tanh.");
  m.def(
      "geglu",
      [](const py::object& gate_arg, const py::object& up_arg) {
        const std::string op = "geglu";
        const py::array gate = Arg::dense(op, "gate", gate_arg, {DType::F32}, 0);
        const py::array up = Arg::dense(op, "up", up_arg, {DType::F32}, 0);
        if (Arg::shape(up) != Arg::shape(gate))
          fail(op, "up has shape " + shape_str(up) + ", gate has shape " + shape_str(gate) + ": they must match");
        py::array_t<float> y(Arg::shape(gate));
        float* out = y.mutable_data();
        const bool avx2 = Arg::avx2("geglu");
        {
          py::gil_scoped_release unlocked;
          geglu(Arg::f32(gate), Arg::f32(up), out, gate.size(), avx2);
        }
        return y;
      },
      py::arg("gate"), py::arg("up"), "gelu_tanh(gate) * up, same shapes. Twin of refpg.ops.geglu.");
  m.def(
      "softcap",
      [](const py::object& x_arg, const py::object& cap_arg) -> py::object {
        const std::string op = "softcap";
        const py::array x = Arg::dense(op, "x", x_arg, {DType::F32}, 0);
        if (cap_arg.is_none()) return x;  // like the twin: no cap, x itself
        const float cap = Arg::number(op, "cap", cap_arg, Arg::NonZero);
        py::array_t<float> y(Arg::shape(x));
        float* out = y.mutable_data();
        const bool avx2 = Arg::avx2("softcap");
        {
          py::gil_scoped_release unlocked;
          softcap(Arg::f32(x), out, x.size(), cap, avx2);
        }
        return std::move(y);
      },
      py::arg("x"), py::arg("cap"), "cap · tanh(x / cap), any shape; cap None returns x. Twin of refpg.ops.softcap.");
  m.def(
      "softmax",
      [](const py::object& x_arg, int axis) {
        const std::string op = "softmax";
        const py::array x = Arg::dense(op, "x", x_arg, {DType::F32}, 1);
        if (axis != -1 && axis != x.ndim() - 1) fail(op, "only the last axis is supported, got axis " + std::to_string(axis));
        const int64_t cols = x.shape(x.ndim() - 1);
        if (cols == 0) fail(op, "x has shape " + shape_str(x) + ": the softmax axis is empty");
        py::array_t<float> y(Arg::shape(x));
        float* out = y.mutable_data();
        const bool avx2 = Arg::avx2("softmax");
        {
          py::gil_scoped_release unlocked;
          softmax(Arg::f32(x), out, x.size() / cols, cols, avx2);
        }
        return y;
      },
      py::arg("x"), py::arg("axis") = -1,
      "exp(x - max) / Σ exp(x - max) over the last axis of x[..., N]; rows with NaN or +inf come out NaN, as "
      "in NumPy. Twin of refpg.ops.softmax.");

  // rope and rope_ share their checks: x [B, T, H, hd] with hd even, cos and sin [B, T, hd].
  struct RopeArgs {
    py::array x, cos, sin;
    int64_t tokens, heads, hd;
    static RopeArgs parse(const std::string& op, const py::object& x_arg, const py::object& cos_arg,
                          const py::object& sin_arg) {
      RopeArgs r{Arg::array(op, "x", x_arg), Arg::array(op, "cos", cos_arg), Arg::array(op, "sin", sin_arg), 0, 0, 0};
      const auto xs = check_array(op, "x", r.x, {DType::F32}, {-1, -1, -1, -1});
      check_contiguous(op, "x", r.x);
      if (xs[3] % 2) fail(op, "x has shape " + shape_str(r.x) + ": head_dim (its last dimension) must be even");
      for (const auto& [name, a] : {std::pair{"cos", &r.cos}, {"sin", &r.sin}}) {
        check_array(op, name, *a, {DType::F32}, {xs[0], xs[1], xs[3]});
        check_contiguous(op, name, *a);
      }
      r.tokens = xs[0] * xs[1];
      r.heads = xs[2];
      r.hd = xs[3];
      return r;
    }
    void run(float* out) const {
      const float *px = Arg::f32(x), *pc = Arg::f32(cos), *ps = Arg::f32(sin);
      py::gil_scoped_release unlocked;
      rope(px, pc, ps, out, tokens, heads, hd);
    }
  };
  m.def(
      "rope",
      [](const py::object& x, const py::object& cos, const py::object& sin) {
        const RopeArgs r = RopeArgs::parse("rope", x, cos, sin);
        py::array_t<float> y(Arg::shape(r.x));
        r.run(y.mutable_data());
        return y;
      },
      py::arg("x"), py::arg("cos"), py::arg("sin"),
      "x[B, T, H, hd] * cos + rotate_half(x) * sin, cos/sin [B, T, hd] shared by the heads, rotate_half(x) = "
      "cat(-x[hd/2:], x[:hd/2]). Twin of refpg.ops.rope.");
  m.def(
      "rope_",
      [](const py::object& x, const py::object& cos, const py::object& sin) {
        const std::string op = "rope_";
        RopeArgs r = RopeArgs::parse(op, x, cos, sin);
        check_writeable(op, "x", r.x);
        const py::object shares = py::module_::import("numpy").attr("may_share_memory");
        for (const auto& [name, a] : {std::pair{"cos", &r.cos}, {"sin", &r.sin}})
          if (shares(r.x, *a).cast<bool>()) fail(op, std::string("x must not overlap ") + name);
        r.run(static_cast<float*>(r.x.mutable_data()));
        return r.x;
      },
      py::arg("x"), py::arg("cos"), py::arg("sin"), "rope, in place: rotates x (C-contiguous, writeable) and returns it.");
  m.def(
      "embedding",
      [](const py::object& table_arg, const py::object& ids_arg) {
        const std::string op = "embedding";
        const py::array table = Arg::array(op, "table", table_arg);
        const auto ts = check_array(op, "table", table, {DType::F32, DType::BF16}, {-1, -1});
        check_contiguous(op, "table", table);
        const py::array ids = Arg::dense(op, "ids", ids_arg, {DType::I64}, 0);
        const int64_t V = ts[0], D = ts[1], n = ids.size();
        const int64_t* id = static_cast<const int64_t*>(ids.data());
        for (int64_t i = 0; i < n; ++i)
          if (id[i] < 0 || id[i] >= V)
            fail(op, "ids holds " + std::to_string(id[i]) + " (flat index " + std::to_string(i) +
                         "), outside the table's rows [0, " + std::to_string(V) + ")");
        auto shape = Arg::shape(ids);
        shape.push_back(D);
        py::array_t<float> out(shape);
        float* pout = out.mutable_data();
        if (n * D > 0) {
          const void* pt = table.data();
          const bool bf16 = has_dtype(table, DType::BF16);
          py::gil_scoped_release unlocked;
          embedding(pt, bf16, D, id, n, pout);
        }
        return out;
      },
      py::arg("table"), py::arg("ids"),
      "table[V, D] (float32 or bf16 bits as uint16) rows at int64 ids (any shape) -> float32 [*ids.shape, D]; "
      "ids outside [0, V) raise ValueError. Twin of refpg.ops.embedding.");

  // ---- attention --------------------------------------------------------------------------------
  m.def(
      "attention",
      [](const py::object& q_arg, const py::object& k_arg, const py::object& v_arg, const py::object& mask_arg,
         const py::object& scale_arg, const py::object& softcap_arg) {
        const std::string op = "attention";
        const py::array q = Arg::array(op, "q", q_arg), k = Arg::array(op, "k", k_arg),
                        v = Arg::array(op, "v", v_arg);
        const std::optional<py::array> mask =
            mask_arg.is_none() ? std::nullopt : std::optional<py::array>(Arg::array(op, "mask", mask_arg));
        const auto qs = check_array(op, "q", q, {DType::F32}, {-1, -1, -1, -1});
        const int64_t B = qs[0], T = qs[1], H = qs[2], hd = qs[3];
        const auto ks = check_array(op, "k", k, {DType::F32}, {B, -1, -1, hd});
        const int64_t S = ks[1], KV = ks[2];
        check_array(op, "v", v, {DType::F32}, {B, S, KV, hd});
        if (mask) check_array(op, "mask", *mask, {DType::BOOL}, {B, T, S});
        if (S < 1) fail(op, "k and v hold no keys (S = 0)");
        if (KV < 1 || H % KV != 0)
          fail(op, "q's heads (" + std::to_string(H) + ") must be a multiple of k's kv heads (" + std::to_string(KV) + ")");
        check_inner_contiguous(op, "q", q, 2);
        check_inner_contiguous(op, "k", k, 2);
        check_inner_contiguous(op, "v", v, 2);
        if (mask) check_inner_contiguous(op, "mask", *mask, 1);
        const float scale = Arg::number(op, "scale", scale_arg);
        const float cap = softcap_arg.is_none() ? 0.0f : Arg::number(op, "logit_softcap", softcap_arg, Arg::NonZero);
        py::array_t<float> out(std::vector<py::ssize_t>{B, T, H, hd});
        const AttentionArgs args{Arg::f32(q), elem_stride(q, 0), elem_stride(q, 1),
                                 Arg::f32(k), elem_stride(k, 0), elem_stride(k, 1),
                                 Arg::f32(v), elem_stride(v, 0), elem_stride(v, 1),
                                 mask ? static_cast<const uint8_t*>(mask->data()) : nullptr,
                                 mask ? elem_stride(*mask, 0) : 0, mask ? elem_stride(*mask, 1) : 0,
                                 out.mutable_data(), B, T, S, H, KV, hd, scale, cap};
        const SimdPath path = Arg::path(op);
        {
          py::gil_scoped_release unlocked;
          attention(args, path);
        }
        return out;
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("scale"), py::arg("logit_softcap") = py::none(),
      "Fused masked attention: q [B, T, H, hd], k/v [B, S, KV, hd] (H a multiple of KV; batch and key strides "
      "free, e.g. views of a longer KV cache), mask bool [B, T, S] (True = may attend; batch and token strides "
      "free) or None (every key visible), scores (q·k)·scale, optional soft-cap, masked scores at the most negative float, softmax, "
      "weighted sum of v -> [B, T, H, hd]. Twin of refpg.ops.attention.");

  py::module_ cuda_module = m.def_submodule("cuda", "GPU kernels (csrc/cuda/) on device tensors; twins of refpg.ops");
#ifdef REFPG_WITH_CUDA
  bind_cuda(cuda_module);
#else
  cuda_module.attr("compiled") = false;
#endif
}

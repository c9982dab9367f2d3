// The GPU kernels (csrc/cuda/) and device tensors as the submodule refpg._C.cuda, twins of refpg.ops
// on data that stays on the GPU (refpg/backends/cuda.py wraps them). Compiled only when the build found nvcc
// (REFPG_WITH_CUDA); g++ compiles this file: csrc/cuda/*.h are plain C++. Every argument is checked
// here (csrc/bind.h, and Dev below for device tensors) before a kernel is queued.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::vector <-> list / tuple: shapes and strides

#include <algorithm>

#include "bind.h"
#include "cuda/activations.h"
#include "cuda/affine.h"
#include "cuda/attention.h"
#include "cuda/device_tensor.h"
#include "cuda/embedding.h"
#include "cuda/matmul.h"
#include "cuda/norms.h"
#include "cuda/rope.h"
#include "cuda/tensor.h"
#include "weight_format.h"

namespace refpg {

namespace {

using cuda::DeviceTensor;

// Argument handling for device tensors, like Arg (csrc/bind.h) for numpy arrays.
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
    for (DType d : {DType::F32, DType::BF16, DType::F16, DType::U32, DType::I64, DType::BOOL})
      if (has_dtype(a, d)) return d;
    throw py::type_error("device tensors hold float32, bfloat16 (uint16 bits), float16, uint32, int64 or bool, not " +
                         std::string(py::str(a.dtype())));
  }
  static py::dtype numpy_dtype(DType d) {
    switch (d) {
      case DType::F32: return py::dtype::of<float>();
      case DType::BF16: return py::dtype::of<uint16_t>();
      case DType::F16: return py::dtype("float16");
      case DType::U32: return py::dtype::of<uint32_t>();
      case DType::I64: return py::dtype::of<int64_t>();
      case DType::BOOL: return py::dtype::of<bool>();
    }
    return py::dtype::of<float>();
  }
  static DeviceTensor like(const DeviceTensor& t) { return DeviceTensor::empty(t.shape, DType::F32); }
  // A weight's format from its dtype, already checked to be float32 or bf16.
  static WeightFormat format(const DeviceTensor& t) {
    return t.dtype == DType::BF16 ? WeightFormat::BF16 : WeightFormat::F32;
  }
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

// The device: its errors as Python exceptions, what it is, and waiting for it.
void bind_device(py::module_& c) {
  py::register_exception<cuda::Error>(c, "CudaError", PyExc_RuntimeError);
  py::register_exception<cuda::OutOfMemory>(c, "OutOfMemory", PyExc_MemoryError);
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
}

// Device tensors: the Tensor class, allocation, transfers and copies.
void bind_tensors(py::module_& c) {

  py::class_<DeviceTensor>(c, "Tensor", "A strided view of GPU memory (refpg.backends.cuda.DeviceArray wraps it).")
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

}

// An MLX affine matrix of `cols` columns on the device: codes uint32 [rows, cols·bits/32], scales and
// biases [rows, cols/group_size] of one dtype (float32, bf16 bits, float16), all contiguous.
AffineWeight affine_arg(const std::string& op, const py::object& codes_arg, const py::object& scales_arg,
                        const py::object& biases_arg, const py::object& bits_arg, const py::object& group_arg,
                        int64_t cols) {
  const int bits = Arg::affine_bits(op, bits_arg);
  const int group_size = Arg::affine_group_size(op, group_arg, cols);
  const DeviceTensor& codes = Dev::dense(op, "codes", codes_arg, 2, DType::U32);
  const int64_t rows = Dev::check(op, "codes", codes, {DType::U32}, {-1, cols * bits / 32})[0];
  const DeviceTensor& scales = Dev::tensor(op, "scales", scales_arg);
  const DeviceTensor& biases = Dev::tensor(op, "biases", biases_arg);
  Dev::check(op, "scales", scales, {DType::F32, DType::BF16, DType::F16}, {rows, cols / group_size});
  Dev::check(op, "biases", biases, {scales.dtype}, {rows, cols / group_size});
  if (!scales.contiguous() || !biases.contiguous()) fail(op, "scales and biases must be contiguous");
  const WeightFormat f = scales.dtype == DType::F16 ? WeightFormat::F16 : Dev::format(scales);
  return AffineWeight{codes.as<uint32_t>(), scales.data(), biases.data(), f, bits, group_size};
}

// The ops, twins of refpg.ops (the Python side, refpg/backends/cuda.py, handles numpy inputs).
void bind_ops(py::module_& c) {
  c.def("linear_affine", [](const py::object& x_arg, const py::object& codes, const py::object& scales,
                            const py::object& biases, const py::object& bits, const py::object& group_size,
                            const py::object& b_arg) {
    const std::string op = "linear_affine";
    const DeviceTensor& x = Dev::tensor(op, "x", x_arg);
    const auto xs = Dev::check(op, "x", x, {DType::F32}, {-1, -1});
    if (!x.inner_contiguous(1) || (xs[0] > 1 && x.strides[0] < xs[1])) fail(op, "x rows must be packed and not overlap");
    const AffineWeight w = affine_arg(op, codes, scales, biases, bits, group_size, xs[1]);
    const int64_t M = xs[0], K = xs[1], N = Dev::tensor(op, "codes", codes).shape[0];
    Dev::launchable(op, (N + 7) / 8);
    const DeviceTensor* b = b_arg.is_none() ? nullptr : &Dev::vec(op, "bias", b_arg, N);
    DeviceTensor y = DeviceTensor::empty({M, N}, DType::F32);
    cuda::linear_affine({x.as<float>(), x.strides[0], nullptr, WeightFormat::Affine, b ? b->as<float>() : nullptr,
                         y.as<float>(), N, M, N, K}, w);
    return y;
  }, py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("biases"), py::arg("bits"), py::arg("group_size"),
     py::arg("bias") = py::none(), "x[M, K] @ W.T (+ bias), W [N, K] in MLX's affine quantization");
  c.def("embedding_affine", [](const py::object& codes_arg, const py::object& scales, const py::object& biases,
                               const py::object& bits_arg, const py::object& group_size, const py::object& ids_arg) {
    const std::string op = "embedding_affine";
    const DeviceTensor& codes = Dev::dense(op, "codes", codes_arg, 2, DType::U32);
    const int64_t D = codes.shape[1] * 32 / Arg::affine_bits(op, bits_arg);
    const AffineWeight w = affine_arg(op, codes_arg, scales, biases, bits_arg, group_size, D);
    const DeviceTensor ids = Dev::ids(op, ids_arg, codes.shape[0]);
    std::vector<int64_t> shape = ids.shape;
    shape.push_back(D);
    DeviceTensor out = DeviceTensor::empty(shape, DType::F32);
    cuda::embedding_affine(w, D, ids.as<int64_t>(), ids.numel(), out.as<float>());
    return out;
  }, py::arg("codes"), py::arg("scales"), py::arg("biases"), py::arg("bits"), py::arg("group_size"), py::arg("ids"),
     "the exact float32 rows at host int64 ids (checked, then uploaded) of a table in MLX's affine quantization");
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
    cuda::linear({x.as<float>(), x.strides[0], w.data(), Dev::format(w), b ? b->as<float>() : nullptr,
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
    cuda::embedding(table.data(), Dev::format(table), ts[1], ids.as<int64_t>(), ids.numel(), out.as<float>());
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

void bind_cuda(py::module_& c) {
  c.attr("compiled") = true;
  bind_device(c);
  bind_tensors(c);
  bind_ops(c);
}

}  // namespace refpg

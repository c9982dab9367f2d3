// The one binding file: every kernel is exposed here, and every argument is validated here
// (csrc/check.h) before a kernel touches memory. Kernels live one op per file pair in csrc/cpu/.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "check.h"
#include "cpu/activations.h"
#include "cpu/attention.h"
#include "cpu/cpu_features.h"
#include "cpu/embedding.h"
#include "cpu/matmul.h"
#include "cpu/norms.h"
#include "cpu/rope.h"
#include "cpu/threadpool.h"

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
  // A soft-cap: a finite, nonzero number.
  static float cap(const std::string& op, const char* name, const py::object& o) {
    double c = 0.0;
    try {
      c = o.cast<double>();
    } catch (const py::cast_error&) {
      fail(op, std::string(name) + " must be a number or None, got " + std::string(py::str(py::type::handle_of(o))));
    }
    if (!std::isfinite(c) || c == 0.0) fail(op, std::string(name) + " must be finite and nonzero");
    return static_cast<float>(c);
  }
  // The AVX2+FMA kernels when this CPU has them and REFPG_SIMD does not ask for scalar.
  static bool avx2() {
    const CpuFeatures& f = cpu_features();
    return f.avx2 && f.fma && simd_path() != SimdPath::Scalar;
  }
};

PYBIND11_MODULE(_C, m) {
  m.doc() = "refpg native CPU kernels; each has a NumPy twin in refpg.ops";
  m.def("cpu_features", []() {
    const auto& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bf16"] = f.avx512bf16;
    return d;
  }, "SIMD features of this CPU, detected at run time (CPUID + XGETBV).");
  m.def("num_threads", &num_threads, "threads the kernels use");
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "set the kernels' thread count (n <= 0: the number of available cores)");

  // ---- matmul / linear ------------------------------------------------------------------------
  m.def("simd_path", [] { return std::string(simd_path_name(simd_path())); },
        "instruction set linear runs with: REFPG_SIMD (avx512 | avx2 | scalar) or the best of this CPU");
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
        const SimdPath path = simd_path();
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
      [](const py::object& x_arg, const py::object& weight_arg, float eps) {
        const std::string op = "rms_norm";
        const py::array x = Arg::dense(op, "x", x_arg, {DType::F32}, 1);
        const int64_t D = x.shape(x.ndim() - 1), rows = D ? x.size() / D : 0;
        const py::array weight = Arg::vec(op, "weight", weight_arg, D);
        py::array_t<float> y(Arg::shape(x));
        float* out = y.mutable_data();
        const bool avx2 = Arg::avx2();
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
      [](const py::object& x_arg, const py::object& weight_arg, const py::object& bias_arg, float eps) {
        const std::string op = "layer_norm";
        const py::array x = Arg::dense(op, "x", x_arg, {DType::F32}, 1);
        const int64_t D = x.shape(x.ndim() - 1), rows = D ? x.size() / D : 0;
        const py::array weight = Arg::vec(op, "weight", weight_arg, D), bias = Arg::vec(op, "bias", bias_arg, D);
        py::array_t<float> y(Arg::shape(x));
        float* out = y.mutable_data();
        const bool avx2 = Arg::avx2();
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
        const bool avx2 = Arg::avx2();
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
        const bool avx2 = Arg::avx2();
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
        const float cap = Arg::cap(op, "cap", cap_arg);
        py::array_t<float> y(Arg::shape(x));
        float* out = y.mutable_data();
        const bool avx2 = Arg::avx2();
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
        const bool avx2 = Arg::avx2();
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
         float scale, const py::object& softcap_arg) {
        const std::string op = "attention";
        const py::array q = Arg::array(op, "q", q_arg), k = Arg::array(op, "k", k_arg),
                        v = Arg::array(op, "v", v_arg), mask = Arg::array(op, "mask", mask_arg);
        const auto qs = check_array(op, "q", q, {DType::F32}, {-1, -1, -1, -1});
        const int64_t B = qs[0], T = qs[1], H = qs[2], hd = qs[3];
        const auto ks = check_array(op, "k", k, {DType::F32}, {B, -1, -1, hd});
        const int64_t S = ks[1], KV = ks[2];
        check_array(op, "v", v, {DType::F32}, {B, S, KV, hd});
        check_array(op, "mask", mask, {DType::BOOL}, {B, T, S});
        if (S < 1) fail(op, "k and v hold no keys (S = 0)");
        if (KV < 1 || H % KV != 0)
          fail(op, "q's heads (" + std::to_string(H) + ") must be a multiple of k's kv heads (" + std::to_string(KV) + ")");
        check_inner_contiguous(op, "q", q, 2);
        check_inner_contiguous(op, "k", k, 2);
        check_inner_contiguous(op, "v", v, 2);
        check_inner_contiguous(op, "mask", mask, 1);
        const float cap = softcap_arg.is_none() ? 0.0f : Arg::cap(op, "logit_softcap", softcap_arg);
        py::array_t<float> out(std::vector<py::ssize_t>{B, T, H, hd});
        const AttentionArgs args{Arg::f32(q), elem_stride(q, 0), elem_stride(q, 1),
                                 Arg::f32(k), elem_stride(k, 0), elem_stride(k, 1),
                                 Arg::f32(v), elem_stride(v, 0), elem_stride(v, 1),
                                 static_cast<const uint8_t*>(mask.data()), elem_stride(mask, 0), elem_stride(mask, 1),
                                 out.mutable_data(), B, T, S, H, KV, hd, scale, cap};
        const bool avx2 = Arg::avx2();
        {
          py::gil_scoped_release unlocked;
          attention(args, avx2);
        }
        return out;
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("scale"), py::arg("logit_softcap") = py::none(),
      "Fused masked attention: q [B, T, H, hd], k/v [B, S, KV, hd] (H a multiple of KV; batch and key strides "
      "free, e.g. views of a longer KV cache), mask bool [B, T, S] (True = may attend; batch and token strides "
      "free), scores (q·k)·scale, optional soft-cap, masked scores at the most negative float, softmax, "
      "weighted sum of v -> [B, T, H, hd]. Twin of refpg.ops.attention.");
}

// The CPU kernels (csrc/cpu/) as functions of refpg._C, twins of refpg.ops. Each binding validates
// its arguments (csrc/bind.h), reads the current SIMD path once, and runs the kernel without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <optional>

#include "bind.h"
#include "cpu/activations.h"
#include "cpu/affine.h"
#include "cpu/attention.h"
#include "cpu/cpu_features.h"
#include "cpu/embedding.h"
#include "cpu/matmul.h"
#include "cpu/norms.h"
#include "cpu/peak.h"
#include "cpu/rope.h"
#include "cpu/simd.h"
#include "cpu/threadpool.h"

namespace refpg {

namespace {

// The end of every op binding, once its arguments are checked: the current path, then
// kernel(path) without the GIL.
template <class Kernel>
void run(const std::string& op, Kernel kernel) {
  const SimdPath path = Arg::path(op);
  py::gil_scoped_release unlocked;
  kernel(path);
}

// The same for an op writing a new float32 array of `shape`: kernel(y, path).
template <class Kernel>
py::array_t<float> run_into_new(const std::string& op, const std::vector<py::ssize_t>& shape, Kernel kernel) {
  py::array_t<float> y(shape);
  float* out = y.mutable_data();
  run(op, [&](SimdPath path) { kernel(out, path); });
  return y;
}

// The x of a row op (the norms): C-contiguous float32 [..., D], `rows` rows of D.
struct Rows {
  py::array x;
  int64_t D, rows;
  Rows(const std::string& op, const py::object& x_arg)
      : x(Arg::dense(op, "x", x_arg, {DType::F32}, 1)), D(x.shape(x.ndim() - 1)), rows(D ? x.size() / D : 0) {}
};

// An embedding's ids (int64, dense) as a pointer, once each is checked to be a row of a V-row table.
const int64_t* checked_ids(const std::string& op, const py::array& ids, int64_t V) {
  const int64_t* id = static_cast<const int64_t*>(ids.data());
  for (int64_t i = 0; i < ids.size(); ++i)
    if (id[i] < 0 || id[i] >= V)
      fail(op, "ids holds " + std::to_string(id[i]) + " (flat index " + std::to_string(i) +
                   "), outside the table's rows [0, " + std::to_string(V) + ")");
  return id;
}

void bind_simd(py::module_& m) {
  m.def("cpu_features", []() {
    const auto& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bf16"] = f.avx512bf16;
    d["avx512vnni"] = f.avx512vnni;
    d["avx512vbmi"] = f.avx512vbmi;
    d["amx_bf16"] = f.amx_bf16;
    return d;
  }, "SIMD features of this CPU, detected at run time (CPUID + XGETBV).");
  m.def("simd_path", [] {
          try {
            return std::string(simd_path_name(simd_path()));
          } catch (const std::exception& e) {
            throw py::value_error(e.what());  // REFPG_SIMD's own message: no op to name
          }
        },
        "the instruction set the kernels run with (amx | avx512 | avx2 | scalar): the last set_simd_path, "
        "else REFPG_SIMD, read once, or the best of this CPU");
  m.def("set_simd_path", [](const std::string& name) {
          try {
            set_simd_path(name, "name");
          } catch (const std::exception& e) {
            fail("set_simd_path", e.what());
          }
        },
        py::arg("name"),
        "make every kernel called from now on run with `name` (amx, avx512, avx2, scalar, or auto: the best "
        "of this CPU); ValueError for another name or a path this CPU lacks");
}

void bind_threads(py::module_& m) {
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
}

void bind_peak(py::module_& m) {
  m.def(
      "fma_peak",
      [](const py::object& seconds_arg) {
        const float seconds = Arg::number("fma_peak", "seconds", seconds_arg, Arg::NonNegative);
        if (seconds > 60.0f) fail("fma_peak", "seconds must be at most 60");
        double flops = 0.0;
        run("fma_peak", [&](SimdPath path) { flops = fma_peak(seconds, path); });
        return flops;
      },
      py::arg("seconds") = 0.2,
      "FLOP/s of independent register FMAs on every thread, with the current path's widest vectors (tools/bench.py's "
      "prefill peak)");
}

void bind_linear(py::module_& m) {
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
        const LinearArgs args{Arg::f32(x), elem_stride(x, 0), weight.data(), Arg::format(weight),
                              bias ? Arg::f32(*bias) : nullptr, static_cast<float*>(out.mutable_data()),
                              elem_stride(out, 0), M, N, K};
        run(op, [&](SimdPath path) { linear(args, path); });
        return std::move(out);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("out") = py::none(),
      "y[M, N] = x[M, K] @ weight[N, K].T (+ bias[N]); weight float32 or bf16 bits (uint16), fp32 "
      "accumulation; writes into `out` when given. Twin of refpg.ops.linear.");
}

// An MLX affine matrix [rows, cols]: codes [rows, cols·bits/32] uint32, scales and biases
// [rows, cols/group_size] of one dtype (float32, bf16 bits as uint16, float16), all C-contiguous.
AffineWeight affine_arg(const std::string& op, const py::array& codes, const py::array& scales,
                        const py::array& biases, const py::object& bits_arg, const py::object& group_arg,
                        int64_t cols) {
  const int bits = Arg::affine_bits(op, bits_arg);
  const int group_size = Arg::affine_group_size(op, group_arg, cols);
  const int64_t rows = check_array(op, "codes", codes, {DType::U32}, {-1, cols * bits / 32})[0];
  check_contiguous(op, "codes", codes);
  check_array(op, "scales", scales, {DType::F32, DType::BF16, DType::F16}, {rows, cols / group_size});
  check_contiguous(op, "scales", scales);
  check_array(op, "biases", biases, {DType::F32, DType::BF16, DType::F16}, {rows, cols / group_size});
  check_contiguous(op, "biases", biases);
  if (!scales.dtype().is(biases.dtype())) fail(op, "biases must have the dtype of scales");
  const WeightFormat f = has_dtype(scales, DType::F16) ? WeightFormat::F16 : Arg::format(scales);
  return AffineWeight{static_cast<const uint32_t*>(codes.data()), scales.data(), biases.data(), f, bits, group_size};
}

void bind_affine(py::module_& m) {
  m.def(
      "linear_affine",
      [](const py::object& x_arg, const py::object& codes_arg, const py::object& scales_arg,
         const py::object& biases_arg, const py::object& bits, const py::object& group_size,
         const py::object& bias_arg) {
        const std::string op = "linear_affine";
        const py::array x = Arg::array(op, "x", x_arg);
        const auto xs = check_array(op, "x", x, {DType::F32}, {-1, -1});
        check_inner_contiguous(op, "x", x, 1);
        const int64_t M = xs[0], K = xs[1];
        const py::array codes = Arg::array(op, "codes", codes_arg), scales = Arg::array(op, "scales", scales_arg),
                        biases = Arg::array(op, "biases", biases_arg);
        const AffineWeight w = affine_arg(op, codes, scales, biases, bits, group_size, K);
        const int64_t N = codes.shape(0);
        std::optional<py::array> bias;
        if (!bias_arg.is_none()) bias = Arg::vec(op, "bias", bias_arg, N);
        const float* pb = bias ? Arg::f32(*bias) : nullptr;
        return run_into_new(op, {M, N}, [&](float* y, SimdPath path) {
          linear_affine(LinearArgs{Arg::f32(x), elem_stride(x, 0), nullptr, WeightFormat::Affine, pb, y, N, M, N, K},
                        w, path);
        });
      },
      py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("biases"), py::arg("bits"), py::arg("group_size"),
      py::arg("bias") = py::none(),
      "y[M, N] = x[M, K] @ W.T (+ bias[N]), W [N, K] in MLX's affine quantization (codes uint32 "
      "[N, K·bits/32], scales and biases [N, K/group_size] float32, bf16 bits or float16). Twin of "
      "refpg.ops.linear on an AFFINE refpg.formats.Matrix.");
  m.def(
      "embedding_affine",
      [](const py::object& codes_arg, const py::object& scales_arg, const py::object& biases_arg,
         const py::object& bits, const py::object& group_size, const py::object& ids_arg) {
        const std::string op = "embedding_affine";
        const py::array codes = Arg::array(op, "codes", codes_arg), scales = Arg::array(op, "scales", scales_arg),
                        biases = Arg::array(op, "biases", biases_arg);
        check_array(op, "codes", codes, {DType::U32}, {-1, -1});
        const int64_t D = codes.shape(1) * 32 / Arg::affine_bits(op, bits);
        const AffineWeight w = affine_arg(op, codes, scales, biases, bits, group_size, D);
        const py::array ids = Arg::dense(op, "ids", ids_arg, {DType::I64}, 0);
        const int64_t V = codes.shape(0), n = ids.size();
        const int64_t* id = checked_ids(op, ids, V);
        auto shape = Arg::shape(ids);
        shape.push_back(D);
        return run_into_new(op, shape, [&](float* out, SimdPath path) {
          if (n * D > 0) embedding_affine(w, D, id, n, out, path);
        });
      },
      py::arg("codes"), py::arg("scales"), py::arg("biases"), py::arg("bits"), py::arg("group_size"), py::arg("ids"),
      "the exact float32 rows at int64 ids of a table in MLX's affine quantization -> [*ids.shape, D]. Twin of "
      "refpg.ops.embedding on an AFFINE refpg.formats.Matrix.");
}

void bind_norms(py::module_& m) {
  m.def(
      "rms_norm",
      [](const py::object& x_arg, const py::object& weight_arg, const py::object& eps_arg) {
        const std::string op = "rms_norm";
        const Rows x(op, x_arg);
        const py::array weight = Arg::vec(op, "weight", weight_arg, x.D);
        const float eps = Arg::number(op, "eps", eps_arg, Arg::NonNegative);
        const float *px = Arg::f32(x.x), *pw = Arg::f32(weight);
        return run_into_new(op, Arg::shape(x.x), [&](float* y, SimdPath path) {
          rms_norm(px, pw, y, x.rows, x.D, eps, path);
        });
      },
      py::arg("x"), py::arg("weight"), py::arg("eps"),
      "x[..., D] / sqrt(mean(x²) + eps) * (1 + weight[D]); statistics in double. Twin of refpg.ops.rms_norm.");
  m.def(
      "layer_norm",
      [](const py::object& x_arg, const py::object& weight_arg, const py::object& bias_arg, const py::object& eps_arg) {
        const std::string op = "layer_norm";
        const Rows x(op, x_arg);
        const py::array weight = Arg::vec(op, "weight", weight_arg, x.D), bias = Arg::vec(op, "bias", bias_arg, x.D);
        const float eps = Arg::number(op, "eps", eps_arg, Arg::NonNegative);
        const float *px = Arg::f32(x.x), *pw = Arg::f32(weight), *pb = Arg::f32(bias);
        return run_into_new(op, Arg::shape(x.x), [&](float* y, SimdPath path) {
          layer_norm(px, pw, pb, y, x.rows, x.D, eps, path);
        });
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
      "(x - mean) / sqrt(var + eps) * weight + bias over the last axis of x[..., D] (two-pass variance, "
      "statistics in double). Twin of refpg.ops.layer_norm.");
}

void bind_activations(py::module_& m) {
  m.def(
      "gelu_tanh",
      [](const py::object& x_arg) {
        const std::string op = "gelu_tanh";
        const py::array x = Arg::dense(op, "x", x_arg, {DType::F32}, 0);
        const float* px = Arg::f32(x);
        const int64_t n = x.size();
        return run_into_new(op, Arg::shape(x), [&](float* y, SimdPath path) { gelu_tanh(px, y, n, path); });
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
        const float *pg = Arg::f32(gate), *pu = Arg::f32(up);
        const int64_t n = gate.size();
        return run_into_new(op, Arg::shape(gate), [&](float* y, SimdPath path) { geglu(pg, pu, y, n, path); });
      },
      py::arg("gate"), py::arg("up"), "gelu_tanh(gate) * up, same shapes. Twin of refpg.ops.geglu.");
  m.def(
      "softcap",
      [](const py::object& x_arg, const py::object& cap_arg) -> py::object {
        const std::string op = "softcap";
        const py::array x = Arg::dense(op, "x", x_arg, {DType::F32}, 0);
        if (cap_arg.is_none()) return x;  // like the twin: no cap, x itself
        const float cap = Arg::number(op, "cap", cap_arg, Arg::NonZero);
        const float* px = Arg::f32(x);
        const int64_t n = x.size();
        return run_into_new(op, Arg::shape(x), [&](float* y, SimdPath path) { softcap(px, y, n, cap, path); });
      },
      py::arg("x"), py::arg("cap"), "cap · tanh(x / cap), any shape; cap None returns x. Twin of refpg.ops.softcap.");
}

void bind_rope_embedding(py::module_& m) {
  m.def(
      "rope",
      [](const py::object& x_arg, const py::object& cos_arg, const py::object& sin_arg) {
        const std::string op = "rope";
        const py::array x = Arg::array(op, "x", x_arg), cos = Arg::array(op, "cos", cos_arg),
                        sin = Arg::array(op, "sin", sin_arg);
        const auto xs = check_array(op, "x", x, {DType::F32}, {-1, -1, -1, -1});
        check_contiguous(op, "x", x);
        if (xs[3] % 2) fail(op, "x has shape " + shape_str(x) + ": head_dim (its last dimension) must be even");
        for (const auto& [name, a] : {std::pair{"cos", &cos}, {"sin", &sin}}) {
          check_array(op, name, *a, {DType::F32}, {xs[0], xs[1], xs[3]});
          check_contiguous(op, name, *a);
        }
        const float *px = Arg::f32(x), *pc = Arg::f32(cos), *ps = Arg::f32(sin);
        return run_into_new(op, Arg::shape(x), [&](float* y, SimdPath path) {
          rope(px, pc, ps, y, xs[0] * xs[1], xs[2], xs[3], path);
        });
      },
      py::arg("x"), py::arg("cos"), py::arg("sin"),
      "x[B, T, H, hd] * cos + rotate_half(x) * sin, cos/sin [B, T, hd] shared by the heads, rotate_half(x) = "
      "cat(-x[hd/2:], x[:hd/2]). Twin of refpg.ops.rope.");
  m.def(
      "embedding",
      [](const py::object& table_arg, const py::object& ids_arg) {
        const std::string op = "embedding";
        const py::array table = Arg::array(op, "table", table_arg);
        const auto ts = check_array(op, "table", table, {DType::F32, DType::BF16}, {-1, -1});
        check_contiguous(op, "table", table);
        const py::array ids = Arg::dense(op, "ids", ids_arg, {DType::I64}, 0);
        const int64_t V = ts[0], D = ts[1], n = ids.size();
        const int64_t* id = checked_ids(op, ids, V);
        auto shape = Arg::shape(ids);
        shape.push_back(D);
        const void* rows = table.data();
        const WeightFormat format = Arg::format(table);
        return run_into_new(op, shape, [&](float* out, SimdPath path) {
          if (n * D > 0) embedding(rows, format, D, id, n, out, path);
        });
      },
      py::arg("table"), py::arg("ids"),
      "table[V, D] (float32 or bf16 bits as uint16) rows at int64 ids (any shape) -> float32 [*ids.shape, D]; "
      "ids outside [0, V) raise ValueError. Twin of refpg.ops.embedding.");
}

void bind_attention(py::module_& m) {
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
        run(op, [&](SimdPath path) { attention(args, path); });
        return out;
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("scale"), py::arg("logit_softcap") = py::none(),
      "Fused masked attention: q [B, T, H, hd], k/v [B, S, KV, hd] (H a multiple of KV; batch and key strides "
      "free, e.g. views of a longer KV cache), mask bool [B, T, S] (True = may attend; batch and token strides "
      "free) or None (every key visible), scores (q·k)·scale, optional soft-cap, masked scores at the most negative float, softmax, "
      "weighted sum of v -> [B, T, H, hd]. Twin of refpg.ops.attention.");
}

}  // namespace

void bind_cpu(py::module_& m) {
#ifdef REFPG_SANITIZED
  m.attr("sanitized") = true;  // built with -DREFPG_SANITIZE=ON (tools/sanitize.sh)
#else
  m.attr("sanitized") = false;
#endif
  bind_simd(m);
  bind_threads(m);
  bind_linear(m);
  bind_affine(m);
  bind_peak(m);
  bind_norms(m);
  bind_activations(m);
  bind_rope_embedding(m);
  bind_attention(m);
}

}  // namespace refpg

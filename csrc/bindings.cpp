// The one binding file: every kernel is exposed here, and every argument is validated here
// (csrc/check.h) before a kernel touches memory. Kernels live one op per file pair in csrc/cpu/.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "check.h"
#include "cpu/cpu_features.h"
#include "cpu/threadpool.h"

namespace py = pybind11;
using namespace refpg;

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

  // ---- norms, activations, rope, softmax, embedding --------------------------------------------

  // ---- attention --------------------------------------------------------------------------------
}

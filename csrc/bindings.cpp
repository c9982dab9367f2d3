// The one binding file: every kernel is exposed here, and every argument is validated here
// before a kernel touches memory.
#include <pybind11/pybind11.h>

#include "cpu/cpu_features.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "refpg native kernels";
  m.def("cpu_features", []() {
    const auto& f = refpg::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bf16"] = f.avx512bf16;
    return d;
  }, "SIMD features of this CPU, detected at run time (CPUID + XGETBV).");
}

// The module refpg._C: the CPU kernels (csrc/bind_cpu.cpp) and the submodule _C.cuda, which holds the
// GPU kernels (csrc/bind_cuda.cpp) when the build found nvcc and says `compiled = False` otherwise.
#include "bind.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "refpg native CPU kernels; each has a NumPy twin in refpg.ops";
  refpg::bind_cpu(m);
  pybind11::module_ cuda = m.def_submodule("cuda", "GPU kernels (csrc/cuda/) on device tensors; twins of refpg.ops");
#ifdef REFPG_WITH_CUDA
  refpg::bind_cuda(cuda);
#else
  cuda.attr("compiled") = false;
#endif
}

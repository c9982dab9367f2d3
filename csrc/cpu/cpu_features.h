// Run-time CPU feature detection: kernels pick their SIMD path from this, never from
// compile-time flags, so one binary runs on any x86-64 CPU.
#pragma once
#include <string>

namespace refpg {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512bf16 = false;
  bool avx512vnni = false;  // with AVX-512 BW: the quantized GEMV's integer dot products (affine.cpp)
  bool avx512vbmi = false;  // with AVX-512 BW: its byte permutes, unpacking 2/3/5/6-bit codes
  // AMX tiles with bf16 products (and AVX-512 BF16 + BW beside them), usable: the OS saves tile
  // state and granted this process its use
  // (Linux arch_prctl ARCH_REQ_XCOMP_PERM, asked once, when the features are first read).
  bool amx_bf16 = false;
};

const CpuFeatures& cpu_features();

}  // namespace refpg

// linear's prefill GEMM on Intel AMX (bf16 tiles), at float32 accuracy. See matmul_amx.cpp.
#pragma once
#include "cpu/matmul.h"

namespace refpg {

// y = x @ W.T (+ b) for any M, N and K >= 1 (linear handles K = 0), close to float32 (NMSE ~1e-11 against float64, where float32
// FMA chains give ~1e-13). Returns false, y then unspecified, when x or W holds an inf or NaN (or,
// in float32, a value beyond the bf16 range): the caller then runs the float32 FMA path, so such
// values propagate exactly as there. Needs AMX-BF16, AVX-512 BF16 + BW and the OS permission for
// tile data (cpu_features().amx_bf16). Runs on the threadpool; call without the GIL.
bool linear_amx(const LinearArgs& args);

}  // namespace refpg

// The FMA peak of this CPU as the kernels can reach it: every thread of the pool runs independent
// chains of fused multiply-adds on registers (no memory traffic) with the current SimdPath's widest
// vectors (AVX-512 for Avx512 and Amx, AVX2 for Avx2, scalar FMAs for Scalar). tools/bench.py divides
// the prefill's matmul FLOPs by it. AMX tile throughput is not measured here.
#pragma once
#include <cstdint>

#include "cpu/simd.h"

namespace refpg {

// FLOP/s (a fused multiply-add counts 2) over about `seconds` of running, all threads. Call without the GIL.
double fma_peak(double seconds, SimdPath path);

}  // namespace refpg

#include "cpu/cpu_features.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace refpg {

namespace {

// Linux enables tile data (8 KB of state per thread) only for processes that ask for it.
bool amx_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  if (!osxsave) return f;
  unsigned xcr0_lo, xcr0_hi;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_state = (xcr0_lo & 0x6) == 0x6;    // SSE + AVX registers saved by the OS
  const bool zmm_state = (xcr0_lo & 0xe6) == 0xe6;  // plus opmask and upper ZMM
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = ymm_state && (b & (1u << 5));
  f.fma = f.fma && ymm_state;
  f.avx512f = zmm_state && (b & (1u << 16));
  const bool avx512bw = f.avx512f && (b & (1u << 30));        // the AMX path's packing uses it
  f.avx512vnni = avx512bw && (c & (1u << 11));
  f.avx512vbmi = avx512bw && (c & (1u << 1));
  const bool amx_cpu = (d & (1u << 22)) && (d & (1u << 24));  // AMX-BF16, AMX-TILE
  const bool tile_state = (xcr0_lo & 0x60000) == 0x60000;     // XTILECFG + XTILEDATA
  if (f.avx512f && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512bf16 = a & (1u << 5);
  f.amx_bf16 = f.avx512bf16 && avx512bw && amx_cpu && tile_state && amx_permitted();
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

}  // namespace refpg

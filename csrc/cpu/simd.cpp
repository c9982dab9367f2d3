// The current SIMD path: see simd.h.
#include "cpu/simd.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "cpu/cpu_features.h"

namespace refpg {

namespace {

constexpr int kUnchosen = -1;
std::atomic<int> current{kUnchosen};  // a SimdPath, or kUnchosen before the first use

// `name` as a path this CPU can run; `what` names where the name came from, in the messages.
SimdPath parse(const std::string& name, const std::string& what) {
  const CpuFeatures& f = cpu_features();
  const bool avx2 = f.avx2 && f.fma;
  // Every vector path uses AVX2 + FMA too (packing, and the kernels of the other ops).
  if (name == "auto")
    return !avx2 ? SimdPath::Scalar : f.amx_bf16 ? SimdPath::Amx : f.avx512f ? SimdPath::Avx512 : SimdPath::Avx2;
  if (name == "scalar") return SimdPath::Scalar;
  if (name == "avx2") {
    if (!avx2) throw std::invalid_argument(what + "=avx2, but this CPU lacks AVX2 or FMA");
    return SimdPath::Avx2;
  }
  if (name == "avx512") {
    if (!f.avx512f || !avx2) throw std::invalid_argument(what + "=avx512, but this CPU lacks AVX-512F (or AVX2 + FMA)");
    return SimdPath::Avx512;
  }
  if (name == "amx") {
    if (!f.amx_bf16 || !avx2)
      throw std::invalid_argument(what + "=amx, but this CPU (or its OS) offers no AMX-BF16 with AVX-512 BF16");
    return SimdPath::Amx;
  }
  throw std::invalid_argument(what + " must be amx, avx512, avx2, scalar or auto, got '" + name + "'");
}

// REFPG_SIMD, read once: the path it names, or the message saying why it names none.
struct EnvChoice {
  SimdPath path = SimdPath::Scalar;
  std::string error;
};

EnvChoice from_env() {
  const char* env = std::getenv("REFPG_SIMD");
  EnvChoice choice;
  try {
    choice.path = parse(env && *env ? env : "auto", "REFPG_SIMD");  // empty: as unset
  } catch (const std::invalid_argument& e) {
    choice.error = e.what();
  }
  return choice;
}

}  // namespace

SimdPath simd_path() {
  const int path = current.load(std::memory_order_acquire);
  if (path != kUnchosen) return static_cast<SimdPath>(path);
  static const EnvChoice env = from_env();  // thread-safe, once per process
  if (!env.error.empty()) throw std::invalid_argument(env.error);
  int expected = kUnchosen;  // a set_simd_path meanwhile wins
  current.compare_exchange_strong(expected, static_cast<int>(env.path), std::memory_order_acq_rel);
  return static_cast<SimdPath>(current.load(std::memory_order_acquire));
}

void set_simd_path(const std::string& name, const std::string& what) {
  current.store(static_cast<int>(parse(name, what)), std::memory_order_release);
}

const char* simd_path_name(SimdPath path) {
  switch (path) {
    case SimdPath::Scalar: return "scalar";
    case SimdPath::Avx2: return "avx2";
    case SimdPath::Avx512: return "avx512";
    case SimdPath::Amx: return "amx";
  }
  return "?";
}

}  // namespace refpg

// The instruction-set choice of isa.h: detected once, overridable with set_isa().
#include "cpu/isa.h"

#include <atomic>
#include <stdexcept>

namespace loom {
namespace {

// What this build compiled: LOOM_DISPATCH (x86-64, portable) adds the AVX2 / AVX-512 kernels.
#if defined(LOOM_NATIVE_BUILD)
constexpr Isa kBase = Isa::kNative;
#else
constexpr Isa kBase = Isa::kScalar;
#endif

bool cpu_runs(Isa isa) {
  if (isa == kBase) return true;
#if defined(LOOM_DISPATCH)
  // The same features the cpu/isa/ files are compiled with (CMakeLists.txt). libgcc's checks
  // include the OS's support for saving the wider registers (XCR0).
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("popcnt");
  if (isa == Isa::kAvx2) return avx2;
  if (isa == Isa::kAvx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512cd");
#endif
  return false;
}

Isa best_isa() {
  static const Isa best = supported_isas().back();
  return best;
}

std::atomic<int> g_forced{-1};  // -1: the best the CPU runs

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kNative: return "native";
  }
  return "?";
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kNative})
    if (cpu_runs(isa)) out.push_back(isa);
  return out;
}

Isa active_isa() {
  const int forced = g_forced.load(std::memory_order_relaxed);
  return forced < 0 ? best_isa() : static_cast<Isa>(forced);
}

void set_isa(const std::string& name) {
  std::string have;
  for (Isa isa : supported_isas()) have += (have.empty() ? "" : ", ") + std::string(isa_name(isa));
  if (name == "auto") {
    g_forced.store(-1);
    return;
  }
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kNative}) {
    if (name != isa_name(isa)) continue;
    if (!cpu_runs(isa))
      throw std::invalid_argument("CPU instruction set '" + name + "' is not available: this build and CPU run " +
                                  have + (isa == Isa::kNative || kBase == Isa::kNative
                                              ? " (LOOM_NATIVE=ON builds only 'native', portable builds never)"
                                              : ""));
    g_forced.store(static_cast<int>(isa));
    return;
  }
  throw std::invalid_argument("CPU instruction set must be auto, scalar, avx2, avx512 or native, got '" + name +
                              "' (this build and CPU run " + have + ")");
}

}  // namespace loom

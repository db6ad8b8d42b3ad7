// Run-time choice of the instruction set for the CPU kernels (lap_cpu.cpp, philox_cpu.cpp).
//
// A portable build (the default) compiles each kernel source three times: as plain C++ for the
// architecture's baseline (SSE2 on x86-64), and, on x86-64 only, again from the small files in
// cpu/isa/ with AVX2 + FMA and with AVX-512 enabled. Each build's kernels live in their own
// namespace (LOOM_ISA_NS below), and the driver of each solver picks one at every call from
// active_isa(): the best the CPU supports, unless set_isa() forced another. A LOOM_NATIVE=ON
// build (-march=native) compiles the baseline only, for the build machine, and reports "native".
#pragma once
#include <string>
#include <vector>

namespace loom {
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kNative = 3 };

const char* isa_name(Isa isa);
std::vector<Isa> supported_isas();  // the paths this build has and this CPU runs, best last
Isa active_isa();                   // the path the kernels take now
// Forces a path by name ("scalar", "avx2", "avx512", "native", or "auto" for the best one).
// Throws std::invalid_argument for an unknown name or a path this build or CPU lacks.
void set_isa(const std::string& name);
}  // namespace loom

// The namespace of this translation unit's kernels. The cpu/isa/*.cpp files define
// LOOM_ISA_AVX2 / LOOM_ISA_AVX512 before including a kernel source; the plain build defines none.
#if defined(LOOM_ISA_AVX512)
#if !defined(__AVX512F__) || !defined(__AVX512DQ__) || !defined(__AVX512VL__) || !defined(__FMA__)
#error "LOOM_ISA_AVX512 needs -mavx512f -mavx512dq -mavx512vl -mfma (see CMakeLists.txt)"
#endif
#define LOOM_ISA_NS isa_avx512
#define LOOM_ISA_VARIANT 1
#elif defined(LOOM_ISA_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__)
#error "LOOM_ISA_AVX2 needs -mavx2 -mfma (see CMakeLists.txt)"
#endif
#define LOOM_ISA_NS isa_avx2
#define LOOM_ISA_VARIANT 1
#else
#define LOOM_ISA_NS isa_base
#endif

// Philox4x32-10: J. K. Salmon, M. A. Moraes, R. O. Dror, D. E. Shaw, "Parallel random numbers:
//   as easy as 1, 2, 3", SC'11 (Random123's round function, multipliers and key schedule).
// Box-Muller: G. E. P. Box, M. E. Muller, "A note on the generation of random normal
//   deviates", Ann. Math. Statist. 29 (1958) 610-611.
//
// The stream is the one defined in loom_kernels/noise.py (a persistence format: never change
// it). kLanes counters at a time: the Philox rounds in SIMD intrinsics (pmuludq on 64-bit lanes,
// see philox_lanes), Box-Muller as plain branch-free loops that gcc auto-vectorizes. log, sin
// and cos are our own float32 polynomials (libmvec would need -ffast-math); over every u = k 2^-24
// the radius is within 3.6e-7 of float64 math and sin/cos within 9e-8 (checked exhaustively,
// with and without FMA contraction):
//   log: u = 2^e m, m in [sqrt(1/2), sqrt(2)), ln m = f + f^2 R(f) with f = m - 1 exact and R a
//        degree-8 polynomial (see log_unit), e ln 2 with ln 2 split in two floats.
//   sin/cos: t = fl(2pi_f32 * u) exactly as the reference forms it, reduced by the nearest
//        multiple of pi/2 (pi/2 split in three floats, exact for the quadrants 0..4 that
//        t in (0, 2pi] needs), Taylor polynomials on [-pi/4, pi/4] (truncation < 2e-9).
// This file is compiled once per instruction set (cpu/isa.h): the lanes go into LOOM_ISA_NS,
// the threaded driver (fill_batch) exists once, in the plain build, and calls the build that
// active_isa() names. Every build makes the same words; the normals of the FMA builds (AVX2,
// AVX-512) differ from the plain build's in the last bits, within the accuracy above.
#include "cpu/philox_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <stdexcept>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"

namespace loom {
namespace LOOM_ISA_NS {
namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
constexpr int kLanes = 32;  // counters per step: 4 AVX-512 / 8 AVX2 vectors of 64-bit lanes in flight

inline uint32_t as_u32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float as_f32(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// Philox4x32-10 of counters (j0 + i, 0, 0, 0), i < kLanes, under key (k0, k1).
// The words live in 64-bit lanes, where the 32x32 -> 64-bit product is one pmuludq (which reads
// only the low halves) and its high half one pshufd (which leaves junk in the high half). gcc does not find pmuludq from scalar code
// (it emits a full 64x64 multiply, or widens packed 32-bit lanes and permutes them back every
// round), hence the intrinsics; the high halves of the lanes carry junk that every multiply and
// the final (uint32_t) drop. The per-ISA blocks below repeat one shape on purpose: the same six
// operations in each target's intrinsics, so that philox_lanes is written once against them.
#if defined(__AVX512F__)
using Vec = __m512i;
inline Vec v_set1(uint64_t a) { return _mm512_set1_epi64(static_cast<long long>(a)); }
inline void v_store(uint64_t* p, Vec a) { _mm512_storeu_si512(p, a); }
inline Vec v_mul(Vec a, Vec b) { return _mm512_mul_epu32(a, b); }
inline Vec v_hi(Vec a) { return _mm512_shuffle_epi32(a, _MM_PERM_DDBB); }
inline Vec v_xor3(Vec a, Vec b, Vec c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
inline Vec v_iota(uint64_t a) { return _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(a)), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0)); }
#elif defined(__AVX2__)
using Vec = __m256i;
inline Vec v_set1(uint64_t a) { return _mm256_set1_epi64x(static_cast<long long>(a)); }
inline void v_store(uint64_t* p, Vec a) { _mm256_storeu_si256(reinterpret_cast<Vec*>(p), a); }
inline Vec v_mul(Vec a, Vec b) { return _mm256_mul_epu32(a, b); }
inline Vec v_hi(Vec a) { return _mm256_shuffle_epi32(a, 0xF5); }
inline Vec v_xor3(Vec a, Vec b, Vec c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
inline Vec v_iota(uint64_t a) { return _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(a)), _mm256_set_epi64x(3, 2, 1, 0)); }
#elif defined(__SSE2__)
using Vec = __m128i;
inline Vec v_set1(uint64_t a) { return _mm_set1_epi64x(static_cast<long long>(a)); }
inline void v_store(uint64_t* p, Vec a) { _mm_storeu_si128(reinterpret_cast<Vec*>(p), a); }
inline Vec v_mul(Vec a, Vec b) { return _mm_mul_epu32(a, b); }
inline Vec v_hi(Vec a) { return _mm_shuffle_epi32(a, 0xF5); }
inline Vec v_xor3(Vec a, Vec b, Vec c) { return _mm_xor_si128(_mm_xor_si128(a, b), c); }
inline Vec v_iota(uint64_t a) { return _mm_add_epi64(_mm_set1_epi64x(static_cast<long long>(a)), _mm_set_epi64x(1, 0)); }
#else  // portable: the same lanes, one at a time
struct Vec {
  uint64_t v;
};
inline Vec v_set1(uint64_t a) { return {a}; }
inline void v_store(uint64_t* p, Vec a) { *p = a.v; }
inline Vec v_mul(Vec a, Vec b) { return {(a.v & 0xFFFFFFFFu) * (b.v & 0xFFFFFFFFu)}; }
inline Vec v_hi(Vec a) { return {a.v >> 32}; }
inline Vec v_xor3(Vec a, Vec b, Vec c) { return {a.v ^ b.v ^ c.v}; }
inline Vec v_iota(uint64_t a) { return {a}; }
#endif
constexpr int kVec = sizeof(Vec) / sizeof(uint64_t);
constexpr int kInFlight = kVec == 8 ? 4 : 2;  // see philox_lanes
static_assert(kLanes % (kVec * kInFlight) == 0, "kLanes must be a multiple of the vectors in flight");

// w[k][i] holds word x_k of counter j0 + i in its low 32 bits. Consumers read it as 64-bit
// lanes, the width it was stored in: narrowing it into a uint32 array first would make the next
// loop's loads straddle the stores, which stalls store-to-load forwarding.
inline void philox_lanes(uint32_t j0, uint32_t k0, uint32_t k1, uint64_t (&w)[4][kLanes]) {
  constexpr int G = kLanes / kVec;
  const Vec m0 = v_set1(kM0), m1 = v_set1(kM1), zero = v_set1(0);
  Vec x0[G], x1[G], x2[G], x3[G];
  for (int g = 0; g < G; ++g) {
    x0[g] = v_iota(uint64_t{j0} + static_cast<uint64_t>(g * kVec));  // bits above 32 are dropped
    x1[g] = x2[g] = x3[g] = zero;
  }
  // kInFlight independent vectors go round by round together, so the multiply's latency hides
  // behind the other vectors' work, as many as the registers hold (4 x 4 words of 32 zmm, 2 x 4
  // of 16 ymm / xmm).
  for (int g0 = 0; g0 < G; g0 += kInFlight) {
    uint32_t ka = k0, kb = k1;
    for (int r = 0; r < 10; ++r) {
      const Vec vka = v_set1(ka), vkb = v_set1(kb);
      for (int g = g0; g < g0 + kInFlight; ++g) {
        const Vec p0 = v_mul(x0[g], m0), p1 = v_mul(x2[g], m1);
        x0[g] = v_xor3(v_hi(p1), x1[g], vka);
        x2[g] = v_xor3(v_hi(p0), x3[g], vkb);
        x1[g] = p1;
        x3[g] = p0;
      }
      ka += kW0;  // uint32 wraps, as the key schedule wants
      kb += kW1;
    }
  }
  for (int g = 0; g < G; ++g) {
    v_store(w[0] + g * kVec, x0[g]);
    v_store(w[1] + g * kVec, x1[g]);
    v_store(w[2] + g * kVec, x2[g]);
    v_store(w[3] + g * kVec, x3[g]);
  }
}

// u(x) = ((x >> 8) + 1) 2^-24 in (0, 1], exact in float32 (the integer is <= 2^24).
inline float uniform(uint64_t x) {
  return static_cast<float>(static_cast<int32_t>((static_cast<uint32_t>(x) >> 8) + 1)) * 0x1p-24f;
}

// ln u for u in (0, 1] (normal floats only, which every u(x) is).
inline float log_unit(float u) {
  const int32_t ix = static_cast<int32_t>(as_u32(u) - 0x3F3504F3u);  // 0x3F3504F3 = sqrt(1/2)
  const int32_t e = ix >> 23;  // arithmetic shift: the exponent relative to [sqrt(1/2), sqrt(2))
  const float m = as_f32((static_cast<uint32_t>(ix) & 0x007FFFFFu) + 0x3F3504F3u);
  const float f = m - 1.0f;  // exact (Sterbenz)
  // ln(1 + f) = f + f^2 R(f), R of degree 8 fitted by us (least squares on Chebyshev nodes,
  // reweighted towards minimax) on [sqrt(1/2) - 1, sqrt(2) - 1]: relative error < 1e-8 with
  // the float32 coefficients, and no division.
  const float r = -0.49999988079071045f + f * (0.3333330750465393f + f * (-0.2500152289867401f +
                  f * (0.2000306248664856f + f * (-0.16611145436763763f + f * (0.1416258066892624f +
                  f * (-0.13207906484603882f + f * (0.13009953498840332f + f * -0.07831735163927078f)))))));
  const float ln_m = f + (f * f) * r;
  const float fe = static_cast<float>(e);
  return fe * 0.693145751953125f + (fe * 1.428606765330187e-06f + ln_m);
}

// sin t, cos t for t in [0, 2pi + a little].
inline void sincos_turn(float t, float& s_out, float& c_out) {
  const int32_t q = static_cast<int32_t>(t * 0.636619772f + 0.5f);  // nearest quadrant, t >= 0
  const float fq = static_cast<float>(q);
  float r = t - fq * 1.5703125f;  // exact: 1.5703125 has 8 bits, q 3
  r -= fq * 0.00048382580280303955f;
  r -= fq * 9.92093629470503e-10f;
  const float r2 = r * r;
  const float sr =
      r + r * r2 * (-1.0f / 6 + r2 * (1.0f / 120 + r2 * (-1.0f / 5040 + r2 * (1.0f / 362880))));
  const float cr = 1.0f + r2 * (-0.5f + r2 * (1.0f / 24 + r2 * (-1.0f / 720 + r2 * (1.0f / 40320 +
                                                                                     r2 * (-1.0f / 3628800)))));
  // quadrant q: (sin, cos) = (sr, cr), (cr, -sr), (-sr, -cr), (-cr, sr)
  const bool odd = q & 1;
  const float s = odd ? cr : sr;
  const float c = odd ? sr : cr;
  s_out = as_f32(as_u32(s) ^ (static_cast<uint32_t>(q & 2) << 30));
  c_out = as_f32(as_u32(c) ^ (static_cast<uint32_t>((q + 1) & 2) << 30));
}

// kLanes blocks of the stream (4 kLanes elements, in stream order) starting at block j0.
inline void normal_lanes(uint32_t j0, uint32_t k0, uint32_t k1, float* out) {
  alignas(64) uint64_t w[4][kLanes];
  philox_lanes(j0, k0, k1, w);
  float v0[kLanes], v1[kLanes], v2[kLanes], v3[kLanes];
  for (int i = 0; i < kLanes; ++i) {
    const float r0 = std::sqrt(std::max(-2.0f * log_unit(uniform(w[0][i])), 0.0f));
    const float r1 = std::sqrt(std::max(-2.0f * log_unit(uniform(w[2][i])), 0.0f));
    float s0, c0, s1, c1;
    sincos_turn(uniform(w[1][i]) * 6.2831854820251465f, s0, c0);  // float32(2 pi), as the reference
    sincos_turn(uniform(w[3][i]) * 6.2831854820251465f, s1, c1);
    v0[i] = r0 * c0;
    v1[i] = r0 * s0;
    v2[i] = r1 * c1;
    v3[i] = r1 * s1;
  }
  for (int i = 0; i < kLanes; ++i) {
    out[4 * i] = v0[i];
    out[4 * i + 1] = v1[i];
    out[4 * i + 2] = v2[i];
    out[4 * i + 3] = v3[i];
  }
}

inline void word_lanes(uint32_t j0, uint32_t k0, uint32_t k1, uint32_t* out) {
  alignas(64) uint64_t w[4][kLanes];
  philox_lanes(j0, k0, k1, w);
  for (int i = 0; i < kLanes; ++i) {
    out[4 * i] = static_cast<uint32_t>(w[0][i]);
    out[4 * i + 1] = static_cast<uint32_t>(w[1][i]);
    out[4 * i + 2] = static_cast<uint32_t>(w[2][i]);
    out[4 * i + 3] = static_cast<uint32_t>(w[3][i]);
  }
}

// Elements [e0, e1) of one row (e0 a multiple of 4 kLanes).
template <typename T>
void fill_range(int64_t seed, int64_t e0, int64_t e1, T* row) {
  const uint64_t bits = static_cast<uint64_t>(seed);
  const uint32_t k0 = static_cast<uint32_t>(bits), k1 = static_cast<uint32_t>(bits >> 32);
  constexpr int64_t kStep = 4 * kLanes;
  auto lanes = [&](int64_t e, T* dst) {
    const uint32_t j0 = static_cast<uint32_t>(e / 4);  // j < 2^32: row_len <= 4 * 2^32
    if constexpr (std::is_same_v<T, float>)
      normal_lanes(j0, k0, k1, dst);
    else
      word_lanes(j0, k0, k1, dst);
  };
  int64_t e = e0;
  for (; e + kStep <= e1; e += kStep) lanes(e, row + e);
  if (e < e1) {  // ragged end of the row: the last block's extra words are dropped
    T tail[kStep];
    lanes(e, tail);
    std::copy(tail, tail + (e1 - e), row + e);
  }
}

// The nearest-of-k pass (philox_nearest): sum z^2, sum x z and sum x^2 over elements [e0, e1) of the
// stream of seed (e0 a multiple of 4 kLanes), each block of normals read back from L1 as soon as it is made, never
// stored. In double: the product of two float32 values is exact there, so FMA contraction changes no bit,
// and the order of the sums (8 lanes, then the lanes in order) is the same in every build.
typedef double vd8 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));

void dots_range(int64_t seed, int64_t e0, int64_t e1, const float* x, double* acc) {
  const uint64_t bits = static_cast<uint64_t>(seed);
  const uint32_t k0 = static_cast<uint32_t>(bits), k1 = static_cast<uint32_t>(bits >> 32);
  constexpr int64_t kStep = 4 * kLanes;
  alignas(64) float z[kStep];
  alignas(64) float xt[kStep];
  vd8 zz = {}, xz = {}, xx = {};
  for (int64_t e = e0; e < e1; e += kStep) {
    normal_lanes(static_cast<uint32_t>(e / 4), k0, k1, z);
    const float* xe = x + e;
    const int64_t n = std::min(kStep, e1 - e);
    if (n < kStep) {  // ragged end of the row: zeros add nothing
      std::fill(z + n, z + kStep, 0.0f);
      std::copy(xe, xe + n, xt);
      std::fill(xt + n, xt + kStep, 0.0f);
      xe = xt;
    }
    for (int i = 0; i < kStep; i += 8) {
      vf8 zf, xf;
      std::memcpy(&zf, z + i, sizeof zf);
      std::memcpy(&xf, xe + i, sizeof xf);
      const vd8 zd = __builtin_convertvector(zf, vd8), xd = __builtin_convertvector(xf, vd8);
      zz += zd * zd;
      xz += xd * zd;
      xx += xd * xd;
    }
  }
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
  for (int l = 0; l < 8; ++l) {
    s0 += zz[l];
    s1 += xz[l];
    s2 += xx[l];
  }
  acc[0] = s0;
  acc[1] = s1;
  acc[2] = s2;
}

}  // namespace

// This instruction set's entry points, called by the driver below.
void philox_fill_range(int64_t seed, int64_t e0, int64_t e1, float* row) { fill_range<float>(seed, e0, e1, row); }
void philox_fill_range(int64_t seed, int64_t e0, int64_t e1, uint32_t* row) {
  fill_range<uint32_t>(seed, e0, e1, row);
}
void philox_dots(int64_t seed, int64_t e0, int64_t e1, const float* x, double* acc) {
  dots_range(seed, e0, e1, x, acc);
}

}  // namespace LOOM_ISA_NS

#if !defined(LOOM_ISA_VARIANT)  // the driver, once
#if defined(LOOM_DISPATCH)
namespace isa_avx2 {
void philox_fill_range(int64_t, int64_t, int64_t, float*);
void philox_fill_range(int64_t, int64_t, int64_t, uint32_t*);
void philox_dots(int64_t, int64_t, int64_t, const float*, double*);
}  // namespace isa_avx2
namespace isa_avx512 {
void philox_fill_range(int64_t, int64_t, int64_t, float*);
void philox_fill_range(int64_t, int64_t, int64_t, uint32_t*);
void philox_dots(int64_t, int64_t, int64_t, const float*, double*);
}  // namespace isa_avx512
#endif

namespace {
// The lanes built for isa (cpu/isa.h).
template <typename T>
auto fill_range_on(Isa isa) {
  using Fn = void (*)(int64_t, int64_t, int64_t, T*);
  switch (isa) {
#if defined(LOOM_DISPATCH)
    case Isa::kAvx512: return static_cast<Fn>(isa_avx512::philox_fill_range);
    case Isa::kAvx2: return static_cast<Fn>(isa_avx2::philox_fill_range);
#endif
    default: return static_cast<Fn>(isa_base::philox_fill_range);
  }
}

using DotsFn = void (*)(int64_t, int64_t, int64_t, const float*, double*);
DotsFn dots_on(Isa isa) {
  switch (isa) {
#if defined(LOOM_DISPATCH)
    case Isa::kAvx512: return isa_avx512::philox_dots;
    case Isa::kAvx2: return isa_avx2::philox_dots;
#endif
    default: return isa_base::philox_dots;
  }
}

// run(it) for it in [0, items) on up to nt threads (the caller's included). Each item is run by exactly
// one thread with the same code: the output does not depend on the scheduling or the thread count. The
// helpers are detached and the caller waits for the items, not for the threads: on a busy machine a
// helper that the OS starts late finds no work left and exits without touching the output (the counters
// it reads are shared-owned), instead of holding the call for a scheduler time slice. run throws nothing.
template <typename Run>
void parallel_items(int64_t items, int64_t nt, const Run& run) {
  if (nt <= 1) {
    for (int64_t it = 0; it < items; ++it) run(it);
    return;
  }
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  const auto progress = std::make_shared<Progress>();
  auto drain = [progress, items, run] {  // run by value: helpers that start late copy it
    for (int64_t it = progress->next.fetch_add(1); it < items; it = progress->next.fetch_add(1)) {
      run(it);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < nt; ++t) {
    try {
      std::thread(drain).detach();
    } catch (const std::system_error&) {  // no thread to be had: the caller does the work
      break;
    }
  }
  drain();
  while (progress->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

int64_t thread_count(int threads, int64_t items, int64_t elements) {
  static const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t nt = threads > 0 ? threads : hw;
  // A thread costs ~tens of microseconds to start: only worth it past ~2^16 elements each.
  return std::max<int64_t>(1, std::min<int64_t>({nt, items, elements >> 16}));
}

// Work items: (row, chunk of kChunk elements), so one long row spreads over threads too.
constexpr int64_t kChunk = int64_t{1} << 14;  // 64 KiB of output: well above a dispatch's cost

template <typename T>
void fill_batch(const int64_t* seeds, int64_t n_rows, int64_t row_len, T* out, int threads) {
  if (row_len < 0) throw std::invalid_argument("philox: row_len must be >= 0");
  if (row_len > (int64_t{4} << 32)) throw std::invalid_argument("philox: row_len must be <= 4 * 2^32");
  if (n_rows <= 0 || row_len == 0) return;
  const int64_t chunks = (row_len + kChunk - 1) / kChunk;
  const int64_t items = n_rows * chunks;
  const auto fill_range = fill_range_on<T>(active_isa());
  auto run = [=](int64_t it) {
    const int64_t row = it / chunks, e0 = (it - row * chunks) * kChunk;
    fill_range(seeds[row], e0, std::min(row_len, e0 + kChunk), out + row * row_len);
  };
  parallel_items(items, thread_count(threads, items, n_rows * row_len), run);
}

void nearest_batch(const int64_t* seeds, const float* x, int64_t b, int64_t k, int64_t D, int64_t* arg,
                   double* dist, double* xsq, int threads) {
  if (b < 0 || k < 1) throw std::invalid_argument("philox_nearest: needs b >= 0 and k >= 1");
  if (D < 0 || D > (int64_t{4} << 32)) throw std::invalid_argument("philox_nearest: D must be in [0, 4 * 2^32]");
  if (b == 0) return;
  // Items: (candidate, chunk of its row), the chunk's three sums kept apart and added in chunk order below,
  // so neither b = 1 nor a long row leaves a thread idle, and the sums do not depend on the threads.
  const int64_t n = b * k, chunks = std::max<int64_t>(1, (D + kChunk - 1) / kChunk), items = n * chunks;
  std::vector<double> part(3 * items);
  double* pp = part.data();
  const DotsFn dots = dots_on(active_isa());
  auto run = [=](int64_t it) {
    const int64_t c = it / chunks, e0 = (it - c * chunks) * kChunk;
    dots(seeds[c], e0, std::min(D, e0 + kChunk), x + (c / k) * D, pp + 3 * it);
  };
  parallel_items(items, thread_count(threads, items, n * D), run);
  for (int64_t i = 0; i < b; ++i) {
    int64_t best = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t c = i * k + j;
      double zz = 0.0, xz = 0.0, xx = 0.0;
      for (int64_t ch = 0; ch < chunks; ++ch) {
        zz += pp[3 * (c * chunks + ch)];
        xz += pp[3 * (c * chunks + ch) + 1];
        xx += pp[3 * (c * chunks + ch) + 2];
      }
      if (j == 0) xsq[i] = xx;  // every candidate's is the same
      const double d = zz - 2.0 * xz;
      dist[c] = d;
      const double db = dist[i * k + best];
      // torch.argmin's rule: the lowest index of the minimum, a NaN counting as the minimum
      if (d < db || (std::isnan(d) && !std::isnan(db))) best = j;
    }
    arg[i] = best;
  }
}

}  // namespace

void philox_normal(const int64_t* seeds, int64_t n_rows, int64_t row_len, float* out, int threads) {
  fill_batch<float>(seeds, n_rows, row_len, out, threads);
}

void philox_uint32(const int64_t* seeds, int64_t n_rows, int64_t row_len, uint32_t* out, int threads) {
  fill_batch<uint32_t>(seeds, n_rows, row_len, out, threads);
}

void philox_nearest(const int64_t* seeds, const float* x, int64_t b, int64_t k, int64_t D, int64_t* arg,
                    double* dist, double* xsq, int threads) {
  nearest_batch(seeds, x, b, k, D, arg, dist, xsq, threads);
}
#endif  // !LOOM_ISA_VARIANT

}  // namespace loom

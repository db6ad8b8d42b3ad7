// The streamed logit pass (cpu/stream_cpu.h): one fused tile kernel for Sinkhorn's log-sum-exp,
// the (Gumbel-)argmax of draw_pairs and the semidiscrete / nearest-neighbour argmin.
//
// Layout of one work item (problem b, rows [r0, r1)): the rows are scaled once (scale * x_i, as
// the torch tiles do) into a small buffer; the columns are walked in panels of C columns,
// transposed into yT[D][C] (L2-sized), and for each block of R rows a register-blocked GEMM
// micro-kernel (R rows x V vectors of W lanes, accumulators in registers, one broadcast of x and
// V loads of yT per k) writes the R x C logits u_j + <scale x_i, y_j> into an L1 tile, which is
// folded at once into the rows' running state:
//   LSE:    tile max, then sum exp(max(s - M, -80)) against the running max M (FlashAttention's
//           online rescale; -80 keeps float32 out of denormals as the torch tiles do);
//   argmax: lane-wise strict > (the lowest column wins ties), plus, when keyed, the Gumbel noise
//           -log(-log(u)), u from the counter-based hash of loom_kernels/sinkhorn/_tiles.py
//           (lowbias32 of ki ^ kj): the same pairs on every device.
// exp and log are float32 polynomials of our own (Cephes' coefficients, ~1 ulp on the ranges
// used) in GCC vector extensions, so the same source builds for SSE2, AVX2 and AVX-512 (cpu/isa.h);
// the plain build holds the threaded driver, as philox_cpu.cpp.
#include "cpu/stream_cpu.h"

#include <algorithm>
#include <atomic>
#include <ctime>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu/isa.h"

namespace loom {
namespace LOOM_ISA_NS {
namespace {

#if defined(LOOM_ISA_AVX512)
constexpr int W = 16, R = 6, V = 4;  // 24 zmm accumulators of 32
#elif defined(LOOM_ISA_AVX2)
constexpr int W = 8, R = 4, V = 3;  // 12 ymm accumulators of 16
#else
constexpr int W = 4, R = 4, V = 2;  // SSE2: 8 xmm accumulators of 16
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
constexpr int VW = V * W;  // columns of one micro-tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float s) {  // one broadcast (a lane loop or vf{} + s makes gcc emit more)
#if defined(LOOM_ISA_AVX512)
  return (vf)_mm512_set1_ps(s);
#elif defined(LOOM_ISA_AVX2)
  return (vf)_mm256_set1_ps(s);
#elif defined(__SSE2__)
  return (vf)_mm_set1_ps(s);
#else
  return vf{} + s;
#endif
}
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf as_f(vu x) { return (vf)x; }
inline vu as_u(vf x) { return (vu)x; }

// exp(x) for x in [-87, 0] (the LSE folds only reach [-80, 0]): x = n ln2 + r, |r| <= ln2 / 2,
// Cephes expf's degree-5 polynomial, 2^n from the exponent bits.
inline vf vexp(vf x) {
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x * splat(1.44269504088896341f) + magic;
  vf n = t - magic;
  vu ni = as_u(t) - as_u(magic);
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.0f);
  return as_f(as_u(p) + (ni << 23));
}

// ln(x) for positive normal x: x = 2^e m, m in [sqrt(1/2), sqrt(2)), Cephes logf's polynomial.
inline vf vlog(vf x) {
  vu b = as_u(x);
  vi e = (vi)b >> 23;
  e = e - 126;
  vf m = as_f((b & 0x807fffffu) | 0x3f000000u);  // [0.5, 1)
  vi small = m < splat(0.707106781186547524f);
  e = e + small;  // small: -1
  vf f = (small ? m + m : m) - splat(1.0f);
  vf z = f * f;
  vf y = splat(7.0376836292e-2f);
  y = y * f + splat(-1.1514610310e-1f);
  y = y * f + splat(1.1676998740e-1f);
  y = y * f + splat(-1.2420140846e-1f);
  y = y * f + splat(1.4249322787e-1f);
  y = y * f + splat(-1.6668057665e-1f);
  y = y * f + splat(2.0000714765e-1f);
  y = y * f + splat(-2.4999993993e-1f);
  y = y * f + splat(3.3333331174e-1f);
  y = y * f * z;
  vf ef = __builtin_convertvector(e, vf);
  y = y + ef * splat(-2.12194440e-4f);
  y = y - splat(0.5f) * z;
  return f + y + ef * splat(0.693359375f);
}

inline vu mix32(vu x) {  // lowbias32, as _tiles.mix32
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// Gumbel(0, 1) of the hash words h: u = ((h >> 8) + 0.5) 2^-24 in (0, 1), -log(-log u).
inline vf gumbel(vu h) {
  const vi top = (vi)(h >> 8);  // < 2^24: exact in float32
  vf u = (__builtin_convertvector(top, vf) + splat(0.5f)) * splat(1.0f / 16777216.0f);
  return -vlog(-vlog(u));
}

// S[r][0..VW) = u[0..VW) + sum_k xs[r][k] yp[k][0..VW) for Rows rows (yp: one packed micro-panel,
// D x VW contiguous), and rmax[r] = max(rmax[r], the new logits) lane-wise.
template <int Rows>
inline void micro(const float* xs, int64_t D, const float* yp, const float* u, float* S, int64_t ldS, vf* rmax) {
  vf acc[Rows][V];
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vf{};
  for (int64_t k = 0; k < D; ++k) {
    vf yv[V];
    for (int v = 0; v < V; ++v) yv[v] = load(yp + k * VW + v * W);
    for (int r = 0; r < Rows; ++r) {
      const vf xb = splat(xs[r * D + k]);
      for (int v = 0; v < V; ++v) acc[r][v] += xb * yv[v];
    }
  }
  for (int v = 0; v < V; ++v) {
    const vf uv = load(u + v * W);
    for (int r = 0; r < Rows; ++r) {
      const vf sv = acc[r][v] + uv;
      rmax[r] = vmax(rmax[r], sv);
      store(S + r * ldS + v * W, sv);
    }
  }
}

inline float hmax(vf v) {
  float m = v[0];
  for (int l = 1; l < W; ++l) m = std::max(m, v[l]);
  return m;
}
inline float hsum(vf v) {
  float s = 0.0f;
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}

struct Item {
  const StreamArgs& a;
  int64_t b, r0, r1;
  float* lse_out;    // LSE mode when set
  int64_t* arg_out;  // else argmax
  float* best_out;   // nullable
};

void run_item(const Item& it) {
  const StreamArgs& a = it.a;
  const int64_t D = a.D, m = a.m, rows = it.r1 - it.r0;
  const int64_t rows_pad = (rows + R - 1) / R * R;
  // panel width: yT (D x C floats) within ~256 KiB, C a multiple of the micro-tile width
  const int64_t C = std::max<int64_t>(VW, std::min<int64_t>(1024, 65536 / std::max<int64_t>(D, 1)) / VW * VW);
  const float scale = a.scale[it.b];
  const float* x = a.x + (it.b * a.n + it.r0) * D;
  const float* y = a.y + it.b * m * D;
  const float* ub = a.u + it.b * m;
  const bool lse = it.lse_out != nullptr, keyed = a.ki != nullptr;

  std::vector<float> xs(rows_pad * std::max<int64_t>(D, 1), 0.0f);  // padded rows stay 0, never folded
  for (int64_t i = 0; i < rows * D; ++i) xs[i] = x[i] * scale;
  std::vector<float> yT(D * C), up(C), S(R * C);
  std::vector<uint32_t> kjp(keyed ? C : 0);
  std::vector<float> run_max(rows, kNegInf), run_sum(rows, 0.0f);
  std::vector<int64_t> run_arg(lse ? 0 : rows, 0);

  for (int64_t c0 = 0; c0 < m; c0 += C) {
    const int64_t cn = std::min(C, m - c0), cpad = (cn + VW - 1) / VW * VW;
    // packed: micro-panel p holds columns [p VW, (p + 1) VW) as D rows of VW (contiguous reads)
    for (int64_t j = 0; j < cpad; ++j) {
      float* dst = yT.data() + (j / VW) * D * VW + j % VW;
      for (int64_t k = 0; k < D; ++k) dst[k * VW] = j < cn ? y[(c0 + j) * D + k] : 0.0f;
    }
    std::copy(ub + c0, ub + c0 + cn, up.begin());
    std::fill(up.begin() + cn, up.begin() + cpad, kNegInf);  // padded columns: -inf logits
    if (keyed)
      for (int64_t j = 0; j < cpad; ++j) kjp[j] = j < cn ? static_cast<uint32_t>(a.kj[c0 + j]) : 0u;
    const int64_t nv = cpad / W, nfull = cn / W;  // vectors; those without padded columns

    for (int64_t rb = 0; rb < rows_pad; rb += R) {
      vf rmax[R];
      for (int r = 0; r < R; ++r) rmax[r] = splat(kNegInf);
      for (int64_t c = 0; c < cpad; c += VW)
        micro<R>(xs.data() + rb * D, D, yT.data() + c * D, up.data() + c, S.data() + c, C, rmax);
      const int64_t rend = std::min<int64_t>(R, rows - rb);
      for (int64_t r = 0; r < rend; ++r) {
        const float* s = S.data() + r * C;
        const int64_t row = rb + r;
        if (lse) {
          const float mx = std::max(run_max[row], hmax(rmax[r]));  // padded columns are -inf
          if (mx == kNegInf) continue;  // every logit so far is -inf: nothing to add
          const vf M = splat(mx), lo = splat(-80.0f);
          vf acc = vf{};
          // as the torch tiles: a -inf logit adds exp(-80) (< 2e-35 of the row's largest term)
          for (int64_t v = 0; v < nfull; ++v) acc += vexp(vmax(load(s + v * W) - M, lo));
          if (nfull < nv) {  // the vector with padded columns: those add nothing
            const vf e = vexp(vmax(load(s + nfull * W) - M, lo));
            vi valid;
            for (int l = 0; l < W; ++l) valid[l] = nfull * W + l < cn ? -1 : 0;
            acc += valid ? e : vf{};
          }
          run_sum[row] = run_sum[row] * std::exp(run_max[row] - mx) + hsum(acc);
          run_max[row] = mx;
        } else {
          vf bv = splat(kNegInf);
          vi bi = vi{}, idx;
          for (int l = 0; l < W; ++l) idx[l] = static_cast<int32_t>(c0 + l);
          vu key{};
          if (keyed) key = vu{} + static_cast<uint32_t>(a.ki[it.b * a.n + it.r0 + row]);
          for (int64_t v = 0; v < nv; ++v, idx += W) {
            vf sv = load(s + v * W);
            if (keyed) {
              vu kj;
              std::memcpy(&kj, kjp.data() + v * W, sizeof kj);
              sv += gumbel(mix32(key ^ kj));
            }
            const vi take = sv > bv;
            bv = take ? sv : bv;
            bi = take ? idx : bi;
          }
          const float mx = hmax(bv);
          if (mx > run_max[row]) {  // strict: an equal value in a later panel keeps the earlier column
            int32_t j = std::numeric_limits<int32_t>::max();
            for (int l = 0; l < W; ++l)
              if (bv[l] == mx) j = std::min(j, bi[l]);
            run_max[row] = mx;
            run_arg[row] = j;
          }
        }
      }
    }
  }
  const int64_t o = it.b * a.n + it.r0;
  for (int64_t r = 0; r < rows; ++r) {
    if (lse) {
      it.lse_out[o + r] = run_max[r] + std::log(run_sum[r]);
    } else {
      it.arg_out[o + r] = run_arg[r];
      if (it.best_out) it.best_out[o + r] = run_max[r];
    }
  }
}

}  // namespace

void stream_rows(const StreamArgs& a, int64_t b, int64_t r0, int64_t r1, float* lse_out, int64_t* arg_out,
                 float* best_out) {
  run_item(Item{a, b, r0, r1, lse_out, arg_out, best_out});
}

// Roofline micro-kernels: the same vector types and exp as the kernel. Timed in this thread's CPU
// seconds: the figures stand on a machine shared with other jobs (where wall time does not).
double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

double exp_sweeps(int64_t n, int64_t reps) {
  n = std::max<int64_t>(W, n / W * W);
  std::vector<float> buf(n);
  for (int64_t i = 0; i < n; ++i) buf[i] = -80.0f * static_cast<float>(i) / static_cast<float>(n);
  vf acc = vf{};
  const double t0 = cpu_now();
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t i = 0; i < n; i += W) acc += vexp(load(buf.data() + i));
  const double s = cpu_now() - t0;
  volatile float sink = hsum(acc);
  (void)sink;
  return s;
}

constexpr int kChains = R * V;  // independent FMA chains in registers: enough to fill the FMA pipes
int64_t fma_per_rep() { return int64_t{kChains} * W * 64; }

double fma_sweeps(int64_t reps) {
  vf acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = splat(1.0f + c * 1e-3f);
  const vf mul = splat(0.999999f), add = splat(1e-7f);
  const double t0 = cpu_now();
  for (int64_t r = 0; r < reps; ++r) {
    for (int k = 0; k < 64; ++k) {
#pragma GCC unroll 32
      for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * mul + add;  // unrolled: acc in registers
    }
  }
  const double s = cpu_now() - t0;
  vf tot = vf{};
  for (int c = 0; c < kChains; ++c) tot += acc[c];
  volatile float sink = hsum(tot);
  (void)sink;
  return s;
}

double read_sweeps(const float* p, int64_t n, int64_t reps, float* sink) {
  n = n / (4 * W) * (4 * W);
  vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
  const double t0 = cpu_now();
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t i = 0; i < n; i += 4 * W) {
      a0 += load(p + i);
      a1 += load(p + i + W);
      a2 += load(p + i + 2 * W);
      a3 += load(p + i + 3 * W);
    }
  const double s = cpu_now() - t0;
  *sink = hsum(a0 + a1 + a2 + a3);
  return s;
}

}  // namespace LOOM_ISA_NS

#if !defined(LOOM_ISA_VARIANT)  // the driver, once
#if defined(LOOM_DISPATCH)
#define LOOM_STREAM_DECLS                                                                                        \
  void stream_rows(const StreamArgs&, int64_t, int64_t, int64_t, float*, int64_t*, float*);                     \
  double exp_sweeps(int64_t, int64_t);                                                                           \
  double fma_sweeps(int64_t);                                                                                    \
  int64_t fma_per_rep();                                                                                         \
  double read_sweeps(const float*, int64_t, int64_t, float*);
namespace isa_avx2 {
LOOM_STREAM_DECLS
}
namespace isa_avx512 {
LOOM_STREAM_DECLS
}
#undef LOOM_STREAM_DECLS
#define LOOM_ON_ISA(fn, ...)                                                                                    \
  switch (active_isa()) {                                                                                        \
    case Isa::kAvx512: return isa_avx512::fn(__VA_ARGS__);                                                       \
    case Isa::kAvx2: return isa_avx2::fn(__VA_ARGS__);                                                           \
    default: return isa_base::fn(__VA_ARGS__);                                                                   \
  }
#else
#define LOOM_ON_ISA(fn, ...) return isa_base::fn(__VA_ARGS__);
#endif

namespace {
void stream_rows_on(const StreamArgs& a, int64_t b, int64_t r0, int64_t r1, float* lse, int64_t* arg, float* best) {
  LOOM_ON_ISA(stream_rows, a, b, r0, r1, lse, arg, best)
}

void check(const StreamArgs& a) {
  if (a.B < 0 || a.n < 0 || a.m < 0 || a.D < 0) throw std::invalid_argument("stream: negative extent");
  if (a.m >= (int64_t{1} << 31) - 1024) throw std::invalid_argument("stream: needs m < 2^31 - 1024 columns");
  if ((a.ki == nullptr) != (a.kj == nullptr)) throw std::invalid_argument("stream: pass both Gumbel keys or neither");
}

// Work items (problem, block of rows), shared by detached helpers as in philox_cpu.cpp: each item
// is computed by one thread with the same code, so the result does not depend on the thread count.
void drive(const StreamArgs& a, float* lse, int64_t* arg, float* best, int threads) {
  check(a);
  if (a.B == 0 || a.n == 0) return;
  if (a.m == 0) {  // no column: LSE -inf, argmax 0 (as the torch tiles would give for -inf logits)
    for (int64_t i = 0; i < a.B * a.n; ++i) {
      if (lse) lse[i] = -std::numeric_limits<float>::infinity();
      if (arg) arg[i] = 0;
      if (best) best[i] = -std::numeric_limits<float>::infinity();
    }
    return;
  }
  static const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  int64_t nt = threads > 0 ? threads : hw;
  // rows per item: each item packs every column once (O(m D)) for O(rows m D) products, so items
  // are as tall as the threads allow, up to 512 rows and ~1 MiB of scaled rows
  const int64_t cap = std::max<int64_t>(24, std::min<int64_t>(512, (int64_t{1} << 18) / std::max<int64_t>(a.D, 1)));
  // ~4 items per thread (balance on a busy machine), but items of >= 256 rows where the rows allow
  const int64_t want = std::max((a.n + 4 * nt - 1) / (4 * nt), std::min<int64_t>((a.n + nt - 1) / nt, 256));
  const int64_t rows = std::max<int64_t>(std::min<int64_t>(24, a.n), std::min(cap, want));
  const int64_t per_b = (a.n + rows - 1) / rows, items = a.B * per_b;
  auto run = [=, &a](int64_t it) {
    const int64_t b = it / per_b, r0 = (it - b * per_b) * rows;
    stream_rows_on(a, b, r0, std::min(a.n, r0 + rows), lse, arg, best);
  };
  // a thread costs tens of microseconds: only worth it past ~2^18 multiply-adds each
  nt = std::max<int64_t>(1, std::min<int64_t>({nt, items, a.B * a.n * a.m * std::max<int64_t>(a.D, 1) >> 18}));
  if (nt == 1) {
    for (int64_t it = 0; it < items; ++it) run(it);
    return;
  }
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable all_done;
  };
  const auto progress = std::make_shared<Progress>();
  // helpers hold a copy of the arguments: one that starts after the call returned finds no item
  const auto args = std::make_shared<StreamArgs>(a);
  auto drain = [progress, items, per_b, rows, args, lse, arg, best] {
    for (int64_t it = progress->next.fetch_add(1); it < items; it = progress->next.fetch_add(1)) {
      const int64_t b = it / per_b, r0 = (it - b * per_b) * rows;
      stream_rows_on(*args, b, r0, std::min(args->n, r0 + rows), lse, arg, best);
      if (progress->done.fetch_add(1, std::memory_order_acq_rel) + 1 == items) {
        std::lock_guard<std::mutex> lock(progress->mu);
        progress->all_done.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < nt; ++t) {
    try {
      std::thread(drain).detach();
    } catch (const std::system_error&) {
      break;
    }
  }
  drain();
  // sleep, not spin, until a late helper finishes its item: on a shared machine a spinning caller
  // would take the core that helper waits for
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->all_done.wait(lock, [&] { return progress->done.load(std::memory_order_acquire) == items; });
}
}  // namespace

void stream_lse(const StreamArgs& a, float* out, int threads) { drive(a, out, nullptr, nullptr, threads); }
void stream_argmax(const StreamArgs& a, int64_t* out, float* best, int threads) {
  drive(a, nullptr, out, best, threads);
}
double roofline_exp(int64_t n, int64_t reps) { LOOM_ON_ISA(exp_sweeps, n, reps) }
double roofline_fma(int64_t reps) { LOOM_ON_ISA(fma_sweeps, reps) }
int64_t roofline_fma_per_rep() { LOOM_ON_ISA(fma_per_rep) }
double roofline_read(const float* p, int64_t n, int64_t reps, float* sink) { LOOM_ON_ISA(read_sweeps, p, n, reps, sink) }
#undef LOOM_ON_ISA
#endif  // !LOOM_ISA_VARIANT

}  // namespace loom

// Exact dense linear assignment on the CPU.
//
// Square problems: R. Jonker and A. Volgenant, "A shortest augmenting path algorithm for dense and
// sparse linear assignment problems", Computing 38:325-340, 1987 (LAPJV): column reduction,
// reduction transfer, two passes of augmenting row reduction, then Dijkstra shortest augmenting
// paths on reduced costs c[i][j] - v[j].
// Rectangular problems (N < M): shortest augmenting paths with column potentials v <= 0 that stay
// 0 on unassigned columns, as in D. F. Crouse, "On implementing 2D rectangular assignment
// algorithms", IEEE Trans. Aerospace and Electronic Systems 52(4), 2016 (scipy's solver),
// initialized by a greedy row reduction and augmenting row reduction, which both keep v <= 0.
//
// Implementation notes (why the code looks the way it does):
// * The cost is read in place, row-major, and every inner loop is a contiguous sweep over one row
//   (AVX-512, AVX2 or scalar: one build each, see below). Dijkstra keeps a dense
//   distance array; a column leaves the search by having its potential set to -inf (restored at
//   the end of the search), so the relax step needs no index list, no gathers and no test.
// * maximize negates each entry as it is loaded; float input is widened as it is loaded.
// * NaN / -inf entries are detected inside the first full sweep the algorithm makes anyway (the
//   column reduction for square problems, the greedy row reduction for rectangular ones).
// * Ties are broken by the smallest index everywhere, so results are deterministic and do not
//   depend on the SIMD width or on the number of threads.
// * This file is compiled once per instruction set (cpu/isa.h): the kernels and Solver below go
//   into LOOM_ISA_NS; the threaded driver at the end exists once, in the plain build, and calls
//   the build that active_isa() names.
#include "cpu/lap_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
// GCC 12 flags its own _mm512_undefined_* helpers (GCC bug 105593): silence that false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

#include "common/status.h"
#include "cpu/isa.h"

namespace loom {

// Per-thread scratch, reused across the problems a worker solves. Shared by every instruction
// set's build of the solver; only the driver (plain build) allocates, so no container code is
// compiled with AVX flags.
struct LapWork {
  std::vector<double> v, d, fin_d, fin_v, colmin;
  std::vector<int64_t> pred, y, fin, free_rows, argrow;
  std::vector<int32_t> matches;
  void resize(int64_t N, int64_t M) {
    v.resize(M), d.resize(M), fin_d.resize(M), fin_v.resize(M), colmin.resize(M);
    pred.resize(M), y.resize(M), fin.resize(M), argrow.resize(M);
    free_rows.resize(N), matches.resize(N);
  }
};

namespace LOOM_ISA_NS {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Augmenting row reduction gets at most this many row scans per row; past that its evictions
// assign rows more slowly than Dijkstra does (measured on uniform and squared-Euclidean costs).
constexpr int64_t kRowReductionSteps = 2;

template <typename T, bool MAX>
inline double load1(const T* p) {
  const double c = static_cast<double>(*p);
  return MAX ? -c : c;
}

// (value, index) pairs ordered lexicographically: the smaller value wins, then the smaller index.
inline bool lex_less(double a, int64_t ia, double b, int64_t ib) {
  return a < b || (a == b && ia < ib);
}

// ---- SIMD layer -------------------------------------------------------------------------------
// One vector type per target (AVX-512, AVX2); the kernels below are written once against it, so the
// per-target structs are parallel by design (same members, each in its own ISA's intrinsics).
// Lanes hold doubles and int64 column indices side by side.
#if defined(__AVX512F__)
#define LOOM_LAP_SIMD 1
struct V {
  static constexpr int W = 8;
  using D = __m512d;
  using I = __m512i;
  using Mk = __mmask8;
  static D set1(double x) { return _mm512_set1_pd(x); }
  static I set1i(int64_t x) { return _mm512_set1_epi64(x); }
  static I iota() { return _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7); }
  static I addi(I a, int64_t k) { return _mm512_add_epi64(a, _mm512_set1_epi64(k)); }
  static D load(const double* p) { return _mm512_loadu_pd(p); }
  static I loadi(const int64_t* p) { return _mm512_loadu_si512(p); }
  static D loadc(const double* p) { return _mm512_loadu_pd(p); }
  static D loadc(const float* p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
  static D neg(D x) {
    return _mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(x), _mm512_set1_epi64(INT64_MIN)));
  }
  static D add(D a, D b) { return _mm512_add_pd(a, b); }
  static D sub(D a, D b) { return _mm512_sub_pd(a, b); }
  static Mk lt(D a, D b) { return _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ); }
  static Mk eq(D a, D b) { return _mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ); }
  static Mk ngt(D a, D b) { return _mm512_cmp_pd_mask(a, b, _CMP_NGT_UQ); }
  static Mk mor(Mk a, Mk b) { return a | b; }
  static Mk mzero() { return 0; }
  static bool any(Mk m) { return m != 0; }
  static D sel(Mk m, D a, D b) { return _mm512_mask_blend_pd(m, a, b); }  // m ? b : a
  static I seli(Mk m, I a, I b) { return _mm512_mask_blend_epi64(m, a, b); }
  static void store(double* p, D x) { _mm512_storeu_pd(p, x); }
  static void storei(int64_t* p, I x) { _mm512_storeu_si512(p, x); }
  static void store_upd(double* p, Mk m, D x) { _mm512_mask_storeu_pd(p, m, x); }
  static void storei_if(int64_t* p, Mk m, I x) { _mm512_mask_storeu_epi64(p, m, x); }
  static Mk mand(Mk a, Mk b) { return a & b; }
  static D min(D a, D b) { return _mm512_min_pd(a, b); }  // a < b ? a : b
  static unsigned bits(Mk m) { return m; }
  static Mk ilt(I a, I b) { return _mm512_cmplt_epi64_mask(a, b); }
  static Mk ieq(I a, I b) { return _mm512_cmpeq_epi64_mask(a, b); }
  static double hmin(D x) { return _mm512_reduce_min_pd(x); }
  static int64_t hmin_idx(Mk m, I x) { return _mm512_mask_reduce_min_epi64(m, x); }
};
#elif defined(__AVX2__)
#define LOOM_LAP_SIMD 1
struct V {
  static constexpr int W = 4;
  using D = __m256d;
  using I = __m256i;
  using Mk = __m256d;  // all-ones / all-zeros lanes
  static D set1(double x) { return _mm256_set1_pd(x); }
  static I set1i(int64_t x) { return _mm256_set1_epi64x(x); }
  static I iota() { return _mm256_setr_epi64x(0, 1, 2, 3); }
  static I addi(I a, int64_t k) { return _mm256_add_epi64(a, _mm256_set1_epi64x(k)); }
  static D load(const double* p) { return _mm256_loadu_pd(p); }
  static I loadi(const int64_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static D loadc(const double* p) { return _mm256_loadu_pd(p); }
  static D loadc(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
  static D neg(D x) { return _mm256_xor_pd(x, _mm256_set1_pd(-0.0)); }
  static D add(D a, D b) { return _mm256_add_pd(a, b); }
  static D sub(D a, D b) { return _mm256_sub_pd(a, b); }
  static Mk lt(D a, D b) { return _mm256_cmp_pd(a, b, _CMP_LT_OQ); }
  static Mk eq(D a, D b) { return _mm256_cmp_pd(a, b, _CMP_EQ_OQ); }
  static Mk ngt(D a, D b) { return _mm256_cmp_pd(a, b, _CMP_NGT_UQ); }
  static Mk mor(Mk a, Mk b) { return _mm256_or_pd(a, b); }
  static Mk mzero() { return _mm256_setzero_pd(); }
  static bool any(Mk m) { return _mm256_movemask_pd(m) != 0; }
  static D sel(Mk m, D a, D b) { return _mm256_blendv_pd(a, b, m); }
  static I seli(Mk m, I a, I b) {
    return _mm256_castpd_si256(_mm256_blendv_pd(_mm256_castsi256_pd(a), _mm256_castsi256_pd(b), m));
  }
  static void store(double* p, D x) { _mm256_storeu_pd(p, x); }
  static void storei(int64_t* p, I x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x); }
  // x already holds the old values outside m: store it whole, without a branch.
  static void store_upd(double* p, Mk, D x) { store(p, x); }
  // Branch-free read-blend-write: the update pattern is data dependent, a branch mispredicts.
  static void storei_if(int64_t* p, Mk m, I x) {
    __m256i* q = reinterpret_cast<__m256i*>(p);
    _mm256_storeu_si256(q, seli(m, _mm256_loadu_si256(q), x));
  }
  static Mk mand(Mk a, Mk b) { return _mm256_and_pd(a, b); }
  static D min(D a, D b) { return _mm256_min_pd(a, b); }  // a < b ? a : b
  static unsigned bits(Mk m) { return static_cast<unsigned>(_mm256_movemask_pd(m)); }
  static Mk ilt(I a, I b) { return _mm256_castsi256_pd(_mm256_cmpgt_epi64(b, a)); }
  static Mk ieq(I a, I b) { return _mm256_castsi256_pd(_mm256_cmpeq_epi64(a, b)); }
  static double hmin(D x) {
    const __m128d m = _mm_min_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    return _mm_cvtsd_f64(_mm_min_sd(m, _mm_unpackhi_pd(m, m)));
  }
  static int64_t hmin_idx(Mk m, I x) {
    alignas(32) int64_t a[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(a), x);
    const int bits = _mm256_movemask_pd(m);
    int64_t r = INT64_MAX;
    for (int l = 0; l < 4; ++l)
      if (bits >> l & 1) r = std::min(r, a[l]);
    return r;
  }
};
#endif

#ifdef LOOM_LAP_SIMD
// Independent running minima per sweep, so the min chains of consecutive vectors overlap.
constexpr int kUnroll = 4;

template <typename T, bool MAX>
inline V::D loadcs(const T* p) {
  const V::D c = V::loadc(p);
  if constexpr (MAX) return V::neg(c);
  return c;
}
// (a, ia) < (b, ib) lexicographically, lane by lane.
inline V::Mk lex_lt(V::D a, V::I ia, V::D b, V::I ib) {
  return V::mor(V::lt(a, b), V::mand(V::eq(a, b), V::ilt(ia, ib)));
}
// Lexicographic minimum over U accumulators and their lanes; index -1 when every value is +inf.
// Unrecorded slots hold (+inf, -1); recorded ones are finite, so only they can win.
template <int U>
inline void lex_min_reduce(const V::D* val, const V::I* idx, double& best, int64_t& bj) {
  V::D b = val[0];
  V::I bi = idx[0];
  for (int u = 1; u < U; ++u) {
    const V::Mk take = lex_lt(val[u], idx[u], b, bi);
    b = V::sel(take, b, val[u]), bi = V::seli(take, bi, idx[u]);
  }
  best = V::hmin(b);
  bj = best < kInf ? V::hmin_idx(V::eq(b, V::set1(best)), bi) : -1;
  if (bj < 0) best = kInf;
}
#endif

// Best and second best of h[j] = c[j] - v[j] over a row, in lexicographic (value, index) order.
// Forbidden (+inf) entries never qualify, so j1 / j2 are -1 when fewer than 1 / 2 are finite.
// With CHECK, also reports whether the row holds NaN or -inf (one compare per entry).
struct Top2 {
  double m1, m2;
  int64_t j1, j2;
  bool bad;
};

inline void top2_push(Top2& t, double h, int64_t j) {
  if (lex_less(h, j, t.m1, t.j1)) {
    t.m2 = t.m1, t.j2 = t.j1, t.m1 = h, t.j1 = j;
  } else if (lex_less(h, j, t.m2, t.j2)) {
    t.m2 = h, t.j2 = j;
  }
}

template <typename T, bool MAX, bool CHECK>
Top2 row_top2(const T* row, const double* v, int64_t M) {
  Top2 t{kInf, kInf, -1, -1, false};
  int64_t j = 0;
#ifdef LOOM_LAP_SIMD
  constexpr int W = V::W, U = 2, S = W * U;
  if (M >= S) {
    V::D m1[U], m2[U];
    V::I i1[U], i2[U], jv[U];
    V::Mk bad = V::mzero();
    const V::D ninf = V::set1(-kInf);
    for (int u = 0; u < U; ++u)
      m1[u] = m2[u] = V::set1(kInf), i1[u] = i2[u] = V::set1i(-1), jv[u] = V::addi(V::iota(), u * W);
    for (; j + S <= M; j += S) {
      for (int u = 0; u < U; ++u) {
        const V::D c = loadcs<T, MAX>(row + j + u * W);
        if constexpr (CHECK) bad = V::mor(bad, V::ngt(c, ninf));
        const V::D h = V::sub(c, V::load(v + j + u * W));
        // Within a lane indices increase, so strict < keeps the first occurrence.
        const V::Mk lt1 = V::lt(h, m1[u]), lt2 = V::lt(h, m2[u]);
        m2[u] = V::sel(lt1, V::sel(lt2, m2[u], h), m1[u]);
        i2[u] = V::seli(lt1, V::seli(lt2, i2[u], jv[u]), i1[u]);
        m1[u] = V::sel(lt1, m1[u], h);
        i1[u] = V::seli(lt1, i1[u], jv[u]);
        jv[u] = V::addi(jv[u], S);
      }
    }
    // Merge the accumulators lane by lane: the first is the smaller first, the second the
    // smaller of the other first and the winner's second.
    for (int u = 1; u < U; ++u) {
      const V::Mk bw = lex_lt(m1[u], i1[u], m1[0], i1[0]);
      const V::D lose1 = V::sel(bw, m1[u], m1[0]), win2 = V::sel(bw, m2[0], m2[u]);
      const V::I lose1i = V::seli(bw, i1[u], i1[0]), win2i = V::seli(bw, i2[0], i2[u]);
      m1[0] = V::sel(bw, m1[0], m1[u]), i1[0] = V::seli(bw, i1[0], i1[u]);
      const V::Mk sw = lex_lt(win2, win2i, lose1, lose1i);
      m2[0] = V::sel(sw, lose1, win2), i2[0] = V::seli(sw, lose1i, win2i);
    }
    // Across lanes: the best first; then the best among the other lanes' firsts and its lane's second.
    lex_min_reduce<1>(&m1[0], &i1[0], t.m1, t.j1);
    if (t.j1 >= 0) {
      const V::Mk lane = V::ieq(i1[0], V::set1i(t.j1));
      const V::D rest = V::sel(lane, m1[0], m2[0]);
      const V::I resti = V::seli(lane, i1[0], i2[0]);
      lex_min_reduce<1>(&rest, &resti, t.m2, t.j2);
    }
    if constexpr (CHECK) t.bad = V::any(bad);
  }
#endif
  for (; j < M; ++j) {
    const double c = load1<T, MAX>(row + j);
    if constexpr (CHECK) t.bad |= !(c > -kInf);
    const double h = c - v[j];
    if (h < kInf) top2_push(t, h, j);
  }
  if (t.j1 < 0) t.m1 = kInf;
  if (t.j2 < 0) t.m2 = kInf;
  return t;
}

// One Dijkstra relaxation through row i: d[j] = min(d[j], c[i][j] - v[j] + shift), recording
// pred[j] = i on improvement. Columns that left the search carry v = -inf and d = +inf, so they
// are neither updated nor chosen. With INIT the distances are written unconditionally (the first
// row of a search). Returns the smallest distance and its column (smallest index on ties);
// jm = -1 when all are +inf.
template <typename T, bool MAX, bool INIT>
void relax(const T* row, const double* v, double* d, int64_t* pred, int64_t M, double shift,
           int64_t i, double& mn, int64_t& jm) {
  double best = kInf;
  int64_t bj = -1;
  int64_t j = 0;
#ifdef LOOM_LAP_SIMD
  // Two passes: the sweep keeps only the running minimum (one min per vector, no index
  // bookkeeping in the hot loop); a short search then finds the first column holding it.
  constexpr int W = V::W, U = kUnroll, S = W * U;
  double simd_best = kInf;
  if (M >= S) {
    V::D vb[U];
    for (int u = 0; u < U; ++u) vb[u] = V::set1(kInf);
    const V::I vi = V::set1i(i);
    const V::D vs = V::set1(shift);
    for (; j + S <= M; j += S) {
      for (int u = 0; u < U; ++u) {
        const int64_t o = j + u * W;
        const V::D h = V::add(V::sub(loadcs<T, MAX>(row + o), V::load(v + o)), vs);
        if constexpr (INIT) {
          V::store(d + o, h);
          V::storei(pred + o, vi);
          vb[u] = V::min(h, vb[u]);
        } else {
          // Columns out of the search have v = -inf, so h = +inf never updates them.
          const V::D dj = V::load(d + o);
          const V::Mk upd = V::lt(h, dj);
          const V::D dn = V::min(h, dj);
          V::store_upd(d + o, upd, dn);
          V::storei_if(pred + o, upd, vi);
          vb[u] = V::min(dn, vb[u]);
        }
      }
    }
    for (int u = 1; u < U; ++u) vb[0] = V::min(vb[u], vb[0]);
    simd_best = V::hmin(vb[0]);
  }
#endif
  for (; j < M; ++j) {
    const double h = load1<T, MAX>(row + j) - v[j] + shift;
    double dj;
    if constexpr (INIT) {
      d[j] = dj = h;
      pred[j] = i;
    } else {
      dj = d[j];
      if (h < dj) d[j] = dj = h, pred[j] = i;
    }
    if (dj < best) best = dj, bj = j;  // later indices only win on a strictly smaller value
  }
#ifdef LOOM_LAP_SIMD
  if (simd_best < kInf && simd_best <= best) {
    // The smallest index holding the minimum lies in the vector part.
    const V::D target = V::set1(simd_best);
    for (int64_t k = 0;; k += W) {
      const unsigned hit = V::bits(V::eq(V::load(d + k), target));
      if (hit) {
        bj = k + __builtin_ctz(hit);
        break;
      }
    }
    best = simd_best;
  }
#endif
  mn = best;
  jm = bj;
}

// The first unassigned column (y[j] < 0) whose distance equals x, or -1.
inline int64_t first_free_at(const double* d, const int64_t* y, int64_t M, double x) {
  int64_t j = 0;
#ifdef LOOM_LAP_SIMD
  constexpr int W = V::W;
  const V::D vx = V::set1(x);
  const V::I zero = V::set1i(0);
  for (; j + W <= M; j += W) {
    const unsigned hit = V::bits(V::mand(V::eq(V::load(d + j), vx), V::ilt(V::loadi(y + j), zero)));
    if (hit) return j + __builtin_ctz(hit);
  }
#endif
  for (; j < M; ++j)
    if (d[j] == x && y[j] < 0) return j;
  return -1;
}

// Column reduction, one row at a time: colmin[j] = min(colmin[j], c[j]) with argrow[j] = i on a
// strict improvement (the first row attaining each minimum). Returns whether the row holds NaN
// or -inf: !(c > -inf) is true exactly for those, one compare per entry in the same sweep.
template <typename T, bool MAX>
bool col_min_sweep(const T* row, int64_t i, double* colmin, int64_t* argrow, int64_t M) {
  int64_t j = 0;
  bool bad = false;
#ifdef LOOM_LAP_SIMD
  constexpr int W = V::W;
  const V::D ninf = V::set1(-kInf);
  const V::I vi = V::set1i(i);
  V::Mk vbad = V::mzero();
  for (; j + W <= M; j += W) {
    const V::D c = loadcs<T, MAX>(row + j);
    const V::D m = V::load(colmin + j);
    vbad = V::mor(vbad, V::ngt(c, ninf));
    const V::Mk lt = V::lt(c, m);
    V::store(colmin + j, V::min(c, m));
    V::storei(argrow + j, V::seli(lt, V::loadi(argrow + j), vi));
  }
  bad = V::any(vbad);
#endif
  for (; j < M; ++j) {
    const double c = load1<T, MAX>(row + j);
    bad |= !(c > -kInf);
    if (c < colmin[j]) colmin[j] = c, argrow[j] = i;
  }
  return bad;
}

template <typename T, bool MAX>
class Solver {
 public:
  Solver(const T* cost, int64_t N, int64_t M, int64_t* x, LapWork& w)
      : c_(cost), N_(N), M_(M), x_(x), v_(w.v.data()), d_(w.d.data()), fin_d_(w.fin_d.data()), fin_v_(w.fin_v.data()),
        pred_(w.pred.data()), y_(w.y.data()), fin_(w.fin.data()), free_(w.free_rows.data()), w_(w) {}

  Status run() {
    std::fill(x_, x_ + N_, int64_t{-1});
    std::fill(y_, y_ + M_, int64_t{-1});
    int64_t nfree = 0;
    const Status s = N_ == M_ ? init_square(nfree) : init_rect(nfree);
    if (s != kOk) return s;
    if (!row_reduction(nfree)) return kInfeasible;
    for (int64_t k = 0; k < nfree; ++k)
      if (!augment(free_[k])) return kInfeasible;
    return kOk;
  }

 private:
  const T* row(int64_t i) const { return c_ + i * M_; }

  // Column reduction + reduction transfer (square only: it sets v to column minima, which may
  // be positive, and every column must end up assigned).
  Status init_square(int64_t& nfree) {
    double* colmin = w_.colmin.data();
    int64_t* argrow = w_.argrow.data();
    int32_t* matches = w_.matches.data();
    std::fill(colmin, colmin + M_, kInf);
    std::fill(argrow, argrow + M_, int64_t{0});
    // Row-major sweep: strict < keeps the first row attaining each column minimum. The
    // validity check rides along: !(c > -inf) is true exactly for NaN and -inf.
    bool bad = false;
    for (int64_t i = 0; i < N_; ++i) bad |= col_min_sweep<T, MAX>(row(i), i, colmin, argrow, M_);
    if (bad) return kInvalid;
    std::fill(matches, matches + N_, 0);
    for (int64_t j = M_ - 1; j >= 0; --j) {
      if (!(colmin[j] < kInf)) return kInfeasible;  // a column with no finite entry
      v_[j] = colmin[j];
      const int64_t i = argrow[j];
      if (++matches[i] == 1) x_[i] = j, y_[j] = i;
    }
    nfree = 0;
    for (int64_t i = 0; i < N_; ++i) {
      if (matches[i] == 0) {
        free_[nfree++] = i;
      } else if (matches[i] == 1) {
        // Reduction transfer: lower v of the row's only column down to the row's second best,
        // so u[i] = min_{j != x[i]} (c[i][j] - v[j]) and the pair stays tight.
        const int64_t j1 = x_[i];
        const Top2 t = row_top2<T, MAX, false>(row(i), v_, M_);
        const double second = t.j1 == j1 ? t.m2 : t.m1;
        if (second < kInf) v_[j1] -= second;
      }
      // A row holding several column minima keeps the first one of the reverse scan (tight at
      // u[i] = 0); its other minima stay unassigned for the later phases.
    }
    return kOk;
  }

  // Greedy row reduction with v = 0 (rectangular: v must stay <= 0 and 0 on free columns).
  // Each row takes its cheapest column when that column is still free and lowers that column's
  // potential to the row's second best (an auction bid), which keeps every assigned row tight.
  Status init_rect(int64_t& nfree) {
    std::fill(v_, v_ + M_, 0.0);
    nfree = 0;
    bool bad = false;
    bool infeasible = false;
    for (int64_t i = 0; i < N_; ++i) {
      const Top2 t = row_top2<T, MAX, true>(row(i), v_, M_);
      bad |= t.bad;
      if (t.j1 < 0) {
        infeasible = true;
        continue;
      }
      if (y_[t.j1] < 0) {
        x_[i] = t.j1, y_[t.j1] = i;
        if (t.m2 < kInf) v_[t.j1] -= t.m2 - t.m1;
      } else {
        free_[nfree++] = i;
      }
    }
    if (bad) return kInvalid;
    if (infeasible) return kInfeasible;  // a row with no finite entry
    return kOk;
  }

  // Augmenting row reduction (JV): free rows bid for their best column like in an auction,
  // lowering its potential to their second best and evicting its owner. Two passes, plus a
  // global step cap so that float price wars with tiny decrements cannot run for long.
  bool row_reduction(int64_t& nfree) {
    int64_t steps = 0;
    const int64_t cap = kRowReductionSteps * N_ + 64;
    for (int pass = 0; pass < 2 && nfree > 0; ++pass) {
      int64_t k = 0;
      const int64_t prv = nfree;
      nfree = 0;
      while (k < prv) {
        if (++steps > cap) {
          while (k < prv) free_[nfree++] = free_[k++];
          return true;
        }
        const int64_t i = free_[k++];
        const Top2 t = row_top2<T, MAX, false>(row(i), v_, M_);
        if (t.j1 < 0) return false;  // no finite entry in this row
        int64_t j1 = t.j1;
        int64_t i0 = y_[j1];
        // A strict gap with a finite second best lets the row outbid the owner for good.
        const bool lowers = t.m1 < t.m2 && t.m2 < kInf;
        if (lowers) {
          v_[j1] -= t.m2 - t.m1;
        } else if (i0 >= 0 && t.m1 == t.m2) {
          // A tie: take the second column instead, which may be free.
          j1 = t.j2;
          i0 = y_[j1];
        }
        x_[i] = j1, y_[j1] = i;
        if (i0 >= 0) {
          x_[i0] = -1;
          if (lowers)
            free_[--k] = i0;  // re-bid at once: the price moved, the evicted row may move on
          else
            free_[nfree++] = i0;
        }
      }
    }
    return true;
  }

  // Dijkstra shortest augmenting path from free row f on reduced costs c[i][j] - v[j]; updates v
  // of the columns that left the search and flips the path. False when no finite path exists.
  bool augment(int64_t f) {
    double mn;
    int64_t jm;
    relax<T, MAX, true>(row(f), v_, d_, pred_, M_, 0.0, f, mn, jm);
    int64_t nfin = 0;
    double prev = kInf;
    for (;;) {
      if (jm < 0 || !(mn < kInf)) return false;
      // Among columns tied at the minimum, a free one ends the search at once (integer costs:
      // 10-100x fewer relax steps). Looking costs a sweep, and rows tight at several columns
      // make equal consecutive distances common even for continuous costs, where a free column
      // is almost never among them: so look at the first step, and after that only while
      // looking keeps paying off (a budget that successes refill).
      if (y_[jm] >= 0 && (nfin == 0 || (mn == prev && tie_budget_ > 0))) {
        const int64_t jf = first_free_at(d_, y_, M_, mn);
        if (jf >= 0) {
          jm = jf;
          tie_budget_ = std::min<int64_t>(tie_budget_ + kTieRefill, kTieBudgetMax);
        } else if (nfin > 0) {
          --tie_budget_;
        }
      }
      prev = mn;
      const double vj = v_[jm];
      fin_[nfin] = jm, fin_d_[nfin] = mn, fin_v_[nfin] = vj, ++nfin;
      // The column leaves the search: with v = -inf every later path to it costs +inf, so the
      // relax step needs no membership test. Its potential is restored below.
      v_[jm] = -kInf, d_[jm] = kInf;
      if (y_[jm] < 0) break;
      const int64_t i = y_[jm];
      // Row i is tight at column jm: its potential is u = c[i][jm] - v[jm], and a path through
      // it reaches column j at mn + (c[i][j] - v[j] - u).
      const double shift = mn - (load1<T, MAX>(row(i) + jm) - vj);
      relax<T, MAX, false>(row(i), v_, d_, pred_, M_, shift, i, mn, jm);
    }
    // mn is now the length of the path; jm its free end.
    for (int64_t k = 0; k < nfin; ++k) v_[fin_[k]] = fin_v_[k] + (fin_d_[k] - mn);
    int64_t j = fin_[nfin - 1];
    for (;;) {
      const int64_t i = pred_[j];
      y_[j] = i;
      const int64_t next = x_[i];
      x_[i] = j;
      if (i == f) break;
      j = next;
    }
    return true;
  }

  static constexpr int64_t kTieBudgetMax = 1024, kTieRefill = 8;
  int64_t tie_budget_ = 64;
  const T* c_;
  int64_t N_, M_;
  int64_t* x_;
  double *v_, *d_, *fin_d_, *fin_v_;
  int64_t *pred_, *y_, *fin_, *free_;
  LapWork& w_;
};

// w is sized for (N, M) by the caller; N > 0.
template <typename T>
Status solve_one(const T* cost, int64_t N, int64_t M, bool maximize, int64_t* col4row, LapWork& w) {
  const Status s = maximize ? Solver<T, true>(cost, N, M, col4row, w).run()
                            : Solver<T, false>(cost, N, M, col4row, w).run();
  if (s != kOk) std::fill(col4row, col4row + N, int64_t{-1});
  return s;
}

}  // namespace

// This instruction set's entry points, called by the driver below.
Status lap_solve_one(const float* cost, int64_t N, int64_t M, bool maximize, int64_t* col4row, LapWork& w) {
  return solve_one<float>(cost, N, M, maximize, col4row, w);
}
Status lap_solve_one(const double* cost, int64_t N, int64_t M, bool maximize, int64_t* col4row, LapWork& w) {
  return solve_one<double>(cost, N, M, maximize, col4row, w);
}

}  // namespace LOOM_ISA_NS

#if !defined(LOOM_ISA_VARIANT)  // the driver, once
#if defined(LOOM_DISPATCH)
namespace isa_avx2 {
Status lap_solve_one(const float*, int64_t, int64_t, bool, int64_t*, LapWork&);
Status lap_solve_one(const double*, int64_t, int64_t, bool, int64_t*, LapWork&);
}  // namespace isa_avx2
namespace isa_avx512 {
Status lap_solve_one(const float*, int64_t, int64_t, bool, int64_t*, LapWork&);
Status lap_solve_one(const double*, int64_t, int64_t, bool, int64_t*, LapWork&);
}  // namespace isa_avx512
#endif

namespace {
template <typename T>
Status solve_one_on(Isa isa, const T* cost, int64_t N, int64_t M, bool maximize, int64_t* col4row, LapWork& w) {
  if (N == 0) return kOk;
  w.resize(N, M);
  switch (isa) {
#if defined(LOOM_DISPATCH)
    case Isa::kAvx512: return isa_avx512::lap_solve_one(cost, N, M, maximize, col4row, w);
    case Isa::kAvx2: return isa_avx2::lap_solve_one(cost, N, M, maximize, col4row, w);
#endif
    default: return isa_base::lap_solve_one(cost, N, M, maximize, col4row, w);
  }
}
}  // namespace

template <typename T>
void lap_solve_batch(const T* cost, int64_t B, int64_t N, int64_t M, bool maximize,
                     int64_t* col4row, int8_t* status, int threads) {
  if (B <= 0) return;
  if (N > M) throw std::invalid_argument("lap_solve_batch needs N <= M (transpose first)");
  // hardware_concurrency() reads /sys on every call: ask once.
  static const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  int64_t nt = threads > 0 ? threads : hw;
  // Starting a thread costs tens of microseconds: by default give each at least ~64k entries.
  if (threads <= 0) nt = std::min<int64_t>(nt, (B * N * M) >> 16);
  nt = std::max<int64_t>(1, std::min<int64_t>(nt, B));
  const Isa isa = active_isa();  // one path for the whole batch, even if set_isa() runs meanwhile
  auto solve = [&](int64_t b, LapWork& w) {
    status[b] = solve_one_on<T>(isa, cost + b * N * M, N, M, maximize, col4row + b * N, w);
  };
  if (nt == 1) {
    thread_local LapWork w;  // reused across calls: small problems are dominated by setup
    for (int64_t b = 0; b < B; ++b) solve(b, w);
    return;
  }
  // Workers pull problem indices from a shared counter; each problem is solved by exactly one
  // thread with the same code, so the output does not depend on the scheduling.
  std::atomic<int64_t> next{0};
  std::vector<std::exception_ptr> errors(nt);
  auto worker = [&](int64_t t) {
    try {
      LapWork w;
      for (int64_t b = next.fetch_add(1); b < B; b = next.fetch_add(1)) solve(b, w);
    } catch (...) {
      errors[t] = std::current_exception();
      next.store(B);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int64_t t = 1; t < nt; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

template void lap_solve_batch<float>(const float*, int64_t, int64_t, int64_t, bool, int64_t*, int8_t*, int);
template void lap_solve_batch<double>(const double*, int64_t, int64_t, int64_t, bool, int64_t*, int8_t*, int);
#endif  // !LOOM_ISA_VARIANT

}  // namespace loom

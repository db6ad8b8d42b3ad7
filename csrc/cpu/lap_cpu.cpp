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
//   (SIMD with AVX2 where the compiler targets it, scalar otherwise). Dijkstra keeps a dense
//   distance array; a column leaves the search by having its distance set to -inf, so the relax
//   step needs no index list and no gathers.
// * maximize negates each entry as it is loaded; float input is widened as it is loaded.
// * NaN / -inf entries are detected inside the first full sweep the algorithm makes anyway (the
//   column reduction for square problems, the greedy row reduction for rectangular ones).
// * Ties are broken by the smallest index everywhere, so results are deterministic and do not
//   depend on the SIMD width or on the number of threads.
#include "cpu/lap_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/status.h"

namespace loom {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

template <typename T, bool MAX>
inline double load1(const T* p) {
  const double c = static_cast<double>(*p);
  return MAX ? -c : c;
}

// (value, index) pairs ordered lexicographically: the smaller value wins, then the smaller index.
inline bool lex_less(double a, int64_t ia, double b, int64_t ib) {
  return a < b || (a == b && ia < ib);
}

#if defined(__AVX2__)
template <typename T>
inline __m256d load4(const T* p);
template <>
inline __m256d load4<double>(const double* p) { return _mm256_loadu_pd(p); }
template <>
inline __m256d load4<float>(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }

template <typename T, bool MAX>
inline __m256d load4s(const T* p) {
  const __m256d c = load4<T>(p);
  if constexpr (MAX) return _mm256_xor_pd(c, _mm256_set1_pd(-0.0));
  return c;
}
inline __m256d as_pd(__m256i x) { return _mm256_castsi256_pd(x); }
inline __m256i as_si(__m256d x) { return _mm256_castpd_si256(x); }
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
  // Index M+1 stands for "none" so that lex_less prefers any real entry of equal value (only
  // +inf can be equal to the initial value, and +inf entries are rejected below).
  Top2 t{kInf, kInf, -1, -1, false};
  int64_t j = 0;
#if defined(__AVX2__)
  if (M >= 8) {
    __m256d m1 = _mm256_set1_pd(kInf), m2 = m1;
    __m256i i1 = _mm256_set1_epi64x(-1), i2 = i1;
    __m256i jv = _mm256_setr_epi64x(0, 1, 2, 3);
    const __m256i four = _mm256_set1_epi64x(4);
    const __m256d ninf = _mm256_set1_pd(-kInf);
    __m256d bad = _mm256_setzero_pd();
    for (; j + 4 <= M; j += 4) {
      const __m256d c = load4s<T, MAX>(row + j);
      if constexpr (CHECK) bad = _mm256_or_pd(bad, _mm256_cmp_pd(c, ninf, _CMP_NGT_UQ));
      const __m256d h = _mm256_sub_pd(c, _mm256_loadu_pd(v + j));
      // Within a lane indices increase, so strict < keeps the first occurrence.
      const __m256d lt1 = _mm256_cmp_pd(h, m1, _CMP_LT_OQ);
      const __m256d lt2 = _mm256_cmp_pd(h, m2, _CMP_LT_OQ);
      m2 = _mm256_blendv_pd(_mm256_blendv_pd(m2, h, lt2), m1, lt1);
      i2 = as_si(_mm256_blendv_pd(_mm256_blendv_pd(as_pd(i2), as_pd(jv), lt2), as_pd(i1), lt1));
      m1 = _mm256_blendv_pd(m1, h, lt1);
      i1 = as_si(_mm256_blendv_pd(as_pd(i1), as_pd(jv), lt1));
      jv = _mm256_add_epi64(jv, four);
    }
    alignas(32) double a1[4], a2[4];
    alignas(32) int64_t b1[4], b2[4];
    _mm256_store_pd(a1, m1);
    _mm256_store_pd(a2, m2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(b1), i1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(b2), i2);
    for (int l = 0; l < 4; ++l) {
      if (b1[l] >= 0) top2_push(t, a1[l], b1[l]);
      if (b2[l] >= 0) top2_push(t, a2[l], b2[l]);
    }
    if constexpr (CHECK) t.bad = _mm256_movemask_pd(bad) != 0;
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

// One Dijkstra relaxation through row i: for every column still in the search (d[j] > -inf),
// d[j] = min(d[j], c[i][j] - v[j] + shift), recording pred[j] = i on improvement. With INIT the
// distances are written unconditionally (the first row of a search). Returns the smallest
// remaining distance and its column (smallest index on ties); jm = -1 when all are +inf.
template <typename T, bool MAX, bool INIT>
void relax(const T* row, const double* v, double* d, int64_t* pred, int64_t M, double shift,
           int64_t i, double& mn, int64_t& jm) {
  double best = kInf;
  int64_t bj = -1;
  int64_t j = 0;
#if defined(__AVX2__)
  if (M >= 8) {
    __m256d vb = _mm256_set1_pd(kInf);
    __m256i vbj = _mm256_set1_epi64x(-1);
    __m256i jv = _mm256_setr_epi64x(0, 1, 2, 3);
    const __m256i four = _mm256_set1_epi64x(4);
    const __m256i vi = _mm256_set1_epi64x(i);
    const __m256d vs = _mm256_set1_pd(shift);
    const __m256d ninf = _mm256_set1_pd(-kInf);
    const __m256d pinf = _mm256_set1_pd(kInf);
    for (; j + 4 <= M; j += 4) {
      const __m256d h = _mm256_add_pd(_mm256_sub_pd(load4s<T, MAX>(row + j), _mm256_loadu_pd(v + j)), vs);
      __m256d key;
      if constexpr (INIT) {
        _mm256_storeu_pd(d + j, h);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pred + j), vi);
        key = h;
      } else {
        const __m256d dj = _mm256_loadu_pd(d + j);
        const __m256d lt = _mm256_cmp_pd(h, dj, _CMP_LT_OQ);
        __m256d dn = dj;
        if (_mm256_movemask_pd(lt)) {
          dn = _mm256_blendv_pd(dj, h, lt);
          _mm256_storeu_pd(d + j, dn);
          __m256i* pp = reinterpret_cast<__m256i*>(pred + j);
          _mm256_storeu_si256(pp, as_si(_mm256_blendv_pd(as_pd(_mm256_loadu_si256(pp)), as_pd(vi), lt)));
        }
        // Columns that left the search hold -inf: keep them out of the minimum.
        key = _mm256_blendv_pd(dn, pinf, _mm256_cmp_pd(dn, ninf, _CMP_EQ_OQ));
      }
      const __m256d kl = _mm256_cmp_pd(key, vb, _CMP_LT_OQ);
      vb = _mm256_blendv_pd(vb, key, kl);
      vbj = as_si(_mm256_blendv_pd(as_pd(vbj), as_pd(jv), kl));
      jv = _mm256_add_epi64(jv, four);
    }
    alignas(32) double a[4];
    alignas(32) int64_t b[4];
    _mm256_store_pd(a, vb);
    _mm256_store_si256(reinterpret_cast<__m256i*>(b), vbj);
    for (int l = 0; l < 4; ++l)
      if (b[l] >= 0 && (bj < 0 || lex_less(a[l], b[l], best, bj))) best = a[l], bj = b[l];
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
      if (dj == -kInf) continue;
    }
    if (dj < best) best = dj, bj = j;  // later indices only win on a strictly smaller value
  }
  mn = best;
  jm = bj;
}

// Per-thread scratch, reused across the problems a worker solves.
struct Work {
  std::vector<double> v, d, fin_d, colmin;
  std::vector<int64_t> pred, y, fin, free_rows, argrow;
  std::vector<int32_t> matches;
  void resize(int64_t N, int64_t M) {
    v.resize(M), d.resize(M), fin_d.resize(M), colmin.resize(M);
    pred.resize(M), y.resize(M), fin.resize(M), argrow.resize(M);
    free_rows.resize(N), matches.resize(N);
  }
};

template <typename T, bool MAX>
class Solver {
 public:
  Solver(const T* cost, int64_t N, int64_t M, int64_t* x, Work& w)
      : c_(cost), N_(N), M_(M), x_(x), v_(w.v.data()), d_(w.d.data()), fin_d_(w.fin_d.data()),
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
    int bad = 0;
    for (int64_t i = 0; i < N_; ++i) {
      const T* r = row(i);
      for (int64_t j = 0; j < M_; ++j) {
        const double c = load1<T, MAX>(r + j);
        bad |= !(c > -kInf);
        const bool lt = c < colmin[j];
        colmin[j] = lt ? c : colmin[j];
        argrow[j] = lt ? i : argrow[j];
      }
    }
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
    const int64_t cap = 8 * N_ + 64;
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
    for (;;) {
      if (jm < 0 || !(mn < kInf)) return false;
      fin_[nfin] = jm, fin_d_[nfin] = mn, ++nfin;
      d_[jm] = -kInf;
      if (y_[jm] < 0) break;
      const int64_t i = y_[jm];
      // Row i is tight at column jm: its potential is u = c[i][jm] - v[jm], and a path through
      // it reaches column j at mn + (c[i][j] - v[j] - u).
      const double shift = mn - (load1<T, MAX>(row(i) + jm) - v_[jm]);
      relax<T, MAX, false>(row(i), v_, d_, pred_, M_, shift, i, mn, jm);
    }
    // mn is now the length of the path; jm its free end.
    for (int64_t k = 0; k < nfin; ++k) v_[fin_[k]] += fin_d_[k] - mn;
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

  const T* c_;
  int64_t N_, M_;
  int64_t* x_;
  double *v_, *d_, *fin_d_;
  int64_t *pred_, *y_, *fin_, *free_;
  Work& w_;
};

template <typename T>
Status solve_one(const T* cost, int64_t N, int64_t M, bool maximize, int64_t* col4row, Work& w) {
  if (N == 0) return kOk;
  w.resize(N, M);
  const Status s = maximize ? Solver<T, true>(cost, N, M, col4row, w).run()
                            : Solver<T, false>(cost, N, M, col4row, w).run();
  if (s != kOk) std::fill(col4row, col4row + N, int64_t{-1});
  return s;
}

}  // namespace

template <typename T>
void lap_solve_batch(const T* cost, int64_t B, int64_t N, int64_t M, bool maximize,
                     int64_t* col4row, int8_t* status, int threads) {
  if (B <= 0) return;
  if (N > M) throw std::invalid_argument("lap_solve_batch needs N <= M (transpose first)");
  int64_t nt = threads > 0 ? threads : static_cast<int64_t>(std::thread::hardware_concurrency());
  nt = std::max<int64_t>(1, std::min<int64_t>(nt, B));
  auto solve = [&](int64_t b, Work& w) {
    status[b] = solve_one<T>(cost + b * N * M, N, M, maximize, col4row + b * N, w);
  };
  if (nt == 1) {
    Work w;
    for (int64_t b = 0; b < B; ++b) solve(b, w);
    return;
  }
  // Workers pull problem indices from a shared counter; each problem is solved by exactly one
  // thread with the same code, so the output does not depend on the scheduling.
  std::atomic<int64_t> next{0};
  std::vector<std::exception_ptr> errors(nt);
  auto worker = [&](int64_t t) {
    try {
      Work w;
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

}  // namespace loom

// CPU twin of the CUDA ε-scaling auction (Bertsekas 1988; Bertsekas & Castañón 1991, Jacobi
// rounds; shortest-augmenting-path phase finish after Jonker & Volgenant 1987). Every step
// mirrors cuda/auction_cuda.cu: in a round all unassigned bidders bid against the same prices,
// each object takes the highest bid (ties to the lowest bidder), then assignments and prices
// change at once; a sweep of the phase finish relaxes every frontier row against the labels of
// the sweep's start. The math lives in common/auction.h; this file only orders it
// sequentially. Batches run one problem per std::thread task.
#include "cpu/auction_cpu.h"

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "common/auction.h"
#include "common/status.h"

namespace loom {
namespace {
using namespace auction;

struct Workspace {
  std::vector<double> price, x;
  std::vector<uint64_t> best_key;
  std::vector<int> best_bidder, owner, assigned;
  std::vector<int> touched;
  // Phase finish: labels d, their sweep minima dn, predecessor rows, frontier rows.
  std::vector<double> d, dn;
  std::vector<int> pred, pred_new;
  std::vector<char> frontier;
  void resize(int64_t m) {
    price.assign(m, 0.0);
    x.assign(m, 0.0);
    best_key.assign(m, kKeyNone);
    best_bidder.assign(m, kNoIndex);
    owner.assign(m, -1);
    assigned.assign(m, -1);
    touched.clear();
    touched.reserve(m);
    d.assign(m, 0.0);
    dn.assign(m, 0.0);
    pred.assign(m, kNoIndex);
    pred_new.assign(m, kNoIndex);
    frontier.assign(m, 0);
  }
};

// The canonical 32-lane order of auction.h (the GPU sums in exactly this order).
double canon_sum(const double* x, int64_t n, bool absolute) {
  double part[kSumLanes] = {0.0};
  for (int64_t i = 0; i < n; ++i) part[i % kSumLanes] += absolute ? std::fabs(x[i]) : x[i];
  double total = 0.0;
  for (int l = 0; l < kSumLanes; ++l) total += part[l];
  return total;
}

// Places the lowest-index free bidder by a shortest augmenting path (common/auction.h, "Phase
// finish"). cost(i, j) is the bidders' cost in minimization form; n_rows = N real rows;
// m = M bidders and objects.
// Returns false when the round bound is hit first.
template <typename Cost>
bool sap_augment(const Cost& cost, int64_t n_rows, int64_t m, Workspace& ws, int64_t& rounds) {
  double* p = ws.price.data();
  int64_t i0 = 0;
  while (ws.assigned[i0] >= 0) ++i0;
  std::fill(ws.d.begin(), ws.d.end(), HUGE_VAL);
  std::fill(ws.dn.begin(), ws.dn.end(), HUGE_VAL);
  std::fill(ws.pred.begin(), ws.pred.end(), kNoIndex);
  std::fill(ws.x.begin(), ws.x.end(), HUGE_VAL);  // u_i = min_k c_ik + p_k, filled on demand
  std::fill(ws.frontier.begin(), ws.frontier.end(), 0);
  double D = HUGE_VAL;     // label of the best free object so far
  double lmin = HUGE_VAL;  // lowest label of the frontier
  bool source = true;      // the first sweep relaxes the free bidder's row (label 0)
  for (;;) {
    if (++rounds > kMaxRounds) return false;
    // Every frontier row relaxes its row against the labels of the sweep's start (dn starts
    // equal to d). Rows come in ascending order and only a strictly lower label replaces one,
    // so each improved object gets the lowest row reaching its new label: the GPU's two passes
    // (label minima, then atomicMin of the rows that reach them) in one.
    auto relax = [&](int64_t i, double base) {
      double u = ws.x[i];
      if (u == HUGE_VAL) {  // first visit in this search: prices do not move until its end
        for (int64_t k = 0; k < m; ++k) {
          const double x = cost(i, k) + p[k];
          u = x < u ? x : u;
        }
        ws.x[i] = u;
      }
      for (int64_t k = 0; k < m; ++k) {
        const double cand = sap_label(base, cost(i, k) + p[k], u);
        if (cand < ws.dn[k]) {
          ws.dn[k] = cand;
          ws.pred_new[k] = static_cast<int>(i);
        }
      }
    };
    if (source) {
      relax(i0, 0.0);
    } else {
      const double limit = sap_limit(lmin, D, n_rows);
      for (int64_t i = 0; i < m; ++i) {
        if (!ws.frontier[i] || ws.d[ws.assigned[i]] > limit) continue;
        ws.frontier[i] = 0;
        relax(i, ws.d[ws.assigned[i]]);
      }
    }
    source = false;
    // Improved labels take their lowest-index predecessor; D follows the free objects.
    for (int64_t j = 0; j < m; ++j) {
      if (ws.pred_new[j] == kNoIndex) continue;
      ws.d[j] = ws.dn[j];
      ws.pred[j] = ws.pred_new[j];
      if (ws.owner[j] < 0 && ws.d[j] < D) D = ws.d[j];
    }
    // The next frontier: owners of improved objects and rows still waiting, labelled below D.
    int64_t count = 0;
    lmin = HUGE_VAL;
    for (int64_t j = 0; j < m; ++j) {
      const bool improved = ws.pred_new[j] != kNoIndex;
      ws.pred_new[j] = kNoIndex;
      const int o = ws.owner[j];
      if (o < 0) continue;
      const bool keep = (improved || ws.frontier[o]) && ws.d[j] < D;
      ws.frontier[o] = keep;
      if (keep) {
        ++count;
        lmin = ws.d[j] < lmin ? ws.d[j] : lmin;
      }
    }
    if (count == 0) break;
  }
  int64_t jf = 0;
  while (!(ws.owner[jf] < 0 && ws.d[jf] == D)) ++jf;
  for (int64_t j = 0; j < m; ++j) p[j] = sap_price(p[j], ws.d[j], D);
  for (int64_t j = jf;;) {  // flip the path
    const int i = ws.pred[j];
    const int next = ws.assigned[i];
    ws.assigned[i] = static_cast<int>(j);
    ws.owner[j] = i;
    if (i == i0) break;
    j = next;
  }
  return true;
}

template <typename T>
int8_t solve_one(const T* c, int64_t N, int64_t M, bool maximize, double tol, int64_t* col4row,
                 int64_t* rounds_out, Workspace& ws) {
  int64_t rounds = 0;
  if (rounds_out) *rounds_out = 0;
  if (N == 0) return kOk;
  std::fill(col4row, col4row + N, int64_t(-1));

  // One pass: range, integrality, invalid entries, rows without a finite entry.
  double lo = HUGE_VAL, hi = -HUGE_VAL;
  bool invalid = false, has_inf = false, integral = true, empty_row = false;
  double gap_max = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    bool any_finite = false;
    Top2 t = top2_empty();
    for (int64_t j = 0; j < M; ++j) {
      double x = static_cast<double>(c[i * M + j]);
      if (maximize) x = -x;
      scan_entry(x, lo, hi, invalid, has_inf, integral);
      any_finite |= std::isfinite(x);
      if (std::isfinite(x)) top2_push(t, value(x, 0.0), static_cast<int>(j));
    }
    empty_row |= !any_finite;
    const double g = row_gap(t);
    gap_max = g > gap_max ? g : gap_max;
  }
  if (invalid) return kInvalid;
  if (empty_row) return kInfeasible;

  const double big = has_inf ? big_cost(lo, hi, N) : hi;
  const int64_t m = M;  // bidders after padding with M - N zero-cost dummies
  ws.resize(m);
  double* p = ws.price.data();
  auto cost = [&](int64_t i, int64_t j) -> double {
    return i < N ? load_cost(c[i * M + j], maximize, big) : 0.0;
  };

  double eps = eps_initial(lo, big > hi ? big : hi, gap_max);
  int64_t unassigned = m;  // owner/assigned start empty (ws.resize)
  int64_t real_unassigned = N;  // of them, rows i < N (dummies do not bid)
  const bool only_paths = sap_only(N, M);
  double thr = -1.0;  // the certificate's threshold, from the last phase
  for (int phase = 0; phase < kMaxPhases; ++phase) {
    if (phase > 0) {
      // Keep the pairs that still satisfy ε-CS at the new ε (ws.x holds u_i = min_j c_ij + p_j
      // from the certificate); only the others bid again.
      for (int64_t i = 0; i < m; ++i) {
        const int j = ws.assigned[i];
        if (j >= 0 && !keeps_pair(cost(i, j), p[j], ws.x[i], eps)) {
          ws.assigned[i] = -1;
          ws.owner[j] = -1;
          ++unassigned;
          if (i < N) ++real_unassigned;
        }
      }
    }
    const bool early = phase_is_early(eps, thr, integral, N, M, unassigned);
    const int64_t round_limit = rounds + jacobi_budget(m);
    while (!only_paths && real_unassigned > kSapSwitch && rounds < round_limit) {
      if (++rounds > kMaxRounds) {
        if (rounds_out) *rounds_out = rounds - 1;
        return kNotConverged;
      }
      // Bids of the real rows against the prices of the start of the round.
      for (int64_t i = 0; i < N; ++i) {
        if (ws.assigned[i] >= 0) continue;
        Top2 t = top2_empty();
        for (int64_t j = 0; j < M; ++j) top2_push(t, value(cost(i, j), p[j]), static_cast<int>(j));
        const int j = t.j1;
        const uint64_t k = key_of(bid_price(t, p[j], eps));
        if (ws.best_bidder[j] == kNoIndex) ws.touched.push_back(j);
        if (k > ws.best_key[j]) {  // bidders come in ascending order: ties keep the lowest
          ws.best_key[j] = k;
          ws.best_bidder[j] = static_cast<int>(i);
        }
      }
      // Every object that got a bid goes to its best bidder at the bid price.
      for (int j : ws.touched) {
        const int w = ws.best_bidder[j];
        const int old = ws.owner[j];
        if (old >= 0) ws.assigned[old] = -1; else --unassigned;
        if (old >= 0 && old < N) ++real_unassigned;
        --real_unassigned;
        ws.owner[j] = w;
        ws.assigned[w] = j;
        p[j] = double_of(ws.best_key[j]);
        ws.best_key[j] = kKeyNone;
        ws.best_bidder[j] = kNoIndex;
      }
      ws.touched.clear();
    }
    // Paths place the rest (the real rows first: they have the lowest indices); in the
    // paths-only first phase the dummies then take the free objects in index order. Early
    // phases leave the rest to the next phase.
    const int64_t seat_dummies = only_paths && phase == 0 ? m - N : 0;
    for (; !early && unassigned > seat_dummies; --unassigned) {
      if (!sap_augment(cost, N, m, ws, rounds)) {
        if (rounds_out) *rounds_out = kMaxRounds;
        return kNotConverged;
      }
      if (real_unassigned > 0) --real_unassigned;  // the lowest free bidder was placed
    }
    if (seat_dummies > 0) {
      int64_t i = N;
      for (int64_t j = 0; j < M; ++j) {
        if (ws.owner[j] >= 0) continue;
        ws.owner[j] = static_cast<int>(i);
        ws.assigned[i++] = static_cast<int>(j);
      }
      unassigned = 0;
      real_unassigned = 0;
    }

    // Certificate: primal of the current assignment, dual of the current prices (unplaced
    // bidders of an early phase count 0 in the sums; such a phase cannot be certified).
    bool uses_big = false;
    for (int64_t i = 0; i < m; ++i) {
      if (i < N && ws.assigned[i] >= 0) {
        double raw = static_cast<double>(c[i * M + ws.assigned[i]]);
        if (maximize) raw = -raw;
        uses_big |= raw == HUGE_VAL;
        ws.x[i] = cost(i, ws.assigned[i]);
      } else {
        ws.x[i] = 0.0;
      }
    }
    const double P = canon_sum(ws.x.data(), m, false);
    double p_max = 0.0, c_max = 0.0;  // exact maxima: any order gives the GPU's value
    for (int64_t j = 0; j < M; ++j) p_max = p[j] > p_max ? p[j] : p_max;
    for (int64_t i = 0; i < m; ++i) c_max = std::fabs(ws.x[i]) > c_max ? std::fabs(ws.x[i]) : c_max;
    const double sum_abs = canon_sum(ws.x.data(), m, true);
    for (int64_t i = 0; i < m; ++i) {
      double u = HUGE_VAL;
      for (int64_t j = 0; j < M; ++j) {
        double v = cost(i, j) + p[j];
        u = v < u ? v : u;
      }
      ws.x[i] = u;
    }
    const double sum_u = canon_sum(ws.x.data(), m, false);
    const double sum_p = canon_sum(p, M, false);
    const double D = sum_u - sum_p;
    thr = gap_threshold(tol, sum_abs);
    if (unassigned == 0 && certified(P, D, thr, integral)) {
      if (rounds_out) *rounds_out = rounds;
      if (uses_big) return kInfeasible;
      for (int64_t i = 0; i < N; ++i) col4row[i] = ws.assigned[i];
      return kOk;
    }
    eps = eps_next(eps, thr, integral, m);
    if (eps_below_resolution(eps, p_max + c_max)) break;
  }
  if (rounds_out) *rounds_out = rounds;
  return kNotConverged;
}
}  // namespace

template <typename T>
void auction_solve_batch(const T* cost, int64_t B, int64_t N, int64_t M, bool maximize, double tol,
                         int64_t* col4row, int8_t* status, int64_t* rounds, int threads) {
  if (B <= 0) return;
  int hw = static_cast<int>(std::thread::hardware_concurrency());
  int nt = threads > 0 ? threads : (hw > 0 ? hw : 1);
  nt = static_cast<int>(std::min<int64_t>(nt, B));
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    Workspace ws;
    for (int64_t b = next++; b < B; b = next++) {
      status[b] = solve_one<T>(cost + b * N * M, N, M, maximize, tol, col4row + b * N,
                               rounds ? rounds + b : nullptr, ws);
    }
  };
  if (nt <= 1) {
    work();
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int t = 0; t < nt - 1; ++t) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
}

template void auction_solve_batch<float>(const float*, int64_t, int64_t, int64_t, bool, double,
                                         int64_t*, int8_t*, int64_t*, int);
template void auction_solve_batch<double>(const double*, int64_t, int64_t, int64_t, bool, double,
                                          int64_t*, int8_t*, int64_t*, int);
}  // namespace loom

// The ε-scaling auction shared by the CPU twin (cpu/auction_cpu.cpp) and the CUDA kernels
// (cuda/auction_cuda.cu): the per-bidder step, the ε schedule and the duality certificate.
//
// Algorithm: D. P. Bertsekas, "The auction algorithm: a distributed relaxation method for the
// assignment problem", Annals of OR 14 (1988); ε-scaling: Bertsekas & Eckstein, "Dual coordinate
// step methods for linear network flow problems", Math. Prog. 42 (1988). Jacobi (parallel-bid)
// rounds as in Bertsekas & Castañón, "Parallel synchronous and asynchronous implementations of
// the auction algorithm", Parallel Computing 17 (1991). Phase finish by shortest augmenting
// paths from the auction's prices: R. Jonker & A. Volgenant, "A shortest augmenting path
// algorithm for dense and sparse linear assignment problems", Computing 38 (1987), with the
// labels computed by synchronous (Jacobi) Bellman-Ford sweeps so that a team of threads can
// relax many rows at once.
//
// Conventions (everything below is in MINIMIZATION form; maximize flips the sign on load):
// * The problem is made square by M - N virtual dummy bidders whose cost is 0 for every object
//   (never stored). Then the dual of the padded problem is the plain assignment dual and
//       D = sum_{i < M} min_j (c_ij + p_j) - sum_j p_j   <=   opt   <=   P = sum_{i < N} c_i,s(i)
//   for ANY prices p; for the original rectangular LP this is the lower bound obtained with the
//   nonnegative column duals p_j - min_k p_k, so it certifies the rectangular answer as well.
// * +inf entries (forbidden pairs) are replaced by a finite "big" cost B (big_cost below), so
//   every bid is finite and each phase terminates. B is chosen so that any assignment using a B
//   entry costs at least 2*range + max(1, |hi|) more than any all-finite one: the original
//   problem is infeasible iff the optimum of the modified one uses a B entry. The solvers report
//   kInfeasible when a real row has no finite entry, or when the certified answer uses a B entry.
// * Certificate: after every phase P and D are computed; the solve stops when P - D <= thr with
//   thr = tol * max(sum_i |c_i,s(i)|, tiny), or when P - D < 1 and every finite cost is an
//   integer (the optimum is then an integer, so P = opt); a phase that left bidders unplaced
//   (an early phase, below) is never certified. When ε would drop below the resolution of the
//   prices (eps_below_resolution) or the round/phase bounds are hit, the solve reports
//   kNotConverged instead of an uncertified answer.
// * Determinism: the per-bidder math below is the only place where bids are computed, every
//   tie goes to the lowest index, and all sums use the canonical 32-lane order (canon_sum), so
//   the CPU twin and the GPU give bit-identical runs in float64 (and in float32, whose entries
//   are widened exactly to double). The mul-adds (big_cost, sap_limit) are explicit fma so
//   compiler contraction cannot make the two sides differ.
// * Phase finish (SAP): once at most kSapSwitch bidders are left (or the phase has spent its
//   jacobi_budget of rounds) each is placed by a shortest augmenting path from the auction's
//   prices, with every assigned pair treated as tight; ε-CS holds afterwards, so the phase ends
//   exactly as an auction phase would. Every label is a min and every tie goes to the lowest
//   index, so the result does not depend on the order of the relaxations.
// * Early phases of square problems (phase_is_early) skip the finish; dummy bidders never bid;
//   clearly rectangular problems (sap_only) skip the auction. Why, and the measurements behind
//   the constants below: docs/auction.md.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define LOOM_HD __host__ __device__ __forceinline__
#else
#define LOOM_HD inline
#endif

namespace loom {
namespace auction {

// ε shrinks by this factor per phase; ε0 = (effective cost range) / kEps0Div (θ and kSapSwitch:
// docs/auction.md).
#ifndef LOOM_AUCTION_THETA
#define LOOM_AUCTION_THETA 4.0
#endif
#ifndef LOOM_AUCTION_EPS0_DIV
#define LOOM_AUCTION_EPS0_DIV 64.0
#endif
#ifndef LOOM_AUCTION_SAP_SWITCH
#define LOOM_AUCTION_SAP_SWITCH 4
#endif
constexpr double kTheta = LOOM_AUCTION_THETA;
constexpr double kEps0Div = LOOM_AUCTION_EPS0_DIV;
// Bidders left in a phase at which Jacobi rounds give way to shortest augmenting paths (0: the
// pure auction).
constexpr int kSapSwitch = LOOM_AUCTION_SAP_SWITCH;
// Hang guards: a run that needs more phases or bidding rounds (summed over phases) stops with
// kNotConverged instead of looping. Both sides count rounds identically.
constexpr int kMaxPhases = 64;
constexpr int64_t kMaxRounds = 2000000;
// Canonical summation: lane l sums x[l], x[l+32], ... in order, then lanes are added 0..31.
constexpr int kSumLanes = 32;
constexpr int kNoIndex = 0x7fffffff;

LOOM_HD double neg_inf() { return -HUGE_VAL; }

// One cost entry as double in minimization form, +inf replaced by `big`.
template <typename T>
LOOM_HD double load_cost(T raw, bool maximize, double big) {
  double x = static_cast<double>(raw);
  if (maximize) x = -x;
  return x == HUGE_VAL ? big : x;
}

// Best and second-best value over a row; j1 is the lowest index attaining v1, and v2 is the
// second largest of the multiset of values (so v2 == v1 when the best value is tied).
struct Top2 {
  double v1, v2;
  int j1;
};

LOOM_HD Top2 top2_empty() { return Top2{neg_inf(), neg_inf(), kNoIndex}; }

LOOM_HD void top2_push(Top2& t, double v, int j) {
  if (v > t.v1 || (v == t.v1 && j < t.j1)) {
    t.v2 = t.v1;
    t.v1 = v;
    t.j1 = j;
  } else if (v > t.v2) {
    t.v2 = v;
  }
}

// Merge of two partial results over disjoint index sets; associative and commutative, so any
// reduction tree (warp shuffles) gives the same answer as a left-to-right scan.
LOOM_HD Top2 top2_merge(Top2 a, Top2 b) {
  if (b.v1 > a.v1 || (b.v1 == a.v1 && b.j1 < a.j1)) {
    double s = a.v1 > b.v2 ? a.v1 : b.v2;
    return Top2{b.v1, s, b.j1};
  }
  double s = a.v2 > b.v1 ? a.v2 : b.v1;
  return Top2{a.v1, s, a.j1};
}

// Bidder's value of object j: -c_ij - p_j (the bidder maximizes it).
LOOM_HD double value(double c, double p) { return -c - p; }

// The new price bidder offers for t.j1 (Bertsekas' bid: raise the price until the bidder is
// indifferent with its second choice, plus ε). p1 is the current price of t.j1. With a single
// object (M == 1) there is no second choice: the bid is p1 + ε.
LOOM_HD double bid_price(const Top2& t, double p1, double eps) {
  double v2 = t.v2 == neg_inf() ? t.v1 : t.v2;
  return p1 + (t.v1 - v2) + eps;
}

// Order-preserving map double -> uint64 (for atomicMax on bids); exact and invertible.
LOOM_HD uint64_t key_of(double x) {
  union {
    double d;
    uint64_t u;
  } b;
  b.d = x;
  return (b.u >> 63) ? ~b.u : (b.u | 0x8000000000000000ull);
}
LOOM_HD double double_of(uint64_t k) {
  union {
    double d;
    uint64_t u;
  } b;
  b.u = (k >> 63) ? (k & 0x7fffffffffffffffull) : ~k;
  return b.d;
}
constexpr uint64_t kKeyNone = 0;  // below the key of every double (key_of(-inf) > 0)

// ε-CS at the start of a phase: bidder i keeps object j when c_ij + p_j <= u_i + ε, where
// u_i = min_k c_ik + p_k (the dual row value computed by the certificate with the same prices).
LOOM_HD bool keeps_pair(double c, double p, double u, double eps) { return c + p <= u + eps; }

// ---- shortest-augmenting-path finish (see the header) -------------------------------------------

// The sweeps' Δ-stepping window as a fraction of D - (lowest frontier label) (<= 0: every
// frontier row in every sweep), used from kSapWindowRows rows up (sizes: docs/auction.md).
#ifndef LOOM_AUCTION_SAP_WINDOW
#define LOOM_AUCTION_SAP_WINDOW 0.5
#endif
#ifndef LOOM_AUCTION_SAP_WINDOW_ROWS
#define LOOM_AUCTION_SAP_WINDOW_ROWS 1024
#endif
constexpr double kSapWindow = LOOM_AUCTION_SAP_WINDOW;
constexpr int64_t kSapWindowRows = LOOM_AUCTION_SAP_WINDOW_ROWS;

// Highest label of a frontier row relaxed in this sweep of an n-row problem (lmin: the
// frontier's lowest label, D: the best free object's label so far).
LOOM_HD double sap_limit(double lmin, double D, int64_t n) {
  return kSapWindow > 0.0 && n >= kSapWindowRows ? fma(kSapWindow, D - lmin, lmin) : HUGE_VAL;
}

// Label of column k reached from a tree row with label `base`, x = c_ik + p_k, u = min_l x_l.
// x - u >= 0 exactly (u is one of the x), so labels never decrease along a path.
LOOM_HD double sap_label(double base, double x, double u) { return base + (x - u); }

// Price after the augmentation: columns labelled below the free column's label D rise to make
// the tree's pairs and the path tight.
LOOM_HD double sap_price(double p, double d, double D) { return d < D ? p + (D - d) : p; }

// Bidding rounds a phase may spend before the path finish takes every remaining bidder. Rounds
// stall when ε is tiny against the price moves a phase needs (identical rows over costs that
// span 1e-8..1e8 took millions of rounds); a path costs at most m sweeps, so a phase stays
// bounded.
LOOM_HD int64_t jacobi_budget(int64_t m) { return 2 * m + 64; }

// Early phase (see the header) of an n x m problem: square, more than kSapSwitch bidders to
// place (else bidding would not run and nothing would move), and m ε > kEarlyFactor x the gap
// the certificate accepts (thr, or 1 for integer data), judged with the previous phase's thr;
// the first phase (thr < 0: not known yet) is early. kEarlyFactor <= 0 turns early phases off.
#ifndef LOOM_AUCTION_EARLY_FACTOR
#define LOOM_AUCTION_EARLY_FACTOR 2.0
#endif
constexpr double kEarlyFactor = LOOM_AUCTION_EARLY_FACTOR;
LOOM_HD bool phase_is_early(double eps, double thr, bool integral, int64_t n, int64_t m, int64_t unassigned) {
  if (kEarlyFactor <= 0.0 || n != m || unassigned <= kSapSwitch) return false;
  if (thr < 0.0) return true;
  const double target = integral && thr < 1.0 ? 1.0 : thr;
  return static_cast<double>(m) * eps > kEarlyFactor * target;
}

// Augmenting paths only, no bidding rounds, below N = 0.7 M (the measured crossover: docs/auction.md).
LOOM_HD bool sap_only(int64_t n, int64_t m) { return 10 * n <= 7 * m; }

// ---- schedule ---------------------------------------------------------------------------------

// What one pass over the problem tells (lo/hi over finite entries in minimization form).
struct Scan {
  double lo, hi;
  bool invalid;    // NaN, or -inf after the maximize flip
  bool has_inf;    // some +inf entry (after the flip)
  bool integral;   // every finite entry is an integer
  bool empty_row;  // a real row without a finite entry: infeasible
};

// Classify one entry into the running scan (order-independent: min/max/and/or).
LOOM_HD void scan_entry(double x_min_form, double& lo, double& hi, bool& invalid, bool& has_inf,
                        bool& integral) {
  double x = x_min_form;
  if (x != x || x == -HUGE_VAL) {
    invalid = true;
  } else if (x == HUGE_VAL) {
    has_inf = true;
  } else {
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
    if (x != floor(x)) integral = false;
  }
}

// Finite stand-in for +inf: B = hi + (n_rows + 1) * range + max(1, |hi|), see the header.
LOOM_HD double big_cost(double lo, double hi, int64_t n_rows) {
  double range = hi - lo;
  double m = fabs(hi) > 1.0 ? fabs(hi) : 1.0;
  return fma(static_cast<double>(n_rows + 1), range, hi + m);
}

// Initial ε: the largest best-vs-second-best gap of any row at zero prices (the size of the
// first bids), capped by the effective range / kEps0Div. A range-based ε alone lifts prices to
// the scale of the range, which on huge-range costs leaves too few bits to resolve a small
// optimum; row_gap_max <= 0 (no row with two finite entries, or all ties) uses the range.
LOOM_HD double eps_initial(double lo, double hi_eff, double row_gap_max) {
  double lo0 = lo < 0.0 ? lo : 0.0;  // dummy bidders see cost 0
  double hi0 = hi_eff > 0.0 ? hi_eff : 0.0;
  double r = hi0 - lo0;
  double e = r > 0.0 ? r / kEps0Div : 1.0;
  return (row_gap_max > 0.0 && row_gap_max < e) ? row_gap_max : e;
}

// The row's contribution to row_gap_max: v1 - v2 of top2 over finite entries at zero prices.
LOOM_HD double row_gap(const Top2& t) {
  return (t.v2 == neg_inf() || t.v1 == neg_inf()) ? 0.0 : t.v1 - t.v2;
}

// Stopping threshold on P - D: tol relative to sum |c_i,s(i)|. No floor for rounding noise: a
// gap the doubles cannot resolve must end in kNotConverged (see below), never in a false
// certificate (huge-range costs whose optimum is tiny compared with the prices).
LOOM_HD double gap_threshold(double tol, double sum_abs) {
  double scale = sum_abs > DBL_MIN ? sum_abs : DBL_MIN;
  return tol * scale;
}

LOOM_HD bool certified(double P, double D, double thr, bool integral) {
  double gap = P - D;
  return gap <= thr || (integral && gap < 1.0);
}

// Next ε: divide by kTheta, but not below the ε at which ε-complementary slackness alone
// guarantees the certificate (m * ε <= thr / 2, or < 1/2 for integer data); once there, keep
// dividing (rounding noise) until kMaxPhases.
LOOM_HD double eps_next(double eps, double thr, bool integral, int64_t m) {
  double target = thr;
  if (integral && target < 1.0) target = 1.0;
  double floor_eps = 0.5 * target / static_cast<double>(m);
  double e = eps / kTheta;
  if (eps <= floor_eps) return e;
  return e > floor_eps ? e : floor_eps;
}

// True when ε has fallen below what bids on prices of magnitude `scale` (max price + the
// largest |c_i,s(i)| of the assignment, the magnitude of the competing values) can resolve: further phases cannot improve the certificate, the solve stops (kNotConverged).
LOOM_HD bool eps_below_resolution(double eps, double scale) { return eps < 8.0 * DBL_EPSILON * scale; }

}  // namespace auction
}  // namespace loom

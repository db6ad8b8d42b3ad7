// CUDA ε-scaling auction (Bertsekas 1988; Jacobi rounds: Bertsekas & Castañón 1991) with a
// shortest-augmenting-path phase finish (Jonker & Volgenant 1987), the twin of
// cpu/auction_cpu.cpp: the per-bidder math, ties, ε schedule, phase finish and certificate come
// from common/auction.h, so a float64 run matches the CPU twin's assignment and round count.
//
// One "team" of threads solves one problem:
// * BlockTeam: one thread block per problem, all B problems in one launch. The per-problem
//   state (prices, owners, bids, path labels: 128 + 52*M bytes) lives in shared memory when it
//   fits, else in a global workspace slice.
// * GridTeam: every block of a cooperative launch works on one problem, state in global
//   memory, cg::this_grid().sync() between the steps of a round (opt-in: see auction_cuda.h).
// A round: (A) each warp takes unassigned bidders, scans the row with coalesced loads, reduces
// the top-2 values with shuffles and atomicMax-es the order-preserving key of its bid on the
// object; (B) bidders whose key equals the object's best atomicMin their index (ties -> lowest
// bidder); (C) objects that got bids move to their winner at the bid price.
// A sweep of the phase finish (sap_augment) has the same shape: (1) each warp relaxes frontier
// rows, atomicMin-ing label keys; (2) rows whose label equals the new minimum atomicMin their
// index as predecessor; (3) labels move, D (best free label) follows; (4) the next frontier.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/auction.h"
#include "common/status.h"
#include "cuda/auction_cuda.h"

namespace cg = cooperative_groups;

namespace loom {
namespace {
using namespace auction;

constexpr unsigned kFull = 0xffffffffu;
// 512 threads (16 warps) per block, which caps a thread at 128 registers. ptxas spills a little
// there (sm_90 float: 44 B stores / 80 B loads per thread; 11 STL + 17 LDL instructions, in the
// row scans' tail prologues and around the path-finish call, none in the unrolled scan loop).
// Kept on purpose: 256 threads remove the spills (182-202 registers) but halve the warps, and a
// step's critical path is ceil(active rows / warps) row scans: counted on the CPU twin, 8 warps
// need 1.8x the serial row scans of 16 (sq3072 64x256: 1240 vs 689). python_tests/test_gpu_compile.py
// holds these spills under ceilings (CUDA_ALLOWED_SPILLS); bench/RESULTS.md has the numbers.
constexpr int kBlockThreads = 512;
constexpr int kGridThreads = 512;

enum Flag : int { kFlagInvalid = 1, kFlagHasInf = 2, kFlagNotIntegral = 4, kFlagEmptyRow = 8, kFlagUsesBig = 16 };

// Per-problem scalars shared by the team (64 bytes, first in the state).
struct Header {
  unsigned long long lo_key, hi_key;  // key_of(min / max finite entry)
  unsigned long long gap_key;         // key_of(max row gap at zero prices), see eps_initial
  int flags;
  int unassigned;       // bidders without an object (dummies included)
  int unassigned_real;  // of them, rows i < N: only these bid
  double sums[5];  // P, sum |c_i,s(i)|, sum p_j, sum u_i, max p_j + max |c_i,s(i)|
  // Phase finish: key_of(D), key_of(the frontier's lowest label), the source bidder, the best
  // free object, the next frontier's size.
  unsigned long long sap_d_key, sap_lmin_key;
  int sap_source, sap_free, sap_frontier;
};
constexpr size_t kHeaderBytes = 128;
static_assert(sizeof(Header) <= kHeaderBytes, "header must fit its slot");

// 52 bytes per object: M = 4096 still fits the 227 KiB of shared memory of an H100/H200 block.
__host__ __device__ inline size_t state_bytes(int64_t M) { return kHeaderBytes + 52 * static_cast<size_t>(M); }

struct State {
  Header* h;
  double* price;                 // [M]
  unsigned long long* best_key;  // [M] best bid key per object this round
  double* x;                     // [M] bids' keys during rounds (as bits) / row sums at phase end
  int* best_bidder;              // [M]
  int* owner;                    // [M] bidder owning object j, -1
  int* assigned;                 // [M] object of bidder i (dummies i >= N included), -1
  int* bid_obj;                  // [M] object bidder i bid on this round / frontier flag of row i
  double* label;                 // [M] phase finish: label d_j of object j
  int* pred;                     // [M] phase finish: predecessor row of object j
  // The phase finish borrows best_key as key_of(sweep minimum of d_j) and best_bidder as the
  // sweep's predecessor candidates; both are back to "no bid" when it returns.
};

__device__ inline State carve(char* base, int M) {
  State s;
  s.h = reinterpret_cast<Header*>(base);
  char* p = base + kHeaderBytes;
  s.price = reinterpret_cast<double*>(p); p += 8 * static_cast<size_t>(M);
  s.best_key = reinterpret_cast<unsigned long long*>(p); p += 8 * static_cast<size_t>(M);
  s.x = reinterpret_cast<double*>(p); p += 8 * static_cast<size_t>(M);
  s.best_bidder = reinterpret_cast<int*>(p); p += 4 * static_cast<size_t>(M);
  s.owner = reinterpret_cast<int*>(p); p += 4 * static_cast<size_t>(M);
  s.assigned = reinterpret_cast<int*>(p); p += 4 * static_cast<size_t>(M);
  s.bid_obj = reinterpret_cast<int*>(p); p += 4 * static_cast<size_t>(M);
  s.label = reinterpret_cast<double*>(p); p += 8 * static_cast<size_t>(M);
  s.pred = reinterpret_cast<int*>(p);
  return s;
}

// ld(): loads of state other threads write. In a block team plain loads suffice (shared memory,
// or a global slice only this block touches); a grid team reads through L2 (__ldcg) so no SM
// sees a stale L1 line of another block's write.
struct BlockTeam {
  template <typename U>
  __device__ U ld(const U* p) const { return *p; }
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ bool leader_warp() const { return threadIdx.x < 32; }
  __device__ void sync() const { __syncthreads(); }
};

struct GridTeam {
  template <typename U>
  __device__ U ld(const U* p) const { return __ldcg(p); }
  __device__ int rank() const { return blockIdx.x * blockDim.x + threadIdx.x; }
  __device__ int size() const { return gridDim.x * blockDim.x; }
  __device__ bool leader_warp() const { return blockIdx.x == 0 && threadIdx.x < 32; }
  // grid.sync() fences memory at device scope: plain loads after it see the other blocks' writes.
  __device__ void sync() const { cg::this_grid().sync(); }
};

__device__ inline Top2 shfl_xor_top2(const Top2& t, int off) {
  Top2 o;
  o.v1 = __shfl_xor_sync(kFull, t.v1, off);
  o.v2 = __shfl_xor_sync(kFull, t.v2, off);
  o.j1 = __shfl_xor_sync(kFull, t.j1, off);
  return o;
}

// Canonical 32-lane sum of x[0..n) (auction.h); the whole warp calls it, every lane gets it.
template <typename Team>
__device__ inline double warp_canon_sum(const Team& team, const double* x, int n, bool absolute) {
  const int lane = threadIdx.x & 31;
  double part = 0.0;
  for (int i = lane; i < n; i += kSumLanes) {
    const double v = team.ld(&x[i]);
    part += absolute ? fabs(v) : v;
  }
  double total = 0.0;
  for (int l = 0; l < kSumLanes; ++l) total += __shfl_sync(kFull, part, l);
  return total;
}

__device__ inline int volatile_load(const int* p) { return *reinterpret_cast<const volatile int*>(p); }
__device__ inline double volatile_load(const double* p) { return *reinterpret_cast<const volatile double*>(p); }

// Visits (c_ij as double in min form, j) for j = lane, lane + 32, ... < M, issuing kUnroll loads
// per lane before the first use so a row scan costs one memory latency, not M / 32 of them.
// row == nullptr is a dummy row (cost 0). The caller's f only folds (order-independent).
constexpr int kUnroll = 8;
template <typename T, typename F>
__device__ __forceinline__ void scan_row(const T* __restrict__ row, int M, bool maximize, double big, F&& f) {
  const int lane = threadIdx.x & 31;
  for (int base = 0; base < M; base += 32 * kUnroll) {
    T v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * 32 + lane;
      v[u] = (row != nullptr && j < M) ? __ldg(row + j) : T(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * 32 + lane;
      if (j < M) f(row != nullptr ? load_cost(v[u], maximize, big) : 0.0, j);
    }
  }
}

// u_i = min_j c_ij + p_j of one row (nullptr: a dummy), in every lane of the calling warp.
template <typename T, typename Team>
__device__ inline double row_value(const Team& team, const T* __restrict__ row, int M, bool maximize, double big,
                                   const double* price) {
  double u = HUGE_VAL;
  scan_row(row, M, maximize, big, [&](double cij, int j) {
    const double x = cij + team.ld(&price[j]);
    u = x < u ? x : u;
  });
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const double o = __shfl_xor_sync(kFull, u, off);
    u = o < u ? o : u;
  }
  return u;
}

// Places the lowest-index free bidder by a shortest augmenting path (common/auction.h, "Phase
// finish"), step for step as sap_augment in cpu/auction_cpu.cpp. The whole team calls it;
// returns false when the round bound is hit first (rounds counts the sweeps). Not inlined:
// the block kernel sits at its 128-register cap, and a separate allocation keeps the finish's
// locals out of the bidding loop's registers (ptxas: fewer spills in the kernel, none here).
template <typename T, typename Team>
__device__ __noinline__ bool sap_augment(const Team& team, const T* __restrict__ c, int N, int M, bool maximize, double big,
                            State s, int64_t& rounds) {
  const int tid = team.rank();
  const int nthr = team.size();
  const int lane = threadIdx.x & 31;
  const int warp = tid >> 5;
  const int nwarps = nthr >> 5;
  const int m = M;
  Header* h = s.h;
  const unsigned long long inf_key = key_of(HUGE_VAL);
  if (tid == 0) {
    h->sap_source = kNoIndex;
    h->sap_free = kNoIndex;
    h->sap_d_key = inf_key;
    h->sap_lmin_key = inf_key;
    h->sap_frontier = 0;
  }
  team.sync();
  for (int j = tid; j < M; j += nthr) {
    s.label[j] = HUGE_VAL;
    s.best_key[j] = inf_key;
    s.pred[j] = kNoIndex;
    s.bid_obj[j] = 0;     // frontier flags of rows
    s.x[j] = HUGE_VAL;    // u_i of row j, computed on its first visit (prices hold still here)
    if (team.ld(&s.assigned[j]) < 0) atomicMin(&h->sap_source, j);
  }
  team.sync();
  const int i0 = volatile_load(&h->sap_source);
  const T* row0 = i0 < N ? c + static_cast<int64_t>(i0) * M : nullptr;
  for (bool source = true;; source = false) {
    if (++rounds > kMaxRounds) return false;
    const double limit = sap_limit(double_of(*reinterpret_cast<volatile unsigned long long*>(&h->sap_lmin_key)),
                                   double_of(*reinterpret_cast<volatile unsigned long long*>(&h->sap_d_key)), N);
    // (1) label minima, (2) lowest predecessor among the rows that reach them. Warp w takes rows
    // w, w + nwarps, ...; the source sweep relaxes only the free bidder's row (label 0), later
    // sweeps the frontier rows labelled within the limit (they leave the frontier in pass 2).
    for (int pass = 0; pass < 2; ++pass) {
      for (int k0 = 0; k0 * nwarps < m; k0 += 32) {
        const int mine = warp + nwarps * (k0 + lane);
        const bool in = mine < m && (source ? mine == i0
                                            : team.ld(&s.bid_obj[mine]) != 0 &&
                                                  team.ld(&s.label[team.ld(&s.assigned[mine])]) <= limit);
        unsigned pending = __ballot_sync(kFull, in);
        while (pending) {
          const int i = warp + nwarps * (k0 + __ffs(pending) - 1);
          pending &= pending - 1;
          const T* row = source ? row0 : (i < N ? c + static_cast<int64_t>(i) * M : nullptr);
          const double base = source ? 0.0 : team.ld(&s.label[team.ld(&s.assigned[i])]);
          double u;
          if (pass == 0) {
            u = team.ld(&s.x[i]);
            if (u == HUGE_VAL) {  // warp-uniform: every lane read the same slot
              u = row_value(team, row, M, maximize, big, s.price);
              if (lane == 0) s.x[i] = u;
            }
            scan_row(row, M, maximize, big, [&](double cij, int j) {
              atomicMin(&s.best_key[j], key_of(sap_label(base, cij + team.ld(&s.price[j]), u)));
            });
          } else {
            u = team.ld(&s.x[i]);
            scan_row(row, M, maximize, big, [&](double cij, int j) {
              const double cand = sap_label(base, cij + team.ld(&s.price[j]), u);
              if (key_of(cand) == team.ld(&s.best_key[j]) && cand < team.ld(&s.label[j]))
                atomicMin(&s.best_bidder[j], i);
            });
            if (lane == 0) s.bid_obj[i] = 0;
          }
        }
      }
      team.sync();
    }
    // (3) improved labels (those that got a predecessor) move; D follows the free objects.
    if (tid == 0) {  // both last read before this sweep's first sync
      h->sap_frontier = 0;
      h->sap_lmin_key = inf_key;
    }
    for (int j = tid; j < M; j += nthr) {
      const int w = team.ld(&s.best_bidder[j]);
      if (w == kNoIndex) continue;
      const unsigned long long k = team.ld(&s.best_key[j]);
      s.label[j] = double_of(k);
      s.pred[j] = w;
      if (team.ld(&s.owner[j]) < 0) atomicMin(&h->sap_d_key, k);
    }
    team.sync();
    // (4) the next frontier: owners of improved objects and rows still waiting, labelled below
    // D (each row owns one object, so one thread decides each flag), and its lowest label.
    {
      const double D = double_of(*reinterpret_cast<volatile unsigned long long*>(&h->sap_d_key));
      int count = 0;
      double lmin = HUGE_VAL;
      for (int j = tid; j < M; j += nthr) {
        const bool improved = team.ld(&s.best_bidder[j]) != kNoIndex;
        if (improved) s.best_bidder[j] = kNoIndex;
        const int o = team.ld(&s.owner[j]);
        if (o < 0) continue;
        const double l = team.ld(&s.label[j]);
        const bool keep = (improved || team.ld(&s.bid_obj[o]) != 0) && l < D;
        s.bid_obj[o] = keep ? 1 : 0;
        if (keep) {
          ++count;
          lmin = l < lmin ? l : lmin;
        }
      }
      if (count) {
        atomicAdd(&h->sap_frontier, count);
        atomicMin(&h->sap_lmin_key, key_of(lmin));
      }
    }
    team.sync();
    if (volatile_load(&h->sap_frontier) == 0) break;
  }
  // Prices rise below D; the path to the lowest-index free object labelled D is flipped.
  const unsigned long long d_key = *reinterpret_cast<volatile unsigned long long*>(&h->sap_d_key);
  const double D = double_of(d_key);
  for (int j = tid; j < M; j += nthr) {
    if (team.ld(&s.owner[j]) < 0 && team.ld(&s.best_key[j]) == d_key) atomicMin(&h->sap_free, j);
  }
  team.sync();
  for (int j = tid; j < M; j += nthr) {
    s.price[j] = sap_price(team.ld(&s.price[j]), team.ld(&s.label[j]), D);
    s.best_key[j] = kKeyNone;
  }
  if (tid == 0) {
    for (int j = volatile_load(&h->sap_free);;) {
      const int i = team.ld(&s.pred[j]);
      const int next = team.ld(&s.assigned[i]);
      s.assigned[i] = j;
      s.owner[j] = i;
      if (i == i0) break;
      j = next;
    }
    h->unassigned -= 1;
    if (i0 < N) h->unassigned_real -= 1;
  }
  team.sync();
  return true;
}

// Solves one problem with the threads of `team`. Every thread runs the same control flow (all
// loop bounds and branches below depend only on values read after a team sync), so every
// team.sync() is reached by all threads.
template <typename T, typename Team>
__device__ void solve_problem(const Team& team, const T* __restrict__ c, int N, int M, bool maximize,
                              double tol, State s, int64_t* __restrict__ col4row, int8_t* __restrict__ status,
                              int64_t* __restrict__ rounds_out) {
  const int tid = team.rank();
  const int nthr = team.size();
  const int lane = threadIdx.x & 31;
  const int warp = tid >> 5;
  const int nwarps = nthr >> 5;
  const int m = M;  // bidders after padding with M - N zero-cost dummies
  Header* h = s.h;

  // ---- init + scan ----
  if (tid == 0) {
    h->lo_key = key_of(HUGE_VAL);
    h->hi_key = key_of(-HUGE_VAL);
    h->gap_key = key_of(0.0);
    h->flags = 0;
    h->unassigned = m;
    h->unassigned_real = N;
  }
  for (int j = tid; j < M; j += nthr) {
    s.price[j] = 0.0;
    s.best_key[j] = kKeyNone;
    s.best_bidder[j] = kNoIndex;
    s.owner[j] = -1;
    s.assigned[j] = -1;
  }
  team.sync();
  {
    double lo = HUGE_VAL, hi = -HUGE_VAL;
    bool invalid = false, has_inf = false, integral = true, empty_row = false;
    for (int i = warp; i < N; i += nwarps) {  // warp-uniform loop: the vote below sees 32 lanes
      const T* row = c + static_cast<int64_t>(i) * M;
      bool any_finite = false;
      Top2 t = top2_empty();
      for (int j = lane; j < M; j += 32) {
        double x = static_cast<double>(row[j]);
        if (maximize) x = -x;
        scan_entry(x, lo, hi, invalid, has_inf, integral);
        any_finite |= isfinite(x);
        if (isfinite(x)) top2_push(t, value(x, 0.0), j);
      }
      if (!__any_sync(kFull, any_finite)) empty_row = true;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) t = top2_merge(t, shfl_xor_top2(t, off));
      if (lane == 0) {
        const double g = row_gap(t);
        if (g > 0.0) atomicMax(&h->gap_key, key_of(g));
      }
    }
    if (lo != HUGE_VAL) atomicMin(&h->lo_key, key_of(lo));
    if (hi != -HUGE_VAL) atomicMax(&h->hi_key, key_of(hi));
    int f = (invalid ? kFlagInvalid : 0) | (has_inf ? kFlagHasInf : 0) | (integral ? 0 : kFlagNotIntegral) |
            (empty_row ? kFlagEmptyRow : 0);
    if (f) atomicOr(&h->flags, f);
  }
  team.sync();
  const int flags = volatile_load(&h->flags);
  const double lo = double_of(*reinterpret_cast<volatile unsigned long long*>(&h->lo_key));
  const double hi = double_of(*reinterpret_cast<volatile unsigned long long*>(&h->hi_key));
  const double gap_max = double_of(*reinterpret_cast<volatile unsigned long long*>(&h->gap_key));
  if (flags & (kFlagInvalid | kFlagEmptyRow)) {
    for (int i = tid; i < N; i += nthr) col4row[i] = -1;
    if (tid == 0) {
      *status = (flags & kFlagInvalid) ? kInvalid : kInfeasible;
      if (rounds_out) *rounds_out = 0;
    }
    return;
  }
  const bool integral = !(flags & kFlagNotIntegral);
  const double big = (flags & kFlagHasInf) ? big_cost(lo, hi, N) : hi;
  unsigned long long* bid_key = reinterpret_cast<unsigned long long*>(s.x);

  double eps = eps_initial(lo, big > hi ? big : hi, gap_max);
  int64_t rounds = 0;
  int8_t st = kNotConverged;
  bool certified_ok = false;
  const bool only_paths = sap_only(N, M);
  double thr = -1.0;  // the certificate's threshold, from the last phase
  for (int phase = 0; phase < kMaxPhases && !certified_ok; ++phase) {
    if (phase > 0) {
      // Keep the pairs still in ε-CS at the new ε; s.x holds u_i from the last certificate.
      int freed = 0, freed_real = 0;
      for (int i = tid; i < m; i += nthr) {
        const int j = team.ld(&s.assigned[i]);
        if (j < 0) continue;  // left unplaced by an early phase
        const double ci = i < N ? load_cost(c[static_cast<int64_t>(i) * M + j], maximize, big) : 0.0;
        if (!keeps_pair(ci, team.ld(&s.price[j]), team.ld(&s.x[i]), eps)) {
          s.assigned[i] = -1;
          s.owner[j] = -1;
          ++freed;
          freed_real += i < N;
        }
      }
      if (freed) atomicAdd(&h->unassigned, freed);
      if (freed_real) atomicAdd(&h->unassigned_real, freed_real);
      team.sync();
    }

    bool out_of_rounds = false;
    const bool early = phase_is_early(eps, thr, integral, N, M, volatile_load(&h->unassigned));
    const int64_t round_limit = rounds + jacobi_budget(m);
    while (!only_paths && volatile_load(&h->unassigned_real) > kSapSwitch && rounds < round_limit) {
      if (++rounds > kMaxRounds) {
        out_of_rounds = true;
        break;
      }
      // (A) bids of the real rows against the prices of the start of the round.
      // Warp w owns bidders w, w + nwarps, ...; its lanes read 32 of their flags at once and the
      // ballot lists the unassigned ones (a warp-uniform mask: shuffles below see all 32 lanes).
      for (int k0 = 0; k0 * nwarps < N; k0 += 32) {
        const int mine = warp + nwarps * (k0 + lane);
        unsigned pending = __ballot_sync(kFull, mine < N && team.ld(&s.assigned[mine]) < 0);
        while (pending) {
          const int i = warp + nwarps * (k0 + __ffs(pending) - 1);
          pending &= pending - 1;
          Top2 t = top2_empty();
          scan_row(c + static_cast<int64_t>(i) * M, M, maximize, big,
                   [&](double cij, int j) { top2_push(t, value(cij, team.ld(&s.price[j])), j); });
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) t = top2_merge(t, shfl_xor_top2(t, off));
          if (lane == 0) {
            const unsigned long long k = key_of(bid_price(t, team.ld(&s.price[t.j1]), eps));
            s.bid_obj[i] = t.j1;
            bid_key[i] = k;
            atomicMax(&s.best_key[t.j1], k);
          }
        }
      }
      team.sync();
      // (B) among equal best bids the lowest bidder wins.
      for (int i = tid; i < N; i += nthr) {
        if (team.ld(&s.assigned[i]) >= 0) continue;
        const int j = team.ld(&s.bid_obj[i]);
        if (team.ld(&bid_key[i]) == team.ld(&s.best_key[j])) atomicMin(&s.best_bidder[j], i);
      }
      team.sync();
      // (C) objects move to their winners. Winners were unassigned and previous owners were
      // not bidding, so the assigned[] writes of different objects never collide.
      int taken = 0, real_delta = 0;
      for (int j = tid; j < M; j += nthr) {
        const int w = team.ld(&s.best_bidder[j]);
        if (w == kNoIndex) continue;
        const int old = team.ld(&s.owner[j]);
        if (old >= 0) s.assigned[old] = -1; else ++taken;
        real_delta += (old >= 0 && old < N) - 1;  // the winner is real; so may the loser be
        s.owner[j] = w;
        s.assigned[w] = j;
        s.price[j] = double_of(team.ld(&s.best_key[j]));
        s.best_key[j] = kKeyNone;
        s.best_bidder[j] = kNoIndex;
      }
      if (taken) atomicSub(&h->unassigned, taken);
      if (real_delta) atomicAdd(&h->unassigned_real, real_delta);
      team.sync();
    }
    // Paths place the rest (the real rows first: they have the lowest indices); in the
    // paths-only first phase the dummies then take the free objects in index order. Early
    // phases leave the rest to the next phase.
    const int seat_dummies = only_paths && phase == 0 ? m - N : 0;
    while (!early && !out_of_rounds && volatile_load(&h->unassigned) > seat_dummies)
      out_of_rounds = !sap_augment<T>(team, c, N, M, maximize, big, s, rounds);
    if (out_of_rounds) break;
    if (seat_dummies > 0) {
      if (team.leader_warp()) {
        int next = N;
        for (int j0 = 0; j0 < M; j0 += 32) {
          const int j = j0 + lane;
          const bool free_obj = j < M && team.ld(&s.owner[j]) < 0;
          const unsigned mask = __ballot_sync(kFull, free_obj);
          if (free_obj) {
            const int i = next + __popc(mask & ((1u << lane) - 1u));
            s.owner[j] = i;
            s.assigned[i] = j;
          }
          next += __popc(mask);
        }
        if (lane == 0) h->unassigned = 0;  // the real rows were all placed by paths
      }
      team.sync();
    }

    // ---- certificate: P of the assignment, D of the prices (unplaced bidders of an early
    // phase count 0 in the sums; such a phase cannot be certified) ----
    for (int i = tid; i < m; i += nthr) {
      const int j = team.ld(&s.assigned[i]);
      s.x[i] = i < N && j >= 0 ? load_cost(c[static_cast<int64_t>(i) * M + j], maximize, big) : 0.0;
    }
    team.sync();
    if (team.leader_warp()) {
      const double P = warp_canon_sum(team, s.x, m, false);
      const double A = warp_canon_sum(team, s.x, m, true);
      const double Sp = warp_canon_sum(team, s.price, M, false);
      double pm = 0.0, cm = 0.0;  // maxima are exact: any order gives the CPU's values
      for (int j = lane; j < M; j += 32) {
        const double v = team.ld(&s.price[j]);
        pm = v > pm ? v : pm;
      }
      for (int i = lane; i < m; i += 32) {
        const double v = fabs(team.ld(&s.x[i]));
        cm = v > cm ? v : cm;
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const double o = __shfl_xor_sync(kFull, pm, off);
        pm = o > pm ? o : pm;
        const double q = __shfl_xor_sync(kFull, cm, off);
        cm = q > cm ? q : cm;
      }
      if (lane == 0) {
        h->sums[0] = P;
        h->sums[1] = A;
        h->sums[2] = Sp;
        h->sums[4] = pm + cm;
      }
    }
    team.sync();  // the leader has read s.x before rows overwrite it
    for (int i = warp; i < m; i += nwarps) {
      const double u = row_value(team, i < N ? c + static_cast<int64_t>(i) * M : nullptr, M, maximize, big, s.price);
      if (lane == 0) s.x[i] = u;
    }
    team.sync();
    if (team.leader_warp()) {
      const double Su = warp_canon_sum(team, s.x, m, false);
      if (lane == 0) h->sums[3] = Su;
    }
    team.sync();
    const double P = volatile_load(&h->sums[0]);
    const double A = volatile_load(&h->sums[1]);
    const double Sp = volatile_load(&h->sums[2]);
    const double Su = volatile_load(&h->sums[3]);
    const double scale = volatile_load(&h->sums[4]);  // max p_j + max |c_i,s(i)|
    const double D = Su - Sp;
    thr = gap_threshold(tol, A);
    if (volatile_load(&h->unassigned) == 0 && certified(P, D, thr, integral)) {
      certified_ok = true;
    } else {
      eps = eps_next(eps, thr, integral, m);
      if (eps_below_resolution(eps, scale)) break;
    }
  }

  if (certified_ok) {
    // The modified problem's optimum uses a stand-in for +inf iff the original is infeasible.
    for (int i = tid; i < N; i += nthr) {
      double raw = static_cast<double>(c[static_cast<int64_t>(i) * M + team.ld(&s.assigned[i])]);
      if (maximize) raw = -raw;
      if (raw == HUGE_VAL) atomicOr(&h->flags, kFlagUsesBig);
    }
    team.sync();
    st = (volatile_load(&h->flags) & kFlagUsesBig) ? kInfeasible : kOk;
  }
  for (int i = tid; i < N; i += nthr) col4row[i] = st == kOk ? team.ld(&s.assigned[i]) : -1;
  if (tid == 0) {
    *status = st;
    if (rounds_out) *rounds_out = rounds > kMaxRounds ? kMaxRounds : rounds;
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads, 1) auction_block_kernel(
    const T* __restrict__ cost,  // [B, N, M]
    int N, int M, bool maximize, double tol, bool in_shared,
    char* __restrict__ workspace,  // [B, state_bytes(M)] when !in_shared
    int64_t* __restrict__ col4row, int8_t* __restrict__ status, int64_t* __restrict__ rounds) {
#ifdef LOOM_CUDA_EMULATION  // python_tests/cuda_emu: the block's dynamic shared memory, emulated
  char* smem = emu::dynamic_smem();
#else
  extern __shared__ __align__(16) char smem[];
#endif
  const int64_t b = blockIdx.x;
  char* base = in_shared ? smem : workspace + b * state_bytes(M);
  solve_problem<T>(BlockTeam{}, cost + b * N * static_cast<int64_t>(M), N, M, maximize, tol, carve(base, M),
                   col4row + b * N, status + b, rounds ? rounds + b : nullptr);
}

template <typename T>
__global__ void __launch_bounds__(kGridThreads, 1) auction_grid_kernel(
    const T* __restrict__ cost,  // [N, M], one problem
    int N, int M, bool maximize, double tol,
    char* __restrict__ workspace,  // [state_bytes(M)]
    int64_t* __restrict__ col4row, int8_t* __restrict__ status, int64_t* __restrict__ rounds) {
  solve_problem<T>(GridTeam{}, cost, N, M, maximize, tol, carve(workspace, M), col4row, status, rounds);
}

// Dynamic shared memory a launch gets without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr size_t kDefaultDynamicSmem = 48 * 1024;

struct Plan {
  bool grid;
  bool in_shared;
  int blocks;  // grid path: cooperative blocks
  size_t workspace;
  size_t dynamic_smem;  // block path: bytes of dynamic shared memory (opt-in above kDefaultDynamicSmem)
};

// The launch plan from the device's attributes: sms, the opt-in shared memory per block and (grid mode
// only) the grid kernel's resident blocks per SM. Pure host code, so the emulator (python_tests/cuda_emu)
// runs the kernels under the plan a given GPU would get: state in shared memory up to smem_optin (over
// 48 KB from M >= 943), in a global workspace beyond (M >= 4468 on an H100/H200's 227 KiB).
inline Plan plan_launch(int64_t B, int64_t M, int mode, int sms, int smem_optin, int grid_per_sm) {
  Plan plan{false, false, 0, 0, 0};
  plan.grid = mode == kModeGrid;  // auto: one block per problem (see auction_cuda.h)
  if (plan.grid) {
    if (grid_per_sm < 1) throw std::runtime_error("loom_kernels CUDA auction: the grid kernel cannot be resident");
    // A warp per bidder of a full round, but never more blocks than are resident at once.
    const int64_t want = (M * 32 + kGridThreads - 1) / kGridThreads;
    const int64_t cap = static_cast<int64_t>(sms) * (grid_per_sm < 2 ? grid_per_sm : 2);
    plan.blocks = static_cast<int>(want < cap ? want : cap);
    if (plan.blocks < 1) plan.blocks = 1;
    plan.workspace = state_bytes(M);  // problems run one after another on the stream
    return plan;
  }
  plan.in_shared = mode != kModeBlockGlobal && state_bytes(M) <= static_cast<size_t>(smem_optin);
  plan.workspace = plan.in_shared ? 0 : static_cast<size_t>(B) * state_bytes(M);
  plan.dynamic_smem = plan.in_shared ? state_bytes(M) : 0;
  return plan;
}

// The host side. Under LOOM_CUDA_EMULATION it is built against python_tests/cuda_emu's recording stub of
// the runtime, so the launch plan, the opt-in, the cooperative loop and the error paths run without a GPU.
#ifndef LOOM_CUDA_ARCHS_BUILT
#define LOOM_CUDA_ARCHS_BUILT "?"
#endif
void check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  std::string msg = std::string("loom_kernels CUDA auction: ") + what + " failed: " + cudaGetErrorString(e);
  if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction ||
      e == cudaErrorUnsupportedPtxVersion) {
    // A GPU this build has no code for (a wheel built for other targets, or a driver older than
    // the PTX): name the architecture and how to build for it.
    int dev = 0, major = 0, minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    const std::string sm = std::to_string(major) + std::to_string(minor);
    msg += ". This GPU is sm_" + sm + " but loom_kernels._cuda was built for CUDA architectures [" +
           LOOM_CUDA_ARCHS_BUILT + "] (newer drivers are needed for PTX of a newer toolkit): rebuild from source "
           "for it with LOOM_CUDA_ARCHS=\"" + sm + "\" pip install --no-binary loom_kernels loom_kernels "
           "(or LOOM_CUDA_ARCHS=\"" + sm + "\" pip install . in a checkout), or pass backend='cpu'";
  }
  throw std::runtime_error(msg);
}

template <typename T>
Plan make_plan(int64_t B, int64_t M, int mode, int device) {
  int sms = 0, smem_optin = 0, per_sm = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute");
  if (mode == kModeGrid)
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, auction_grid_kernel<T>, kGridThreads, 0),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return plan_launch(B, M, mode, sms, smem_optin, per_sm);
}

template <typename T>
void launch(const void* cost, int64_t B, int64_t N, int64_t M, bool maximize, double tol, void* workspace,
            size_t workspace_bytes, int64_t* col4row, int8_t* status, int64_t* rounds, cudaStream_t stream,
            int device, int mode) {
  const int n = static_cast<int>(N), mm = static_cast<int>(M);
  const T* c = static_cast<const T*>(cost);
  char* ws = static_cast<char*>(workspace);
  const Plan plan = make_plan<T>(B, M, mode, device);
  if (workspace_bytes < plan.workspace || (plan.workspace > 0 && ws == nullptr))
    throw std::invalid_argument("auction_cuda_solve: workspace of " + std::to_string(workspace_bytes) +
                                " bytes, needs " + std::to_string(plan.workspace));
  if (plan.grid) {
    auto kern = auction_grid_kernel<T>;
    for (int64_t b = 0; b < B; ++b) {
      const T* cb = c + b * N * M;
      int64_t* ob = col4row + b * N;
      int8_t* sb = status + b;
      int64_t* rb = rounds ? rounds + b : nullptr;
      void* args[] = {(void*)&cb, (void*)&n, (void*)&mm, (void*)&maximize, (void*)&tol, (void*)&ws,
                      (void*)&ob, (void*)&sb, (void*)&rb};
      check(cudaLaunchCooperativeKernel(kern, dim3(plan.blocks), dim3(kGridThreads), args, 0, stream),
            "cudaLaunchCooperativeKernel");
    }
    return;
  }
  const size_t dyn = plan.dynamic_smem;
  auto kern = auction_block_kernel<T>;
  if (dyn > kDefaultDynamicSmem)
    check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn)),
          "cudaFuncSetAttribute");
  bool in_shared = plan.in_shared;
  void* args[] = {(void*)&c,         (void*)&n,  (void*)&mm,      (void*)&maximize, (void*)&tol,
                  (void*)&in_shared, (void*)&ws, (void*)&col4row, (void*)&status,   (void*)&rounds};
  // cudaLaunchKernel rather than <<<>>>: the same launch, and plain C++ for the emulator's stub runtime
  check(cudaLaunchKernel(kern, dim3(static_cast<unsigned>(B)), dim3(kBlockThreads), args, dyn, stream),
        "auction kernel launch");
}

// Runs f with `device` current, restoring the caller's device.
template <typename F>
void on_device(int device, F&& f) {
  int cur = -1;
  check(cudaGetDevice(&cur), "cudaGetDevice");
  if (cur != device) check(cudaSetDevice(device), "cudaSetDevice");
  try {
    f();
  } catch (...) {
    if (cur != device) cudaSetDevice(cur);
    throw;
  }
  if (cur != device) check(cudaSetDevice(cur), "cudaSetDevice");
}
}  // namespace

size_t auction_cuda_workspace_bytes(int64_t B, int64_t N, int64_t M, int mode, int device) {
  (void)N;
  if (B <= 0 || N <= 0) return 0;
  size_t bytes = 0;
  on_device(device, [&] { bytes = make_plan<float>(B, M, mode, device).workspace; });
  return bytes;
}

void auction_cuda_solve(const void* cost, bool is_double, int64_t B, int64_t N, int64_t M, bool maximize,
                        double tol, void* workspace, size_t workspace_bytes, int64_t* col4row, int8_t* status,
                        int64_t* rounds, cudaStream_t stream, int device, int mode) {
  if (B <= 0) return;
  if (N > M) throw std::invalid_argument("auction_cuda_solve needs N <= M (transpose first)");
  if (M > (int64_t(1) << 30)) throw std::invalid_argument("auction_cuda_solve needs M <= 2^30");
  if (mode < kModeAuto || mode > kModeGrid) throw std::invalid_argument("auction_cuda_solve: unknown mode");
  on_device(device, [&] {
    if (N == 0) {
      check(cudaMemsetAsync(status, 0, static_cast<size_t>(B), stream), "cudaMemsetAsync");
      if (rounds) check(cudaMemsetAsync(rounds, 0, static_cast<size_t>(B) * sizeof(int64_t), stream), "cudaMemsetAsync");
      return;
    }
    if (is_double)
      launch<double>(cost, B, N, M, maximize, tol, workspace, workspace_bytes, col4row, status, rounds, stream,
                     device, mode);
    else
      launch<float>(cost, B, N, M, maximize, tol, workspace, workspace_bytes, col4row, status, rounds, stream,
                    device, mode);
  });
}

int auction_cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}
}  // namespace loom

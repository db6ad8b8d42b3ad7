// A CPU stand-in for the CUDA runtime, just enough to run csrc/cuda/auction_cuda.cu's device
// code with one std::thread per CUDA thread (test_auction_emulated.py). Barriers stand in for
// __syncthreads, grid syncs and the implicit warp synchronisation of shuffles and votes, so a
// branch that is not warp- or block-uniform deadlocks here as it would misbehave on a GPU; a
// watchdog then ends the process with a message instead of hanging the test run.
#pragma once
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

using std::isfinite;  // CUDA's math functions live in the global namespace

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__
#define __launch_bounds__(...)

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;

struct emu_uint3 {
  unsigned x, y, z;
};
inline thread_local emu_uint3 threadIdx, blockIdx, blockDim, gridDim;

#ifndef EMU_WATCHDOG_SECONDS
#define EMU_WATCHDOG_SECONDS 600
#endif

namespace emu {
struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32];
};
// Guard bytes after a block's dynamic shared memory: a kernel writing past its size overwrites them.
constexpr size_t kGuardBytes = 256;
constexpr unsigned char kGuard = 0xA5;

struct Block {
  Block(int threads, size_t dyn_bytes)
      : bar(threads), warps(threads / 32), dyn_bytes(dyn_bytes), dyn((dyn_bytes + kGuardBytes) / 8 + 1) {
    std::memset(reinterpret_cast<char*>(dyn.data()) + dyn_bytes, kGuard, kGuardBytes);
  }
  bool guard_intact() const {
    const auto* g = reinterpret_cast<const unsigned char*>(dyn.data()) + dyn_bytes;
    for (size_t i = 0; i < kGuardBytes; ++i)
      if (g[i] != kGuard) return false;
    return true;
  }
  std::barrier<> bar;
  std::vector<Warp> warps;
  size_t dyn_bytes;         // the launch's dynamic shared memory (extern __shared__), 0: none
  std::vector<double> dyn;  // 8-byte aligned like shared memory, guard bytes after it
};
inline thread_local Block* tl_block = nullptr;
inline thread_local std::barrier<>* tl_grid = nullptr;

// Every lane publishes v, then reads lane `src`'s value; the second wait keeps the slots
// stable until all lanes have read them.
template <typename T>
T exchange(T v, int src) {
  static_assert(sizeof(T) <= 8, "one slot per lane");
  Warp& w = tl_block->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  std::memcpy(&w.slot[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &w.slot[src & 31], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}

// The calling block's dynamic shared memory (nullptr when the launch asked for none).
inline char* dynamic_smem() {
  return tl_block->dyn_bytes ? reinterpret_cast<char*>(tl_block->dyn.data()) : nullptr;
}

// Runs fn on blocks x threads std::threads (threads a multiple of 32), each block with dyn_bytes
// of dynamic shared memory; a launch that has not finished after EMU_WATCHDOG_SECONDS is a
// deadlock (a sync not reached by every thread). Returns false when a block wrote past its
// dynamic shared memory.
inline bool launch(int blocks, int threads, const std::function<void()>& fn, size_t dyn_bytes = 0) {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::thread watchdog([&] {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, std::chrono::seconds(EMU_WATCHDOG_SECONDS), [&] { return done; })) {
      std::fprintf(stderr, "cuda_emu: the emulated kernel deadlocked (a barrier not reached by all threads)\n");
      std::_Exit(3);
    }
  });
  std::barrier<> grid(blocks * threads);
  std::vector<std::unique_ptr<Block>> bs;
  for (int b = 0; b < blocks; ++b) bs.push_back(std::make_unique<Block>(threads, dyn_bytes));
  std::vector<std::thread> pool;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, b, t] {
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        blockIdx = {static_cast<unsigned>(b), 0, 0};
        blockDim = {static_cast<unsigned>(threads), 1, 1};
        gridDim = {static_cast<unsigned>(blocks), 1, 1};
        tl_block = bs[b].get();
        tl_grid = &grid;
        fn();
      });
  for (auto& th : pool) th.join();
  {
    std::lock_guard<std::mutex> lock(mu);
    done = true;
  }
  cv.notify_one();
  watchdog.join();
  for (auto& b : bs)
    if (!b->guard_intact()) return false;
  return true;
}

template <typename T, typename F>
T atomic_update(T* a, F f) {
  T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
  while (!__atomic_compare_exchange_n(a, &old, f(old), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
}  // namespace emu

inline void __syncthreads() { emu::tl_block->bar.arrive_and_wait(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int off) { return emu::exchange(v, static_cast<int>(threadIdx.x % 32) ^ off); }
template <typename T>
T __shfl_sync(unsigned, T v, int src) { return emu::exchange(v, src); }
inline unsigned __ballot_sync(unsigned, int pred) {
  unsigned mask = 0;
  for (int l = 0; l < 32; ++l) mask |= (emu::exchange(pred ? 1u : 0u, l) ? 1u : 0u) << l;
  return mask;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <typename T>
T __ldg(const T* p) { return *p; }
template <typename T>
T __ldcg(const T* p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
inline double __ldcg(const double* p) {
  uint64_t u = __atomic_load_n(reinterpret_cast<const uint64_t*>(p), __ATOMIC_SEQ_CST);
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

template <typename T>
T atomicMin(T* a, std::type_identity_t<T> v) { return emu::atomic_update(a, [v](T o) { return v < o ? v : o; }); }
template <typename T>
T atomicMax(T* a, std::type_identity_t<T> v) { return emu::atomic_update(a, [v](T o) { return v > o ? v : o; }); }
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }
inline int atomicOr(int* a, int v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }

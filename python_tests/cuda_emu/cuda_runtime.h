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
#include <utility>
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

// ---- The host API: a recording stub -------------------------------------------------------------
// Enough of the runtime for csrc/cuda/auction_cuda.cu's host side (make_plan, launch, on_device,
// check): a simulated device (emu::host().dev) answers the attribute queries, and every call that
// shapes a launch is appended to emu::host().log, one line each, for test_auction_emulated.py. Launches
// are checked as the real runtime checks them (dynamic shared memory over 48 KB without the opt-in,
// an opt-in above the device's limit, a cooperative grid larger than can be resident), can be made to
// fail with a given error (fail_launch: cudaErrorNoKernelImageForDevice, ...), and run the kernel on
// the emulator when run_kernels is set ("device" pointers are host memory here).
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidDevice = 101;
constexpr cudaError_t cudaErrorNoKernelImageForDevice = 209;
constexpr cudaError_t cudaErrorInvalidDeviceFunction = 98;
constexpr cudaError_t cudaErrorUnsupportedPtxVersion = 222;
constexpr cudaError_t cudaErrorCooperativeLaunchTooLarge = 720;
enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {
struct Device {
  int sms = 132, smem_optin = 232448, grid_per_sm = 1, major = 9, minor = 0, count = 1;
};
struct Host {
  Device dev;
  int current = 0;
  cudaError_t fail_launch = cudaSuccess;  // returned by the next launches instead of running them
  bool run_kernels = false;
  int threads_override = 0;  // run a launch's kernel with this many threads per block (0: as launched)
  std::vector<std::pair<const void*, int>> max_dyn;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
  std::string log;
};
inline Host& host() {
  static Host h;
  return h;
}
inline void record(const std::string& line) { host().log += line + "\n"; }
inline int opted_in(const void* f) {
  for (auto& [g, v] : host().max_dyn)
    if (g == f) return v;
  return 48 * 1024;
}
template <typename... A, size_t... I>
void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
  f(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <typename... A>
cudaError_t launch_kernel(const char* kind, void (*f)(A...), dim3 grid, dim3 block, void** args, size_t dyn) {
  record(std::string(kind) + " grid=" + std::to_string(grid.x) + " block=" + std::to_string(block.x) +
         " dyn=" + std::to_string(dyn) + " args=" + std::to_string(sizeof...(A)));
  if (host().fail_launch != cudaSuccess) return host().fail_launch;
  if (block.x > 1024 || grid.x < 1 || dyn > static_cast<size_t>(opted_in(reinterpret_cast<const void*>(f))))
    return cudaErrorInvalidValue;
  if (host().run_kernels) {
    const int threads = host().threads_override ? host().threads_override : static_cast<int>(block.x);
    if (!launch(static_cast<int>(grid.x), threads, [&] { call(f, args, std::index_sequence_for<A...>{}); }, dyn))
      return cudaErrorInvalidValue;  // wrote past its dynamic shared memory: "an illegal address" on a GPU
  }
  return cudaSuccess;
}
}  // namespace emu

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoKernelImageForDevice: return "no kernel image is available for execution on the device";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
    default: return "unknown error";
  }
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = emu::host().dev.count;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = emu::host().current;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= emu::host().dev.count) return cudaErrorInvalidDevice;
  emu::record("set_device " + std::to_string(d));
  emu::host().current = d;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device) {
  if (device != emu::host().current) emu::record("attribute of a device not current");
  const emu::Device& d = emu::host().dev;
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = d.sms; break;
    case cudaDevAttrComputeCapabilityMajor: *v = d.major; break;
    case cudaDevAttrComputeCapabilityMinor: *v = d.minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = d.smem_optin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F*, int threads, size_t dyn) {
  emu::record("occupancy block=" + std::to_string(threads) + " dyn=" + std::to_string(dyn));
  *n = emu::host().dev.grid_per_sm;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute a, int value) {
  emu::record("set_attribute max_dynamic_smem=" + std::to_string(value));
  if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > emu::host().dev.smem_optin)
    return cudaErrorInvalidValue;
  emu::host().max_dyn.emplace_back(reinterpret_cast<const void*>(f), value);
  return cudaSuccess;
}
template <typename... A>
cudaError_t cudaLaunchKernel(void (*f)(A...), dim3 grid, dim3 block, void** args, size_t dyn, cudaStream_t) {
  return emu::launch_kernel("launch", f, grid, block, args, dyn);
}
template <typename... A>
cudaError_t cudaLaunchCooperativeKernel(void (*f)(A...), dim3 grid, dim3 block, void** args, size_t dyn,
                                        cudaStream_t) {
  const emu::Device& d = emu::host().dev;
  if (grid.x > static_cast<unsigned>(d.sms * d.grid_per_sm)) {
    emu::record("cooperative grid=" + std::to_string(grid.x) + " too large");
    return cudaErrorCooperativeLaunchTooLarge;
  }
  return emu::launch_kernel("cooperative", f, grid, block, args, dyn);
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  emu::record("memset " + std::to_string(n));
  std::memset(p, v, n);
  return cudaSuccess;
}

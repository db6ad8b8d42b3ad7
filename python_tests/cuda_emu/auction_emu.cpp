// Runs the CUDA auction's device code (csrc/cuda/auction_cuda.cu) on the CPU through the
// stand-in runtime of this folder, for test_auction_emulated.py (loaded with ctypes). Linked
// with csrc/cpu/auction_cpu.cpp, so twin_solve is the CPU twin built with the same constants
// (the tests also build variants with other -DLOOM_AUCTION_* values). The host side (make_plan, launch,
// on_device, check) is built against the recording stub of cuda_runtime.h here: emu_host_*.
#define LOOM_CUDA_EMULATION 1
#include "cpu/auction_cpu.h"
#include "cuda/auction_cuda.cu"

extern "C" {
// cost: [B, N, M] float64 (is_double) or float32, N <= M. mode 1: one block per problem,
// 3: the cooperative kernel with `blocks` blocks per problem; `threads` per block.
int emu_solve(const void* cost, int is_double, int64_t B, int64_t N, int64_t M, int maximize, double tol, int mode,
              int threads, int blocks, int64_t* col4row, int8_t* status, int64_t* rounds) {
  using namespace loom;
  const size_t bytes = state_bytes(M);
  std::vector<double> ws((B * bytes + 7) / 8 + 1);  // 8-byte aligned, like cudaMalloc
  char* w = reinterpret_cast<char*>(ws.data());
  auto run = [&](auto* c) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(c)>>;
    if (mode == 3) {
      for (int64_t b = 0; b < B; ++b)
        emu::launch(blocks, threads, [&] {
          auction_grid_kernel<T>(c + b * N * M, int(N), int(M), maximize != 0, tol, w, col4row + b * N, status + b,
                                 rounds + b);
        });
    } else {
      emu::launch(int(B), threads, [&] {
        auction_block_kernel<T>(c, int(N), int(M), maximize != 0, tol, false, w, col4row, status, rounds);
      });
    }
  };
  if (is_double)
    run(static_cast<const double*>(cost));
  else
    run(static_cast<const float*>(cost));
  return 0;
}

// plan_launch's choice for a device: out = [grid, in_shared, blocks, workspace, dynamic_smem].
void emu_plan(int64_t B, int64_t M, int mode, int sms, int smem_optin, int grid_per_sm, int64_t* out) {
  const loom::Plan p = loom::plan_launch(B, M, mode, sms, smem_optin, grid_per_sm);
  out[0] = p.grid;
  out[1] = p.in_shared;
  out[2] = p.blocks;
  out[3] = static_cast<int64_t>(p.workspace);
  out[4] = static_cast<int64_t>(p.dynamic_smem);
}

// The default dynamic shared memory limit, above which the launch must opt in.
int64_t emu_default_dynamic_smem() { return static_cast<int64_t>(loom::kDefaultDynamicSmem); }

// The shipped block size (threads per block of the block kernel).
int emu_block_threads() { return loom::kBlockThreads; }

// The block kernel under the plan (plan_launch) a GPU with `sms` SMs and `smem_optin` bytes of
// opt-in shared memory per block gets in auto mode: the state in each block's dynamic shared
// memory of plan.dynamic_smem bytes, or in the global workspace of plan.workspace bytes.
// plan_out: [in_shared, dynamic_smem, workspace]. Returns 0, or 1 when a block wrote past its
// dynamic shared memory or its workspace slice.
int emu_solve_planned(const void* cost, int is_double, int64_t B, int64_t N, int64_t M, int maximize, double tol,
                      int threads, int sms, int smem_optin, int64_t* col4row, int8_t* status, int64_t* rounds,
                      int64_t* plan_out) {
  using namespace loom;
  const Plan plan = plan_launch(B, M, kModeAuto, sms, smem_optin, 0);
  plan_out[0] = plan.in_shared;
  plan_out[1] = static_cast<int64_t>(plan.dynamic_smem);
  plan_out[2] = static_cast<int64_t>(plan.workspace);
  // the workspace the host would cudaMalloc, with guard bytes after it
  std::vector<double> ws((plan.workspace + emu::kGuardBytes) / 8 + 1);
  char* w = reinterpret_cast<char*>(ws.data());
  std::memset(w + plan.workspace, emu::kGuard, emu::kGuardBytes);
  bool ok = true;
  auto run = [&](auto* c) {
    ok = emu::launch(int(B), threads, [&] {
      auction_block_kernel(c, int(N), int(M), maximize != 0, tol, plan.in_shared, plan.workspace ? w : nullptr,
                           col4row, status, rounds);
    }, plan.dynamic_smem);
  };
  if (is_double)
    run(static_cast<const double*>(cost));
  else
    run(static_cast<const float*>(cost));
  for (size_t i = 0; i < emu::kGuardBytes; ++i) ok = ok && static_cast<unsigned char>(w[plan.workspace + i]) == emu::kGuard;
  return ok ? 0 : 1;
}

int twin_solve(const void* cost, int is_double, int64_t B, int64_t N, int64_t M, int maximize, double tol,
               int64_t* col4row, int8_t* status, int64_t* rounds) {
  if (is_double)
    loom::auction_solve_batch<double>(static_cast<const double*>(cost), B, N, M, maximize != 0, tol, col4row, status,
                                      rounds, 1);
  else
    loom::auction_solve_batch<float>(static_cast<const float*>(cost), B, N, M, maximize != 0, tol, col4row, status,
                                     rounds, 1);
  return 0;
}

// The simulated device of the stub runtime, and whether launches run their kernel (with `threads`
// per block instead of the launched 512 when threads > 0) or fail with `fail_launch`.
void emu_host_config(int sms, int smem_optin, int grid_per_sm, int major, int minor, int count, int current,
                     int fail_launch, int run_kernels, int threads) {
  emu::Host& h = emu::host();
  h.dev = {sms, smem_optin, grid_per_sm, major, minor, count};
  h.current = current;
  h.fail_launch = fail_launch;
  h.run_kernels = run_kernels != 0;
  h.threads_override = threads;
  h.max_dyn.clear();
  h.log.clear();
}

// The stub's log since emu_host_config (one line per call), copied into out (NUL-terminated).
void emu_host_log(char* out, int64_t size) {
  std::snprintf(out, static_cast<size_t>(size), "%s", emu::host().log.c_str());
}

// loom::auction_cuda_workspace_bytes, then loom::auction_cuda_solve with a workspace of that size
// (ws_bytes >= 0: this size instead), as auction_cuda.cpp calls them. Returns 0, or 1 with the
// exception's message in err.
int emu_host_solve(const void* cost, int is_double, int64_t B, int64_t N, int64_t M, int maximize, double tol,
                   int mode, int device, int64_t ws_bytes, int64_t* col4row, int8_t* status, int64_t* rounds,
                   int64_t* ws_out, char* err, int64_t err_size) {
  try {
    const size_t need = loom::auction_cuda_workspace_bytes(B, N, M, mode, device);
    const size_t bytes = ws_bytes >= 0 ? static_cast<size_t>(ws_bytes) : need;
    *ws_out = static_cast<int64_t>(need);
    std::vector<double> ws(bytes / 8 + 1);
    loom::auction_cuda_solve(cost, is_double != 0, B, N, M, maximize != 0, tol, bytes ? ws.data() : nullptr, bytes,
                             col4row, status, rounds, nullptr, device, mode);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, static_cast<size_t>(err_size), "%s", e.what());
    return 1;
  }
}

// The _cuda module's two entry points (csrc/bindings_cuda.cpp) over the stub: assign.dispatch.solve_cuda's
// calls, with its CPU tensors' addresses. Errors as in emu_host_solve.
int64_t emu_host_workspace_bytes(int64_t B, int64_t N, int64_t M, int mode, int device) {
  return static_cast<int64_t>(loom::auction_cuda_workspace_bytes(B, N, M, mode, device));
}
int emu_host_solve_raw(uintptr_t cost, int is_double, int64_t B, int64_t N, int64_t M, int maximize, double tol,
                       uintptr_t col4row, uintptr_t status, uintptr_t ws, uint64_t ws_bytes, uintptr_t rounds,
                       int device, int mode, char* err, int64_t err_size) {
  try {
    loom::auction_cuda_solve(reinterpret_cast<const void*>(cost), is_double != 0, B, N, M, maximize != 0, tol,
                             reinterpret_cast<void*>(ws), static_cast<size_t>(ws_bytes),
                             reinterpret_cast<int64_t*>(col4row), reinterpret_cast<int8_t*>(status),
                             reinterpret_cast<int64_t*>(rounds), nullptr, device, mode);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, static_cast<size_t>(err_size), "%s", e.what());
    return 1;
  }
}
}

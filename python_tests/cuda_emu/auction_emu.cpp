// Runs the CUDA auction's device code (csrc/cuda/auction_cuda.cu) on the CPU through the
// stand-in runtime of this folder, for test_auction_emulated.py (loaded with ctypes). Linked
// with csrc/cpu/auction_cpu.cpp, so twin_solve is the CPU twin built with the same constants
// (the tests also build variants with other -DLOOM_AUCTION_* values).
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
}

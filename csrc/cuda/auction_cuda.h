// Host entry points of the CUDA auction (cuda/auction_cuda.cu); raw device pointers, no torch.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace loom {
// Dispatch: auto = one block per problem (state in shared memory when it fits). The cooperative
// multi-block kernel is opt-in (kModeGrid): it was not faster at any size measured, since rounds
// are latency-bound and grid syncs cost more than the extra warps save (docs/auction.md).
enum AuctionMode : int { kModeAuto = 0, kModeBlock = 1, kModeBlockGlobal = 2, kModeGrid = 3 };

// Bytes of device workspace auction_cuda_solve needs for this shape and mode (0 when all the
// state fits in shared memory).
size_t auction_cuda_workspace_bytes(int64_t B, int64_t N, int64_t M, int mode, int device);

// cost: [B, N, M] float32 or float64 (is_double), C-contiguous, N <= M, on `device`.
// col4row: [B, N] int64; status: [B] int8 (common/status.h); rounds: [B] int64 or nullptr.
// Enqueues on `stream` and returns without synchronizing; throws std::runtime_error on CUDA
// errors and std::invalid_argument on bad shapes.
void auction_cuda_solve(const void* cost, bool is_double, int64_t B, int64_t N, int64_t M, bool maximize,
                        double tol, void* workspace, size_t workspace_bytes, int64_t* col4row, int8_t* status,
                        int64_t* rounds, cudaStream_t stream, int device, int mode);

int auction_cuda_device_count();
}  // namespace loom

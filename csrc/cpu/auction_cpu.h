// CPU twin of the CUDA auction (cuda/auction_cuda.cu): same Jacobi rounds, same ties, same ε
// schedule (common/auction.h), so a float64 GPU run reproduces its assignment and round count.
#pragma once
#include <cstdint>

namespace loom {
// cost: [B, N, M] row-major, N <= M. col4row: [B, N] (-1 where the status is not kOk).
// status: [B] (common/status.h). rounds: [B] bidding rounds per problem, or nullptr.
// tol: relative gap tolerance (see auction::gap_threshold); threads <= 0: all hardware threads.
template <typename T>
void auction_solve_batch(const T* cost, int64_t B, int64_t N, int64_t M, bool maximize, double tol,
                         int64_t* col4row, int8_t* status, int64_t* rounds, int threads);
}  // namespace loom

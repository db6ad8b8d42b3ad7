// Exact dense linear assignment on the CPU (Jonker-Volgenant shortest augmenting paths).
#pragma once
#include <cstdint>

namespace loom {
// cost:    [B, N, M] row-major, N <= M, float or double; +inf marks a forbidden pair.
// col4row: [B, N] int64, the column given to each row (-1 when the problem is not solved).
// status:  [B] int8, a loom::Status per problem (kOk, kInfeasible, kInvalid).
// maximize flips the sign of every entry as it is read (no copy). Distances and potentials are
// accumulated in double, so float input is solved exactly with respect to its float64 value.
// threads <= 0 uses all hardware threads (fewer for small batches, where starting threads would
// cost more than it saves); a single problem (or threads == 1) runs on the calling thread. The
// result does not depend on the thread count. The caller handles the GIL.
template <typename T>
void lap_solve_batch(const T* cost, int64_t B, int64_t N, int64_t M, bool maximize,
                     int64_t* col4row, int8_t* status, int threads);
}  // namespace loom

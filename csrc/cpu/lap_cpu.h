// Exact CPU solver (placeholder interface; implemented in lap_cpu.cpp).
#pragma once
#include <cstdint>

namespace loom {
// cost: [B, N, M] row-major, N <= M. col4row: [B, N]. status: [B]. Releases nothing: caller
// handles the GIL. threads <= 0 means all hardware threads.
template <typename T>
void lap_solve_batch(const T* cost, int64_t B, int64_t N, int64_t M, bool maximize,
                     int64_t* col4row, int8_t* status, int threads);
}  // namespace loom

#include "cpu/lap_cpu.h"
#include <stdexcept>

namespace loom {
template <typename T>
void lap_solve_batch(const T*, int64_t, int64_t, int64_t, bool, int64_t*, int8_t*, int) {
  throw std::runtime_error("lap_solve_batch: not implemented yet");
}
template void lap_solve_batch<float>(const float*, int64_t, int64_t, int64_t, bool, int64_t*, int8_t*, int);
template void lap_solve_batch<double>(const double*, int64_t, int64_t, int64_t, bool, int64_t*, int8_t*, int);
}  // namespace loom

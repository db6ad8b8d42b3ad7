// The noise stream of loom_kernels/noise.py on the CPU: Philox4x32-10 words and their
// Box-Muller normals, row i a pure function of seeds[i] (the stream is defined in noise.py's
// module docstring; the Triton kernel there is the GPU twin).
#pragma once
#include <cstdint>

namespace loom {
// seeds: [n_rows] int64 (all 64 bits are the key). out: [n_rows, row_len] row-major.
// philox_normal writes the float32 normals, philox_uint32 the raw words x0, x1, x2, x3 of
// blocks 0, 1, ... (the last block truncated at row_len). row_len <= 4 * 2^32.
// threads <= 0 uses all hardware threads; small outputs run on the calling thread. The result
// does not depend on the thread count. The caller handles the GIL.
void philox_normal(const int64_t* seeds, int64_t n_rows, int64_t row_len, float* out, int threads);
void philox_uint32(const int64_t* seeds, int64_t n_rows, int64_t row_len, uint32_t* out, int threads);
// Nearest of k (loom_kernels/couplings/knn.py): x [b, D] row-major, seeds [b * k], candidate j of item i
// the normals of seeds[i * k + j] (as philox_normal's row of length D), never stored.
// dist[i * k + j] = |z|^2 - 2 <x_i, z> summed in double; arg[i] = the lowest j of the least dist[i, :]
// (a NaN counts as least, as torch.argmin); xsq[i] = |x_i|^2 in double (the costs need it: the pass
// computes it for free). The result does not depend on the thread count.
void philox_nearest(const int64_t* seeds, const float* x, int64_t b, int64_t k, int64_t D, int64_t* arg,
                    double* dist, double* xsq, int threads);
}  // namespace loom

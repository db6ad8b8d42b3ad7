// The streamed logit pass of loom_kernels/streamed.py on the CPU: for each row i of a problem,
// a reduction over j of the logits s_ij = u_j + scale_b <x_i, y_j> (the Triton kernel of
// loom_kernels/sinkhorn/_kernels.py is the GPU twin), the n x m logits never stored.
#pragma once
#include <cstdint>

namespace loom {
struct StreamArgs {
  const float* x;      // [B, n, D] row-major
  const float* y;      // [B, m, D]
  const float* u;      // [B, m] column terms (-inf allowed: a column that never counts)
  const float* scale;  // [B]
  const int64_t* ki;   // [B, n] Gumbel row keys in [0, 2^32), or null (no noise)
  const int64_t* kj;   // [m] Gumbel column keys, or null
  int64_t B, n, m, D;
};

// out[b, i] = LSE_j s_ij (float32; -inf for a row of -inf logits).
void stream_lse(const StreamArgs& a, float* out, int threads);
// out[b, i] = argmax_j (s_ij + Gumbel(ki[b, i], kj[j])) (no noise without keys), the lowest j on
// ties; best (nullable) gets the maximum. m < 2^31. The result does not depend on threads.
void stream_argmax(const StreamArgs& a, int64_t* out, float* best, int threads);

// Roofline micro-kernels (bench/roofline.py): seconds for `reps` sweeps of each.
double roofline_exp(int64_t n, int64_t reps);     // n exps (the kernel's own polynomial), L1-resident
double roofline_fma(int64_t reps);                // reps * kFmaPerRep float32 FMAs, register-resident
double roofline_read(const float* p, int64_t n, int64_t reps, float* sink);  // stream n floats
int64_t roofline_fma_per_rep();
}  // namespace loom

// Status codes shared by the CPU and CUDA solvers (one int8 per problem).
#pragma once
#include <cstdint>

namespace loom {
enum Status : int8_t {
  kOk = 0,          // optimal (or within tol for the auction)
  kInfeasible = 1,  // +inf entries leave no complete finite assignment
  kInvalid = 2,     // NaN, or -inf after the maximize sign flip
  kNotConverged = 3,  // auction hit its round/phase bound (common/auction.h) without a certificate
};
}  // namespace loom

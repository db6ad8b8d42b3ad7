// PYBIND11_MODULE(_cuda): raw-pointer entry points of the CUDA auction; torch is not linked.
// loom_kernels/assign.py (_solve_cuda) allocates the buffers with torch and passes their
// addresses and the current stream.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/auction_cuda.h"

namespace py = pybind11;

namespace {
bool is_double_dtype(const std::string& dtype) {
  if (dtype == "float64") return true;
  if (dtype == "float32") return false;
  throw std::invalid_argument("solve_auction: dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

void solve_auction(uintptr_t cost_ptr, const std::string& dtype, int64_t B, int64_t N, int64_t M, bool maximize,
                   double tol, uintptr_t col4row_ptr, uintptr_t status_ptr, uintptr_t workspace_ptr,
                   uint64_t workspace_bytes, uintptr_t rounds_ptr, uintptr_t stream, int device, int mode) {
  const bool dbl = is_double_dtype(dtype);
  if (B < 0 || N < 0 || M < 0) throw std::invalid_argument("solve_auction: negative shape");
  py::gil_scoped_release nogil;
  loom::auction_cuda_solve(reinterpret_cast<const void*>(cost_ptr), dbl, B, N, M, maximize, tol,
                           reinterpret_cast<void*>(workspace_ptr), static_cast<size_t>(workspace_bytes),
                           reinterpret_cast<int64_t*>(col4row_ptr), reinterpret_cast<int8_t*>(status_ptr),
                           reinterpret_cast<int64_t*>(rounds_ptr), reinterpret_cast<cudaStream_t>(stream), device,
                           mode);
}
}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "loom_kernels CUDA solvers (raw device pointers; see loom_kernels/assign.py)";
  m.def("device_count", &loom::auction_cuda_device_count, "Visible CUDA devices (0 without a driver)");
  m.def("workspace_bytes", &loom::auction_cuda_workspace_bytes, py::arg("B"), py::arg("N"), py::arg("M"),
        py::arg("mode") = 0, py::arg("device") = 0,
        "Device workspace (bytes) solve_auction needs for a (B, N, M) problem");
  m.def("solve_auction", &solve_auction, py::arg("cost_ptr"), py::arg("dtype"), py::arg("B"), py::arg("N"),
        py::arg("M"), py::arg("maximize"), py::arg("tol"), py::arg("col4row_ptr"), py::arg("status_ptr"),
        py::arg("workspace_ptr"), py::arg("workspace_bytes"), py::arg("rounds_ptr") = 0, py::arg("stream") = 0,
        py::arg("device") = 0, py::arg("mode") = 0,
        "Enqueue the ε-scaling auction on `stream`: cost [B, N, M] float32/float64 (N <= M) -> col4row int64 "
        "[B, N], status int8 [B] (0 ok, 1 infeasible, 2 invalid, 3 not converged), rounds int64 [B] if given. "
        "mode: 0 auto, 1 one block per problem, 2 same with global-memory state, 3 multi-block cooperative.");
}

// PYBIND11_MODULE(_cuda): raw-pointer entry points; torch is not linked.
#include <pybind11/pybind11.h>

namespace py = pybind11;

int loom_cuda_device_count();

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "loom_kernels CUDA solvers";
  m.def("device_count", &loom_cuda_device_count);
}

// PYBIND11_MODULE(_C): numpy-facing wrappers of the CPU solvers. Validation lives in
// loom_kernels/assign.py; the checks here are the cheap second line.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "common/status.h"
#include "cpu/lap_cpu.h"
#include "cpu/auction_cpu.h"
#include "cpu/isa.h"
#include "cpu/philox_cpu.h"
#include "cpu/stream_cpu.h"

namespace py = pybind11;

namespace {
template <typename T>
py::tuple solve_lap_t(py::array_t<T, py::array::c_style> cost, bool maximize, int threads) {
  if (cost.ndim() != 3) throw std::invalid_argument("cost must be a 3-D (B, N, M) array");
  const int64_t B = cost.shape(0), N = cost.shape(1), M = cost.shape(2);
  if (N > M) throw std::invalid_argument("solve_lap needs N <= M (transpose first)");
  py::array_t<int64_t> col4row({B, N});
  py::array_t<int8_t> status(B);
  const T* c = cost.data();
  int64_t* out = col4row.mutable_data();
  int8_t* st = status.mutable_data();
  {
    py::gil_scoped_release nogil;
    loom::lap_solve_batch<T>(c, B, N, M, maximize, out, st, threads);
  }
  return py::make_tuple(col4row, status);
}

// The auction's CPU twin (owned with cuda/auction_cuda.cu). with_rounds adds the bidding-round
// count per problem, which tests compare with the GPU's.
template <typename T>
py::tuple solve_auction_t(py::array_t<T, py::array::c_style> cost, bool maximize, double tol, int threads,
                          bool with_rounds) {
  if (cost.ndim() != 3) throw std::invalid_argument("cost must be a 3-D (B, N, M) array");
  const int64_t B = cost.shape(0), N = cost.shape(1), M = cost.shape(2);
  if (N > M) throw std::invalid_argument("solve_auction needs N <= M (transpose first)");
  if (M > 0x7ffffffe) throw std::invalid_argument("solve_auction needs M < 2^31 - 1");
  py::array_t<int64_t> col4row({B, N});
  py::array_t<int8_t> status(B);
  py::array_t<int64_t> rounds(B);
  const T* c = cost.data();
  int64_t* out = col4row.mutable_data();
  int8_t* st = status.mutable_data();
  int64_t* rd = rounds.mutable_data();
  {
    py::gil_scoped_release nogil;
    loom::auction_solve_batch<T>(c, B, N, M, maximize, tol, out, st, rd, threads);
  }
  if (with_rounds) return py::make_tuple(col4row, status, rounds);
  return py::make_tuple(col4row, status);
}

// The noise stream of loom_kernels/noise.py: [n_rows, row_len] float32 normals or uint32 words.
template <typename T>
py::array_t<T> philox_t(py::array_t<int64_t, py::array::c_style> seeds, int64_t row_len, int threads) {
  if (seeds.ndim() != 1) throw std::invalid_argument("seeds must be a 1-D (S,) int64 array");
  if (row_len < 0 || row_len > (int64_t{4} << 32))
    throw std::invalid_argument("row_len must be in [0, 4 * 2**32], got " + std::to_string(row_len));
  const int64_t S = seeds.shape(0);
  py::array_t<T> out({S, row_len});
  const int64_t* s = seeds.data();
  T* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    if constexpr (std::is_same_v<T, float>)
      loom::philox_normal(s, S, row_len, o, threads);
    else
      loom::philox_uint32(s, S, row_len, o, threads);
  }
  return out;
}

// The streamed logit pass (loom_kernels/streamed.py validates; these checks are the second line).
using F32 = py::array_t<float, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;
loom::StreamArgs stream_args(const F32& x, const F32& y, const F32& u, const F32& scale, const py::object& ki,
                             const py::object& kj) {
  if (x.ndim() != 3 || y.ndim() != 3 || u.ndim() != 2 || scale.ndim() != 1)
    throw std::invalid_argument("stream: x (B, n, D), y (B, m, D), u (B, m), scale (B,) expected");
  const int64_t B = x.shape(0), n = x.shape(1), D = x.shape(2), m = y.shape(1);
  if (y.shape(0) != B || y.shape(2) != D || u.shape(0) != B || u.shape(1) != m || scale.shape(0) != B)
    throw std::invalid_argument("stream: shapes of x, y, u, scale disagree");
  loom::StreamArgs a{x.data(), y.data(), u.data(), scale.data(), nullptr, nullptr, B, n, m, D};
  if (!ki.is_none()) {
    auto kia = ki.cast<I64>(), kja = kj.cast<I64>();
    if (kia.ndim() != 2 || kia.shape(0) != B || kia.shape(1) != n || kja.ndim() != 1 || kja.shape(0) != m)
      throw std::invalid_argument("stream: ki must be (B, n) and kj (m,) int64");
    a.ki = kia.data();
    a.kj = kja.data();
  }
  return a;
}

// Nearest of k noise candidates drawn from their seeds (loom_kernels/couplings/knn.py validates).
py::tuple philox_nearest_t(I64 seeds, F32 x, int64_t k, int threads) {
  if (x.ndim() != 2) throw std::invalid_argument("philox_nearest: x must be a 2-D (b, D) float32 array");
  const int64_t b = x.shape(0), D = x.shape(1);
  if (k < 1) throw std::invalid_argument("philox_nearest: k must be >= 1, got " + std::to_string(k));
  if (seeds.ndim() != 1 || seeds.shape(0) != b * k)
    throw std::invalid_argument("philox_nearest: seeds must be 1-D with b * k = " + std::to_string(b * k) +
                                " int64 values");
  py::array_t<int64_t> arg(b);
  py::array_t<double> dist({b, k});
  py::array_t<double> xsq(b);
  const int64_t* s = seeds.data();
  const float* xp = x.data();
  int64_t* a = arg.mutable_data();
  double* d = dist.mutable_data();
  double* q = xsq.mutable_data();
  {
    py::gil_scoped_release nogil;
    loom::philox_nearest(s, xp, b, k, D, a, d, q, threads);
  }
  return py::make_tuple(arg, dist, xsq);
}

py::array_t<float> stream_lse(F32 x, F32 y, F32 u, F32 scale, int threads) {
  const auto a = stream_args(x, y, u, scale, py::none(), py::none());
  py::array_t<float> out({a.B, a.n});
  float* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    loom::stream_lse(a, o, threads);
  }
  return out;
}

py::tuple stream_argmax(F32 x, F32 y, F32 u, F32 scale, py::object ki, py::object kj, int threads) {
  if (ki.is_none() != kj.is_none()) throw std::invalid_argument("stream: pass both ki and kj or neither");
  I64 kia, kja;  // kept alive through the call
  if (!ki.is_none()) {
    kia = ki.cast<I64>();
    kja = kj.cast<I64>();
  }
  const auto a = stream_args(x, y, u, scale, ki.is_none() ? py::none() : py::object(kia),
                             kj.is_none() ? py::none() : py::object(kja));
  py::array_t<int64_t> out({a.B, a.n});
  py::array_t<float> best({a.B, a.n});
  int64_t* o = out.mutable_data();
  float* bo = best.mutable_data();
  {
    py::gil_scoped_release nogil;
    loom::stream_argmax(a, o, bo, threads);
  }
  return py::make_tuple(out, best);
}

double roofline_read(F32 buf, int64_t reps) {
  float sink = 0.0f;
  const float* p = buf.data();
  const int64_t n = buf.size();
  py::gil_scoped_release nogil;
  return loom::roofline_read(p, n, reps, &sink);
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "loom_kernels CPU solvers";
  m.def("solve_lap", &solve_lap_t<double>, py::arg("cost"), py::arg("maximize"), py::arg("threads") = 0,
        "Exact dense assignment of a (B, N, M) float64 batch, N <= M -> (col4row int64 (B, N), status int8 (B,))");
  m.def("solve_lap", &solve_lap_t<float>, py::arg("cost"), py::arg("maximize"), py::arg("threads") = 0);
  m.def("solve_auction", &solve_auction_t<double>, py::arg("cost"), py::arg("maximize"), py::arg("tol"),
        py::arg("threads") = 0, py::arg("with_rounds") = false,
        "ε-scaling auction (CPU twin of the CUDA solver) of a (B, N, M) float32/float64 batch, N <= M -> "
        "(col4row int64 (B, N), status int8 (B,)[, rounds int64 (B,)])");
  m.def("solve_auction", &solve_auction_t<float>, py::arg("cost"), py::arg("maximize"), py::arg("tol"),
        py::arg("threads") = 0, py::arg("with_rounds") = false);
  m.def("philox_normal", &philox_t<float>, py::arg("seeds"), py::arg("row_len"), py::arg("threads") = 0,
        "Philox4x32-10 + Box-Muller normals of loom_kernels.noise: int64 seeds (S,) -> float32 (S, row_len)");
  m.def("philox_uint32", &philox_t<uint32_t>, py::arg("seeds"), py::arg("row_len"), py::arg("threads") = 0,
        "The raw Philox4x32-10 words of loom_kernels.noise: int64 seeds (S,) -> uint32 (S, row_len)");
  m.def("philox_nearest", &philox_nearest_t, py::arg("seeds"), py::arg("x"), py::arg("k"), py::arg("threads") = 0,
        "Nearest of k: for x (b, D) float32 and seeds (b*k,) int64, (argmin_j int64 (b,), |z|^2 - 2 <x_i, z> "
        "float64 (b, k), |x_i|^2 float64 (b,)) over the philox_normal rows z of seeds[i*k + j], none stored");
  m.def("stream_lse", &stream_lse, py::arg("x"), py::arg("y"), py::arg("u"), py::arg("scale"),
        py::arg("threads") = 0,
        "LSE_j(u_j + scale_b <x_i, y_j>) float32 (B, n) of float32 x (B, n, D), y (B, m, D), u (B, m), scale (B,)");
  m.def("stream_argmax", &stream_argmax, py::arg("x"), py::arg("y"), py::arg("u"), py::arg("scale"),
        py::arg("ki") = py::none(), py::arg("kj") = py::none(), py::arg("threads") = 0,
        "(argmax_j int64 (B, n), max float32 (B, n)) of u_j + scale_b <x_i, y_j> [+ Gumbel(ki (B, n), kj (m,))]");
  m.def("roofline_exp", &loom::roofline_exp, py::arg("n"), py::arg("reps"),
        py::call_guard<py::gil_scoped_release>(), "Seconds for reps sweeps of n exps (L1-resident)");
  m.def("roofline_fma", &loom::roofline_fma, py::arg("reps"), py::call_guard<py::gil_scoped_release>(),
        "Seconds for reps * roofline_fma_per_rep() float32 FMAs in registers");
  m.def("roofline_fma_per_rep", &loom::roofline_fma_per_rep);
  m.def("roofline_read", &roofline_read, py::arg("buf"), py::arg("reps"),
        "Seconds for reps sequential reads of the float32 buffer");
  m.def("isa", [] { return loom::isa_name(loom::active_isa()); },
        "The instruction set the solver and noise kernels run now: scalar, avx2, avx512 or native");
  m.def("isas", [] {
    py::list out;
    for (loom::Isa i : loom::supported_isas()) out.append(loom::isa_name(i));
    return out;
  }, "The instruction sets this build has and this CPU runs, best last");
  m.def("set_isa", &loom::set_isa, py::arg("name"),
        "Force the kernels' instruction set (scalar, avx2, avx512, native) or 'auto' for the best; "
        "ValueError for one this build or CPU lacks");
}

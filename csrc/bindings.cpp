// Python bindings of accelprune._native: shape checks, GIL release, parallel loop over problems,
// C++ exceptions mapped to Python ones (std::invalid_argument -> ValueError, std::bad_alloc ->
// MemoryError, by pybind11). The Python layer (accelprune/cluster.py) has already converted the
// inputs to C-contiguous float64; forcecast here only guards direct callers, and inputs are read
// through const pointers, never written.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ward.hpp"

namespace py = pybind11;
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;
using IntArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

namespace {

// Runs body(problem, workspace) for every problem on n_threads threads, each thread owning one
// workspace. Exceptions cannot cross an OpenMP region, so the first one is kept and rethrown.
template <typename Body>
void parallel_over_problems(int64_t n_problems, int n_threads, Body body) {
  std::exception_ptr error = nullptr;
  std::atomic<bool> failed{false};
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
  {
    accelprune::WardWorkspace ws;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t b = 0; b < n_problems; ++b) {
      if (failed.load(std::memory_order_relaxed)) continue;
      try {
        body(b, ws);
      } catch (...) {
#ifdef _OPENMP
#pragma omp critical
#endif
        if (!failed.exchange(true)) error = std::current_exception();
      }
    }
  }
  (void)n_threads;
  if (error) std::rethrow_exception(error);
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// Threads worth using for B problems of n points in d dimensions. Starting a second thread costs
// microseconds on an idle machine but can cost a scheduler tick (~10 ms) on a busy one, so small
// layers stay on one thread. The estimate is in rough nanoseconds of single-thread work.
int useful_threads(int64_t B, int64_t n, int64_t d, int n_threads) {
  const double per_problem = d == 1 ? 20.0 * n * std::log2(static_cast<double>(n) + 1.0)
                                    : static_cast<double>(n) * n * (d + 4.0);
  const double min_work_per_thread = 2e7;  // ~20 ms
  const double useful = static_cast<double>(B) * per_problem / min_work_per_thread;
  return static_cast<int>(std::max(1.0, std::min<double>(n_threads, std::floor(useful))));
}

py::array_t<double> ward_linkage_batched(const DoubleArray& X, int n_threads) {
  require(X.ndim() == 3, "X must be 3-D (problems, points, dims)");
  require(n_threads >= 1, "n_threads must be >= 1");
  const int64_t B = X.shape(0), n = X.shape(1), d = X.shape(2);
  require(n >= 1 && d >= 1, "X needs at least one point of dimension >= 1 per problem");
  const double* x = X.data();
  // The scans rely on finite, moderate distances (dead clusters sit behind a 1e300 sentinel);
  // NaN would make them run past the row. accelprune.cluster checks this too, with the same
  // message, but direct callers of the extension must not be able to crash it.
  for (int64_t i = 0, size = B * n * d; i < size; ++i) {
    require(std::isfinite(x[i]) && std::fabs(x[i]) <= 1e100,
            "X has NaN, Inf or values beyond +-1e100");
  }
  py::array_t<double> Z({B, n - 1, static_cast<int64_t>(4)});
  double* z = Z.mutable_data();
  const int threads = useful_threads(B, n, d, n_threads);
  {
    py::gil_scoped_release release;
    parallel_over_problems(B, threads, [&](int64_t b, accelprune::WardWorkspace& ws) {
      accelprune::ward_linkage(x + b * n * d, n, d, ws, z + b * (n - 1) * 4);
    });
  }
  return Z;
}

// Shared driver of the two cuts: threshold_of(b, max_dist, n) gives problem b's threshold.
template <typename Threshold>
py::array_t<int32_t> cut_batched(const DoubleArray& Z, Threshold threshold_of) {
  require(Z.ndim() == 3 && Z.shape(2) == 4, "Z must have shape (problems, n-1, 4)");
  const int64_t B = Z.shape(0), n = Z.shape(1) + 1;
  py::array_t<int32_t> labels({B, n});
  const double* z = Z.data();
  int32_t* out = labels.mutable_data();
  {
    py::gil_scoped_release release;
    // Cuts are cheap: one thread, no per-problem allocation beyond two small vectors.
    std::vector<double> max_dist;
    std::vector<char> used;
    for (int64_t b = 0; b < B; ++b) {
      const double* zb = z + b * (n - 1) * 4;
      accelprune::check_linkage(zb, n, max_dist, used);
      accelprune::cut_at(zb, n, max_dist, threshold_of(b, max_dist, n), out + b * n);
    }
  }
  return labels;
}

py::array_t<int32_t> cut_linkage_height(const DoubleArray& Z, const DoubleArray& heights) {
  require(heights.ndim() == 1 && heights.shape(0) == Z.shape(0), "need one height per problem");
  const double* h = heights.data();
  return cut_batched(Z, [h](int64_t b, const std::vector<double>&, int64_t) { return h[b]; });
}

py::array_t<int32_t> cut_linkage_maxclust(const DoubleArray& Z, const IntArray& counts) {
  require(counts.ndim() == 1 && counts.shape(0) == Z.shape(0), "need one n_clusters per problem");
  const int64_t* k = counts.data();
  for (int64_t b = 0; b < counts.shape(0); ++b) {
    require(k[b] >= 1 && k[b] <= Z.shape(1) + 1, "n_clusters must be in [1, n]");
  }
  return cut_batched(Z, [k](int64_t b, const std::vector<double>& max_dist, int64_t n) {
    return accelprune::maxclust_threshold(max_dist, n, k[b]);
  });
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "accelprune's native engines: batched Ward clustering and flat cuts.";
  m.def("ward_linkage_batched", &ward_linkage_batched, py::arg("X"), py::arg("n_threads"),
        "Ward linkage of every problem in X (B, n, d) -> Z (B, n-1, 4), scipy conventions.");
  m.def("cut_linkage_height", &cut_linkage_height, py::arg("Z"), py::arg("heights"),
        "fcluster 'distance' partition of each problem, labels in order of first appearance.");
  m.def("cut_linkage_maxclust", &cut_linkage_maxclust, py::arg("Z"), py::arg("counts"),
        "fcluster 'maxclust' partition of each problem, labels in order of first appearance.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}

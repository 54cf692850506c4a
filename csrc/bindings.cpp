// Python bindings of accelprune._native: input checks, GIL release, parallel loop over problems,
// C++ exceptions mapped to Python ones (std::invalid_argument -> ValueError, std::bad_alloc ->
// MemoryError, by pybind11).
//
// The Python layer (accelprune/cluster.py) is the documented entry point: it converts real input
// to float32 or float64 (points, in any memory layout) or to the exact dtype each function takes.
// These functions do not convert (a bool, complex, object or other-dtype array is a TypeError,
// not a silent cast) and check everything themselves, so a direct caller gets an exception,
// never a crash. Inputs are read through const pointers, never written.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ward.hpp"

namespace py = pybind11;

namespace {

// The most threads a call may ask for; more is a mistake (2**40), not a big machine.
constexpr int64_t kMaxThreads = 1 << 16;

// (A literal message, not a std::string: building one per call was a malloc and a free each,
// and the checks of every input element used to call this once per element.)
void require(bool ok, const char* message) {
  if (!ok) throw std::invalid_argument(message);
}

// The C-contiguous array of exactly dtype T behind obj, or a TypeError naming the argument.
template <typename T>
py::array_t<T, py::array::c_style> exact_array(const py::handle& obj, const char* name,
                                               const char* dtype_name) {
  if (!py::isinstance<py::array_t<T, py::array::c_style>>(obj)) {
    std::string got = py::isinstance<py::array>(obj)
                          ? std::string(py::str(obj.attr("dtype"))) + " array"
                          : std::string(py::str(py::type::of(obj).attr("__name__")));
    throw py::type_error(std::string(name) + " must be a C-contiguous " + dtype_name +
                         " numpy array, got " + got +
                         " (accelprune.cluster converts other inputs)");
  }
  return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(obj);
}

// A thread count: a Python or numpy integer (not a bool) in [1, kMaxThreads].
int parse_threads(const py::handle& obj) {
  if (py::isinstance<py::bool_>(obj) || !PyIndex_Check(obj.ptr())) {
    throw py::type_error("n_threads must be an integer, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0 || value < 1 || value > kMaxThreads) {
    throw std::invalid_argument("n_threads must be in [1, " + std::to_string(kMaxThreads) +
                                "], got " + std::string(py::str(index)));
  }
  return static_cast<int>(value);
}

accelprune::WardMethod parse_method(const std::string& name) {
  using accelprune::WardMethod;
  for (WardMethod m : {WardMethod::kAuto, WardMethod::kCentroids, WardMethod::kMatrix,
                       WardMethod::kSorted}) {
    if (name == accelprune::method_name(m)) return m;
  }
  throw std::invalid_argument("unknown Ward method '" + name +
                              "'; expected 'auto', 'centroids', 'matrix' or 'sorted'");
}

// Physical memory of the machine, in bytes (0 when unknown).
double physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return (pages > 0 && page > 0) ? static_cast<double>(pages) * static_cast<double>(page) : 0.0;
}

std::string gigabytes(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f GB", bytes / 1e9);
  return text;
}

// Runs body(problem, workspace) for every problem on n_threads threads, each thread owning one
// workspace, handing out `chunk` consecutive problems at a time. Exceptions cannot cross an
// OpenMP region, so the first one is kept and rethrown.
template <typename Body>
void parallel_over_problems(int64_t n_problems, int n_threads, Body body, int chunk = 1) {
  std::exception_ptr error = nullptr;
  std::atomic<bool> failed{false};
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
  {
    try {
      accelprune::WardWorkspace ws;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk)
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
    } catch (...) {  // the workspace's destructor cannot throw; this only keeps the region safe
#ifdef _OPENMP
#pragma omp critical
#endif
      if (!failed.exchange(true)) error = std::current_exception();
    }
  }
  (void)n_threads;
  (void)chunk;
  if (error) std::rethrow_exception(error);
}

// Threads worth using for work_ns nanoseconds of single-thread work: one per ~0.5 ms of it.
int threads_for_work(double work_ns, int n_threads) {
  const double useful = std::floor(work_ns / 5e5);
  return static_cast<int>(std::max(1.0, std::min<double>(n_threads, useful)));
}

// Threads worth using for B problems of n points in d dimensions. Waking OpenMP's pooled threads
// costs microseconds on an idle machine and up to a scheduler tick (~10 ms) on a busy one, where
// problems are handed out one at a time, so a late thread delays the batch by at most one
// problem. Layers under ~0.5 ms of work stay on one thread (at 20 ms, ResNet-50's 256-filter
// layers, ~40 ms each, ran on one thread: a REPrune event's clustering took 0.75 s, not 0.55 s).
// The estimate is in rough nanoseconds of single-thread work.
int useful_threads(int64_t B, int64_t n, int64_t d, accelprune::WardMethod method, int n_threads) {
  const double nd = static_cast<double>(n);
  const double dims = static_cast<double>(d);
  double per_problem;
  switch (method) {
    case accelprune::WardMethod::kSorted: per_problem = 10.0 * nd * std::log2(nd + 1.0); break;
    case accelprune::WardMethod::kMatrix: per_problem = nd * nd * (dims + 4.0); break;
    default: per_problem = nd * nd * (0.2 * dims + 0.4); break;
  }
  return threads_for_work(static_cast<double>(B) * per_problem, n_threads);
}

// The bits of a double and back (heights, >= 0, order as their bit patterns do).
uint64_t double_to_bits(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

double bits_to_double(uint64_t u) {
  double v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

constexpr const char* kImmoderate =
    "X contains NaN or Inf, or values beyond +-1e100 (rescale the data)";

// The points of a batch of Ward problems as numpy holds them: float32 or float64, any strides
// (REPrune passes a transposed view of a conv weight, (c_in, n, kh*kw) over (n, c_in, kh, kw):
// no float64 copy of the layer is made in Python). Each thread copies the problem it solves
// into its workspace as doubles (exact for float32) and checks the values on the way.
struct PointsView {
  py::array array;  // keeps the buffer alive
  const char* data = nullptr;
  bool is_float32 = false;
  int64_t stride[3] = {0, 0, 0};  // in bytes

  // Problem b (n x d, row-major) into out as doubles; false (out unusable) if any value is NaN,
  // Inf or beyond +-1e100: the scans need finite, moderate distances (dead clusters sit behind a
  // 1e300 sentinel), and NaN would make them run past the row. accelprune.cluster checks this
  // too, but direct callers of the extension must not be able to crash it.
  bool gather(int64_t b, int64_t n, int64_t d, std::vector<double>& out) const {
    return is_float32 ? gather_as<float>(b, n, d, out) : gather_as<double>(b, n, d, out);
  }

  template <typename T>
  bool gather_as(int64_t b, int64_t n, int64_t d, std::vector<double>& out) const {
    out.resize(static_cast<size_t>(n * d));
    bool moderate = true;  // (|v| <= 1e100 is false for NaN and Inf too)
    for (int64_t i = 0; i < n; ++i) {
      const char* point = data + b * stride[0] + i * stride[1];
      for (int64_t k = 0; k < d; ++k) {
        T v;
        std::memcpy(&v, point + k * stride[2], sizeof v);  // (no alignment assumed)
        out[i * d + k] = static_cast<double>(v);
        moderate &= std::fabs(static_cast<double>(v)) <= 1e100;
      }
    }
    return moderate;
  }
};

// A checked batch of Ward problems: X (B, n, d), the method to use and the threads worth using.
struct ProblemBatch {
  PointsView X;
  int64_t B, n, d;
  accelprune::WardMethod method;
  int threads;
  // Problems a thread takes at a time: 1-D problems are a strided column each, so 16
  // consecutive ones share every cache line of float32 input (3-4% of the sorted path's time
  // on ResNet-50's 1x1 layers); the others take one, as a problem's time varies too much.
  int chunk;
};

// Checks X, the thread count and the method; refuses what cannot fit in memory (the output, at
// output_bytes_per_merge for each of the B (n - 1) merges, and one workspace per thread) before
// anything is allocated. X's values are checked as each problem is copied (PointsView::gather).
ProblemBatch checked_problems(const py::object& X_obj, const py::object& threads_obj,
                              const std::string& method_name, double output_bytes_per_merge) {
  // (numpy's type equivalence: native byte order, any dtype object of that type)
  const bool is_float32 = py::isinstance<py::array_t<float>>(X_obj);
  const bool is_float64 = py::isinstance<py::array_t<double>>(X_obj);
  if (!is_float32 && !is_float64) {
    std::string got = py::isinstance<py::array>(X_obj)
                          ? std::string(py::str(X_obj.attr("dtype"))) + " array"
                          : std::string(py::str(py::type::of(X_obj).attr("__name__")));
    throw py::type_error("X must be a float32 or float64 numpy array, got " + got +
                         " (accelprune.cluster converts other inputs)");
  }
  ProblemBatch p{PointsView{}, 0, 0, 0, accelprune::WardMethod::kAuto, 1, 1};
  p.X.array = py::reinterpret_borrow<py::array>(X_obj);
  p.X.is_float32 = is_float32;
  const int n_threads = parse_threads(threads_obj);
  p.method = parse_method(method_name);
  require(p.X.array.ndim() == 3, "X must be 3-D (problems, points, dims)");
  p.B = p.X.array.shape(0);
  p.n = p.X.array.shape(1);
  p.d = p.X.array.shape(2);
  require(p.B >= 1 && p.n >= 1 && p.d >= 1,
          "X needs at least one problem of at least one point of dimension >= 1");
  for (int i = 0; i < 3; ++i) p.X.stride[i] = p.X.array.strides(i);
  p.X.data = static_cast<const char*>(p.X.array.data());
  if (p.method == accelprune::WardMethod::kAuto) p.method = accelprune::choose_method(p.n, p.d);
  require(p.method != accelprune::WardMethod::kSorted || p.d == 1,
          "method 'sorted' needs 1-D points (d == 1)");
  p.threads = useful_threads(p.B, p.n, p.d, p.method, n_threads);
  p.chunk = p.method == accelprune::WardMethod::kSorted ? 16 : 1;
  const double physical = physical_memory_bytes();
  const double output =
      static_cast<double>(p.B) * static_cast<double>(p.n - 1) * output_bytes_per_merge;
  const double work = accelprune::workspace_bytes(p.n, p.d, p.method) * p.threads;
  if (physical > 0 && output + work > physical) {
    throw std::invalid_argument(
        "Ward on " + std::to_string(p.B) + " problem(s) of " + std::to_string(p.n) +
        " points in " + std::to_string(p.d) + "-D with method '" +
        accelprune::method_name(p.method) + "' needs " + gigabytes(output + work) +
        " of memory, more than this machine's " + gigabytes(physical) +
        (p.method == accelprune::WardMethod::kMatrix ? "; method 'centroids' needs O(n d)"
                                                      : ""));
  }
  return p;
}

py::array_t<double> ward_linkage_batched(const py::object& X_obj, const py::object& threads_obj,
                                         const std::string& method_name) {
  const ProblemBatch p = checked_problems(X_obj, threads_obj, method_name, 32.0);
  const int64_t B = p.B, n = p.n, d = p.d;
  py::array_t<double> Z({B, n - 1, static_cast<int64_t>(4)});
  double* z = Z.mutable_data();
  const PointsView& X = p.X;
  const accelprune::WardMethod method = p.method;
  {
    py::gil_scoped_release release;
    parallel_over_problems(B, p.threads, [&](int64_t b, accelprune::WardWorkspace& ws) {
      if (!X.gather(b, n, d, ws.input)) throw std::invalid_argument(kImmoderate);
      accelprune::ward_linkage(ws.input.data(), n, d, ws, z + b * (n - 1) * 4, method);
    }, p.chunk);
  }
  return Z;
}

// For the tests: one problem's linkage (X (n, d) float64, finite) by the centroid chain, with or
// without its float prefilter. Both must give the same bits: the prefilter only narrows down
// which clusters the exact cost is computed for.
py::array_t<double> centroid_linkage(const py::object& X_obj, bool float_prefilter) {
  const auto X = exact_array<double>(X_obj, "X", "float64");
  require(X.ndim() == 2 && X.shape(0) >= 2 && X.shape(1) >= 1, "X must be (n, d) with n >= 2");
  const int64_t n = X.shape(0), d = X.shape(1);
  bool moderate = true;  // as PointsView::gather checks
  for (int64_t i = 0; i < n * d; ++i) moderate &= std::fabs(X.data()[i]) <= 1e100;
  require(moderate, kImmoderate);
  py::array_t<double> Z({n - 1, static_cast<int64_t>(4)});
  accelprune::WardWorkspace ws;
  ws.float_prefilter = float_prefilter;
  accelprune::ward_linkage(X.data(), n, d, ws, Z.mutable_data(),
                           accelprune::WardMethod::kCentroids);
  return Z;
}

// REPrune's layer cut (ALGORITHMS.md 3.2) in one call, without linkage matrices: every
// problem's merges in the order made (accelprune::keep_merges), the layer's cut-off h = the
// largest over the problems of the height of the merges_needed-th merge in height order, then
// every problem's partition at h (accelprune::cut_merges). X: a list of (B, n, d) batches with
// the same n (residual-coupled producers share one cut; d may differ). Returns (labels int32
// (sum of B, n), 0..c-1 in order of first appearance, the batches' problems in order; h).
// The merges stay in this call's buffers: the cut trusts their naming because the solvers made
// them.
py::tuple ward_cut_layer(const py::list& X_list, int64_t merges_needed,
                         const py::object& threads_obj, const std::string& method_name) {
  std::vector<ProblemBatch> batches;
  // a merge's pair and height (16 bytes) and a point's label (4)
  for (const py::handle X : X_list) {
    batches.push_back(checked_problems(py::reinterpret_borrow<py::object>(X), threads_obj,
                                       method_name, 20.0));
  }
  require(!batches.empty(), "X is an empty list; give at least one (problems, n, d) array");
  const int64_t n = batches[0].n;
  int64_t total = 0;
  for (const ProblemBatch& p : batches) {
    require(p.n == n, "the arrays of X disagree on the number of points n");
    total += p.B;
  }
  require(n >= 2 && n <= INT32_MAX, "the layer cut needs 2 <= n <= 2**31 - 1 points");
  require(merges_needed >= 1 && merges_needed <= n - 1, "merges_needed must be in [1, n - 1]");
  const int n_threads = parse_threads(threads_obj);
  py::array_t<int32_t> labels({total, n});
  int32_t* label_out = labels.mutable_data();
  // numpy's allocator (not zeroed; large buffers get huge pages where the kernel allows)
  py::array_t<int32_t> pair_buffer(total * (n - 1) * 2);
  py::array_t<double> height_buffer(total * (n - 1));
  int32_t* pairs = pair_buffer.mutable_data();
  double* heights = height_buffer.mutable_data();
  // The running maximum, shared by the threads (heights are >= 0, so their bit patterns order as
  // the values do). The final value is the maximum whatever the order the problems finish in.
  std::atomic<uint64_t> highest{0};
  {
    py::gil_scoped_release release;
    int64_t first = 0;  // the batch's first problem among all
    for (const ProblemBatch& p : batches) {
      parallel_over_problems(p.B, p.threads, [&](int64_t b, accelprune::WardWorkspace& ws) {
        if (!p.X.gather(b, n, p.d, ws.input)) throw std::invalid_argument(kImmoderate);
        accelprune::ward_merges(ws.input.data(), n, p.d, ws, p.method);
        uint64_t seen = highest.load(std::memory_order_relaxed);
        const double h = accelprune::keep_merges(ws, n, merges_needed, bits_to_double(seen),
                                                 pairs + (first + b) * (n - 1) * 2,
                                                 heights + (first + b) * (n - 1));
        const uint64_t mine = double_to_bits(h + 0.0);  // + 0.0: -0.0 would order as huge
        while (mine > seen && !highest.compare_exchange_weak(seen, mine)) {
        }
      }, p.chunk);
      first += p.B;
    }
    const double threshold = bits_to_double(highest.load());
    // ~5 ns a merge (see useful_threads for why small work stays on one thread)
    const int threads = threads_for_work(5.0 * static_cast<double>(total) *
                                             static_cast<double>(n), n_threads);
    parallel_over_problems(total, threads, [&](int64_t b, accelprune::WardWorkspace& ws) {
      accelprune::cut_merges(pairs + b * (n - 1) * 2, heights + b * (n - 1), n,
                             threshold, ws.cut_scratch, label_out + b * n);
    });
  }
  return py::make_tuple(labels, bits_to_double(highest.load()));
}

// Shared driver of the two cuts: threshold_of(b, max_dist, n) gives problem b's threshold.
template <typename Threshold>
py::array_t<int32_t> cut_batched(const py::array_t<double, py::array::c_style>& Z,
                                 Threshold threshold_of) {
  const int64_t B = Z.shape(0), n = Z.shape(1) + 1;
  py::array_t<int32_t> labels({B, n});
  const double* z = Z.data();
  int32_t* out = labels.mutable_data();
  {
    py::gil_scoped_release release;
    // Cuts are cheap: one thread, no per-problem allocation beyond two small vectors.
    std::vector<double> max_dist;
    std::vector<int64_t> size;
    for (int64_t b = 0; b < B; ++b) {
      const double* zb = z + b * (n - 1) * 4;
      accelprune::check_linkage(zb, n, max_dist, size);
      accelprune::cut_at(zb, n, max_dist, threshold_of(b, max_dist, n), out + b * n);
    }
  }
  return labels;
}

py::array_t<double, py::array::c_style> linkage_batch(const py::object& Z_obj) {
  auto Z = exact_array<double>(Z_obj, "Z", "float64");
  require(Z.ndim() == 3 && Z.shape(2) == 4, "Z must have shape (problems, n-1, 4)");
  require(Z.shape(1) + 1 <= INT32_MAX, "Z has too many rows for int32 labels");
  return Z;
}

py::array_t<int32_t> cut_linkage_height(const py::object& Z_obj, const py::object& heights_obj) {
  const auto Z = linkage_batch(Z_obj);
  const auto heights = exact_array<double>(heights_obj, "heights", "float64");
  require(heights.ndim() == 1 && heights.shape(0) == Z.shape(0), "need one height per problem");
  const double* h = heights.data();
  for (int64_t b = 0; b < heights.shape(0); ++b) {
    require(h[b] >= 0.0, "cut heights must be >= 0 (not NaN)");  // NaN fails too
  }
  return cut_batched(Z, [h](int64_t b, const std::vector<double>&, int64_t) { return h[b]; });
}

py::array_t<int32_t> cut_linkage_maxclust(const py::object& Z_obj, const py::object& counts_obj) {
  const auto Z = linkage_batch(Z_obj);
  const auto counts = exact_array<int64_t>(counts_obj, "counts", "int64");
  require(counts.ndim() == 1 && counts.shape(0) == Z.shape(0), "need one n_clusters per problem");
  const int64_t* k = counts.data();
  for (int64_t b = 0; b < counts.shape(0); ++b) {
    require(k[b] >= 1 && k[b] <= Z.shape(1) + 1, "n_clusters must be in [1, n]");
  }
  return cut_batched(Z, [k](int64_t b, const std::vector<double>& max_dist, int64_t n) {
    return accelprune::maxclust_threshold(max_dist, n, k[b]);
  });
}

// For the tests: the Ward costs of a query cluster (centroid `query` (d,), size size_x) to m
// clusters (centroids (m, d), sizes (m,)) by every version of the centroid scan this CPU runs, in
// double and in float (the prefilter's scan: names "<version> float32"), and by the scalar
// ward_cost: {name: (costs (m,), smallest, its lowest index, second smallest)}. The double
// versions must agree with ward_cost to the bit (the engine's promise: the same merges whatever
// the CPU), the float versions with each other to the bit.
template <typename T>
void add_scan_versions(py::dict& out, const std::vector<double>& points, const double* query,
                       const std::vector<double>& sizes, double size_x, int64_t m, int64_t d,
                       const char* suffix) {
  const int64_t padded = accelprune::round_up_block<T>(m);
  const T hidden =
      std::is_same<T, float>::value ? T(accelprune::kHidden32) : T(accelprune::kHidden);
  std::vector<T> blocked(static_cast<size_t>(padded) * d, T(0)), size(padded, T(1)),
      mask(padded, hidden), q(d);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t k = 0; k < d; ++k)
      blocked[accelprune::centroid_index<T>(i, k, d)] = static_cast<T>(points[i * d + k]);
    size[i] = static_cast<T>(sizes[i]);
    mask[i] = T(0);
  }
  for (int64_t k = 0; k < d; ++k) q[k] = static_cast<T>(query[k]);
  for (const accelprune::WardScanVersion<T>& version : accelprune::ward_scan_versions<T>()) {
    if (!version.runs_here) continue;
    std::vector<T> costs(padded);
    const accelprune::ScanMinimum found =
        version.scan(blocked.data(), d, q.data(), static_cast<T>(size_x), size.data(),
                     mask.data(), padded, costs.data());
    std::vector<double> as_double(costs.begin(), costs.begin() + m);
    out[py::str(std::string(version.name) + suffix)] = py::make_tuple(
        py::array_t<double>(m, as_double.data()), found.smallest, found.argmin, found.second);
  }
}

py::dict ward_scan_versions(const py::object& centroids_obj, const py::object& query_obj,
                            const py::object& sizes_obj, double size_x) {
  const auto points = exact_array<double>(centroids_obj, "centroids", "float64");
  const auto query = exact_array<double>(query_obj, "query", "float64");
  const auto sizes = exact_array<double>(sizes_obj, "sizes", "float64");
  require(points.ndim() == 2 && points.shape(0) >= 1 && points.shape(1) >= 1,
          "centroids must be (m, d) with m, d >= 1");
  const int64_t m = points.shape(0), d = points.shape(1);
  // the float scans index lanes in int32, as the chain runs them only for n <= 2^24
  require(m <= (int64_t{1} << 24), "centroids must have at most 2**24 rows");
  require(query.ndim() == 1 && query.shape(0) == d, "query must be (d,)");
  require(sizes.ndim() == 1 && sizes.shape(0) == m, "sizes must be (m,)");
  require(size_x >= 1.0, "size_x must be >= 1");
  std::vector<double> flat(points.data(), points.data() + m * d), size(sizes.data(),
                                                                       sizes.data() + m);
  for (int64_t i = 0; i < m; ++i) require(size[i] >= 1.0, "sizes must be >= 1");
  py::dict out;
  add_scan_versions<double>(out, flat, query.data(), size, size_x, m, d, "");
  add_scan_versions<float>(out, flat, query.data(), size, size_x, m, d, " float32");
  const int64_t padded = accelprune::round_up_block<double>(m);
  std::vector<double> blocked(static_cast<size_t>(padded) * d, 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t k = 0; k < d; ++k) blocked[accelprune::centroid_index(i, k, d)] = flat[i * d + k];
  std::vector<double> costs(m);
  int64_t argmin = 0;
  for (int64_t i = 0; i < m; ++i) {
    costs[i] = accelprune::ward_cost(blocked.data(), d, query.data(), size_x, i, size[i], 0.0);
    if (costs[i] < costs[argmin]) argmin = i;
  }
  std::vector<double> rest(costs);
  rest.erase(rest.begin() + argmin);
  const double second = rest.empty() ? std::numeric_limits<double>::infinity()
                                     : *std::min_element(rest.begin(), rest.end());
  out["scalar"] = py::make_tuple(py::array_t<double>(m, costs.data()), costs[argmin], argmin,
                                 second);
  return out;
}

std::string ward_method(int64_t n, int64_t d) {
  require(n >= 1 && d >= 1, "n and d must be >= 1");
  return accelprune::method_name(accelprune::choose_method(n, d));
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() =
      "accelprune's native engines: batched Ward clustering and flat cuts. Private: call them "
      "through accelprune.cluster, which converts and checks the inputs.";
  m.def("ward_linkage_batched", &ward_linkage_batched, py::arg("X"), py::arg("n_threads"),
        py::arg("method") = "auto",
        "Ward linkage of every problem in X (B, n, d) float32/float64 -> Z (B, n-1, 4), scipy "
        "conventions. method: 'auto', 'centroids', 'matrix' or 'sorted' (d == 1).");
  m.def("ward_cut_layer", &ward_cut_layer, py::arg("X"), py::arg("merges_needed"),
        py::arg("n_threads"), py::arg("method") = "auto",
        "REPrune's layer cut: X a list of (B, n, d) float32/float64 batches with the same n -> "
        "(labels int32 (sum of B, n) in order of first appearance, the cut-off height: the "
        "largest over the problems of the height of the merges_needed-th merge).");
  m.def("cut_linkage_height", &cut_linkage_height, py::arg("Z"), py::arg("heights"),
        "fcluster 'distance' partition of each problem, labels in order of first appearance.");
  m.def("cut_linkage_maxclust", &cut_linkage_maxclust, py::arg("Z"), py::arg("counts"),
        "fcluster 'maxclust' partition of each problem, labels in order of first appearance.");
  m.def("ward_method", &ward_method, py::arg("n"), py::arg("d"),
        "The path method='auto' takes for problems of n points in d dimensions.");
  m.def("_centroid_linkage", &centroid_linkage, py::arg("X"), py::arg("float_prefilter"),
        "For the tests: one problem's linkage by the centroid chain, with or without its float "
        "prefilter (the same bits either way).");
  m.def("_ward_scan_versions", &ward_scan_versions, py::arg("centroids"), py::arg("query"),
        py::arg("sizes"), py::arg("size_x"),
        "For the tests: Ward costs by every centroid-scan version this CPU runs (double, and "
        "float as '<name> float32') and the scalar cost, {name: (costs, smallest, argmin, "
        "second)}; the double ones agree to the bit, the float ones with each other.");
  m.attr("max_threads") = kMaxThreads;
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}

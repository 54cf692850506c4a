// Ward hierarchical clustering: the C++ core of accelprune._native.
//
// Plain C++17 on raw pointers; it knows nothing of Python (bindings.cpp does the checks, the GIL
// and the exception mapping). The output follows scipy.cluster.hierarchy.linkage(X, "ward"):
// an (n-1) x 4 matrix [child a, child b, height, size], rows in non-decreasing height order, new
// cluster ids n, n+1, ..., the smaller child id first, heights sqrt(2 * Ward merge cost).
//
// Three solvers, all nearest-neighbour chains (Ward is reducible, so merging mutual nearest
// neighbours in the order the chain finds them gives the same dendrogram as always merging the
// global minimum). Scan order and tie rule are scipy's nn_chain (previous chain element first,
// then the lowest id):
//  * centroid_chain_ward ("centroids"): O(n^2 d) time, O(n d) memory. Clusters are centroids and
//    sizes; the Ward cost to every cluster is recomputed on each chain step from them (as
//    fastcluster's linkage_vector does), in a blocked structure-of-arrays layout that vectorises
//    over clusters, keeping each chain depth's row of costs for the rescans a merge causes. The
//    sum of squares is accumulated by fused multiply-adds (one rounding per dimension) in every
//    version of the scan and in the scalar cost, so all give the same bits on any x86-64 CPU.
//    The scans run in float as a prefilter (twice the lanes): with a proven bound on their error,
//    only the clusters that could be the nearest (usually one) are costed again in double, so the
//    merges are those of an all-double chain, to the bit (tests compare both).
//    Best for small d and large n, and the only choice when an n x n matrix would not fit.
//  * nn_chain_ward ("matrix"): O(n^2) time after an O(n^2 d) start, O(n^2) memory: a dense matrix
//    of squared distances updated with the Lance-Williams formula. Best for larger d.
//  * ward_1d ("sorted"): points on a line. Ward clusters of 1-D points are runs of the sorted
//    points, and a run's nearest cluster is one of its two neighbouring runs, so after a sort (a
//    radix sort on 32-bit keys when every point is a float, as upcast float32 weights are) the
//    chain is O(n), each step two loads of kept neighbour costs.
// choose_method() picks one by n and d (thresholds measured by benchmarks/bench_ward.py).
// All produce an unsorted list of merges (ward_merges()). Two consumers:
//  * finish_linkage() sorts them by height and relabels them into scipy's format (ward_linkage);
//  * REPrune's layer cut (keep_merges(), cut_merges()) needs no linkage matrix: it keeps the
//    merges in the order made (cluster names + height), picks the layer's cut-off by selection,
//    and joins the clusters of the merges at or below it in one backward pass (heights are
//    non-decreasing up the tree, so that is fcluster's "distance" partition).
// None writes to its input.
//
// Exceptions: only plain functions allocate (std::bad_alloc can leave them). The vectorised
// kernels, compiled in several versions (target_clones, target-attribute versions dispatched by
// hand, or GCC's multi-versioning by target attribute), never allocate and are noexcept: GCC 12
// treats multi-versioned functions as non-throwing, so an exception inside one would end the
// process instead of reaching Python.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

// Hot loops that the compiler vectorises get AVX2 / AVX-512 clones besides the baseline one,
// chosen at load time by the CPU (GCC/Clang function multi-versioning on x86-64; a no-op
// elsewhere). Results are the same in every clone: the compiler fuses nothing
// (-ffp-contract=off), and every version does the same operations in the same order per lane.
// The one fused multiply-add is written out (the centroid scan's sum of squares, fma_lanes and
// ward_cost): hardware fma where the CPU has it, std::fma elsewhere, both correctly rounded.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(ACCELPRUNE_NO_CLONES)
#define ACCELPRUNE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ACCELPRUNE_VECTOR_CLONES
#endif

namespace accelprune {

enum class WardMethod { kAuto, kMatrix, kCentroids, kSorted };

inline const char* method_name(WardMethod m) {
  switch (m) {
    case WardMethod::kMatrix: return "matrix";
    case WardMethod::kCentroids: return "centroids";
    case WardMethod::kSorted: return "sorted";
    default: return "auto";
  }
}

// The "auto" rule, from measurements on a 2-core AVX-512 x86-64 machine (benchmarks/bench_ward.py,
// the "crossover" rows): the centroid chain does O(d) work per cluster and chain step (in float
// lanes, see the prefilter), the matrix O(1) after an O(n^2 d) start, but its rows leave the
// cache as n grows. The matrix is 1.2-2.4x faster at n = 32 whatever d, and wins from about
// d = 20 at n = 64, 100 at n = 128 and 160 at n = 256; at n = 512 it had not won by d = 2048
// (0.8-0.9x the chain's time from d = 512 on). The rule, d >= n^2 / 256 up to 256 points, fits
// those crossovers. Points on a line take the sorted path. Memory stays O(n d) beyond
// kMatrixMaxPoints (a 512 KB matrix per thread at most).
constexpr int64_t kMatrixMaxPoints = 256;

inline WardMethod choose_method(int64_t n, int64_t d) {
  if (d == 1) return WardMethod::kSorted;
  if (n <= kMatrixMaxPoints && d * 256 >= n * n) return WardMethod::kMatrix;
  return WardMethod::kCentroids;
}

// One merge before relabelling, named as the solvers name clusters (a point or slot id each):
// a is the cluster merged away, b the merged cluster, which keeps b's name in later merges.
// finish_linkage() maps them to cluster ids; cut_merges() relies on the naming.
struct Merge {
  int64_t a;
  int64_t b;
  double height;
};

// Union-find over the 2n-1 nodes of a dendrogram, as scipy's LinkageUnionFind.
class LinkageUnionFind {
 public:
  void reset(int64_t n) {
    parent_.resize(2 * n - 1);
    size_.assign(2 * n - 1, 1);
    for (int64_t i = 0; i < 2 * n - 1; ++i) parent_[i] = i;
    next_label_ = n;
  }

  int64_t find(int64_t x) {
    int64_t root = x;
    while (parent_[root] != root) root = parent_[root];
    while (parent_[x] != root) {  // path compression
      int64_t up = parent_[x];
      parent_[x] = root;
      x = up;
    }
    return root;
  }

  // Merge two roots into a new node; returns the new node's size.
  int64_t merge(int64_t x, int64_t y) {
    parent_[x] = next_label_;
    parent_[y] = next_label_;
    int64_t s = size_[x] + size_[y];
    size_[next_label_] = s;
    ++next_label_;
    return s;
  }

 private:
  std::vector<int64_t> parent_;
  std::vector<int64_t> size_;
  int64_t next_label_ = 0;
};

// How far a row of costs may be from ward_cost(): every entry v and the cost c that ward_cost()
// gives for it satisfy |v - c| <= relative * c + absolute (both 0: the entries are its bits).
struct CostBound {
  double relative = 0.0, absolute = 0.0;
  bool exact() const { return relative == 0.0 && absolute == 0.0; }

  // The largest entry whose cost can equal that of an entry `smallest`: a cost c with entry v
  // lies in [(v - a) / (1 + r), (v + a) / (1 - r)], so an entry above the limit has a larger
  // cost (the factor 1 + 2^-40 covers the rounding of these lines; the ratio is set once, not
  // divided on every settle of a chain).
  double limit(double smallest) const {
    return ((smallest + absolute) * growth + absolute) * (1.0 + 0x1p-40);
  }
  void set(double r, double a) {
    relative = r;
    absolute = a;
    growth = (1.0 + r) / (1.0 - r);
  }

 private:
  double growth = 1.0;
};

// Per-thread work buffers, reused across the problems one thread solves (never one per problem:
// a 2048-filter layer would need 32 MB each for the matrix path).
struct WardWorkspace {
  std::vector<double> input;  // the problem being solved, as the caller copied it in
  // shared by the solvers
  std::vector<int64_t> chain, ids;
  std::vector<int32_t> cut_scratch;     // the layer cut's roots and labels per root
  std::vector<double> heights_scratch;  // the layer cut's selection of the m-th height
  std::vector<Merge> merges;
  std::vector<double> formed_height, mask, size_d;
  LinkageUnionFind union_find;
  // stable radix sort
  std::vector<uint64_t> keys, keys_tmp;
  std::vector<uint32_t> keys32, keys32_tmp;  // 1-D points that are all floats
  std::vector<int64_t> perm, perm_tmp;
  // matrix path
  std::vector<double> dist;  // n x ld squared Euclidean distances between current clusters
  int64_t ld = 0;            // row stride of dist
  std::vector<int64_t> size, active, position;
  std::vector<double> points_t;
  // centroid path
  std::vector<double> centroids, query, neighbour, centre;
  std::vector<double> chain_cost;  // chain_cost[i]: the cost between chain[i - 1] and chain[i]
  std::vector<float> cost_rows;  // kCachedRows + 1 rows of ld: each chain depth's costs
  std::vector<int64_t> row_owner;  // whose costs each kept row holds (a position; -1: none)
  std::vector<float> centroids32, query32, size32, mask32;  // the float prefilter's copies
  bool float_prefilter = true;  // where its bound allows (the tests turn it off to compare)
  // 1-D path
  std::vector<int64_t> order, prev, next;
  std::vector<double> count, mean, cost_left;  // count: a run's points (exact in double)
};

// Bytes of workspace one thread needs for a problem of n points in d dimensions (an estimate
// within a few percent, used to refuse problems the machine cannot hold before allocating).
inline double workspace_bytes(int64_t n, int64_t d, WardMethod method) {
  const double nd = static_cast<double>(n);
  const double dims = static_cast<double>(d);
  // the O(n) vectors, the copied-in problem (input) and one more n x d array (points_t)
  const double per_point = 8.0 * 25 + 16.0 * dims;
  if (method == WardMethod::kMatrix) return nd * (nd + 8) * 8.0 + nd * per_point;
  if (method == WardMethod::kCentroids) {
    // centroids in double, and the prefilter's float centroids and 17 float rows of costs
    return (nd + 16) * (8.0 * dims + 4.0 * (dims + 20.0)) + nd * per_point;
  }
  return nd * per_point;
}

// ------------------------------------------------------------------------------------------
// Sorting: a stable LSD radix sort on 64-bit keys (the merges by height, the 1-D points by value),
// or on 32-bit keys where the values are floats (the 1-D points of float32 weights: 4 passes).
// Much cheaper than std::stable_sort on these sizes (no comparisons, no temporary allocation),
// and stable, so equal heights keep the order the chain found them in, as scipy's mergesort.

// Order-preserving map of a double (never NaN) to an unsigned integer; -0.0 maps as +0.0.
inline uint64_t sortable_bits(double v) {
  v += 0.0;  // -0.0 + 0.0 == +0.0
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u >> 63) ? ~u : (u | (uint64_t{1} << 63));
}

// Order-preserving map of a float (never NaN) to an unsigned integer; -0.0 maps as +0.0. For
// doubles that are floats it orders as sortable_bits() does (double -> float is then exact).
inline uint32_t sortable_bits32(float v) {
  v += 0.0f;
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u >> 31) ? ~u : (u | (uint32_t{1} << 31));
}

// perm[0..n) = the stable ascending order of keys[0..n) (Key: uint32_t or uint64_t, one pass per
// byte). keys is left in sorted order.
template <typename Key>
inline void stable_argsort(std::vector<Key>& keys, std::vector<int64_t>& perm,
                           std::vector<Key>& keys_tmp, std::vector<int64_t>& perm_tmp) {
  constexpr int kPasses = sizeof(Key);
  const int64_t n = static_cast<int64_t>(keys.size());
  perm.resize(n);
  for (int64_t i = 0; i < n; ++i) perm[i] = i;
  if (n < 48) {  // insertion sort: cheaper than the histograms on tiny inputs
    for (int64_t i = 1; i < n; ++i) {
      const Key k = keys[i];
      int64_t j = i;
      for (; j > 0 && keys[j - 1] > k; --j) {
        keys[j] = keys[j - 1];
        perm[j] = perm[j - 1];
      }
      keys[j] = k;
      perm[j] = i;
    }
    return;
  }
  keys_tmp.resize(n);
  perm_tmp.resize(n);
  uint32_t histogram[kPasses][256] = {};
  for (int64_t i = 0; i < n; ++i)
    for (int pass = 0; pass < kPasses; ++pass) ++histogram[pass][(keys[i] >> (8 * pass)) & 255];
  for (int pass = 0; pass < kPasses; ++pass) {
    uint32_t* h = histogram[pass];
    const int shift = 8 * pass;
    // A pass whose digit is the same in every key would only copy: skip it (the exponent bytes
    // of heights and the high bytes of small counts usually are).
    if (h[(keys[0] >> shift) & 255] == static_cast<uint32_t>(n)) continue;
    uint32_t offset = 0;
    for (int b = 0; b < 256; ++b) {
      const uint32_t c = h[b];
      h[b] = offset;
      offset += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t slot = h[(keys[i] >> shift) & 255]++;
      keys_tmp[slot] = keys[i];
      perm_tmp[slot] = perm[i];
    }
    keys.swap(keys_tmp);
    perm.swap(perm_tmp);
  }
}

// Sort merges by height (stable, as scipy's mergesort) and relabel into scipy's linkage format.
inline void finish_linkage(WardWorkspace& ws, int64_t n, double* Z) {
  const int64_t m = n - 1;
  ws.keys.resize(m);
  for (int64_t k = 0; k < m; ++k) ws.keys[k] = sortable_bits(ws.merges[k].height);
  stable_argsort(ws.keys, ws.perm, ws.keys_tmp, ws.perm_tmp);
  LinkageUnionFind& uf = ws.union_find;
  uf.reset(n);
  for (int64_t k = 0; k < m; ++k) {
    const Merge& merge = ws.merges[ws.perm[k]];
    int64_t ra = uf.find(merge.a), rb = uf.find(merge.b);
    double* row = Z + 4 * k;
    row[0] = static_cast<double>(std::min(ra, rb));
    row[1] = static_cast<double>(std::max(ra, rb));
    row[2] = merge.height;
    row[3] = static_cast<double>(uf.merge(ra, rb));
  }
}

// Added to a cost to hide a cluster from nearest-neighbour scans (dead clusters, the diagonal).
// Finite, so that scans stay plain arithmetic; Python rejects inputs whose squared distances
// could come near it.
constexpr double kHidden = 1e300;

// ------------------------------------------------------------------------------------------
// The matrix path.

// Lance-Williams update for Ward on squared distances, for a whole row: after merging x and y
// (squared distance d_xy), the squared distance of the new cluster to every cluster i:
//   ((n_i + n_x) d_xi + (n_i + n_y) d_yi - n_i d_xy) / (n_x + n_y + n_i),
// written over row_y. No square root (scipy's form takes one per update); clamped at 0, where
// rounding can push an exact 0 slightly below.
ACCELPRUNE_VECTOR_CLONES
inline void update_row(const double* row_x, double* row_y, const double* size, int64_t m,
                       double d_xy, int64_t size_x, int64_t size_y) noexcept {
  const double nx = static_cast<double>(size_x), ny = static_cast<double>(size_y);
  for (int64_t i = 0; i < m; ++i) {
    const double ni = size[i];
    const double v = ((ni + nx) * row_x[i] + (ni + ny) * row_y[i] - ni * d_xy) / (nx + ny + ni);
    row_y[i] = v > 0.0 ? v : 0.0;
  }
}

// Row stride for an m x m matrix: padded where a multiple of 2 KiB would alias in the L1 cache.
inline int64_t padded_stride(int64_t m) { return (m % 256 == 0) ? m + 8 : m; }

// The upper triangle of D (n x ld) from X and its transpose xt (d x n), then the mirror.
ACCELPRUNE_VECTOR_CLONES
inline void fill_distances(const double* X, const double* xt, int64_t n, int64_t d, int64_t ld,
                           double* D) noexcept {
  for (int64_t i = 0; i < n; ++i) {
    double* row = D + i * ld;
    row[i] = 0.0;
    for (int64_t j = i + 1; j < n; ++j) row[j] = 0.0;
    for (int64_t k = 0; k < d; ++k) {  // dimension by dimension: a vectorisable loop over j
      const double xik = X[i * d + k];
      const double* col = xt + k * n;
      for (int64_t j = i + 1; j < n; ++j) {
        double diff = xik - col[j];
        row[j] += diff * diff;
      }
    }
  }
  // Column walks (this mirror, the Lance-Williams updates) step by one row at a time; with a row
  // stride that is a multiple of 2 KiB every step lands in the same L1 cache set and evicts the
  // last, so such strides are padded (padded_stride).
  constexpr int64_t kTile = 32;
  for (int64_t ib = 0; ib < n; ib += kTile)
    for (int64_t jb = ib; jb < n; jb += kTile)
      for (int64_t i = ib; i < std::min(ib + kTile, n); ++i)
        for (int64_t j = std::max(jb, i + 1); j < std::min(jb + kTile, n); ++j)
          D[j * ld + i] = D[i * ld + j];
}

inline void pairwise_distances(const double* X, int64_t n, int64_t d, WardWorkspace& ws) {
  ws.ld = padded_stride(n);
  ws.dist.resize(static_cast<size_t>(n) * ws.ld);  // allocations here, outside the clones
  ws.points_t.resize(static_cast<size_t>(n) * d);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) ws.points_t[k * n + i] = X[i * d + k];
  fill_distances(X, ws.points_t.data(), n, d, ws.ld, ws.dist.data());
}

// min over j < n of row[j] + mask[j]. Compilers do not vectorise a floating-point min reduction
// without fast-math, so the SSE2 version is spelled out; the scan is half the NN-chain's time.
inline double masked_min(const double* row, const double* mask, int64_t n) {
  int64_t j = 0;
  double best = kHidden * 4;
#if defined(__SSE2__)
  __m128d m0 = _mm_set1_pd(best), m1 = m0;
  for (; j + 4 <= n; j += 4) {
    m0 = _mm_min_pd(m0, _mm_add_pd(_mm_loadu_pd(row + j), _mm_loadu_pd(mask + j)));
    m1 = _mm_min_pd(m1, _mm_add_pd(_mm_loadu_pd(row + j + 2), _mm_loadu_pd(mask + j + 2)));
  }
  double lanes[2];
  _mm_storeu_pd(lanes, _mm_min_pd(m0, m1));
  best = std::min(lanes[0], lanes[1]);
#endif
  for (; j < n; ++j) best = std::min(best, row[j] + mask[j]);
  return best;
}

// Nearest-neighbour chain Ward on points X (n x d, row-major) with a stored distance matrix.
// Leaves the n - 1 merges, unsorted, in ws.merges.
inline void nn_chain_ward(const double* X, int64_t n, int64_t d, WardWorkspace& ws) {
  pairwise_distances(X, n, d, ws);
  double* D = ws.dist.data();
  int64_t ld = ws.ld;
  // Clusters live at dense positions 0..m-1 of D; ids[p] is the scipy slot id at position p.
  // When half the positions are dead the matrix is compacted (keeping the order, hence the tie
  // rule), so scans and updates run over live clusters and the matrix shrinks into the cache.
  int64_t m = n;
  ws.ids.resize(n);
  ws.size.assign(n, 1);
  ws.size_d.assign(n, 1.0);  // the sizes again, as doubles for the vectorised update
  ws.mask.assign(n, 0.0);    // 0 for live clusters, kHidden for merged-away ones
  ws.formed_height.assign(n, 0.0);
  ws.position.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    ws.ids[i] = i;
    D[i * ld + i] = kHidden;  // a cluster is not its own neighbour
  }
  ws.active.resize(n);  // positions of live clusters, ascending
  for (int64_t i = 0; i < n; ++i) ws.active[i] = i;
  ws.chain.resize(n);
  ws.merges.resize(n - 1);

  int64_t chain_length = 0;
  for (int64_t k = 0; k < n - 1; ++k) {
    if (chain_length == 0) {
      ws.chain[0] = ws.active[0];
      chain_length = 1;
    }
    int64_t x = 0, y = 0;
    double current_min = 0.0;
    // Walk the chain of nearest neighbours until two clusters are each other's nearest.
    while (true) {
      x = ws.chain[chain_length - 1];
      const double* row = D + x * ld;
      current_min = masked_min(row, ws.mask.data(), m);
      // On ties prefer the previous element of the chain (so the chain cannot cycle), then the
      // lowest id: the rule of scipy's nn_chain.
      const int64_t previous = chain_length > 1 ? ws.chain[chain_length - 2] : -1;
      if (previous >= 0 && row[previous] == current_min) break;
      y = 0;
      while (row[y] + ws.mask[y] != current_min) ++y;
      ws.chain[chain_length++] = y;
    }
    y = ws.chain[chain_length - 2];
    chain_length -= 2;
    if (x > y) std::swap(x, y);  // the merged cluster lives on in slot y, as in scipy
    int64_t nx = ws.size[x], ny = ws.size[y];
    // Ward heights never decrease up the tree; max() keeps rounding from breaking that, so the
    // sort in finish_linkage() always puts a merge after the merges that formed its children.
    const double height =
        std::max({std::sqrt(current_min), ws.formed_height[x], ws.formed_height[y]});
    ws.merges[k] = Merge{ws.ids[x], ws.ids[y], height};
    ws.formed_height[y] = height;
    ws.size[x] = 0;
    ws.size[y] = nx + ny;
    ws.mask[x] = kHidden;
    ws.active.erase(std::lower_bound(ws.active.begin(), ws.active.end(), x));
    ws.size_d[x] = 0.0;
    ws.size_d[y] = static_cast<double>(nx + ny);
    // Row y over all m positions in one vectorisable loop (dead positions get finite garbage
    // that the mask hides), then the column through the live rows.
    update_row(D + x * ld, D + y * ld, ws.size_d.data(), m, current_min, nx, ny);
    D[y * ld + y] = kHidden;
    const double* row_y = D + y * ld;
    for (int64_t i : ws.active) D[i * ld + y] = row_y[i];
    const int64_t live = static_cast<int64_t>(ws.active.size());
    if (live > 32 && 2 * live <= m) {
      // Compact in place: every element moves to a lower address, in increasing order, so no
      // element is overwritten before it is read.
      const int64_t new_ld = padded_stride(live);
      for (int64_t r = 0; r < live; ++r) ws.position[ws.active[r]] = r;
      for (int64_t r = 0; r < live; ++r) {
        const double* from = D + ws.active[r] * ld;
        double* to = D + r * new_ld;
        for (int64_t c = 0; c < live; ++c) to[c] = from[ws.active[c]];
      }
      for (int64_t r = 0; r < live; ++r) {
        const int64_t p = ws.active[r];
        ws.ids[r] = ws.ids[p];
        ws.size[r] = ws.size[p];
        ws.size_d[r] = ws.size_d[p];
        ws.formed_height[r] = ws.formed_height[p];
        ws.mask[r] = 0.0;
        ws.active[r] = r;
      }
      for (int64_t c = 0; c < chain_length; ++c) ws.chain[c] = ws.position[ws.chain[c]];
      m = live;
      ld = new_ld;
    }
  }
}

// ------------------------------------------------------------------------------------------
// The centroid path.

// The Ward cost scan below is written once with GCC/Clang vector extensions over a native
// vector type V of element T and compiled per instruction set (versions dispatched by hand on
// x86-64 Linux; elsewhere one version for the compiler's target): per register 2 doubles or 4
// floats in the SSE2 baseline, 4 or 8 with AVX2, 8 or 16 with AVX-512. Two element types:
//  * double, the exact scan: its costs are ward_cost's bits;
//  * float, the prefilter of the centroid chain (see settle_nearest): twice the lanes and a
//    cheaper division, about 2.9x faster at 512 clusters in 9-D; its costs come with an error
//    bound, and the few clusters the bound cannot rule out are costed again in double.
// Every version of one type does the same lane-wise arithmetic (the one fused multiply-add is
// written out), so all give the same bits. (Generic vectors wider than the target's registers,
// or loops left to the auto-vectoriser, came out scalar or spilled to the stack: 3-10x slower.)

// Clusters a block holds: one 64-byte line per dimension (8 doubles, 16 floats).
template <typename T>
constexpr int64_t kBlock = 64 / static_cast<int64_t>(sizeof(T));

template <typename T = double>
inline int64_t round_up_block(int64_t m) {
  return (m + kBlock<T> - 1) / kBlock<T> * kBlock<T>;
}

template <typename T, int kWidth>
struct NativeVector {
  typedef T type __attribute__((vector_size(kWidth * sizeof(T))));
  typedef typename std::conditional<sizeof(T) == 8, int64_t, int32_t>::type lane_int;
  typedef lane_int mask __attribute__((vector_size(kWidth * sizeof(T))));
};

// Centroids are stored in blocks of kBlock<T> clusters, each block d x kBlock<T> (dimension-major
// within the block): a scan reads memory in order, with no stride between dimensions (a d x n
// layout with n a multiple of 512 maps every dimension's row to the same L1 cache set).
template <typename T = double>
inline int64_t centroid_index(int64_t i, int64_t k, int64_t d) {
  return (i / kBlock<T>) * kBlock<T> * d + k * kBlock<T> + i % kBlock<T>;
}

// The Ward merge cost of clusters x and i from their centroids and sizes, in the exact order of
// operations of the vectorised scan (so that both give the same bits):
//   n_x n_i / (n_x + n_i) * sum_k (c_ik - c_xk)^2 + mask_i,
// the sum accumulated by fused multiply-adds (one rounding per dimension, as the scan does).
// It is bitwise symmetric in x and i: (a - b)^2 == (b - a)^2, the sum runs in the same order and
// the size factor is symmetric; the chain's termination test relies on it. An FMA clone turns
// std::fma into one instruction; the baseline calls the C library's (correctly rounded) fma.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(ACCELPRUNE_NO_CLONES)
__attribute__((target_clones("fma", "default")))
#endif
inline double ward_cost(const double* centroids, int64_t d, const double* query, double size_x,
                        int64_t i, double size_i, double mask_i) noexcept {
  double squared = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    const double diff = centroids[centroid_index(i, k, d)] - query[k];
    squared = std::fma(diff, diff, squared);
  }
  return size_x * size_i / (size_x + size_i) * squared + mask_i;
}

// a * b + c lane by lane with one rounding (std::fma per lane; one instruction where the target
// has it: the specialisations below, inlined into the FMA versions of the scan by `flatten`).
template <typename T, int kWidth>
inline typename NativeVector<T, kWidth>::type fma_lanes(typename NativeVector<T, kWidth>::type a,
                                                        typename NativeVector<T, kWidth>::type b,
                                                        typename NativeVector<T, kWidth>::type c) {
  typename NativeVector<T, kWidth>::type out{};  // every lane is written below
  for (int l = 0; l < kWidth; ++l) out[l] = std::fma(a[l], b[l], c[l]);
  return out;
}
#if defined(__x86_64__) && defined(__GNUC__)
// One instruction per register: fma_lanes<T, W> for the vector widths the scans use.
#define ACCELPRUNE_FMA_LANES(T, W, TARGET, INTRINSIC, REGISTER)                              \
  template <>                                                                                \
  __attribute__((target(TARGET))) inline NativeVector<T, W>::type fma_lanes<T, W>(          \
      NativeVector<T, W>::type a, NativeVector<T, W>::type b, NativeVector<T, W>::type c) { \
    return reinterpret_cast<NativeVector<T, W>::type>(                                      \
        INTRINSIC(reinterpret_cast<REGISTER>(a), reinterpret_cast<REGISTER>(b),             \
                  reinterpret_cast<REGISTER>(c)));                                          \
  }
ACCELPRUNE_FMA_LANES(double, 4, "avx2,fma", _mm256_fmadd_pd, __m256d)
ACCELPRUNE_FMA_LANES(double, 8, "avx512f", _mm512_fmadd_pd, __m512d)
ACCELPRUNE_FMA_LANES(float, 8, "avx2,fma", _mm256_fmadd_ps, __m256)
ACCELPRUNE_FMA_LANES(float, 16, "avx512f", _mm512_fmadd_ps, __m512)
#undef ACCELPRUNE_FMA_LANES
#endif

// What a scan or a row's minimum reports: the smallest value, the lowest index that has it, and
// the second smallest value (equal to the smallest on a tie), which tells a prefilter whether
// any other cluster could be the nearest.
struct ScanMinimum {
  double smallest = std::numeric_limits<double>::infinity();
  double second = std::numeric_limits<double>::infinity();
  int64_t argmin = 0;
};

// The running minimum of a scan: per lane, the smallest cost seen and the first block where it
// was seen (a strict < keeps the first of equal costs), and the second smallest cost seen.
template <typename T, int kWidth>
struct LaneMinimum {
  typedef typename NativeVector<T, kWidth>::type V;
  typedef typename NativeVector<T, kWidth>::mask M;
  typedef typename NativeVector<T, kWidth>::lane_int lane_int;
  static constexpr int kGroups = static_cast<int>(kBlock<T>) / kWidth;
  V best[kGroups], second[kGroups];
  M block[kGroups];

  LaneMinimum() {
    for (int g = 0; g < kGroups; ++g) {
      best[g] = V{} + std::numeric_limits<T>::infinity();
      second[g] = best[g];
      block[g] = M{};
    }
  }

  static V select(M take, V a, V b) {
    return reinterpret_cast<V>((take & reinterpret_cast<M>(a)) | (~take & reinterpret_cast<M>(b)));
  }

  // Folds the costs v of block `at` into lane group g (lane-wise, by masks: the same on every
  // target).
  void add(int g, V v, int64_t at) {
    const M smaller = v < best[g];
    second[g] = select(smaller, best[g], select(v < second[g], v, second[g]));
    best[g] = select(smaller, v, best[g]);
    block[g] = (smaller & (M{} + static_cast<lane_int>(at))) | (~smaller & block[g]);
  }

  // Folds in another running minimum, of other blocks (each running minimum having added its own
  // blocks in increasing order): lane by lane, the smaller (cost, block) wins, so the result is
  // that of one running minimum over all the blocks.
  __attribute__((always_inline)) void merge(const LaneMinimum& other) noexcept {
    for (int g = 0; g < kGroups; ++g)
      fold(best[g], block[g], second[g], other.best[g], other.block[g], other.second[g]);
  }

  // The smallest cost over all lanes and its index (the lowest index on ties), and the second:
  // a tree of lane-wise folds (log2 of the lanes, branch-free; a scalar loop over the lanes was
  // a fifth of the chain's time). Exact (min only), so every version gives the same.
  __attribute__((always_inline)) ScanMinimum reduce() const noexcept {
    return reduce(std::make_integer_sequence<lane_int, kWidth>{});
  }

 private:
  template <lane_int... L>
  __attribute__((always_inline)) ScanMinimum reduce(
      std::integer_sequence<lane_int, L...> lanes) const noexcept {
    const M lane{L...};
    V value = best[0], runner_up = second[0];
    M index = block[0] * static_cast<lane_int>(kBlock<T>) + lane;
    for (int g = 1; g < kGroups; ++g) {
      const M at = block[g] * static_cast<lane_int>(kBlock<T>) +
                   static_cast<lane_int>(g * kWidth) + lane;
      fold(value, index, runner_up, best[g], at, second[g]);
    }
    fold_lanes<kWidth / 2>(value, index, runner_up, lanes);
    ScanMinimum out;
    out.smallest = value[0];
    out.second = runner_up[0];
    out.argmin = static_cast<int64_t>(index[0]);
    return out;
  }

  // (value, index, runner_up) becomes, per lane, the lexicographically smaller (cost, index) of
  // itself and (v, i), with as runner-up the smaller of the winner's runner-up and the loser's
  // cost.
  __attribute__((always_inline)) static void fold(V& value, M& index, V& runner_up, V v, M i,
                                                  V r) noexcept {
    // i < index as the sign of i - index (indices are >= 0 and below 2^31 for floats, as float
    // scans run only for n <= 2^24: no overflow; >> of a negative value is arithmetic on GCC
    // and Clang, defined so from C++20). GCC 12 makes scalar code of a float compare's mask
    // combined with an integer compare's.
    const M earlier = (i - index) >> static_cast<lane_int>(8 * sizeof(lane_int) - 1);
    const M take = (v < value) | (~(value < v) & earlier);  // no cost is NaN
    runner_up = select(take, select(r < value, r, value), select(v < runner_up, v, runner_up));
    value = select(take, v, value);
    index = (take & i) | (~take & index);
  }

  // Folds lane l with lane l ^ H for H = kWidth / 2, ..., 1: every lane then holds the fold of
  // all.
  template <int H, lane_int... L>
  __attribute__((always_inline)) static void fold_lanes(
      V& value, M& index, V& runner_up, std::integer_sequence<lane_int, L...> lanes) noexcept {
    if constexpr (H >= 1) {
      fold(value, index, runner_up, swap_lanes<H>(value, lanes), swap_lanes<H>(index, lanes),
           swap_lanes<H>(runner_up, lanes));
      fold_lanes<H / 2>(value, index, runner_up, lanes);
    }
  }

  // v with lane l taken from lane l ^ H.
  template <int H, typename W, lane_int... L>
  __attribute__((always_inline)) static W swap_lanes(
      W v, std::integer_sequence<lane_int, L...>) noexcept {
#if defined(__clang__) || __GNUC__ >= 12
    return __builtin_shufflevector(v, v, (L ^ H)...);
#else
    return __builtin_shuffle(v, M{(L ^ H)...});
#endif
  }
};

// Costs of cluster x to the kBlocks blocks starting at block `first`, folded into `running` and
// written to cost unless it is null. Several blocks at a time give independent
// sums: one block's sum over d dimensions is a chain of dependent additions, and a single chain
// leaves most of the adders idle.
template <typename T, int kWidth, int kBlocks>
__attribute__((always_inline)) inline void scan_blocks(const T* centroids, int64_t d,
                                                       const T* query, T size_x, const T* size,
                                                       const T* mask, int64_t first, T* cost,
                                                       LaneMinimum<T, kWidth>& running) noexcept {
  typedef typename NativeVector<T, kWidth>::type V;
  constexpr int64_t kB = kBlock<T>;
  constexpr int kGroups = static_cast<int>(kB) / kWidth;
  auto load = [](const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  V squared[kBlocks][kGroups];
  for (int u = 0; u < kBlocks; ++u)
    for (int g = 0; g < kGroups; ++g) squared[u][g] = V{};
  const T* c = centroids + first * kB * d;
  for (int64_t k = 0; k < d; ++k, c += kB) {
    const T q = query[k];
    for (int u = 0; u < kBlocks; ++u) {
      for (int g = 0; g < kGroups; ++g) {
        const V diff = load(c + u * kB * d + g * kWidth) - q;
        squared[u][g] = fma_lanes<T, kWidth>(diff, diff, squared[u][g]);
      }
    }
  }
  const V nx = V{} + size_x;
  for (int u = 0; u < kBlocks; ++u) {
    const int64_t block = first + u;
    for (int g = 0; g < kGroups; ++g) {
      const int64_t at = block * kB + g * kWidth;
      const V ni = load(size + at);
      const V v = nx * ni / (nx + ni) * squared[u][g] + load(mask + at);
      if (cost != nullptr) std::memcpy(cost + at, &v, sizeof v);
      running.add(g, v, block);
    }
  }
}

// The Ward merge cost of cluster x (centroid `query`, size size_x) with every cluster i < m
// (m a multiple of kBlock<T>; centroids in blocks, see centroid_index<T>), each as ward_cost()
// does it in type T; the smallest, the lowest i that has it, and the second smallest. Every cost
// is also written to cost[i] unless cost is null.
template <typename T, int kWidth>
__attribute__((always_inline)) inline ScanMinimum ward_costs_kernel(
    const T* centroids, int64_t d, const T* query, T size_x, const T* size, const T* mask,
    int64_t m, T* cost) noexcept {
  constexpr int kBlocks = (kWidth * sizeof(T) == 16) ? 2 : 4;  // SSE2: half the registers
  LaneMinimum<T, kWidth> running;
  const int64_t n_blocks = m / kBlock<T>;
  int64_t block = 0;
  for (; block + kBlocks <= n_blocks; block += kBlocks)
    scan_blocks<T, kWidth, kBlocks>(centroids, d, query, size_x, size, mask, block, cost, running);
  for (; block < n_blocks; ++block)
    scan_blocks<T, kWidth, 1>(centroids, d, query, size_x, size, mask, block, cost, running);
  return running.reduce();
}

// The versions of the scan compiled here, and which one this CPU runs. Dispatched by hand (not
// by GCC's function multi-versioning) so that the FMA requirement of the AVX2 version is spelled
// out and every version can be called by name: the tests check that all versions the CPU can run
// give the same bits (ward_scan_versions()).
template <typename T>
using WardScan = ScanMinimum (*)(const T* centroids, int64_t d, const T* query, T size_x,
                                 const T* size, const T* mask, int64_t m, T* cost) noexcept;

template <typename T>
struct WardScanVersion {
  const char* name;
  WardScan<T> scan;
  bool runs_here;  // the CPU (and the OS) support its instructions
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(ACCELPRUNE_NO_CLONES)
// `flatten` inlines fma_lanes' target-specific specialisation into each version (a plain
// always_inline chain cannot: GCC refuses to inline an AVX intrinsic into a function without the
// AVX target, such as the templates above before they are inlined).
template <typename T>
__attribute__((flatten)) inline ScanMinimum ward_costs_baseline(
    const T* centroids, int64_t d, const T* query, T size_x, const T* size, const T* mask,
    int64_t m, T* cost) noexcept {
  return ward_costs_kernel<T, 16 / sizeof(T)>(centroids, d, query, size_x, size, mask, m, cost);
}
template <typename T>
__attribute__((target("avx2,fma"), flatten)) inline ScanMinimum ward_costs_avx2_fma(
    const T* centroids, int64_t d, const T* query, T size_x, const T* size, const T* mask,
    int64_t m, T* cost) noexcept {
  return ward_costs_kernel<T, 32 / sizeof(T)>(centroids, d, query, size_x, size, mask, m, cost);
}
template <typename T>
__attribute__((target("avx512f"), flatten)) inline ScanMinimum ward_costs_avx512f(
    const T* centroids, int64_t d, const T* query, T size_x, const T* size, const T* mask,
    int64_t m, T* cost) noexcept {
  return ward_costs_kernel<T, 64 / sizeof(T)>(centroids, d, query, size_x, size, mask, m, cost);
}

// Widest first. __builtin_cpu_supports also checks that the OS saves the registers (XGETBV).
template <typename T>
inline const std::vector<WardScanVersion<T>>& ward_scan_versions() {
  static const std::vector<WardScanVersion<T>> versions = [] {
    __builtin_cpu_init();
    return std::vector<WardScanVersion<T>>{
        {"avx512f", &ward_costs_avx512f<T>, __builtin_cpu_supports("avx512f") != 0},
        {"avx2+fma", &ward_costs_avx2_fma<T>,
         __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0},
        {"sse2", &ward_costs_baseline<T>, true},
    };
  }();
  return versions;
}
#else
// One version, for the compiler's target (std::fma per lane where it has no FMA instruction).
template <typename T>
inline ScanMinimum ward_costs_native(const T* centroids, int64_t d, const T* query, T size_x,
                                     const T* size, const T* mask, int64_t m,
                                     T* cost) noexcept {
#if defined(__AVX512F__)
  constexpr int kBytes = 64;
#elif defined(__AVX2__) && defined(__FMA__)
  constexpr int kBytes = 32;
#else
  constexpr int kBytes = 16;
#endif
  return ward_costs_kernel<T, kBytes / sizeof(T)>(centroids, d, query, size_x, size, mask, m,
                                                  cost);
}

template <typename T>
inline const std::vector<WardScanVersion<T>>& ward_scan_versions() {
  static const std::vector<WardScanVersion<T>> versions{{"native", &ward_costs_native<T>, true}};
  return versions;
}
#endif

// The Ward merge cost of cluster x with every cluster i < m in type T, by the widest version this
// CPU runs (chosen once): see ward_costs_kernel.
template <typename T>
// (Not noexcept: the first call builds the list of versions, which allocates.)
inline ScanMinimum ward_costs_from(const T* centroids, int64_t d, const T* query, T size_x,
                                   const T* size, const T* mask, int64_t m, T* cost) {
  static const WardScan<T> chosen = [] {
    for (const WardScanVersion<T>& v : ward_scan_versions<T>())
      if (v.runs_here) return v.scan;
    return ward_scan_versions<T>().back().scan;
  }();
  return chosen(centroids, d, query, size_x, size, mask, m, cost);
}

// The first smallest of row[0..m) (m a multiple of 16), where it is, and the second smallest:
// the kept rows' minimum, lane-wise as in the scan (a scalar loop is one dependent compare per
// element).
template <int kWidth>
__attribute__((always_inline)) inline ScanMinimum first_minimum_kernel(const float* row,
                                                                       int64_t m) noexcept {
  typedef typename NativeVector<float, kWidth>::type V;
  constexpr int64_t kB = kBlock<float>;
  constexpr int kGroups = static_cast<int>(kB) / kWidth;
  // Even and odd blocks in two running minima: one alone is a chain of dependent compares.
  LaneMinimum<float, kWidth> even, odd;
  auto add = [row](LaneMinimum<float, kWidth>& running, int64_t block) {
    for (int g = 0; g < kGroups; ++g) {
      V v;
      std::memcpy(&v, row + block * kB + g * kWidth, sizeof v);
      running.add(g, v, block);
    }
  };
  const int64_t n_blocks = m / kB;
  int64_t block = 0;
  for (; block + 2 <= n_blocks; block += 2) {
    add(even, block);
    add(odd, block + 1);
  }
  if (block < n_blocks) add(even, block);
  even.merge(odd);
  return even.reduce();
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(ACCELPRUNE_NO_CLONES)
__attribute__((target("default"))) inline ScanMinimum first_minimum(const float* row,
                                                                    int64_t m) noexcept {
  return first_minimum_kernel<4>(row, m);
}
__attribute__((target("avx2"))) inline ScanMinimum first_minimum(const float* row,
                                                                 int64_t m) noexcept {
  return first_minimum_kernel<8>(row, m);
}
__attribute__((target("avx512f"))) inline ScanMinimum first_minimum(const float* row,
                                                                    int64_t m) noexcept {
  return first_minimum_kernel<16>(row, m);
}
#else
inline ScanMinimum first_minimum(const float* row, int64_t m) noexcept {
#if defined(__AVX512F__)
  return first_minimum_kernel<16>(row, m);
#elif defined(__AVX__)
  return first_minimum_kernel<8>(row, m);
#else
  return first_minimum_kernel<4>(row, m);
#endif
}
#endif

// The per-dimension means of X (n x d) into centre: subtracting them first keeps the centroids'
// differences exact for data far from the origin (points at 1e12 + noise; Sterbenz: the
// difference of two doubles within a factor of two of each other is exact).
inline void column_means(const double* X, int64_t n, int64_t d, std::vector<double>& centre) {
  centre.assign(d, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) centre[k] += X[i * d + k];
  for (int64_t k = 0; k < d; ++k) centre[k] /= static_cast<double>(n);
}

// Chain depths whose rows of costs are kept (kCachedRows x n floats of workspace). The chain is a
// stack: a cluster's costs to every cluster not merged since its scan are still valid, so when a
// merge exposes it again at the top of the chain, its nearest neighbour is the minimum of its kept
// row after the merged pair's entries are updated: a pass over m floats instead of a scan of m
// centroids (about a third of all scans). Deeper chains (rare) scan again. Rows hold the float
// prefilter's costs (and exact costs rounded to float: within its bound), so they are kept only
// where the prefilter runs.
constexpr int64_t kCachedRows = 16;

// The float prefilter works on the centroids times `scale`, a power of two (exact) that brings
// the largest centred coordinate into [1, 2), so that float costs stay clear of overflow and
// underflow whatever the data's magnitude; its costs are the Ward costs times scale^2.
// Returns false where it cannot run: all points equal (nothing to scale), a scale double cannot
// hold, or problems too large for float sizes or a useful bound.
//
// The bound of its costs, in those scaled units, for n points in d dimensions (C < 2 bounds the
// scaled coordinates; u = 2^-24, t = 2^-12):
//  * the centroids rounded to float move each difference by at most 2 u C, so the sum of squares
//    moves by at most 2 |a| |delta| + |delta|^2 <= t |a|^2 + (1 + 1/t) d (2 u C)^2, and the size
//    factor (<= n) scales that: the relative t, the absolute n d C^2 2^-32;
//  * the float arithmetic (the difference, d fused multiply-adds, the size factor, the product)
//    rounds at most d + 8 times, and ward_cost's own rounding is far smaller: (d + 16) 2u;
//  * results in float's subnormal range lose at most 2^-149 an operation: n d 2^-130.
inline bool float_prefilter_setup(int64_t n, int64_t d, double coordinate_bound, double* scale,
                                  CostBound* bound) {
  if (!(coordinate_bound > 0.0) || !std::isfinite(coordinate_bound)) return false;
  int exponent = 0;
  std::frexp(coordinate_bound, &exponent);  // coordinate_bound in [2^(exponent-1), 2^exponent)
  if (exponent < -1000 || exponent > 1000) return false;
  *scale = std::ldexp(1.0, 1 - exponent);
  const double nd = static_cast<double>(n) * static_cast<double>(d);
  const double scaled = coordinate_bound * *scale;  // in [1, 2)
  if (n > (int64_t{1} << 24) || nd > 0x1p60) return false;  // sizes exact in float; no overflow
  bound->set(0x1p-12 + (static_cast<double>(d) + 16.0) * 0x1p-23,
             nd * scaled * scaled * 0x1p-32 + nd * 0x1p-130);
  return bound->relative <= 0x1p-4;
}

// Added to a float cost to hide a cluster from the prefilter's scans.
constexpr float kHidden32 = 0x1p120f;

// The nearest cluster to x from a row of costs to every position < m whose lowest entries
// `found` describes: the position with the smallest ward_cost(), the lowest id among equal
// costs, and that cost. Only a prefilter's row is read (an exact scan's answer is final): every
// entry that its bound cannot rule out is costed again by ward_cost (usually just the smallest),
// so the answer is a double scan's, to the bit.
inline double settle_nearest(const float* row, const CostBound& bound, const ScanMinimum& found,
                             int64_t m, const double* centroids, int64_t d, const double* query,
                             double size_x, const double* size, const int64_t* ids,
                             int64_t* nearest) {
  *nearest = found.argmin;
  if (bound.exact()) return found.smallest;
  const double limit = bound.limit(found.smallest);
  const auto cost_of = [&](int64_t p) {
    return ward_cost(centroids, d, query, size_x, p, size[p], 0.0);
  };
  if (found.second > limit) return cost_of(found.argmin);
  double best = std::numeric_limits<double>::infinity();
  for (int64_t p = 0; p < m; ++p) {
    if (!(static_cast<double>(row[p]) <= limit)) continue;
    const double cost = cost_of(p);
    if (cost < best || (cost == best && ids[p] < ids[*nearest])) {
      best = cost;
      *nearest = p;
    }
  }
  return best;
}

// The lowest id among the clusters whose cost an exact scan found equal to the smallest, when
// the scan found a tie (its argmin is the lowest position, and positions are not in id order).
// Costs are recomputed as the scan computed them (ward_cost() plus the mask, the same bits).
inline int64_t lowest_id_among_ties(const ScanMinimum& found, int64_t m, const double* centroids,
                                    int64_t d, const double* query, double size_x,
                                    const double* size, const double* mask, const int64_t* ids) {
  if (found.second != found.smallest) return found.argmin;
  int64_t nearest = found.argmin;
  for (int64_t p = 0; p < m; ++p) {
    const double cost = ward_cost(centroids, d, query, size_x, p, size[p], 0.0) + mask[p];
    if (cost == found.smallest && ids[p] < ids[nearest]) nearest = p;
  }
  return nearest;
}

// Nearest-neighbour chain Ward on centroids: O(n d) memory. Leaves the n - 1 merges, unsorted,
// in ws.merges.
inline void centroid_chain_ward(const double* X, int64_t n, int64_t d, WardWorkspace& ws) {
  // Clusters live at positions 0..m-1 (m rounded up to whole blocks; the padding is hidden);
  // ids[p] is the scipy slot id at position p, which decides ties (the lowest id wins, as in
  // scipy). A merge frees one position and the last cluster moves into it, so every scan covers
  // live clusters only (a periodic compaction left an eighth of the scanned positions dead on
  // average, and moved every cluster each time); positions are then in no particular order, and
  // ties are settled by id wherever they occur.
  // The float prefilter keeps its own copy of the centroids, sizes and mask, in blocks of 16.
  const int64_t ld = round_up_block<float>(n);
  const int64_t cached_rows = std::min<int64_t>(kCachedRows, n);
  ws.centroids.assign(static_cast<size_t>(ld) * d, 0.0);
  ws.query.resize(d);
  ws.neighbour.resize(d);
  ws.size_d.assign(ld, 1.0);
  ws.mask.assign(ld, kHidden);
  ws.formed_height.assign(n, 0.0);
  ws.ids.resize(n);
  ws.chain.resize(n);
  ws.chain_cost.resize(n);
  ws.merges.resize(n - 1);
  ws.row_owner.assign(cached_rows, -1);
  column_means(X, n, d, ws.centre);
  double* C = ws.centroids.data();
  double coordinate_bound = 0.0;  // every centroid is a mean of points: none goes beyond it
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < d; ++k) {
      const double c = X[i * d + k] - ws.centre[k];
      C[centroid_index(i, k, d)] = c;
      coordinate_bound = std::max(coordinate_bound, std::fabs(c));
    }
  }
  coordinate_bound *= 1.0 + 0x1p-20;  // and the rounding of the centroid updates
  for (int64_t i = 0; i < n; ++i) {
    ws.ids[i] = i;
    ws.mask[i] = 0.0;
  }
  // Rows are kept only where the prefilter runs, all with its bound (see kCachedRows).
  CostBound float_bound;
  double scale = 1.0;
  const bool prefilter =
      ws.float_prefilter && float_prefilter_setup(n, d, coordinate_bound, &scale, &float_bound);
  if (prefilter) ws.cost_rows.resize(static_cast<size_t>(cached_rows + 1) * ld);  // + scratch
  // A cost in the prefilter's units, rounded to float (scaled in two steps: scale^2 alone can
  // overflow where the product does not).
  auto scaled_cost = [scale](double cost) { return static_cast<float>(cost * scale * scale); };
  float* C32 = nullptr;
  if (prefilter) {
    ws.centroids32.assign(static_cast<size_t>(ld) * d, 0.0f);
    ws.query32.resize(d);
    ws.size32.assign(ld, 1.0f);
    ws.mask32.assign(ld, kHidden32);
    C32 = ws.centroids32.data();
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t k = 0; k < d; ++k)
        C32[centroid_index<float>(i, k, d)] =
            static_cast<float>(C[centroid_index(i, k, d)] * scale);
      ws.mask32[i] = 0.0f;
    }
  }
  auto centroid_of = [&](int64_t p, std::vector<double>& out) {
    for (int64_t j = 0; j < d; ++j) out[j] = C[centroid_index(p, j, d)];
  };
  auto cost_row = [&](int64_t depth) {
    return ws.cost_rows.data() + std::min(depth, cached_rows) * ld;
  };
  int64_t m = n;

  int64_t chain_length = 0;
  for (int64_t k = 0; k < n - 1; ++k) {
    if (chain_length == 0) {
      int64_t first = 0;  // the lowest id, as scipy starts its chains
      for (int64_t p = 1; p < m; ++p)
        if (ws.ids[p] < ws.ids[first]) first = p;
      ws.chain[0] = first;
      chain_length = 1;
    }
    int64_t x = 0, y = 0;
    double current_min = 0.0;
    while (true) {
      const int64_t depth = chain_length - 1;
      const bool kept = prefilter && depth < cached_rows;
      x = ws.chain[depth];
      centroid_of(x, ws.query);
      float* row = prefilter ? cost_row(depth) : nullptr;  // beyond the kept depths: scratch
      CostBound bound;  // exact unless the costs came from the prefilter
      ScanMinimum found;
      if (kept && ws.row_owner[depth] == x) {
        bound = float_bound;
        found = first_minimum(row, round_up_block<float>(m));
      } else {
        if (prefilter) {
          for (int64_t j = 0; j < d; ++j) ws.query32[j] = C32[centroid_index<float>(x, j, d)];
          ws.mask32[x] = kHidden32;  // not its own neighbour
          found = ward_costs_from<float>(C32, d, ws.query32.data(), ws.size32[x],
                                         ws.size32.data(), ws.mask32.data(),
                                         round_up_block<float>(m), row);
          ws.mask32[x] = 0.0f;
          bound = float_bound;
        } else {
          ws.mask[x] = kHidden;  // an exact scan: no row needed
          found = ward_costs_from<double>(C, d, ws.query.data(), ws.size_d[x], ws.size_d.data(),
                                          ws.mask.data(), round_up_block<double>(m), nullptr);
          found.argmin = lowest_id_among_ties(found, m, C, d, ws.query.data(), ws.size_d[x],
                                              ws.size_d.data(), ws.mask.data(), ws.ids.data());
          ws.mask[x] = 0.0;
        }
        if (kept) ws.row_owner[depth] = x;
      }
      int64_t nearest = 0;
      current_min = settle_nearest(row, bound, found, m, C, d, ws.query.data(), ws.size_d[x],
                                   ws.size_d.data(), ws.ids.data(), &nearest);
      // Ties: the previous chain element (so the chain cannot cycle), then the lowest id. The
      // cost to the previous element is the one it found when it pushed x (ward_cost is bitwise
      // symmetric, and neither has merged since: merges pop the chain's top); the test also
      // accepts the scan naming the previous element.
      const int64_t previous = chain_length > 1 ? ws.chain[chain_length - 2] : -1;
      if (previous >= 0 &&
          (nearest == previous || ws.chain_cost[chain_length - 1] <= current_min)) {
        break;
      }
      if (chain_length >= n) throw std::logic_error("Ward nearest-neighbour chain did not close");
      ws.chain_cost[chain_length] = current_min;  // from x to the cluster pushed above it
      ws.chain[chain_length++] = nearest;
    }
    y = ws.chain[chain_length - 2];
    chain_length -= 2;
    for (int64_t depth = chain_length; depth < std::min(chain_length + 2, cached_rows); ++depth)
      ws.row_owner[depth] = -1;
    // The merged cluster keeps the larger id, as in scipy (its slot), and lives on at y.
    if (ws.ids[x] > ws.ids[y]) std::swap(x, y);
    const double nx = ws.size_d[x], ny = ws.size_d[y];
    // Ward heights never decrease up the tree; max() keeps rounding from breaking that.
    const double height = std::max(
        {std::sqrt(2.0 * current_min), ws.formed_height[x], ws.formed_height[y]});
    ws.merges[k] = Merge{ws.ids[x], ws.ids[y], height};
    ws.formed_height[y] = height;
    // The new centroid as c_x + (c_y - c_x) n_y / (n_x + n_y): equal centroids stay exactly
    // equal (the weighted mean (n_x c_x + n_y c_y) / (n_x + n_y) can move them by an ulp, and
    // duplicate points would then merge at tiny heights instead of 0, in another order).
    const double weight_y = ny / (nx + ny);
    for (int64_t j = 0; j < d; ++j) {
      const double cx = C[centroid_index(x, j, d)];
      double& cy = C[centroid_index(y, j, d)];
      cy = cx + (cy - cx) * weight_y;
    }
    ws.size_d[y] = nx + ny;
    ws.mask[x] = kHidden;
    if (prefilter) {
      for (int64_t j = 0; j < d; ++j)
        C32[centroid_index<float>(y, j, d)] =
            static_cast<float>(C[centroid_index(y, j, d)] * scale);
      ws.size32[y] = static_cast<float>(nx + ny);  // exact: n <= 2^24
      ws.mask32[x] = kHidden32;
    }
    // The kept rows of the clusters still on the chain: x is gone, y is the merged cluster (its
    // exact cost, scaled and rounded to float: within the rows' bound).
    centroid_of(y, ws.neighbour);
    for (int64_t depth = 0; depth < std::min(chain_length, cached_rows); ++depth) {
      if (ws.row_owner[depth] < 0) continue;
      const int64_t w = ws.chain[depth];
      float* row = cost_row(depth);
      row[x] = kHidden32;
      row[y] = scaled_cost(
          ward_cost(C, d, ws.neighbour.data(), ws.size_d[y], w, ws.size_d[w], 0.0));
    }
    // Position x is free: the last cluster moves into it (its centroid, size, id, height, and
    // its column of the kept rows; the chain and the rows' owners follow it).
    const int64_t last = m - 1;
    const int64_t kept_rows = std::min(chain_length, cached_rows);
    if (x != last) {
      for (int64_t j = 0; j < d; ++j) C[centroid_index(x, j, d)] = C[centroid_index(last, j, d)];
      ws.size_d[x] = ws.size_d[last];
      ws.mask[x] = 0.0;
      if (prefilter) {
        for (int64_t j = 0; j < d; ++j)
          C32[centroid_index<float>(x, j, d)] = C32[centroid_index<float>(last, j, d)];
        ws.size32[x] = ws.size32[last];
        ws.mask32[x] = 0.0f;
      }
      ws.ids[x] = ws.ids[last];
      ws.formed_height[x] = ws.formed_height[last];
      for (int64_t depth = 0; depth < kept_rows; ++depth) {
        if (ws.row_owner[depth] < 0) continue;
        float* row = cost_row(depth);
        row[x] = row[last];
        if (ws.row_owner[depth] == last) ws.row_owner[depth] = x;
      }
      for (int64_t c = 0; c < chain_length; ++c)
        if (ws.chain[c] == last) ws.chain[c] = x;
    }
    // The freed last position is hidden (its stale centroid is finite: hidden costs stay finite).
    ws.mask[last] = kHidden;
    ws.size_d[last] = 1.0;
    if (prefilter) {
      ws.mask32[last] = kHidden32;
      ws.size32[last] = 1.0f;
    }
    for (int64_t depth = 0; depth < kept_rows; ++depth)
      if (ws.row_owner[depth] >= 0) cost_row(depth)[last] = kHidden32;
    m = last;
  }
}

// ------------------------------------------------------------------------------------------
// The 1-D path.

// Whether every x[i] is exactly a float (so float keys order them as double keys would).
inline bool all_floats(const double* x, int64_t n) {
  bool exact = true;
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i];
    // the range test first: converting a double beyond the float range is undefined
    exact &= std::fabs(v) <= static_cast<double>(std::numeric_limits<float>::max()) &&
             static_cast<double>(static_cast<float>(v)) == v;
  }
  return exact;
}

// Exact Ward for 1-D points x (n values) in O(n log n): a sort, then an O(n) nearest-neighbour
// chain. Ward clusters of points on a line are runs of the sorted points, and a run's nearest
// cluster is one of its two neighbouring runs, so each chain step looks at two candidates.
// Leaves the n - 1 merges, unsorted, in ws.merges.
inline void ward_1d(const double* x, int64_t n, WardWorkspace& ws) {
  // Sorted order of the points (ties by index, so the order is deterministic). A run is named by
  // its first position in that order; merging two runs keeps the left name.
  // Weights are usually float32 upcast: then 32-bit keys sort the same, stably, in half the
  // passes.
  if (all_floats(x, n)) {
    ws.keys32.resize(n);
    for (int64_t i = 0; i < n; ++i) ws.keys32[i] = sortable_bits32(static_cast<float>(x[i]));
    stable_argsort(ws.keys32, ws.order, ws.keys32_tmp, ws.perm_tmp);
  } else {
    ws.keys.resize(n);
    for (int64_t i = 0; i < n; ++i) ws.keys[i] = sortable_bits(x[i]);
    stable_argsort(ws.keys, ws.order, ws.keys_tmp, ws.perm_tmp);
  }
  ws.prev.resize(n);
  ws.next.resize(n);
  ws.count.assign(n, 1.0);
  ws.mean.resize(n);
  ws.formed_height.assign(n, 0.0);
  // Runs keep their mean, not their sum, and the points are centred first: means of data far
  // from the origin (1e12 + noise) then differ exactly where the points do.
  column_means(x, n, 1, ws.centre);
  const double centre = ws.centre[0];
  for (int64_t p = 0; p < n; ++p) {
    ws.prev[p] = p - 1;  // -1: no left neighbour
    ws.next[p] = p + 1;  // n: no right neighbour
    ws.mean[p] = x[ws.order[p]] - centre;
  }
  // Ward cost of merging neighbouring runs l < r: n_l n_r / (n_l + n_r) * (m_l - m_r)^2.
  auto cost = [&ws](int64_t l, int64_t r) {
    const double nl = ws.count[l], nr = ws.count[r];
    const double diff = ws.mean[r] - ws.mean[l];
    return nl * nr / (nl + nr) * diff * diff;
  };
  // Each run's cost to its left neighbour, kept up to date (a merge changes two of them), so a
  // chain step is two loads, not two divisions. Run 0 has no left neighbour and position n stands
  // for "no right neighbour": both cost infinity.
  constexpr double kNone = std::numeric_limits<double>::infinity();
  ws.cost_left.resize(n + 1);
  ws.cost_left[0] = ws.cost_left[n] = kNone;
  for (int64_t p = 1; p < n; ++p) ws.cost_left[p] = cost(p - 1, p);

  // The nearest-neighbour chain starts at run 0 (the leftmost, which never dies: merges keep
  // the left name) and can only grow to the right: a run's nearest is a neighbour, and if it is
  // the left one, that is the run below it on the chain, a reciprocal pair. So the chain is
  // always the runs from 0 to the top `a`, and needs no stack: the top moves right while its
  // right neighbour is strictly nearer (ties go to the left run, the one below on the chain, so
  // the chain cannot cycle), then merges with its left neighbour, and the chain goes on from the
  // run left of the pair (or from run 0 again).
  ws.merges.resize(n - 1);
  int64_t a = 0;
  for (int64_t k = 0; k < n - 1; ++k) {
    while (ws.cost_left[a] > ws.cost_left[ws.next[a]]) a = ws.next[a];
    const double best = ws.cost_left[a];
    const int64_t l = ws.prev[a], r = a;
    // Ward heights never decrease up the tree; max() keeps rounding from breaking that, so the
    // sort in finish_linkage() always puts a merge after the merges that formed its children.
    const double height =
        std::max({std::sqrt(2.0 * best), ws.formed_height[l], ws.formed_height[r]});
    ws.merges[k] = Merge{ws.order[r], ws.order[l], height};  // run r into run l
    ws.formed_height[l] = height;
    // As in the centroid path: equal means stay exactly equal.
    const double nl = ws.count[l], nr = ws.count[r];
    ws.mean[l] += (ws.mean[r] - ws.mean[l]) * (nr / (nl + nr));
    ws.count[l] += ws.count[r];
    ws.next[l] = ws.next[r];
    if (ws.next[l] < n) {
      ws.prev[ws.next[l]] = l;
      ws.cost_left[ws.next[l]] = cost(l, ws.next[l]);
    }
    if (l > 0) ws.cost_left[l] = cost(ws.prev[l], l);
    a = l > 0 ? ws.prev[l] : 0;  // both merged runs leave the chain
  }
}

// The n - 1 merges of one problem (n >= 2), unsorted, into ws.merges, by the given method
// (kAuto: choose_method). kSorted needs d == 1.
inline void ward_merges(const double* X, int64_t n, int64_t d, WardWorkspace& ws,
                        WardMethod method = WardMethod::kAuto) {
  if (method == WardMethod::kAuto) method = choose_method(n, d);
  switch (method) {
    case WardMethod::kSorted:
      if (d != 1) throw std::invalid_argument("the sorted Ward path needs 1-D points");
      ward_1d(X, n, ws);
      break;
    case WardMethod::kMatrix:
      nn_chain_ward(X, n, d, ws);
      break;
    default:
      centroid_chain_ward(X, n, d, ws);
      break;
  }
}

// Ward linkage of one problem by the given method: Z ((n-1) x 4), scipy's format.
inline void ward_linkage(const double* X, int64_t n, int64_t d, WardWorkspace& ws, double* Z,
                         WardMethod method = WardMethod::kAuto) {
  if (n < 2) return;
  ward_merges(X, n, d, ws, method);
  finish_linkage(ws, n, Z);
}

// ------------------------------------------------------------------------------------------
// REPrune's layer cut without linkage matrices (ALGORITHMS.md 3.2). A layer needs, per problem,
// only the height of its m-th merge in height order, and then the flat clusters at the layer's
// cut-off h_l = the largest of those heights: no sorted, relabelled Z. Every solver makes its
// heights monotone up the tree (the max() at each merge), so a merge's subtree holds no higher
// merge, fcluster's "subtree height <= t" is "height <= t", and the merges at or below t are
// closed under taking children: joining the clusters of those merges gives
// fcluster(Z, t, "distance")'s partition.

// Writes ws.merges (n - 1 of them, in the order made) as pairs (merged-away name, kept name)
// and heights, and returns max(floor, the height of the m-th merge in height order
// (1 <= m <= n - 1), as row m - 1 of the sorted linkage holds it). A layer needs only the largest such height over its problems: when at least m heights are
// <= floor (the largest found so far), this problem cannot raise it, and a vectorised count
// replaces the selection (which then runs for a few problems of a layer only).
inline double keep_merges(WardWorkspace& ws, int64_t n, int64_t m, double floor,
                          int32_t* pairs, double* heights) {
  std::vector<double>& scratch = ws.heights_scratch;
  int64_t at_most_floor = 0;
  for (int64_t k = 0; k < n - 1; ++k) {
    const Merge& merge = ws.merges[k];
    pairs[2 * k] = static_cast<int32_t>(merge.a);
    pairs[2 * k + 1] = static_cast<int32_t>(merge.b);
    heights[k] = merge.height;
    at_most_floor += merge.height <= floor;
  }
  if (at_most_floor >= m) return floor;
  scratch.assign(heights, heights + (n - 1));
  std::nth_element(scratch.begin(), scratch.begin() + (m - 1), scratch.end());
  return std::max(floor, scratch[m - 1]);
}

// labels[i] (0..c-1, in order of first appearance) from root[i], each point's cluster named by
// any id in [0, n); label_of: n entries of scratch. Branch-free: whether a root is new is a coin
// flip that a branch mispredicts.
template <typename Root>
inline void first_appearance_labels(const Root* root, int64_t n, int32_t* label_of,
                                    int32_t* labels) {
  for (int64_t i = 0; i < n; ++i) label_of[i] = -1;
  int32_t next_label = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Root r = root[i];
    const int32_t seen = label_of[r];
    const int32_t fresh = -static_cast<int32_t>(seen < 0);  // all ones while r has no label
    const int32_t label = (next_label & fresh) | (seen & ~fresh);
    label_of[r] = label;
    labels[i] = label;
    next_label -= fresh;
  }
}

// Labels (0..c-1, in order of first appearance) of the partition that joins the two clusters of
// every merge with height <= threshold. pairs / heights: n - 1 merges as keep_merges() writes
// them, in the order they were made (children first), named as Merge says: the caller passes
// what a solver made, as root[merged_away] is written unchecked. No union-find: backwards, a
// merge's kept cluster already knows its root (its later merges came first), and the cluster
// merged away takes it.
inline void cut_merges(const int32_t* pairs, const double* heights, int64_t n, double threshold,
                       std::vector<int32_t>& scratch, int32_t* labels) {
  scratch.resize(2 * n + 1);
  int32_t* root = scratch.data();        // n + 1: the last is where untaken merges write
  int32_t* label_of = root + (n + 1);    // per root: its label, -1 until it appears
  // Selects by masks: whether a merge is taken is a coin flip that a branch mispredicts (GCC made
  // a branch of the plain ternary).
  for (int64_t i = 0; i <= n; ++i) root[i] = static_cast<int32_t>(i);
  const int32_t sink = static_cast<int32_t>(n);
  for (int64_t k = n - 2; k >= 0; --k) {
    const int32_t merged_away = pairs[2 * k], kept = pairs[2 * k + 1];
    const int32_t taken = -static_cast<int32_t>(heights[k] <= threshold);  // all ones or zero
    root[sink ^ ((merged_away ^ sink) & taken)] = root[kept];
  }
  first_appearance_labels(root, n, label_of, labels);
}

// ------------------------------------------------------------------------------------------
// Flat cuts (scipy fcluster "distance" / "maxclust"), labels 0..c-1 in order of first appearance.

// Checks that Z ((n-1) x 4) is a valid linkage: heights finite and >= 0, child ids whole
// numbers naming clusters that exist, each used once, and the count column equal to the sum of
// the children's sizes (accelprune.cluster's reference checks the same, so both cuts accept the
// same matrices). Also fills max_dist[r]: the largest height in row r's subtree (scipy's
// monocrit for cuts).
inline void check_linkage(const double* Z, int64_t n, std::vector<double>& max_dist,
                          std::vector<int64_t>& size) {
  max_dist.resize(n > 1 ? n - 1 : 0);
  size.assign(2 * n, 1);  // 0 marks a cluster already merged into another
  for (int64_t r = 0; r < n - 1; ++r) {
    const double* row = Z + 4 * r;
    double md = row[2];
    if (!(md >= 0.0) || !std::isfinite(md)) {
      throw std::invalid_argument("Z has a negative, NaN or infinite height in row " +
                                  std::to_string(r));
    }
    int64_t merged = 0;
    for (int c = 0; c < 2; ++c) {
      double id = row[c];
      if (!(id >= 0.0) || id >= static_cast<double>(n + r) || id != std::floor(id)) {
        throw std::invalid_argument("Z row " + std::to_string(r) + " names cluster " +
                                    std::to_string(id) + ", which does not exist yet");
      }
      int64_t child = static_cast<int64_t>(id);
      if (size[child] == 0) {
        throw std::invalid_argument("Z uses cluster " + std::to_string(child) + " twice");
      }
      merged += size[child];
      size[child] = 0;
      if (child >= n) md = std::max(md, max_dist[child - n]);
    }
    if (row[3] != static_cast<double>(merged)) {
      throw std::invalid_argument("Z row " + std::to_string(r) + " has count " +
                                  std::to_string(row[3]) + " but its children hold " +
                                  std::to_string(merged) + " points");
    }
    size[n + r] = merged;
    max_dist[r] = md;
  }
}

// Labels of the partition that applies every merge whose subtree height is <= threshold.
inline void cut_at(const double* Z, int64_t n, const std::vector<double>& max_dist,
                   double threshold, int32_t* labels) {
  std::vector<int64_t> parent(n), rep(2 * n - 1);  // rep: one point inside each cluster id
  for (int64_t i = 0; i < n; ++i) parent[i] = rep[i] = i;
  auto find = [&parent](int64_t a) {
    while (parent[a] != a) a = parent[a] = parent[parent[a]];
    return a;
  };
  for (int64_t r = 0; r < n - 1; ++r) {
    int64_t a = rep[static_cast<int64_t>(Z[4 * r])], b = rep[static_cast<int64_t>(Z[4 * r + 1])];
    rep[n + r] = a;
    if (max_dist[r] <= threshold) parent[find(b)] = find(a);
  }
  std::vector<int64_t> root(n);
  for (int64_t i = 0; i < n; ++i) root[i] = find(i);
  std::vector<int32_t> label_of(n);
  first_appearance_labels(root.data(), n, label_of.data(), labels);
}

// The lowest threshold among the subtree heights that leaves at most k clusters (k in 1..n).
inline double maxclust_threshold(const std::vector<double>& max_dist, int64_t n, int64_t k) {
  if (k >= n) return -1.0;  // no merge at all
  std::vector<double> sorted(max_dist);
  std::nth_element(sorted.begin(), sorted.begin() + (n - k - 1), sorted.end());
  return sorted[n - k - 1];
}

}  // namespace accelprune

// Ward hierarchical clustering: the C++ core of accelprune._native.
//
// Plain C++17 on raw pointers; it knows nothing of Python (bindings.cpp does the checks, the GIL
// and the exception mapping). The output follows scipy.cluster.hierarchy.linkage(X, "ward"):
// an (n-1) x 4 matrix [child a, child b, height, size], rows in non-decreasing height order, new
// cluster ids n, n+1, ..., the smaller child id first, heights sqrt(2 * Ward merge cost).
//
// Two solvers, both nearest-neighbour chains (Ward is reducible, so merging mutual nearest
// neighbours in the order the chain finds them gives the same dendrogram as always merging the
// global minimum):
//  * nn_chain_ward: O(n^2) time on a dense matrix of squared Euclidean distances, updated with
//    the Lance-Williams formula. Scan order and tie rule are scipy's nn_chain (previous chain
//    element first, then the lowest id).
//  * ward_1d: points on a line. Ward clusters of 1-D points are runs of the sorted points, and a
//    run's nearest cluster is one of its two neighbouring runs, so after a sort the chain is O(n).
// Both produce an unsorted list of merges that finish_linkage() turns into scipy's format.
// Neither writes to its input.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// Hot loops that the compiler vectorises get an AVX2 clone besides the baseline one, chosen at load
// time by the CPU (GCC/Clang function multi-versioning on x86-64; a no-op elsewhere).
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define ACCELPRUNE_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ACCELPRUNE_VECTOR_CLONES
#endif

namespace accelprune {

// One merge before relabelling: a and b are any point (or slot) ids that lie in the two merged
// clusters; finish_linkage() maps them to cluster ids.
struct Merge {
  int64_t a;
  int64_t b;
  double height;
};

// Union-find over the 2n-1 nodes of a dendrogram, as scipy's LinkageUnionFind.
class LinkageUnionFind {
 public:
  explicit LinkageUnionFind(int64_t n) { reset(n); }

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

// Per-thread work buffers, reused across the problems one thread solves (never one per problem:
// a 2048-filter layer would need 32 MB each).
struct WardWorkspace {
  std::vector<double> dist;  // n x ld Euclidean distances between current clusters (NN-chain)
  int64_t ld = 0;            // row stride of dist
  std::vector<int64_t> size, active, chain, ids, position;
  std::vector<Merge> merges;
  std::vector<int64_t> order, prev, next, count;  // 1-D path
  std::vector<double> sum, points_t, mask, formed_height, size_d;
  std::vector<std::pair<double, int64_t>> keyed;
};

// Sort merges by height (stable, as scipy's mergesort) and relabel into scipy's linkage format.
inline void finish_linkage(std::vector<Merge>& merges, int64_t n, double* Z) {
  std::stable_sort(merges.begin(), merges.end(),
                   [](const Merge& l, const Merge& r) { return l.height < r.height; });
  LinkageUnionFind uf(n);
  for (size_t k = 0; k < merges.size(); ++k) {
    int64_t ra = uf.find(merges[k].a), rb = uf.find(merges[k].b);
    double* row = Z + 4 * k;
    row[0] = static_cast<double>(std::min(ra, rb));
    row[1] = static_cast<double>(std::max(ra, rb));
    row[2] = merges[k].height;
    row[3] = static_cast<double>(uf.merge(ra, rb));
  }
}

// Lance-Williams update for Ward on squared distances, for a whole row: after merging x and y
// (squared distance d_xy), the squared distance of the new cluster to every cluster i:
//   ((n_i + n_x) d_xi + (n_i + n_y) d_yi - n_i d_xy) / (n_x + n_y + n_i),
// written over row_y. No square root (scipy's form takes one per update); clamped at 0, where
// rounding can push an exact 0 slightly below.
ACCELPRUNE_VECTOR_CLONES
inline void update_row(const double* row_x, double* row_y, const double* size, int64_t m,
                       double d_xy, int64_t size_x, int64_t size_y) {
  const double nx = static_cast<double>(size_x), ny = static_cast<double>(size_y);
  for (int64_t i = 0; i < m; ++i) {
    const double ni = size[i];
    const double v = ((ni + nx) * row_x[i] + (ni + ny) * row_y[i] - ni * d_xy) / (nx + ny + ni);
    row_y[i] = v > 0.0 ? v : 0.0;
  }
}

// Row stride for an m x m matrix: padded where a multiple of 2 KiB would alias in the L1 cache.
inline int64_t padded_stride(int64_t m) { return (m % 256 == 0) ? m + 8 : m; }

ACCELPRUNE_VECTOR_CLONES
inline void pairwise_distances(const double* X, int64_t n, int64_t d, WardWorkspace& ws) {
  // Column walks (the mirror below, the Lance-Williams updates) step by one row at a time; with a
  // row stride that is a multiple of 2 KiB every step lands in the same L1 cache set and evicts
  // the last, so such strides get padded.
  const int64_t ld = padded_stride(n);
  ws.ld = ld;
  std::vector<double>& D = ws.dist;
  D.resize(static_cast<size_t>(n) * ld);
  std::vector<double>& xt = ws.points_t;  // d x n transposed points
  xt.resize(static_cast<size_t>(n) * d);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) xt[k * n + i] = X[i * d + k];
  for (int64_t i = 0; i < n; ++i) {
    double* row = D.data() + i * ld;
    row[i] = 0.0;
    for (int64_t j = i + 1; j < n; ++j) row[j] = 0.0;
    for (int64_t k = 0; k < d; ++k) {  // dimension by dimension: a vectorisable loop over j
      const double xik = X[i * d + k];
      const double* col = xt.data() + k * n;
      for (int64_t j = i + 1; j < n; ++j) {
        double diff = xik - col[j];
        row[j] += diff * diff;
      }
    }
  }
  constexpr int64_t kBlock = 32;
  for (int64_t ib = 0; ib < n; ib += kBlock)
    for (int64_t jb = ib; jb < n; jb += kBlock)
      for (int64_t i = ib; i < std::min(ib + kBlock, n); ++i)
        for (int64_t j = std::max(jb, i + 1); j < std::min(jb + kBlock, n); ++j)
          D[j * ld + i] = D[i * ld + j];
}

// Added to a distance to hide a cluster from nearest-neighbour scans (dead clusters, the diagonal).
// Finite, so that scans stay plain arithmetic; Python rejects inputs whose squared distances
// could come near it.
constexpr double kHidden = 1e300;

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

// Nearest-neighbour chain Ward on points X (n x d, row-major). Writes Z ((n-1) x 4).
inline void nn_chain_ward(const double* X, int64_t n, int64_t d, WardWorkspace& ws, double* Z) {
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
  ws.mask.assign(n, 0.0);  // 0 for live clusters, kHidden for merged-away ones
  ws.formed_height.assign(n, 0.0);
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
      ws.position.assign(m, -1);
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
  finish_linkage(ws.merges, n, Z);
}

// Exact Ward for 1-D points x (n values) in O(n log n): a sort, then an O(n) nearest-neighbour
// chain. Ward clusters of points on a line are runs of the sorted points, and a run's nearest
// cluster is one of its two neighbouring runs, so each chain step looks at two candidates.
inline void ward_1d(const double* x, int64_t n, WardWorkspace& ws, double* Z) {
  // Sorted order of the points (ties by index, so the order is deterministic). A run is named by
  // its first position in that order; merging two runs keeps the left name.
  ws.keyed.resize(n);
  for (int64_t i = 0; i < n; ++i) ws.keyed[i] = {x[i], i};
  std::sort(ws.keyed.begin(), ws.keyed.end());  // by value, then index
  ws.order.resize(n);
  ws.prev.resize(n);
  ws.next.resize(n);
  ws.count.assign(n, 1);
  ws.sum.resize(n);
  ws.formed_height.assign(n, 0.0);
  for (int64_t p = 0; p < n; ++p) {
    ws.prev[p] = p - 1;  // -1: no left neighbour
    ws.next[p] = p + 1;  // n: no right neighbour
    ws.order[p] = ws.keyed[p].second;
    ws.sum[p] = ws.keyed[p].first;
  }
  // Ward cost of merging neighbouring runs l < r: n_l n_r / (n_l + n_r) * (m_l - m_r)^2.
  auto cost = [&ws](int64_t l, int64_t r) {
    const double nl = static_cast<double>(ws.count[l]), nr = static_cast<double>(ws.count[r]);
    const double diff = ws.sum[r] / nr - ws.sum[l] / nl;
    return nl * nr / (nl + nr) * diff * diff;
  };
  constexpr double kNone = std::numeric_limits<double>::infinity();

  ws.chain.resize(n);
  ws.merges.resize(n - 1);
  int64_t chain_length = 0;
  for (int64_t k = 0; k < n - 1; ++k) {
    if (chain_length == 0) ws.chain[chain_length++] = 0;  // run 0 (the leftmost) never dies
    int64_t a = 0, b = 0;
    double best = 0.0;
    while (true) {
      a = ws.chain[chain_length - 1];
      const int64_t previous = chain_length > 1 ? ws.chain[chain_length - 2] : -1;
      const int64_t left = ws.prev[a], right = ws.next[a];
      const double to_left = left >= 0 ? cost(left, a) : kNone;
      const double to_right = right < n ? cost(a, right) : kNone;
      // Ties prefer the previous chain element (so the chain cannot cycle), then the left run.
      if (to_left < to_right || (to_left == to_right && previous != right)) {
        b = left;
        best = to_left;
      } else {
        b = right;
        best = to_right;
      }
      if (b == previous) break;
      ws.chain[chain_length++] = b;
    }
    chain_length -= 2;
    const int64_t l = std::min(a, b), r = std::max(a, b);
    // Ward heights never decrease up the tree; max() keeps rounding from breaking that, so the
    // sort in finish_linkage() always puts a merge after the merges that formed its children.
    const double height =
        std::max({std::sqrt(2.0 * best), ws.formed_height[l], ws.formed_height[r]});
    ws.merges[k] = Merge{ws.order[l], ws.order[r], height};
    ws.formed_height[l] = height;
    ws.count[l] += ws.count[r];
    ws.sum[l] += ws.sum[r];
    ws.next[l] = ws.next[r];
    if (ws.next[l] < n) ws.prev[ws.next[l]] = l;
  }
  finish_linkage(ws.merges, n, Z);
}

// Ward linkage of one problem, choosing the solver by dimension.
inline void ward_linkage(const double* X, int64_t n, int64_t d, WardWorkspace& ws, double* Z) {
  if (n < 2) return;
  if (d == 1) {
    ward_1d(X, n, ws, Z);
  } else {
    nn_chain_ward(X, n, d, ws, Z);
  }
}

// ------------------------------------------------------------------------------------------
// Flat cuts (scipy fcluster "distance" / "maxclust"), labels 0..c-1 in order of first appearance.

// Checks that Z ((n-1) x 4) is a valid linkage: child ids exist, each used once, heights >= 0.
// Also fills max_dist[r]: the largest height in row r's subtree (scipy's monocrit for cuts).
inline void check_linkage(const double* Z, int64_t n, std::vector<double>& max_dist,
                          std::vector<char>& used) {
  max_dist.resize(n > 1 ? n - 1 : 0);
  used.assign(2 * n, 0);
  for (int64_t r = 0; r < n - 1; ++r) {
    const double* row = Z + 4 * r;
    double md = row[2];
    if (!(md >= 0.0)) throw std::invalid_argument("Z has a negative or NaN height in row " + std::to_string(r));
    for (int c = 0; c < 2; ++c) {
      double id = row[c];
      if (!(id >= 0.0) || id >= static_cast<double>(n + r) || id != std::floor(id)) {
        throw std::invalid_argument("Z row " + std::to_string(r) + " names cluster " +
                                    std::to_string(id) + ", which does not exist yet");
      }
      int64_t child = static_cast<int64_t>(id);
      if (used[child]) {
        throw std::invalid_argument("Z uses cluster " + std::to_string(child) + " twice");
      }
      used[child] = 1;
      if (child >= n) md = std::max(md, max_dist[child - n]);
    }
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
  std::vector<int32_t> label_of_root(n, -1);
  int32_t next_label = 0;
  for (int64_t i = 0; i < n; ++i) {
    int64_t root = find(i);
    if (label_of_root[root] < 0) label_of_root[root] = next_label++;
    labels[i] = label_of_root[root];
  }
}

// The lowest threshold among the subtree heights that leaves at most k clusters (k in 1..n).
inline double maxclust_threshold(const std::vector<double>& max_dist, int64_t n, int64_t k) {
  if (k >= n) return -1.0;  // no merge at all
  std::vector<double> sorted(max_dist);
  std::nth_element(sorted.begin(), sorted.begin() + (n - k - 1), sorted.end());
  return sorted[n - k - 1];
}

}  // namespace accelprune

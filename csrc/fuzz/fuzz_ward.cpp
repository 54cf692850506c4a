// Fuzzer of the Ward core (ward.hpp) against a naive O(n^3) Ward, for sanitizer builds.
//
//   fuzz_ward SECONDS [SEED]
//
// Random problems (n 1..48, d 1..6; normal, integer grid with many ties, duplicates, data at
// 1e9 + noise, tiny and mixed scales) through every path (centroids, matrix, sorted for d = 1),
// one workspace reused across all problems of all sizes, as a thread does. Each linkage is
// replayed against the naive algorithm: every row must merge two current clusters whose Ward
// cost is the smallest at that step (to 1e-9), at height sqrt(2 cost), with the right count,
// in non-decreasing height order; the cuts must give valid first-appearance labels with the
// right number of clusters, and REPrune's layer cut (keep_merges, cut_merges) the labels of the
// cut of Z at the same heights. Prints the number of cases and failures; exits 1 on any failure.
// Build: benchmarks/fuzz_ward.sh (with -fsanitize=address,undefined).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../ward.hpp"

namespace {

using accelprune::WardMethod;

struct Problem {
  int64_t n = 0, d = 0;
  std::vector<double> X;
  std::string kind;
};

Problem random_problem(std::mt19937_64& rng) {
  static const char* kinds[] = {"normal", "grid", "duplicates", "offset", "tiny", "mixed"};
  Problem p;
  p.n = std::uniform_int_distribution<int64_t>(1, 48)(rng);
  p.d = std::uniform_int_distribution<int64_t>(1, 6)(rng);
  p.kind = kinds[std::uniform_int_distribution<int>(0, 5)(rng)];
  std::normal_distribution<double> normal;
  p.X.resize(p.n * p.d);
  if (p.kind == "grid") {
    std::uniform_int_distribution<int> cell(0, 2);
    for (double& v : p.X) v = cell(rng);
  } else if (p.kind == "duplicates") {
    const int64_t distinct = std::max<int64_t>(1, p.n / 3);
    std::vector<double> base(distinct * p.d);
    for (double& v : base) v = normal(rng);
    std::uniform_int_distribution<int64_t> pick(0, distinct - 1);
    for (int64_t i = 0; i < p.n; ++i) {
      const int64_t b = pick(rng);
      for (int64_t k = 0; k < p.d; ++k) p.X[i * p.d + k] = base[b * p.d + k];
    }
  } else if (p.kind == "offset") {
    std::uniform_real_distribution<double> noise(0.0, 100.0);
    for (double& v : p.X) v = 1e9 + noise(rng);
  } else if (p.kind == "tiny") {
    for (double& v : p.X) v = 1e-8 * normal(rng);
  } else if (p.kind == "mixed") {
    for (int64_t i = 0; i < p.n; ++i)
      for (int64_t k = 0; k < p.d; ++k) p.X[i * p.d + k] = normal(rng) * std::pow(10.0, 3 * k - 6);
  } else {
    for (double& v : p.X) v = normal(rng);
  }
  return p;
}

// Replays Z against the naive algorithm; returns "" or what is wrong.
std::string check_linkage_is_ward(const Problem& p, const std::vector<double>& Z) {
  const int64_t n = p.n, d = p.d;
  // Centred points in long double: the naive costs then keep every bit the engine can.
  std::vector<long double> centre(d, 0.0L);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) centre[k] += p.X[i * d + k];
  for (int64_t k = 0; k < d; ++k) centre[k] /= n;
  long double scale = 0.0L;
  std::vector<std::vector<int64_t>> members(2 * n - 1);
  for (int64_t i = 0; i < n; ++i) members[i] = {i};
  std::vector<char> alive(2 * n - 1, 0);
  for (int64_t i = 0; i < n; ++i) alive[i] = 1;
  auto mean = [&](int64_t c, int64_t k) {
    long double s = 0.0L;
    for (int64_t i : members[c]) s += (p.X[i * d + k] - centre[k]);
    return s / members[c].size();
  };
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) scale = std::max(scale, std::fabs(p.X[i * d + k] - centre[k]));
  auto cost = [&](int64_t a, int64_t b) {
    long double sq = 0.0L;
    for (int64_t k = 0; k < d; ++k) {
      const long double diff = mean(a, k) - mean(b, k);
      sq += diff * diff;
    }
    const long double na = members[a].size(), nb = members[b].size();
    return na * nb / (na + nb) * sq;
  };
  const long double abs_tol = 1e-12L * scale * scale + 1e-300L;
  double previous_height = 0.0;
  for (int64_t r = 0; r < n - 1; ++r) {
    const double* row = &Z[4 * r];
    const int64_t a = static_cast<int64_t>(row[0]), b = static_cast<int64_t>(row[1]);
    if (row[0] != a || row[1] != b || a < 0 || b < 0 || a >= n + r || b >= n + r || a >= b ||
        !alive[a] || !alive[b]) {
      return "row " + std::to_string(r) + " names clusters that are not current";
    }
    long double best = INFINITY;
    for (int64_t i = 0; i < n + r; ++i) {
      if (!alive[i]) continue;
      for (int64_t j = i + 1; j < n + r; ++j)
        if (alive[j]) best = std::min(best, cost(i, j));
    }
    const long double c = cost(a, b);
    if (c > best * (1 + 1e-9L) + abs_tol) {
      return "row " + std::to_string(r) + " is not a cheapest merge";
    }
    const long double h = std::sqrt(2 * c);
    if (std::fabs(row[2] - h) > 1e-9L * h + 1e-6L * scale + 1e-300L) {
      return "row " + std::to_string(r) + " height " + std::to_string(row[2]) + " but cost says " +
             std::to_string(static_cast<double>(h));
    }
    if (row[2] < previous_height) return "heights decrease at row " + std::to_string(r);
    previous_height = row[2];
    if (row[3] != static_cast<double>(members[a].size() + members[b].size())) {
      return "row " + std::to_string(r) + " has the wrong count";
    }
    members[n + r] = members[a];
    members[n + r].insert(members[n + r].end(), members[b].begin(), members[b].end());
    alive[a] = alive[b] = 0;
    alive[n + r] = 1;
  }
  return "";
}

// The cuts on Z: labels 0..c-1 in first-appearance order, c clusters as asked (or fewer on ties).
std::string check_cuts(const Problem& p, const std::vector<double>& Z, std::mt19937_64& rng) {
  const int64_t n = p.n;
  std::vector<int32_t> scratch;
  std::vector<double> max_dist;
  std::vector<int64_t> size;
  accelprune::check_linkage(Z.data(), n, max_dist, size);
  std::vector<int32_t> labels(n);
  const int64_t k = std::uniform_int_distribution<int64_t>(1, n)(rng);
  accelprune::cut_at(Z.data(), n, max_dist, accelprune::maxclust_threshold(max_dist, n, k),
                     labels.data());
  int32_t next = 0;
  for (int32_t label : labels) {
    if (label > next) return "labels not in first-appearance order";
    if (label == next) ++next;
  }
  if (next > k) {
    return "maxclust gave " + std::to_string(next) + " clusters for k = " + std::to_string(k);
  }
  return "";
}

// Whether pairs (n - 1 merges as keep_merges() writes them) are a valid merge sequence named as
// the solvers name clusters, as cut_merges() needs (it writes root[merged_away] unchecked):
// names in [0, n), every merge joining two distinct clusters that exist (neither merged away
// before), the first merged away.
bool merges_well_named(const std::vector<int32_t>& pairs, int64_t n) {
  std::vector<char> alive(n, 1);  // 1 while the name is a cluster
  for (int64_t k = 0; k < n - 1; ++k) {
    const int32_t merged_away = pairs[2 * k], kept = pairs[2 * k + 1];
    if (merged_away < 0 || merged_away >= n || kept < 0 || kept >= n) return false;
    if (!alive[merged_away] || !alive[kept] || merged_away == kept) return false;
    alive[merged_away] = 0;
  }
  return true;
}

// REPrune's layer cut on the same solve (ws.merges, in the order made): keep_merges must give
// row m - 1's height of Z (or a larger floor), name the merges as cut_merges needs, and
// cut_merges at a merge's height, just below it, at 0 and between two heights must give the
// labels of the "distance" cut of Z there.
std::string check_layer_cut(const Problem& p, const std::vector<double>& Z,
                            accelprune::WardWorkspace& ws, std::mt19937_64& rng) {
  const int64_t n = p.n;
  std::vector<int32_t> pairs(2 * (n - 1));
  std::vector<double> heights(n - 1);
  const int64_t m = std::uniform_int_distribution<int64_t>(1, n - 1)(rng);
  const double row = Z[4 * (m - 1) + 2];
  const double floor = std::uniform_int_distribution<int>(0, 1)(rng) ? 0.0 : Z[4 * (n - 2) + 2] *
      std::uniform_real_distribution<double>(0.0, 1.5)(rng);
  const double height = accelprune::keep_merges(ws, n, m, floor, pairs.data(), heights.data());
  if (height != std::max(floor, row)) return "keep_merges' height is not max(floor, row m - 1)";
  if (!merges_well_named(pairs, n)) {
    return "the merges are not named as cut_merges needs";
  }
  std::vector<int32_t> scratch;
  std::vector<double> max_dist;
  std::vector<int64_t> size;
  accelprune::check_linkage(Z.data(), n, max_dist, size);
  const double other = Z[4 * std::uniform_int_distribution<int64_t>(0, n - 2)(rng) + 2];
  for (double t : {row, std::nextafter(row, -1.0), 0.0, 0.5 * (row + other)}) {
    std::vector<int32_t> labels(n), expected(n);
    accelprune::cut_merges(pairs.data(), heights.data(), n, t, scratch, labels.data());
    accelprune::cut_at(Z.data(), n, max_dist, t, expected.data());
    if (labels != expected) return "cut_merges' labels differ from the cut of Z";
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s SECONDS [SEED]\n", argv[0]);
    return 2;
  }
  const double seconds = std::atof(argv[1]);
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 0;
  std::mt19937_64 rng(seed);
  accelprune::WardWorkspace ws;  // reused across every problem, as one thread's is
  const auto start = std::chrono::steady_clock::now();
  long cases = 0, runs = 0, failures = 0;
  auto elapsed_s = [&start] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  while (elapsed_s() < seconds) {
    const Problem p = random_problem(rng);
    ++cases;
    std::vector<WardMethod> methods = {WardMethod::kAuto, WardMethod::kCentroids,
                                       WardMethod::kMatrix};
    if (p.d == 1) methods.push_back(WardMethod::kSorted);
    for (WardMethod method : methods) {
      ++runs;
      std::vector<double> Z(4 * std::max<int64_t>(p.n - 1, 0), -1.0);
      accelprune::ward_linkage(p.X.data(), p.n, p.d, ws, Z.data(), method);
      std::string problem = check_linkage_is_ward(p, Z);
      if (problem.empty() && p.n > 1) problem = check_cuts(p, Z, rng);
      if (problem.empty() && p.n > 1) problem = check_layer_cut(p, Z, ws, rng);
      if (!problem.empty()) {
        ++failures;
        std::printf("FAIL case %ld (n=%lld d=%lld %s, method %s): %s\n", cases,
                    static_cast<long long>(p.n), static_cast<long long>(p.d), p.kind.c_str(),
                    accelprune::method_name(method), problem.c_str());
        if (failures >= 10) break;
      }
    }
    if (failures >= 10) break;
  }
  const double elapsed = elapsed_s();
  std::printf("fuzz_ward: %ld cases (%ld linkages) in %.1f s, seed %llu, %ld failures\n", cases,
              runs, elapsed, static_cast<unsigned long long>(seed), failures);
  return failures ? 1 : 0;
}

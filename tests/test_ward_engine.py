"""The native Ward engine's paths, precision, memory behaviour and input checks (issues 13, 14).

Every path (centroids, matrix, sorted) against scipy; data far from the origin; out-of-memory in
a subprocess; the raw extension's own checks; bounded Hypothesis fuzzing of the public entry
points against scipy.
"""
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.cluster.hierarchy as sch
from hypothesis import given, settings
from hypothesis import strategies as st

from accelprune import cut_linkage, cut_linkage_ref, ward_linkage, ward_linkage_batched
from accelprune._backend import available, native_module
from accelprune.cluster import WARD_METHODS, ward_cut_layer, ward_method

pytestmark = pytest.mark.skipif(not available("native"), reason="accelprune._native not built")

ROOT = Path(__file__).resolve().parent.parent


def untied_cut_heights(heights, count=6):
    """Cut heights halfway between well-separated consecutive merge heights."""
    h = np.unique(heights)
    gaps = np.flatnonzero(np.diff(h) > 1e-6 * max(h[-1], 1.0))
    if not len(gaps):
        return []
    return [(h[i] + h[i + 1]) / 2 for i in gaps[np.linspace(0, len(gaps) - 1, count).astype(int)]]


def assert_same_dendrogram(Z, R, rtol=1e-9):
    """Same heights (rtol) and counts, the same partitions at untied cuts."""
    assert Z.shape == R.shape
    np.testing.assert_allclose(Z[:, 2], R[:, 2], rtol=rtol, atol=1e-12)
    np.testing.assert_array_equal(Z[:, 3], R[:, 3])
    for h in untied_cut_heights(R[:, 2]):
        np.testing.assert_array_equal(cut_linkage(Z, height=h), cut_linkage_ref(R, height=h))


def methods_for(d):
    return ["centroids", "matrix"] + (["sorted"] if d == 1 else [])


# ---------------------------------------------------------------------------------------------
# every path against scipy


@pytest.mark.parametrize("d", [1, 2, 9, 30])
@pytest.mark.parametrize("n", [2, 3, 9, 64, 257, 513])
def test_every_path_matches_scipy(n, d):
    X = np.random.default_rng(n * 31 + d).standard_normal((n, d))
    R = sch.linkage(X, "ward")
    for method in methods_for(d):
        Z = ward_linkage(X, method=method)
        assert_same_dendrogram(Z, R)
        np.testing.assert_array_equal(Z[:, :2], R[:, :2])  # no ties: the same children


def test_paths_agree_on_a_batch_with_any_thread_count():
    X = np.random.default_rng(1).standard_normal((9, 70, 5))
    for method in ("centroids", "matrix"):
        one = ward_linkage_batched(X, n_threads=1, method=method)
        for threads in (2, 3):
            np.testing.assert_array_equal(ward_linkage_batched(X, n_threads=threads, method=method),
                                          one)


def test_auto_rule():
    assert WARD_METHODS == ("auto", "centroids", "matrix", "sorted")
    assert ward_method(2048, 1) == "sorted"
    assert ward_method(512, 9) == "centroids"
    assert ward_method(512, 2048) == "centroids"  # the matrix path stops at 256 points
    assert ward_method(256, 255) == "centroids"
    assert ward_method(256, 256) == "matrix"  # where d >= n^2 / 256
    assert ward_method(128, 63) == "centroids"
    assert ward_method(128, 64) == "matrix"
    assert ward_method(64, 9) == "centroids"
    assert ward_method(64, 16) == "matrix"
    assert ward_method(32, 4) == "matrix"
    assert ward_method(1024, 1024) == "centroids"
    assert ward_method(20_000, 49) == "centroids"  # the matrix would be 3.2 GB
    assert ward_method(100_000, 8) == "centroids"


def test_duplicates_merge_at_exactly_zero_on_every_path():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((12, 3)) * 1e3 + 1e6
    X = np.repeat(base, 5, axis=0)[rng.permutation(60)]
    for method in ("centroids", "matrix"):
        Z = ward_linkage(X, method=method)
        assert (Z[:48, 2] == 0).all() and (Z[48:, 2] > 0).all()
    x = np.repeat(rng.standard_normal(10) + 1e9, 4)[:, None]
    for method in methods_for(1):
        Z = ward_linkage(x, method=method)
        assert (Z[:30, 2] == 0).all() and (Z[30:, 2] > 0).all()


def test_sorted_path_float_keys_and_double_keys_agree():
    """Float32-valued points take 32-bit sort keys, others 64-bit ones: the same order (ties and
    -0.0 included), so the same dendrogram as scipy either way."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(400).astype(np.float32).astype(np.float64)
    x[::7] = x[3]  # ties
    x[5], x[9] = -0.0, 0.0
    x[11] = np.float32(2.0**-140)  # a float subnormal
    for values in (x, np.append(x, 0.1), np.append(x, 1e-300)):  # the last two are not floats
        X = values[:, None]
        Z = ward_linkage(X, method="sorted")
        R = sch.linkage(X, "ward")
        np.testing.assert_allclose(Z[:, 2], R[:, 2], rtol=1e-9, atol=1e-12)
        for h in untied_cut_heights(R[:, 2], count=20):
            np.testing.assert_array_equal(cut_linkage(Z, height=h), cut_linkage_ref(R, height=h))


# ---------------------------------------------------------------------------------------------
# every version of the centroid scan gives the same bits (issue 14)


def fused_ward_cost(centroid, query, size_i, size_x):
    """The engine's documented cost, computed exactly and rounded as it specifies: the sum of
    squares by fused multiply-adds (one rounding per dimension: Fraction arithmetic, then float(),
    which rounds correctly), then n_x n_i / (n_x + n_i) * sum in plain double arithmetic."""
    from fractions import Fraction

    squared = 0.0
    for c, q in zip(centroid.tolist(), query.tolist(), strict=True):
        diff = c - q
        squared = float(Fraction(diff) * Fraction(diff) + Fraction(squared))
    return size_x * size_i / (size_x + size_i) * squared + 0.0


@pytest.mark.parametrize("m, d", [(1, 1), (5, 9), (37, 9), (64, 3), (131, 25)])
def test_every_scan_version_and_the_scalar_cost_agree_to_the_bit(m, d):
    """The SSE2 baseline (std::fma per lane), the AVX2+FMA and AVX-512 versions (whichever this
    CPU runs) and the scalar ward_cost (std::fma) give the same costs, minimum, argmin and second
    smallest; and that is the fused formula, not the unfused one (so that the check can fail).
    The float versions (the centroid chain's prefilter) agree with each other to the bit and with
    the double costs to float precision."""
    rng = np.random.default_rng(m * 100 + d)
    centroids = rng.standard_normal((m, d)) * rng.uniform(0.1, 10.0)
    centroids[m // 2] = centroids[0]  # a tie: the lowest index must win everywhere
    query = rng.standard_normal(d)
    sizes = rng.integers(1, 50, m).astype(np.float64)
    sizes[m // 2] = sizes[0]
    versions = native_module()._ward_scan_versions(centroids, query, sizes, 7.0)
    doubles = {k: v for k, v in versions.items() if not k.endswith("float32")}
    floats = {k: v for k, v in versions.items() if k.endswith("float32")}
    assert {"scalar", "sse2"} <= set(doubles) or set(doubles) == {"scalar", "native"}
    assert len(floats) == len(doubles) - 1
    expected = np.array([fused_ward_cost(centroids[i], query, sizes[i], 7.0) for i in range(m)])
    second = np.sort(expected)[1] if m > 1 else None  # (m == 1: the padding's hidden value)
    for name, (costs, smallest, argmin, runner_up) in doubles.items():
        np.testing.assert_array_equal(costs, expected, err_msg=name)
        assert smallest == expected.min() and argmin == int(np.argmin(expected)), name
        assert second is None or runner_up == second, name
    first_float = next(iter(floats.values()))
    for name, (costs, smallest, argmin, runner_up) in floats.items():
        np.testing.assert_array_equal(costs, first_float[0], err_msg=name)
        np.testing.assert_allclose(costs, expected, rtol=1e-5, err_msg=name)
        assert smallest == costs.min() and argmin == int(np.argmin(costs)), name
        assert second is None or runner_up == np.sort(costs)[1], name


def prefilter_cases():
    """Data that stresses the float prefilter's bound: ties, near-ties below float precision,
    duplicates, offsets, magnitudes far beyond float's range (it scales by a power of two)."""
    rng = np.random.default_rng(7)
    grid = rng.integers(0, 3, (300, 6)).astype(np.float64)
    weights = rng.normal(0, 0.05, (300, 9))
    scale = np.abs(weights).max() / 127
    return {
        "normal": rng.standard_normal((300, 9)),
        "grid": grid,
        "grid + 1e-9": grid + 1e-9 * rng.standard_normal(grid.shape),
        "int8 weights": np.round(weights / scale) * scale,
        "duplicates": np.repeat(rng.standard_normal((40, 9)), 7, axis=0),
        "offset 1e6": 1e6 + rng.standard_normal((200, 3)),
        "tiny 1e-30": 1e-30 * rng.standard_normal((200, 9)),
        "subnormal floats": 1e-42 * rng.standard_normal((100, 4)),
        "huge 1e14": 1e14 * rng.standard_normal((200, 9)),
        "1e99": 1e99 * rng.standard_normal((200, 9)),  # (the Python layer refuses |x| > 1e100)
        "1e-150": 1e-150 * rng.standard_normal((200, 9)),
        "float32 values": rng.standard_normal((300, 25)).astype(np.float32).astype(np.float64),
    }


@pytest.mark.parametrize("case", list(prefilter_cases()))
def test_float_prefilter_gives_the_all_double_chain_to_the_bit(case):
    """The centroid chain scans in float and costs again in double only the clusters the float
    costs' error bound cannot rule out: its linkage is the all-double chain's, bit for bit."""
    X = prefilter_cases()[case]
    native = native_module()
    np.testing.assert_array_equal(native._centroid_linkage(X, True),
                                  native._centroid_linkage(X, False))


def test_the_prefilter_test_hook_checks_its_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        native_module()._centroid_linkage(np.full((4, 2), np.nan), True)


def test_the_fused_formula_differs_from_the_unfused_one_somewhere():
    """Guards the test above: on this data one rounding per dimension is visible."""
    rng = np.random.default_rng(0)
    centroids, query = rng.standard_normal((200, 9)), rng.standard_normal(9)
    fused = [fused_ward_cost(c, query, 1.0, 1.0) for c in centroids]
    unfused = []
    for c in centroids:
        squared = 0.0
        for k in range(9):
            squared += (c[k] - query[k]) * (c[k] - query[k])
        unfused.append(0.5 * squared)
    assert np.count_nonzero(np.array(fused) != np.array(unfused)) > 10


# ---------------------------------------------------------------------------------------------
# precision far from the origin (issue 13, item 4)


@pytest.mark.parametrize("offset", [0.0, 1e6, 1e9, 1e12])
@pytest.mark.parametrize("d", [1, 3])
def test_offset_data_keeps_parity(offset, d):
    """Points at offset + uniform(0, 200): scipy's pairwise differences are exact there, and so
    are the engine's once it centres the data (running sums lost 1e-3 at 1e12)."""
    rng = np.random.default_rng(int(offset) % 1000 + d)
    X = offset + rng.uniform(0, 200, size=(300, d))
    R = sch.linkage(X, "ward")
    for method in methods_for(d):
        Z = ward_linkage(X, method=method)
        assert_same_dendrogram(Z, R)
        for h in untied_cut_heights(R[:, 2], count=20):
            np.testing.assert_array_equal(cut_linkage(Z, height=h), cut_linkage_ref(R, height=h))


# ---------------------------------------------------------------------------------------------
# memory (issue 13, item 3; issue 14)


LOAD_NATIVE = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("_native", {native_module().__file__!r})
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
"""


def run_native(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter with the extension loaded as ``native`` (on its own: the
    package's __init__ would import torch, seconds per run)."""
    return subprocess.run([sys.executable, "-c", LOAD_NATIVE + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_matrix_beyond_physical_memory_is_a_value_error_before_allocating():
    X = np.zeros((1, 1_000_000, 2))  # the matrix would need 8 TB
    with pytest.raises(ValueError, match="memory"):
        ward_linkage_batched(X, n_threads=1, method="matrix")


def test_failed_allocation_is_a_memory_error_not_an_abort():
    """Under an address-space limit the matrix cannot be allocated: MemoryError reaches Python
    (it used to end the process: std::bad_alloc through a target_clones function)."""
    result = run_native("""
        import resource
        import numpy as np
        X = np.random.default_rng(0).standard_normal((1, 12000, 30))
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
        try:
            native.ward_linkage_batched(X, 1, "matrix")  # needs 1.15 GB
        except MemoryError:
            print("MemoryError")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MemoryError"


def test_centroid_path_memory_is_linear_in_n():
    """8,000 points in 16-D: a matrix would take 512 MB; the centroid path takes about 1 MB
    (bench_ward.py measures 20,000 x 16 and 100,000 x 8)."""
    result = run_native("""
        import numpy as np
        def peak_kb():  # VmHWM: ru_maxrss would start from the parent's peak (kept over exec)
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        X = np.random.default_rng(0).standard_normal((1, 8000, 16))
        before = peak_kb()
        Z = native.ward_linkage_batched(X, 1)
        grown = peak_kb() - before
        assert Z.shape == (1, 7999, 4) and np.isfinite(Z).all()
        print(grown // 1024)
    """)
    assert result.returncode == 0, result.stderr
    assert 0 < int(result.stdout) < 40  # MB, output included; > 0: the measure sees the run


# ---------------------------------------------------------------------------------------------
# input checks (issue 13, items 5 and 9)


def test_single_point_linkages_can_be_cut():
    Z = ward_linkage(np.zeros((1, 3)))
    assert Z.shape == (0, 4)
    for kwargs in ({"height": 1.0}, {"n_clusters": 1}):
        np.testing.assert_array_equal(cut_linkage(Z, **kwargs), [0])
        np.testing.assert_array_equal(cut_linkage_ref(Z, **kwargs), [0])
    Zb = ward_linkage_batched(np.zeros((3, 1, 2)))
    assert Zb.shape == (3, 0, 4)
    for kwargs in ({"height": np.ones(3)}, {"n_clusters": 1}):
        np.testing.assert_array_equal(cut_linkage(Zb, **kwargs), np.zeros((3, 1)))
        np.testing.assert_array_equal(cut_linkage_ref(Zb, **kwargs), np.zeros((3, 1)))


def broken_linkages():
    Z = ward_linkage(np.random.default_rng(3).standard_normal((6, 2)))
    cases = {}
    for name, (index, value) in {
        "count column": ((2, 3), 7.0),
        "fractional id": ((0, 0), 0.5),
        "id not formed yet": ((0, 1), 6.0),
        "negative id": ((1, 0), -1.0),
        "id used twice": ((1, 0), Z[0, 0]),
        "negative height": ((0, 2), -0.1),
        "nan height": ((0, 2), np.nan),
        "inf height": ((0, 2), np.inf),
        "zero count": ((4, 3), 0.0),
    }.items():
        broken = Z.copy()
        broken[index] = value
        cases[name] = broken
    return Z, cases


@pytest.mark.parametrize("case", list(broken_linkages()[1]))
def test_both_cuts_refuse_the_same_broken_linkages(case):
    broken = broken_linkages()[1][case]
    for cut in (cut_linkage, cut_linkage_ref):
        with pytest.raises(ValueError):
            cut(broken, height=1.0)
        with pytest.raises(ValueError):
            cut(broken, n_clusters=2)


def test_both_cuts_accept_scipy_and_engine_linkages():
    X = np.random.default_rng(4).standard_normal((30, 3))
    for Z in (ward_linkage(X), sch.linkage(X, "ward"), sch.linkage(X, "single")):
        np.testing.assert_array_equal(cut_linkage(Z, n_clusters=4),
                                      cut_linkage_ref(Z, n_clusters=4))


def test_n_threads_takes_numpy_integers_and_refuses_huge_counts():
    X = np.random.default_rng(5).standard_normal((4, 20, 3))
    expected = ward_linkage_batched(X, n_threads=1)
    np.testing.assert_array_equal(ward_linkage_batched(X, n_threads=np.int64(2)), expected)
    np.testing.assert_array_equal(ward_linkage_batched(X, n_threads=np.uint8(3)), expected)
    for huge in (2**40, 2**70, np.int64(2**40)):
        with pytest.raises(ValueError, match="n_threads must be <= 65536"):
            ward_linkage_batched(X, n_threads=huge)
    with pytest.raises(TypeError, match="n_threads"):
        ward_linkage_batched(X, n_threads=True)
    with pytest.raises(TypeError, match="n_threads"):
        ward_linkage_batched(X, n_threads=2.0)


def test_bad_method():
    X = np.zeros((4, 2))
    with pytest.raises(ValueError, match="unknown method"):
        ward_linkage(X, method="fast")
    with pytest.raises(ValueError, match="1-D"):
        ward_linkage(X, method="sorted")
    with pytest.raises(TypeError, match="method"):
        ward_linkage(X, method=None)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_torch_tensors_are_accepted(dtype):
    torch = pytest.importorskip("torch")
    t = torch.randn(40, 4, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    expected = sch.linkage(t.float().numpy().astype(np.float64), "ward")
    assert_same_dendrogram(ward_linkage(t), expected)
    assert_same_dendrogram(ward_linkage_batched(t[None])[0], expected)


def test_the_raw_extension_checks_its_own_inputs():
    native = native_module()
    good = np.random.default_rng(6).standard_normal((2, 5, 3))
    Z = native.ward_linkage_batched(good, 1)
    assert Z.shape == (2, 4, 4)
    for bad in (good > 0, good.astype(complex), good.astype(object), good.astype(np.float16),
                good.tolist()):
        with pytest.raises(TypeError, match="float32 or float64 numpy array"):
            native.ward_linkage_batched(bad, 1)
    # float32 and any memory layout are read as they are (float32 -> float64 is exact)
    exact = good.astype(np.float32).astype(np.float64)
    for view in (good.astype(np.float32), np.asfortranarray(exact), exact[:, ::-1][:, ::-1],
                 np.asfortranarray(exact.astype(np.float32)).transpose(0, 1, 2)):
        np.testing.assert_array_equal(native.ward_linkage_batched(view, 1),
                                      native.ward_linkage_batched(exact, 1))
    with pytest.raises(ValueError, match="NaN or Inf, or values beyond"):
        native.ward_linkage_batched(np.where(good > 1, np.inf, good).astype(np.float32), 2)
    # any float64 dtype object (an unpickled array has its own); big-endian is converted above it
    np.testing.assert_array_equal(native.ward_linkage_batched(pickle.loads(pickle.dumps(good)), 1),
                                  Z)
    with pytest.raises(TypeError, match="float32 or float64"):
        native.ward_linkage_batched(good.astype(">f8"), 1)
    np.testing.assert_array_equal(ward_linkage_batched(good.astype(">f8"), n_threads=1), Z)
    for threads in (0, 2**40, 2**70, -1):
        with pytest.raises(ValueError, match="n_threads"):
            native.ward_linkage_batched(good, threads)
    with pytest.raises(TypeError, match="n_threads"):
        native.ward_linkage_batched(good, 1.5)
    np.testing.assert_array_equal(native.ward_linkage_batched(good, np.int64(2)), Z)
    with pytest.raises(ValueError, match="method"):
        native.ward_linkage_batched(good, 1, "nope")
    for heights in (np.array([np.nan, 1.0]), np.array([-1.0, 1.0])):
        with pytest.raises(ValueError, match="heights"):
            native.cut_linkage_height(Z, heights)
    with pytest.raises(TypeError, match="int64"):
        native.cut_linkage_maxclust(Z, np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="float64"):
        native.cut_linkage_height(Z.astype(np.float32), np.ones(2))


# ---------------------------------------------------------------------------------------------
# bounded fuzzing of the public entry points against scipy (issue 13, item 10)


def naive_check_every_merge_is_cheapest(X, Z):
    """Each merge of Z joins two clusters whose Ward cost is the smallest at that step."""
    n = len(X)
    X = X - X.mean(0)  # exact for offset data (Sterbenz), so the means below are accurate
    members = {i: [i] for i in range(n)}
    for row, (a, b, height, size) in enumerate(Z):
        keys = list(members)
        costs = []
        for i in range(len(keys)):
            for j in range(i + 1, len(keys)):
                A, B = X[members[keys[i]]], X[members[keys[j]]]
                diff = A.mean(0) - B.mean(0)
                costs.append(len(A) * len(B) / (len(A) + len(B)) * float(diff @ diff))
        A, B = X[members[int(a)]], X[members[int(b)]]
        diff = A.mean(0) - B.mean(0)
        cost = len(A) * len(B) / (len(A) + len(B)) * float(diff @ diff)
        assert cost <= min(costs) * (1 + 1e-9) + 1e-12, f"merge {row} is not a cheapest one"
        assert height == pytest.approx(np.sqrt(2 * cost), rel=1e-9, abs=1e-9)
        assert size == len(A) + len(B)
        members[n + row] = members.pop(int(a)) + members.pop(int(b))


points = st.builds(
    lambda n, d, kind, seed: (kind, make_points(n, d, kind, seed)),
    n=st.integers(1, 30),
    d=st.integers(1, 5),
    kind=st.sampled_from(["normal", "grid", "duplicates", "offset", "tiny"]),
    seed=st.integers(0, 2**32 - 1),
)


def make_points(n, d, kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "grid":  # many equal distances
        return rng.integers(0, 3, size=(n, d)).astype(np.float64)
    if kind == "duplicates":
        return rng.standard_normal((max(1, n // 3), d))[rng.integers(0, max(1, n // 3), n)]
    if kind == "offset":
        return 1e9 + rng.uniform(0, 100, size=(n, d))
    if kind == "tiny":
        return rng.standard_normal((n, d)) * 1e-6
    return rng.standard_normal((n, d))


@settings(max_examples=60, deadline=None)
@given(kind_and_points=points, method=st.sampled_from(["auto", "centroids", "matrix"]))
def test_fuzz_ward_linkage(kind_and_points, method):
    kind, X = kind_and_points
    Z = ward_linkage(X, method=method)
    assert Z.shape == (len(X) - 1, 4)
    if len(X) < 2:
        return
    naive_check_every_merge_is_cheapest(X, Z)
    if kind != "grid":  # on a grid, tied choices can lead to other (equally valid) trees
        R = sch.linkage(X, "ward")
        np.testing.assert_allclose(np.sort(Z[:, 2]), np.sort(R[:, 2]), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(kind_and_points=points)
def test_fuzz_float_prefilter(kind_and_points):
    _, X = kind_and_points
    if len(X) < 2:
        return
    native = native_module()
    np.testing.assert_array_equal(native._centroid_linkage(X, True),
                                  native._centroid_linkage(X, False))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 25), d=st.integers(1, 4), b=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1), threads=st.integers(1, 3))
def test_fuzz_ward_linkage_batched(n, d, b, seed, threads):
    X = np.random.default_rng(seed).standard_normal((b, n, d))
    Z = ward_linkage_batched(X, n_threads=threads)
    assert Z.shape == (b, n - 1, 4)
    for z, x in zip(Z, X, strict=True):
        np.testing.assert_array_equal(z, ward_linkage(x))
        if n > 1:
            assert_same_dendrogram(z, sch.linkage(x, "ward"))


@settings(max_examples=40, deadline=None)
@given(kind_and_points=points, data=st.data())
def test_fuzz_cut_linkage(kind_and_points, data):
    X = kind_and_points[1]
    Z = sch.linkage(X, "ward") if len(X) > 1 else np.empty((0, 4))
    n = len(X)
    k = data.draw(st.integers(1, n))
    np.testing.assert_array_equal(cut_linkage(Z, n_clusters=k), cut_linkage_ref(Z, n_clusters=k))
    candidates = [0.0, *Z[:, 2], *(Z[:, 2] * 1.5)] if n > 1 else [0.0, 1.0]
    h = data.draw(st.sampled_from(candidates))
    np.testing.assert_array_equal(cut_linkage(Z, height=h), cut_linkage_ref(Z, height=h))


def test_layer_cut_reads_a_transposed_float32_view_of_the_weights_without_a_copy():
    """REPrune's problems are a view of the conv weight (c_in, n, kh*kw over n, c_in, kh, kw):
    the engine reads its strides and float32 values, with the float64 copy's result."""
    from accelprune.selection import ward_problems

    weight = np.random.default_rng(8).standard_normal((48, 20, 3, 3)).astype(np.float32)
    view = ward_problems(weight)
    assert view.dtype == np.float32 and np.shares_memory(view, weight)
    copy = np.ascontiguousarray(view, dtype=np.float64)
    got, expected = ward_cut_layer(view, 20), ward_cut_layer(copy, 20)
    np.testing.assert_array_equal(got.labels, expected.labels)
    assert got.height == expected.height
    reference = ward_cut_layer(view, 20, backend="reference")
    np.testing.assert_array_equal(got.labels, reference.labels)

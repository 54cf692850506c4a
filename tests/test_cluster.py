"""Ward clustering: the native engine against scipy, on random, tied and bad input."""
import numpy as np
import pytest
import scipy.cluster.hierarchy as sch
from hypothesis import given, settings
from hypothesis import strategies as st

from accelprune import (
    cut_linkage,
    cut_linkage_ref,
    ward_linkage,
    ward_linkage_batched,
    ward_linkage_batched_ref,
    ward_linkage_ref,
)
from accelprune._backend import available, native_module
from accelprune.cluster import ward_cut_layer, ward_cut_layer_ref

pytestmark = pytest.mark.skipif(not available("native"), reason="accelprune._native not built")


def untied_cut_heights(heights, count=4):
    """Cut heights halfway between well-separated consecutive merge heights."""
    h = np.unique(heights)
    gaps = np.flatnonzero(np.diff(h) > 1e-6 * max(h[-1], 1.0))
    if not len(gaps):
        return []
    picks = gaps[np.linspace(0, len(gaps) - 1, min(count, len(gaps))).astype(int)]
    return [(h[i] + h[i + 1]) / 2 for i in picks]


def assert_same_dendrogram(Z, R):
    """Same heights (rtol 1e-9) and the same partitions at every untied cut."""
    assert Z.shape == R.shape
    np.testing.assert_allclose(Z[:, 2], R[:, 2], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(Z[:, 3], R[:, 3])
    for h in untied_cut_heights(R[:, 2]):
        np.testing.assert_array_equal(cut_linkage(Z, height=h), cut_linkage_ref(R, height=h))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 257, 600])
@pytest.mark.parametrize("d", [1, 2, 9, 49])
def test_matches_scipy_on_random_points(n, d):
    X = np.random.default_rng(n * 100 + d).standard_normal((n, d))
    Z = ward_linkage(X)
    assert Z.dtype == np.float64 and Z.shape == (n - 1, 4)
    if n == 1:
        return
    R = sch.linkage(X, "ward")
    assert_same_dendrogram(Z, R)
    # Without ties the children match too (smaller id first, scipy's ids).
    np.testing.assert_array_equal(Z[:, :2], R[:, :2])


@pytest.mark.parametrize("layout", ["float32", "fortran", "strided", "list", "torch"])
def test_accepts_any_layout_and_dtype(layout):
    X = np.random.default_rng(1).standard_normal((40, 5))
    variants = {
        "float32": lambda: X.astype(np.float32),
        "fortran": lambda: np.asfortranarray(X),
        "strided": lambda: np.repeat(X, 2, axis=1)[:, ::2],
        "list": lambda: X.tolist(),
        "torch": lambda: __import__("torch").from_numpy(X),
    }
    Y = variants[layout]()
    expected = sch.linkage(np.asarray(Y, dtype=np.float64), "ward")
    assert_same_dendrogram(ward_linkage(Y), expected)


def test_batched_equals_one_by_one_and_any_thread_count():
    X = np.random.default_rng(2).standard_normal((13, 50, 4))
    single = np.stack([ward_linkage(x) for x in X])
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(ward_linkage_batched(X, n_threads=threads), single)
    np.testing.assert_allclose(ward_linkage_batched(X, backend="reference")[..., 2], single[..., 2],
                               rtol=1e-9)


def test_one_dimensional_fast_path_large_n():
    """1x1 conv kernels: n up to 2048 scalars, with duplicates."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((3, 2048, 1))
    X[1, ::7] = 0.25  # many exact duplicates
    Z = ward_linkage_batched(X)
    for z, x in zip(Z, X, strict=True):
        assert_same_dendrogram(z, sch.linkage(x, "ward"))


def naive_ward_costs(X, clusters):
    """All pairwise Ward merge costs between the current clusters (index lists)."""
    costs = {}
    for a in range(len(clusters)):
        for b in range(a + 1, len(clusters)):
            A, B = X[clusters[a]], X[clusters[b]]
            diff = A.mean(0) - B.mean(0)
            costs[a, b] = len(A) * len(B) / (len(A) + len(B)) * float(diff @ diff)
    return costs


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_every_merge_is_a_global_minimum(d, seed):
    """Integer data, many equal distances: each merge must still be a cheapest one."""
    X = np.random.default_rng(seed).integers(0, 4, size=(40, d)).astype(np.float64)
    Z = ward_linkage(X)
    n = len(X)
    members = {i: [i] for i in range(n)}
    first_tied_choice = np.inf  # height of the first step where several pairs cost the minimum
    for row, (a, b, height, size) in enumerate(Z):
        current = list(members.values())
        costs = naive_ward_costs(X, current)
        best = min(costs.values())
        n_cheapest = sum(c <= best * (1 + 1e-9) + 1e-12 for c in costs.values())
        if best > 1e-12 and n_cheapest > 1:
            first_tied_choice = min(first_tied_choice, height)
        merged = members[int(a)] + members[int(b)]
        diff = X[members[int(a)]].mean(0) - X[members[int(b)]].mean(0)
        cost = len(members[int(a)]) * len(members[int(b)]) / len(merged) * float(diff @ diff)
        assert cost == pytest.approx(best, rel=1e-9, abs=1e-12), f"merge {row} is not a minimum"
        assert height == pytest.approx(np.sqrt(2 * cost), rel=1e-9, abs=1e-12)
        assert size == len(merged)
        del members[int(a)], members[int(b)]
        members[n + row] = merged
    # Partitions agree with scipy at untied cut heights below the first tied choice: up to there
    # the tree is unique (equal-mean clusters all merge at height 0, in whatever order); past a
    # tied choice both trees are valid Ward trees and may part ways.
    R = sch.linkage(X, "ward")
    cuts = [c for c in untied_cut_heights(R[:, 2], count=n) if c < first_tied_choice]
    assert cuts, "the instance should leave some untied cut to compare"
    for c in cuts:
        np.testing.assert_array_equal(cut_linkage(Z, height=c), cut_linkage_ref(R, height=c))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 60),
    d=st.integers(1, 6),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_parity(n, d, scale, seed):
    X = np.random.default_rng(seed).standard_normal((n, d)) * scale
    assert_same_dendrogram(ward_linkage(X), sch.linkage(X, "ward"))


# ---------------------------------------------------------------------------------------------
# cuts


@pytest.mark.parametrize("n", [2, 5, 30, 200])
def test_cut_matches_fcluster(n):
    X = np.random.default_rng(n).standard_normal((n, 3))
    R = sch.linkage(X, "ward")
    for k in sorted({1, 2, n // 2 + 1, n - 1, n}):
        labels = cut_linkage(R, n_clusters=k)
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, cut_linkage_ref(R, n_clusters=k))
        assert labels.max() + 1 == k  # untied heights: exactly k clusters
    for h in [0.0, *R[:, 2], R[-1, 2] * 2]:
        np.testing.assert_array_equal(cut_linkage(R, height=h), cut_linkage_ref(R, height=h))


def test_cut_labels_in_order_of_first_appearance():
    Z = ward_linkage(np.array([[5.0], [0.0], [5.1], [0.1]]))
    np.testing.assert_array_equal(cut_linkage(Z, n_clusters=2), [0, 1, 0, 1])


def test_cut_tied_heights_give_fewer_clusters_like_scipy():
    X = np.array([[0.0], [1.0], [10.0], [11.0]])  # two merges at exactly the same height
    Z = ward_linkage(X)
    np.testing.assert_array_equal(cut_linkage(Z, n_clusters=3), cut_linkage_ref(Z, n_clusters=3))


def test_cut_batched_with_per_problem_heights_and_counts():
    X = np.random.default_rng(4).standard_normal((6, 25, 2))
    Z = ward_linkage_batched(X)
    heights = Z[:, 10, 2] * 1.0000001
    np.testing.assert_array_equal(cut_linkage(Z, height=heights),
                                  cut_linkage_ref(Z, height=heights))
    counts = np.arange(1, 7)
    np.testing.assert_array_equal(cut_linkage(Z, n_clusters=counts),
                                  cut_linkage_ref(Z, n_clusters=counts))


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "X, message",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN or Inf"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), "NaN or Inf"),
        (np.zeros((0, 3)), "no points"),
        (np.zeros((4, 0)), "dimension 0"),
        (np.zeros(5), "2-D"),
        (np.zeros((2, 2, 2)), "2-D"),
        (np.array([[1e200, 0.0], [0.0, 1.0]]), "beyond"),
    ],
)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_bad_points_raise_value_error(X, message, backend):
    # the native paths leave the values to the engine, which checks them as it copies them in
    with pytest.raises(ValueError, match=message):
        ward_linkage(X, backend=backend)
    if X.ndim == 2 and X.shape[0] >= 2 and X.shape[1] >= 1:
        for batch in (X[None], np.stack([np.zeros_like(X), X])):  # a bad problem after a good one
            with pytest.raises(ValueError, match=message):
                ward_linkage_batched(batch, backend=backend)
            with pytest.raises(ValueError, match=message):
                ward_cut_layer(batch, 1, backend=backend)


def test_bad_dtype_raises_type_error():
    with pytest.raises(TypeError, match="numeric"):
        ward_linkage(np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(TypeError, match="numeric"):
        ward_linkage(np.ones((3, 2), dtype=complex))


def test_batched_rejects_wrong_ndim_and_empty_batch():
    with pytest.raises(ValueError, match="3-D"):
        ward_linkage_batched(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="no problems"):
        ward_linkage_batched(np.zeros((0, 4, 2)))
    with pytest.raises(ValueError, match="n_threads"):
        ward_linkage_batched(np.zeros((1, 4, 2)), n_threads=0)


def test_bad_cut_arguments():
    Z = ward_linkage(np.random.default_rng(5).standard_normal((10, 2)))
    with pytest.raises(ValueError, match="exactly one"):
        cut_linkage(Z)
    with pytest.raises(ValueError, match="exactly one"):
        cut_linkage(Z, height=1.0, n_clusters=2)
    for k in (0, 11, -1):
        with pytest.raises(ValueError, match="n_clusters"):
            cut_linkage(Z, n_clusters=k)
    with pytest.raises(TypeError, match="n_clusters"):
        cut_linkage(Z, n_clusters=2.5)
    with pytest.raises(ValueError, match="height"):
        cut_linkage(Z, height=-1.0)
    with pytest.raises(ValueError, match="4 columns"):
        cut_linkage(Z[:, :3], height=1.0)


def test_invalid_linkage_matrix_is_rejected_by_the_native_check():
    Z = ward_linkage(np.random.default_rng(6).standard_normal((6, 2)))
    broken = Z.copy()
    broken[0, 0] = 42  # a cluster that does not exist
    with pytest.raises(ValueError, match="does not exist"):
        cut_linkage(broken, height=1.0)
    reused = Z.copy()
    reused[1, :2] = reused[0, :2]  # the same clusters merged twice
    with pytest.raises(ValueError, match="twice"):
        cut_linkage(reused, n_clusters=2)


def test_inputs_are_never_modified():
    X = np.random.default_rng(7).standard_normal((5, 30, 3))
    X_copy = X.copy()
    Z = ward_linkage_batched(X)
    np.testing.assert_array_equal(X, X_copy)
    Z_copy = Z.copy()
    cut_linkage(Z, height=np.full(5, 1.0))
    cut_linkage(Z, n_clusters=3)
    np.testing.assert_array_equal(Z, Z_copy)


def test_backend_argument():
    X = np.random.default_rng(8).standard_normal((12, 2))
    np.testing.assert_allclose(ward_linkage(X, backend="reference"), ward_linkage_ref(X))
    np.testing.assert_allclose(ward_linkage(X, backend="native"), ward_linkage_ref(X), rtol=1e-9)
    with pytest.raises(ValueError, match="unknown backend"):
        ward_linkage(X, backend="gpu")
    np.testing.assert_allclose(ward_linkage_batched_ref(X[None])[0], ward_linkage_ref(X))


def test_scalar_height_applies_to_every_problem_of_a_batch():
    Z = ward_linkage_batched(np.random.default_rng(9).standard_normal((3, 20, 2)))
    np.testing.assert_array_equal(cut_linkage(Z, height=1.5),
                                  cut_linkage(Z, height=np.full(3, 1.5)))
    np.testing.assert_array_equal(cut_linkage(Z, height=np.float64(1.5)),
                                  cut_linkage_ref(Z, height=1.5))


def test_the_extension_itself_refuses_non_finite_points():
    """Direct callers of accelprune._native get an error, not a scan running past a row."""
    from accelprune._backend import native_module

    X = np.zeros((1, 4, 2))
    for bad in (np.nan, np.inf, 1e200):
        X[0, 1, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf, or values beyond"):
            native_module().ward_linkage_batched(X, 1)


# ---------------------------------------------------------------------------------------------
# REPrune's layer cut (ward_cut_layer): no linkage matrices


def tie_heavy_problems(kind, shape, seed):
    """(B, n, d) problems: normal, float32-valued, duplicated points, or an integer grid."""
    rng = np.random.default_rng(seed)
    B, n, d = shape
    if kind == "duplicates":
        base = rng.standard_normal((B, max(1, n // 4), d))
        return np.take_along_axis(base, rng.integers(0, base.shape[1], (B, n, 1)), axis=1)
    if kind == "grid":
        return rng.integers(0, 3, size=shape).astype(np.float64)
    if kind == "float32":
        return rng.standard_normal(shape).astype(np.float32).astype(np.float64)
    return rng.standard_normal(shape)


def z_route(arrays, merges):
    """The old route: native linkage matrices, then cut_linkage at the layer's height."""
    linkages = [ward_linkage_batched(a) for a in arrays]
    height = max(Z[:, merges - 1, 2].max() for Z in linkages)
    return np.concatenate([cut_linkage(Z, height=height) for Z in linkages]), height


@pytest.mark.parametrize("kind", ["normal", "float32", "duplicates", "grid"])
@pytest.mark.parametrize("shape", [(6, 2, 1), (7, 40, 1), (5, 33, 2), (4, 64, 9), (3, 50, 30)])
def test_layer_cut_matches_the_z_route_and_scipy(kind, shape):
    X = tie_heavy_problems(kind, shape, seed=shape[1] * 7 + shape[2])
    n = shape[1]
    for merges in sorted({1, n // 3 or 1, n // 2 or 1, n - 1}):
        cut = ward_cut_layer(X, merges)
        assert cut.labels.dtype == np.int32 and cut.labels.shape == (shape[0], n)
        labels, height = z_route([X], merges)
        assert cut.height == height  # the same solver: the same bits
        np.testing.assert_array_equal(cut.labels, labels)
        if kind == "grid":
            continue  # tied choices on a grid may give other, equally valid, trees than scipy's
        ref = ward_cut_layer_ref(X, merges)
        assert cut.height == pytest.approx(ref.height, rel=1e-9, abs=1e-12)
        np.testing.assert_array_equal(cut.labels, ref.labels)


@pytest.mark.parametrize("kind", ["normal", "duplicates", "grid"])
def test_layer_cut_pools_a_list_of_arrays_into_one_height(kind):
    arrays = [tie_heavy_problems(kind, (3, 24, d), seed=d) for d in (1, 9, 4)]
    for merges in (1, 7, 23):
        cut = ward_cut_layer(arrays, merges)
        labels, height = z_route(arrays, merges)
        assert cut.height == height and cut.labels.shape == (9, 24)
        np.testing.assert_array_equal(cut.labels, labels)
        if kind != "grid":
            ref = ward_cut_layer_ref(arrays, merges)
            assert cut.height == pytest.approx(ref.height, rel=1e-9, abs=1e-12)
            np.testing.assert_array_equal(cut.labels, ref.labels)
    # each array alone has its own (lower or equal) height
    assert max(ward_cut_layer(a, 7).height for a in arrays) == ward_cut_layer(arrays, 7).height


def test_layer_cut_is_the_same_with_any_thread_count_and_method():
    X = np.random.default_rng(8).standard_normal((40, 300, 1)).astype(np.float32)
    one = ward_cut_layer(X, 150, n_threads=1)
    for threads in (2, 3):
        again = ward_cut_layer(X, 150, n_threads=threads)
        assert again.height == one.height
        np.testing.assert_array_equal(again.labels, one.labels)
    for method in ("centroids", "matrix", "sorted"):
        other = ward_cut_layer(X, 150, n_threads=2, method=method)
        assert other.height == pytest.approx(one.height, rel=1e-9)
        np.testing.assert_array_equal(other.labels, one.labels)
    np.testing.assert_array_equal(ward_cut_layer(X, 150, backend="reference").labels, one.labels)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 30), d=st.integers(1, 4), b=st.integers(1, 4),
       kind=st.sampled_from(["normal", "float32", "duplicates", "grid"]),
       seed=st.integers(0, 2**32 - 1), data=st.data())
def test_fuzz_layer_cut(n, d, b, kind, seed, data):
    X = tie_heavy_problems(kind, (b, n, d), seed)
    merges = data.draw(st.integers(1, n - 1))
    cut = ward_cut_layer(X, merges, n_threads=data.draw(st.integers(1, 3)))
    labels, height = z_route([X], merges)
    assert cut.height == height
    np.testing.assert_array_equal(cut.labels, labels)
    if kind != "grid":  # on a grid, tied choices may give other, equally valid, trees than scipy's
        ref = ward_cut_layer_ref(X, merges)
        assert cut.height == pytest.approx(ref.height, rel=1e-9, abs=1e-12)
        np.testing.assert_array_equal(cut.labels, ref.labels)


def test_layer_cut_rejects_bad_input_and_leaves_input_alone():
    X = np.random.default_rng(9).standard_normal((3, 10, 2))
    before = X.copy()
    ward_cut_layer(X, 4)
    np.testing.assert_array_equal(X, before)
    for cut in (ward_cut_layer, ward_cut_layer_ref):
        for merges in (0, 10, -1):
            with pytest.raises(ValueError, match="merges"):
                cut(X, merges)
        with pytest.raises(TypeError, match="merges"):
            cut(X, 2.5)
        with pytest.raises(ValueError, match="number of points"):
            cut([X, X[:, :5]], 2)
        with pytest.raises(ValueError, match="empty list"):
            cut([], 1)
        with pytest.raises(ValueError, match="n >= 2"):
            cut(X[:, :1], 1)
        with pytest.raises(ValueError, match="3-D"):
            cut(X[0], 1)
    with pytest.raises(ValueError, match="1-D"):
        ward_cut_layer(X, 2, method="sorted")


def test_layer_cut_raw_extension_checks_its_own_inputs():
    native = native_module()
    X = np.random.default_rng(10).standard_normal((2, 6, 3))
    labels, height = native.ward_cut_layer([X, X[:1, :, :2].copy()], 3, 1)
    assert labels.shape == (3, 6) and labels.dtype == np.int32
    expected = ward_cut_layer([X, X[:1, :, :2]], 3, backend="reference")
    np.testing.assert_array_equal(labels, expected.labels)
    assert height == pytest.approx(expected.height, rel=1e-9)
    for merges in (0, 6):
        with pytest.raises(ValueError, match="merges_needed"):
            native.ward_cut_layer([X], merges, 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        native.ward_cut_layer([X.astype(np.float16)], 3, 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        native.ward_cut_layer([X, "not an array"], 3, 1)
    with pytest.raises(TypeError):
        native.ward_cut_layer(X, 3, 1)  # an array, not a list of them
    with pytest.raises(ValueError, match="NaN or Inf"):
        native.ward_cut_layer([X, np.where(X > 1, np.nan, X)], 3, 2)
    with pytest.raises(ValueError, match="number of points"):
        native.ward_cut_layer([X, X[:, :5]], 3, 1)
    with pytest.raises(ValueError, match="empty list"):
        native.ward_cut_layer([], 3, 1)
    with pytest.raises(ValueError, match="n_threads"):
        native.ward_cut_layer([X], 3, 0)

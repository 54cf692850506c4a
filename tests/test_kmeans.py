"""Tests for accelprune.kmeans: parity with the scipy reference, exactness, determinism, checks.

Shapes stay small (two shared CPU cores); the 11008 x 4096 case is benchmarks/bench_kmeans.py's.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.vq import kmeans2

from accelprune import kmeans as km
from accelprune import selection as csgd_mod
from accelprune.kmeans import kmeans, kmeans_fit, kmeans_ref, kmeans_seeds


def co_membership(labels) -> np.ndarray:
    labels = np.asarray(labels)
    return labels[:, None] == labels[None, :]


def blobs(n_centres=8, per=20, d=6, spread=50.0, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, d)) * spread
    X = np.concatenate([c + rng.normal(size=(per, d)) for c in centres])
    return X[rng.permutation(len(X))].astype(dtype)


def inertia(X, labels) -> float:
    X = np.asarray(X, dtype=np.float64)
    return float(sum(((X[labels == c] - X[labels == c].mean(0)) ** 2).sum()
                     for c in np.unique(labels)))


def is_first_appearance(labels) -> bool:
    _, first = np.unique(labels, return_index=True)
    return labels[0] == 0 and bool(np.all(np.diff(first) > 0))


def scipy_lloyd(X, seeds, iters):
    """scipy's kmeans2 from the given seed rows, ``iters`` centre updates (scipy's iter counts
    assignments: one more); also whether it kept all k clusters."""
    X64 = np.asarray(X, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="One of the clusters is empty")
        _, raw = kmeans2(X64, X64[seeds], iter=iters + 1, minit="matrix",
                         missing="warn")
    return raw, len(np.unique(raw)) == len(seeds)


# ---------------------------------------------------------------------------------------------
# parity with the reference


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [4, 8, 12])
def test_well_separated_data_same_partition_as_reference(seed, k):
    X = blobs(seed=seed)
    labels = kmeans(X, k, seed=seed, tol=0)
    np.testing.assert_array_equal(co_membership(labels), co_membership(kmeans_ref(X, k, seed=seed)))
    assert len(np.unique(labels)) == k and is_first_appearance(labels)


def test_well_separated_blobs_are_found_with_exact_kmeans_plus_plus():
    X = blobs(n_centres=8, per=20)
    truth = kmeans_ref(X, 8, seed=0, init_rounds=7)
    labels = kmeans(X, 8, seed=0, init_rounds=7)
    np.testing.assert_array_equal(co_membership(labels), co_membership(truth))
    assert np.bincount(labels).tolist() == [20] * 8   # every blob found


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 80), d=st.integers(1, 24), frac=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**31), rounds=st.sampled_from([1, 3, 16]),
       rounded=st.booleans())
def test_same_lloyd_as_scipy_from_the_same_seeds(n, d, frac, seed, rounds, rounded):
    """Where scipy keeps all k clusters, the partition is scipy's; ties (integer data) included."""
    X = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    if rounded:
        X = np.round(X * 2)
    k = max(1, round(frac * n))
    labels = kmeans(X, k, seed=seed, init_rounds=rounds, tol=0)
    assert len(np.unique(labels)) == k and is_first_appearance(labels)
    if 1 < k < n:
        seeds = kmeans_seeds(X, k, seed=seed, init_rounds=rounds)
        raw, complete = scipy_lloyd(X, seeds, 10)
        if complete and len(seeds) == k:
            np.testing.assert_array_equal(co_membership(labels), co_membership(raw))


@pytest.mark.parametrize("k", [10, 60, 150])
def test_inertia_within_tolerance_of_reference_on_unstructured_data(k):
    """On Gaussian noise Lloyd's local optima may differ (empty clusters are refilled, not kept):
    over 5 seeds the inertia is within 1 % of scipy's from the same seeds, on average not worse."""
    ratios = []
    for seed in range(5):
        X = np.random.default_rng(seed).normal(size=(300, 16)).astype(np.float32)
        ratios.append(inertia(X, kmeans(X, k, seed=seed, tol=0)) /
                      inertia(X, kmeans_ref(X, k, seed=seed)))
    assert max(ratios) < 1.01 and np.mean(ratios) <= 1.0 + 1e-6


def test_reproduces_csgd_cluster_filters_with_exact_seeding():
    """With ``init_rounds >= k - 1`` and kmeans2's default ``iter=10`` (10 assignments, 9 centre
    updates) it is today's C-SGD clustering."""
    for seed in range(6):
        X = np.random.default_rng(seed).normal(size=(64, 27))
        ours = kmeans(X, 20, seed=seed, init_rounds=19, iters=9, tol=0)
        reference = csgd_mod.cluster_filters(X, 20, seed=seed, backend="reference")
        np.testing.assert_array_equal(ours, reference)


def test_exact_seeding_picks_scipys_kmeans_plus_plus_rows():
    for seed in range(5):
        X = np.random.default_rng(seed).normal(size=(50, 7))
        seeds = kmeans_seeds(X, 12, seed=seed, init_rounds=11)
        expected = csgd_mod._kmeans_pp_centres(X, 12, np.random.default_rng(seed))
        np.testing.assert_allclose(X[seeds], expected, rtol=1e-6)   # X went through float32


def test_blocked_seeding_picks_distinct_rows_in_the_given_rounds():
    X = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    seeds = kmeans_seeds(X, 100, seed=3, init_rounds=4)
    assert len(seeds) == 100 and len(np.unique(seeds)) == 100
    np.testing.assert_array_equal(seeds, kmeans_seeds(X, 100, seed=3, init_rounds=4))


def test_cancellation_heavy_data_is_decided_in_float64():
    """Far from the origin the float32 GEMM distances are off by more than the gaps between
    centres; the float64 tie-break makes the labels scipy's (float64) anyway."""
    rng = np.random.default_rng(0)
    X = (3000.0 + rng.normal(size=(200, 8))).astype(np.float32)
    for k in (5, 40):
        labels = kmeans(X, k, seed=1, tol=0)
        seeds = kmeans_seeds(X, k, seed=1)
        raw, complete = scipy_lloyd(X, seeds, 10)
        assert complete
        np.testing.assert_array_equal(co_membership(labels), co_membership(raw))


def test_bounds_path_gives_the_same_labels_as_full_passes(monkeypatch):
    X = blobs(n_centres=30, per=10, d=5, spread=3.0, seed=2)
    fits = {}
    for fraction in (0.0, 0.5, 1.0):  # 0: always every centre, 1: moved centres and bounds
        monkeypatch.setattr(km, "_FULL_PASS_FRACTION", fraction)
        fits[fraction] = kmeans_fit(X, 40, seed=0, iters=30, tol=0)
    for fit in fits.values():
        np.testing.assert_array_equal(fit.labels, fits[0.0].labels)
        assert fit.n_iter == fits[0.0].n_iter
    assert fits[0.0].n_iter > 2  # the bounds path did have iterations to run


# ---------------------------------------------------------------------------------------------
# the result


def test_result_centres_are_the_cluster_means_and_inertia_matches():
    X = np.random.default_rng(0).normal(size=(120, 9)).astype(np.float32)
    fit = kmeans_fit(X, 30, seed=0)
    means = np.stack([X[fit.labels == c].mean(0) for c in range(30)])
    np.testing.assert_allclose(fit.centres.numpy(), means, rtol=1e-5, atol=1e-6)
    assert fit.inertia == pytest.approx(inertia(X, fit.labels), rel=1e-5)
    assert fit.centres.dtype == torch.float32 and 0 <= fit.n_iter <= 10


def test_empty_clusters_are_refilled_from_the_farthest_rows():
    """Two far duplicates of one row attract no cluster of their own in Lloyd unless refilled."""
    X = np.zeros((7, 2), dtype=np.float32)
    X[:, 0] = [0, 0, 0, 0, 10, 10, 11]
    labels = kmeans(X, 4, seed=0)
    assert len(np.unique(labels)) == 4 and is_first_appearance(labels)


def test_fewer_distinct_rows_than_k():
    X = np.repeat(np.array([[0.0, 1.0], [5.0, 5.0], [9.0, -1.0]], dtype=np.float32), 4, axis=0)
    for k in (3, 5, 12):
        labels = kmeans(X, k, seed=0)
        assert len(np.unique(labels)) == k and is_first_appearance(labels)
        for c in range(k):  # a cluster never mixes different rows
            assert len(np.unique(X[labels == c], axis=0)) == 1
    zeros = np.zeros((6, 4), dtype=np.float32)  # as cluster_filters splits them
    np.testing.assert_array_equal(kmeans(zeros, 3), csgd_mod.cluster_filters(zeros, 3))


def test_k_equal_n_and_k_equal_one():
    X = np.random.default_rng(0).normal(size=(9, 3))
    np.testing.assert_array_equal(kmeans(X, 9), np.arange(9))
    np.testing.assert_array_equal(kmeans(X, 1), np.zeros(9, dtype=np.int64))
    np.testing.assert_allclose(kmeans_fit(X, 1).centres.numpy()[0], X.mean(0), rtol=1e-5)
    np.testing.assert_array_equal(kmeans_ref(X, 9), np.arange(9))
    np.testing.assert_array_equal(kmeans_ref(X, 1), np.zeros(9, dtype=np.int64))
    np.testing.assert_array_equal(kmeans(X[:1], 1), [0])


# ---------------------------------------------------------------------------------------------
# determinism


def test_same_result_with_one_or_two_threads_and_any_batch_size():
    X = torch.from_numpy(blobs(n_centres=40, per=15, d=128, spread=2.0, seed=5))
    previous = torch.get_num_threads()
    try:
        fits = []
        for threads, batch in ((1, None), (2, None), (2, 37), (1, 1000)):
            torch.set_num_threads(threads)
            fits.append(kmeans_fit(X, 150, seed=7, init_rounds=4, batch_size=batch))
    finally:
        torch.set_num_threads(previous)
    for fit in fits[1:]:
        np.testing.assert_array_equal(fit.seeds, fits[0].seeds)
        np.testing.assert_array_equal(fit.labels, fits[0].labels)
        assert torch.equal(fit.centres, fits[0].centres)
        assert fit.inertia == fits[0].inertia


def test_deterministic_given_seed_and_input_dtype_is_computed_in_float32():
    X = np.random.default_rng(1).normal(size=(100, 6))
    a = kmeans(X, 20, seed=3)
    np.testing.assert_array_equal(a, kmeans(X, 20, seed=3))
    np.testing.assert_array_equal(a, kmeans(torch.from_numpy(X), 20, seed=3))
    np.testing.assert_array_equal(a, kmeans(X.astype(np.float32), 20, seed=3))


# ---------------------------------------------------------------------------------------------
# input checks


@pytest.mark.parametrize("fn", [kmeans, kmeans_ref, kmeans_seeds])
@pytest.mark.parametrize("X, k, exc, match", [
    (np.array([[0.0, np.nan], [1.0, 2.0]]), 1, ValueError, "NaN"),
    (np.array([[0.0, np.inf], [1.0, 2.0]]), 1, ValueError, "NaN or Inf"),
    (np.array([[1e39, 0.0], [1.0, 2.0]]), 1, ValueError, "float32"),
    (np.zeros((5, 3)), 0, ValueError, r"k must be in \[1, 5\]"),
    (np.zeros((5, 3)), 6, ValueError, r"k must be in \[1, 5\]"),
    (np.zeros((5, 3)), 2.0, TypeError, "k must be an integer"),
    (np.zeros((5, 3)), True, TypeError, "k must be an integer"),
    (np.zeros(5), 1, ValueError, "2-D"),
    (np.zeros((2, 3, 4)), 1, ValueError, "2-D"),
    (np.zeros((0, 3)), 1, ValueError, "empty"),
    (np.zeros((3, 0)), 1, ValueError, "empty"),
    (np.zeros((5, 3), dtype=np.int64), 2, TypeError, "floating-point"),
    (torch.zeros(5, 3, dtype=torch.int32), 2, TypeError, "floating-point"),
    (torch.zeros(5, 3, dtype=torch.bool), 2, TypeError, "floating-point"),
    ([[0.0, 1.0], [2.0, 3.0]], 1, TypeError, "torch.Tensor or numpy"),
])
def test_bad_input(fn, X, k, exc, match):
    with pytest.raises(exc, match=match):
        fn(X, k)


@pytest.mark.parametrize("option, value, exc", [
    ("seed", -1, ValueError), ("seed", 1.5, TypeError), ("iters", -1, ValueError),
    ("tol", -0.1, ValueError), ("tol", float("nan"), ValueError), ("init_rounds", 0, ValueError),
    ("batch_size", 0, ValueError),
])
def test_bad_options(option, value, exc):
    with pytest.raises(exc, match=option):
        kmeans(np.zeros((5, 3), dtype=np.float32), 2, **{option: value})


def test_any_numpy_layout_byte_order_and_float_width():
    X = np.random.default_rng(0).normal(size=(60, 5))
    expected = kmeans(X, 9, seed=2)
    np.testing.assert_array_equal(kmeans(X[::-1][::-1], 9, seed=2), expected)
    np.testing.assert_array_equal(kmeans(X.astype(">f8"), 9, seed=2), expected)
    np.testing.assert_array_equal(kmeans(np.asfortranarray(X), 9, seed=2), expected)
    reversed_rows = kmeans(X[::-1], 9, seed=2)  # negative strides
    assert len(np.unique(reversed_rows)) == 9
    assert len(np.unique(kmeans(X.astype(np.float16), 9))) == 9
    assert len(np.unique(kmeans(torch.from_numpy(X).to(torch.bfloat16), 9))) == 9


def test_input_never_modified():
    X = np.random.default_rng(0).normal(size=(40, 5))
    X32 = X.astype(np.float32)
    T = torch.from_numpy(X32.copy())  # float32 contiguous: used without a copy
    copies = (X.copy(), X32.copy(), T.clone())
    kmeans(X, 7)
    kmeans(X32, 7)
    fit = kmeans_fit(T, 7)
    kmeans_ref(X, 7)
    fit.centres.add_(1.0)  # the result owns its centres
    np.testing.assert_array_equal(X, copies[0])
    np.testing.assert_array_equal(X32, copies[1])
    assert torch.equal(T, copies[2])


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_cpu_on_separated_data_and_is_deterministic():
    X = torch.from_numpy(blobs(n_centres=20, per=30, d=64, spread=10.0))
    cpu = kmeans_fit(X, 20, seed=0, init_rounds=19)
    gpu = kmeans_fit(X.cuda(), 20, seed=0, init_rounds=19)
    assert gpu.centres.is_cuda
    np.testing.assert_array_equal(gpu.labels, kmeans(X.cuda(), 20, seed=0, init_rounds=19))
    np.testing.assert_array_equal(co_membership(gpu.labels), co_membership(cpu.labels))
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-5)

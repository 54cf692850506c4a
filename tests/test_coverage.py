"""Greedy maximum coverage: the Numba path against the set-based reference, and the properties
the selection must have whatever the implementation (ALGORITHMS.md section 2)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accelprune import coverage
from accelprune._backend import available
from accelprune._numba_cache import KernelsUnavailable
from accelprune.cluster import cut_linkage, ward_linkage_batched
from accelprune.coverage import CoverageResult, max_coverage, max_coverage_ref

needs_numba = pytest.mark.skipif(not available("numba"), reason="numba is not installed")


def assert_same(result: CoverageResult, expected: CoverageResult) -> None:
    np.testing.assert_array_equal(result.selected, expected.selected)
    np.testing.assert_array_equal(result.gains, expected.gains)
    assert result.covered == expected.covered
    assert result.selected.dtype == np.int64 and result.gains.dtype == np.int64


def pairs_covered(labels: np.ndarray, selected) -> int:
    """How many distinct (channel, cluster) pairs the selected filters cover."""
    return len({(j, labels[j, i]) for i in selected for j in range(labels.shape[0])})


@st.composite
def instances(draw, max_channels=8, max_filters=12):
    """Small label matrices with few clusters per channel, so that ties are everywhere."""
    c_in = draw(st.integers(1, max_channels))
    n = draw(st.integers(1, max_filters))
    n_clusters = draw(st.integers(1, 4))
    flat = draw(st.lists(st.integers(0, n_clusters - 1), min_size=c_in * n, max_size=c_in * n))
    k = draw(st.integers(1, n))
    return np.array(flat, dtype=np.int64).reshape(c_in, n), k


def ward_cut_labels(c_in: int, n: int, d: int, k: int, seed: int) -> np.ndarray:
    """REPrune's labels for one layer (ALGORITHMS.md section 3, step 2): Ward-cluster every
    channel's kernels, cut all channels at the layer-wide height of merge n - k."""
    X = np.random.default_rng(seed).standard_normal((c_in, n, d))
    Z = ward_linkage_batched(X, backend="auto")
    height = Z[:, n - k - 1, 2].max()
    return cut_linkage(Z, height=np.full(c_in, height), backend="auto")


# ---------------------------------------------------------------------------------------------
# parity with the reference


@needs_numba
@settings(max_examples=150, deadline=None)
@given(instances(), st.sampled_from(["random", "index"]), st.integers(0, 2**32))
def test_numba_equals_reference_on_small_instances(instance, tie_break, seed):
    labels, k = instance
    expected = max_coverage_ref(labels, k, tie_break=tie_break, seed=seed)
    assert_same(max_coverage(labels, k, tie_break=tie_break, seed=seed, backend="numba"), expected)
    assert_same(coverage._max_coverage_numpy(labels, k, tie_break=tie_break, seed=seed), expected)


@needs_numba
@pytest.mark.parametrize("tie_break", ["random", "index"])
@pytest.mark.parametrize(
    ("c_in", "n", "k", "n_clusters"),
    [
        (1, 1, 1, 1),
        (1, 512, 512, 300),
        (512, 1, 1, 1),
        (3, 64, 32, 20),
        (64, 256, 200, 128),
        (512, 512, 12, 256),
        (40, 96, 96, 2),  # everything covered early: the rest is decided by ties alone
    ],
)
def test_numba_equals_reference_across_shapes(c_in, n, k, n_clusters, tie_break):
    labels = np.random.default_rng(c_in * 1000 + n).integers(0, n_clusters, (c_in, n))
    expected = max_coverage_ref(labels, k, tie_break=tie_break, seed=7)
    assert_same(max_coverage(labels, k, tie_break=tie_break, seed=7, backend="numba"), expected)


@needs_numba
@pytest.mark.parametrize("tie_break", ["random", "index"])
def test_numba_equals_numpy_greedy_on_a_large_instance(tie_break):
    # k = n = 512 over 512 channels is too slow for the set-based reference; the NumPy greedy,
    # itself checked against the reference above, stands in for it
    labels = np.random.default_rng(3).integers(0, 200, (512, 512))
    expected = coverage._max_coverage_numpy(labels, 512, tie_break=tie_break, seed=1)
    assert_same(max_coverage(labels, 512, tie_break=tie_break, seed=1, backend="numba"), expected)


@needs_numba
@pytest.mark.parametrize("tie_break", ["random", "index"])
@pytest.mark.parametrize(
    ("c_in", "n", "d", "k"),
    [(1, 8, 9, 4), (16, 32, 9, 16), (64, 64, 1, 32), (96, 128, 9, 64), (32, 128, 1, 1),
     (8, 64, 9, 63)],
)
def test_numba_equals_reference_on_ward_cut_labels(c_in, n, d, k, tie_break):
    labels = ward_cut_labels(c_in, n, d, k, seed=c_in + n)
    expected = max_coverage_ref(labels, k, tie_break=tie_break, seed=3)
    assert_same(max_coverage(labels, k, tie_break=tie_break, seed=3), expected)


def tie_heavy_labels(kind: str, seed: int) -> np.ndarray:
    """Label matrices on which most steps are ties: few, large clusters (lists of 7 and more
    members take their own path in the kernels), duplicated filters, a single cluster."""
    rng = np.random.default_rng(seed)
    if kind == "two clusters":
        return rng.integers(0, 2, (6, 70))
    if kind == "three clusters, wide":
        return rng.integers(0, 3, (4, 130))
    if kind == "duplicated filters":  # every filter has 4 identical twins
        return np.repeat(rng.integers(0, 5, (7, 12)), 4, axis=1)
    return np.zeros((5, 40), dtype=np.int64)  # one cluster: every step after the first ties


TIE_HEAVY = ["two clusters", "three clusters, wide", "duplicated filters", "one cluster"]


@needs_numba
@pytest.mark.parametrize("kind", TIE_HEAVY)
@pytest.mark.parametrize("tie_break", ["random", "index"])
def test_numba_equals_reference_when_ties_dominate(kind, tie_break):
    for seed in range(3):
        labels = tie_heavy_labels(kind, seed)
        n = labels.shape[1]
        for k in (1, n // 3, n):  # k = n: the tail is decided by ties alone
            expected = max_coverage_ref(labels, k, tie_break=tie_break, seed=seed)
            assert_same(max_coverage(labels, k, tie_break=tie_break, seed=seed,
                                     backend="numba"), expected)


@needs_numba
@pytest.mark.parametrize("kind", TIE_HEAVY)
def test_tie_heavy_results_do_not_depend_on_threads_or_index_width(monkeypatch, kind):
    # 40 copies of every channel: enough channels for 3 blocks, and 40 times the gains
    base = tie_heavy_labels(kind, 4)
    labels = np.tile(base, (40, 1))
    expected = max_coverage_ref(base, base.shape[1] // 2, seed=9)
    expected = expected._replace(gains=expected.gains * 40, covered=expected.covered * 40)
    monkeypatch.setattr(coverage, "_KERNELS_PER_THREAD", 100)
    for threads in (1, 2, 3):
        assert_same(max_coverage(labels, labels.shape[1] // 2, seed=9, n_threads=threads),
                    expected)
    monkeypatch.setattr(coverage, "_UINT16_MEMBER_FILTERS", 10)  # uint32 lists
    assert_same(max_coverage(labels, labels.shape[1] // 2, seed=9, n_threads=2), expected)


# ---------------------------------------------------------------------------------------------
# properties of the selection


@needs_numba
@settings(max_examples=100, deadline=None)
@given(instances(max_channels=10, max_filters=16), st.sampled_from(["random", "index"]))
def test_selection_properties(instance, tie_break):
    labels, k = instance
    result = max_coverage(labels, k, tie_break=tie_break, seed=5)
    c_in, n = labels.shape
    assert result.selected.shape == (k,) and result.gains.shape == (k,)
    assert len(set(result.selected.tolist())) == k
    assert ((result.selected >= 0) & (result.selected < n)).all()
    assert result.gains[0] == c_in  # the first filter covers one new pair per channel
    assert (np.diff(result.gains) <= 0).all()  # coverage is submodular
    assert result.covered == result.gains.sum() == pairs_covered(labels, result.selected)
    for step in range(1, k):  # each gain is what that filter newly covered
        before = pairs_covered(labels, result.selected[:step])
        assert pairs_covered(labels, result.selected[: step + 1]) - before == result.gains[step]


@settings(max_examples=60, deadline=None)
@given(instances(max_channels=4, max_filters=7))
def test_greedy_is_within_1_minus_1_over_e_of_the_optimum(instance):
    labels, k = instance
    subsets = itertools.combinations(range(labels.shape[1]), k)
    best = max(pairs_covered(labels, subset) for subset in subsets)
    for backend in (["numba", "reference"] if available("numba") else ["reference"]):
        result = max_coverage(labels, k, backend=backend)
        assert best >= result.covered >= (1 - 1 / math.e) * best


@needs_numba
@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_ties_follow_the_documented_priority_order(backend):
    # every filter covers the same pairs: after the first step all gains are 0 and every pick is
    # a tie, so the selection is the priority order itself
    labels = np.zeros((3, 10), dtype=np.int64)
    for seed in (0, 1, 2):
        result = max_coverage(labels, 6, tie_break="random", seed=seed, backend=backend)
        priority = np.random.default_rng(seed).permutation(10)
        np.testing.assert_array_equal(result.selected, priority[:6])
        np.testing.assert_array_equal(result.gains, [3, 0, 0, 0, 0, 0])
    result = max_coverage(labels, 6, tie_break="index", backend=backend)
    np.testing.assert_array_equal(result.selected, np.arange(6))


@needs_numba
def test_random_ties_depend_on_the_seed_and_nothing_else():
    labels = np.random.default_rng(0).integers(0, 3, (4, 40))
    runs = {seed: max_coverage(labels, 20, seed=seed).selected.tolist() for seed in range(6)}
    assert len({tuple(s) for s in runs.values()}) > 1
    assert max_coverage(labels, 20, seed=4).selected.tolist() == runs[4]


@needs_numba
@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_the_best_filter_wins_over_the_tie_break(backend):
    # filter 4 is in a cluster of its own in every channel: once another filter is taken, it
    # covers 6 new pairs and every other filter at most 1, whatever the priority order says
    labels = np.zeros((6, 8), dtype=np.int64)
    labels[:, 4] = 1
    labels[0, 7] = 2
    result = max_coverage(labels, 3, tie_break="index", backend=backend)
    assert result.selected.tolist() == [0, 4, 7] and result.gains.tolist() == [6, 6, 1]
    for seed in range(5):
        result = max_coverage(labels, 3, seed=seed, backend=backend)
        if result.selected[0] not in (4, 7):
            assert result.selected[1:].tolist() == [4, 7]


# ---------------------------------------------------------------------------------------------
# inputs


@needs_numba
def test_cluster_ids_need_not_be_contiguous():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, (20, 30))
    expected = max_coverage(labels, 12)
    spread = np.array([7, 10**12, 3, 2**40, 99])
    assert_same(max_coverage(spread[labels], 12), expected)  # a different id for each cluster
    assert_same(max_coverage(labels * 1000 + 17, 12), expected)
    assert_same(max_coverage_ref(spread[labels], 12), expected)


@needs_numba
def test_accepts_other_integer_dtypes_lists_and_tensors():
    torch = pytest.importorskip("torch")
    labels = np.random.default_rng(4).integers(0, 6, (9, 17))
    expected = max_coverage(labels, 8)
    strided = np.repeat(labels, 2, axis=1)[:, ::2]
    for variant in (labels.astype(np.int32), labels.astype(np.uint8), labels.tolist(),
                    torch.from_numpy(labels), np.asfortranarray(labels), strided):
        assert_same(max_coverage(variant, 8), expected)


@needs_numba
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_input_is_not_modified(dtype, backend):
    labels = np.random.default_rng(5).integers(0, 9, (12, 20)).astype(dtype)
    views = [labels, np.asfortranarray(labels), labels[:, ::-1]]
    copies = [v.copy() for v in views]
    for view, copy in zip(views, copies, strict=True):
        max_coverage(view, 10, backend=backend)
        np.testing.assert_array_equal(view, copy)
        assert view.dtype == dtype


@needs_numba
def test_result_does_not_depend_on_thread_count(monkeypatch):
    labels = np.random.default_rng(6).integers(0, 128, (500, 256))
    monkeypatch.setattr(coverage, "_KERNELS_PER_THREAD", 1000)  # threads even on small layers
    assert len(coverage._channel_blocks(500, 256, 3)) == 3
    results = [max_coverage(labels, 128, n_threads=t) for t in (1, 2, 3, 7)]
    for result in results[1:]:
        assert_same(result, results[0])


def test_channel_blocks_cover_every_channel_once():
    for c_in, n, threads in [(1, 5, 4), (17, 10**6, 2), (500, 10**5, 3), (64, 10**6, 16)]:
        blocks = coverage._channel_blocks(c_in, n, threads)
        assert blocks[0][0] == 0 and blocks[-1][1] == c_in and len(blocks) <= threads
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
        assert all(lo % 64 == 0 for lo, _ in blocks)


@needs_numba
@pytest.mark.parametrize("limit", ["_UINT16_SLOT_FILTERS", "_UINT16_MEMBER_FILTERS"])
def test_wide_index_paths_give_the_same_result(monkeypatch, limit):
    # more than 8191 filters take uint32 slots, more than 65535 uint32 members: force those
    # paths on a small layer
    labels = np.random.default_rng(8).integers(0, 7, (30, 40))
    expected = max_coverage(labels, 25)
    monkeypatch.setattr(coverage, limit, 10)
    assert_same(max_coverage(labels, 25), expected)


def test_backends_agree_and_reference_backend_is_the_reference():
    labels = np.random.default_rng(9).integers(0, 4, (6, 15))
    expected = max_coverage_ref(labels, 9)
    assert_same(max_coverage(labels, 9, backend="reference"), expected)
    assert_same(max_coverage(labels, 9, backend="auto"), expected)


def test_result_is_a_named_tuple():
    selected, gains, covered = max_coverage([[0, 0, 1], [2, 3, 3]], 2, tie_break="index")
    assert selected.tolist() == [0, 2] and gains.tolist() == [2, 2] and covered == 4


GOOD = np.zeros((2, 3), dtype=np.int64)


@pytest.mark.parametrize("fn", [max_coverage, max_coverage_ref])
@pytest.mark.parametrize(
    ("labels", "k", "kwargs", "error", "match"),
    [
        (GOOD.astype(float), 1, {}, TypeError, "labels must be an integer array"),
        (GOOD.astype(bool), 1, {}, TypeError, "labels must be an integer array"),
        (np.array([["a", "b"]]), 1, {}, TypeError, "labels must be an integer array"),
        (np.zeros(3, dtype=np.int64), 1, {}, ValueError, "labels must be 2-D"),
        (np.zeros((1, 2, 3), dtype=np.int64), 1, {}, ValueError, "labels must be 2-D"),
        (np.zeros((0, 3), dtype=np.int64), 1, {}, ValueError, "labels is empty"),
        (np.zeros((3, 0), dtype=np.int32), 1, {}, ValueError, "labels is empty"),
        (np.array([[0, -1, 2]]), 1, {}, ValueError, "non-negative"),
        (GOOD, 0, {}, ValueError, r"k must be in \[1, 3\]"),
        (GOOD, 4, {}, ValueError, r"k must be in \[1, 3\]"),
        (GOOD, 1.0, {}, TypeError, "k must be an integer"),
        (GOOD, True, {}, TypeError, "k must be an integer"),
        (GOOD, 1, {"tie_break": "first"}, ValueError, "unknown tie_break 'first'"),
        (GOOD, 1, {"tie_break": None}, TypeError, "tie_break must be a string"),
        (GOOD, 1, {"seed": -1}, ValueError, "seed must be in"),
        (GOOD, 1, {"seed": 0.5}, TypeError, "seed must be an integer"),
    ],
)
def test_bad_input_raises_a_clear_error(fn, labels, k, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(labels, k, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backend": "cuda"}, ValueError, "unknown backend 'cuda'"),
        ({"backend": 1}, TypeError, "backend must be a string"),
        ({"n_threads": 0}, ValueError, "n_threads must be >= 1"),
    ],
)
def test_bad_options_raise_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        max_coverage(GOOD, 1, **kwargs)


def test_uint64_ids_beyond_int64_are_ids_not_negative():
    labels = np.random.default_rng(10).integers(0, 4, (5, 9))
    spread = np.array([2**63, 2**64 - 1, 7, 2**63 + 12345], dtype=np.uint64)
    expected = max_coverage_ref(labels, 5)
    assert_same(max_coverage(spread[labels], 5), expected)
    assert_same(max_coverage_ref(spread[labels], 5), expected)
    with pytest.raises(ValueError, match="minimum -5"):
        max_coverage(np.array([[0, -5, 3]]), 1)


@needs_numba
@pytest.mark.parametrize("threads", [1, 3])
def test_a_negative_int32_id_is_caught_by_the_index_build(monkeypatch, threads):
    # int32 labels are not scanned in Python on the Numba path: the index build reports it,
    # also from a thread other than the caller's
    monkeypatch.setattr(coverage, "_KERNELS_PER_THREAD", 100)
    labels = np.random.default_rng(11).integers(0, 4, (200, 30)).astype(np.int32)
    labels[150, 7] = -3
    copy = labels.copy()
    with pytest.raises(ValueError, match="non-negative cluster ids, got minimum -3"):
        max_coverage(labels, 10, n_threads=threads, backend="numba")
    np.testing.assert_array_equal(labels, copy)


@needs_numba
def test_calls_of_different_sizes_share_the_scratch_buffer_safely():
    rng = np.random.default_rng(14)
    wide, narrow = rng.integers(0, 60, (300, 200)), rng.integers(0, 3, (5, 9))
    expected = [coverage._max_coverage_numpy(wide, 90), max_coverage_ref(narrow, 4)]
    for _ in range(2):  # the narrow call reuses (part of) what the wide one wrote
        assert_same(max_coverage(wide, 90), expected[0])
        assert_same(max_coverage(narrow, 4), expected[1])
    assert coverage._scratch.buffer.size >= 300 * 200 * 4


def test_results_are_fresh_arrays_though_priority_orders_are_remembered():
    labels = np.random.default_rng(13).integers(0, 4, (6, 30))
    for backend in (["numba", "reference"] if available("numba") else ["reference"]):
        first = max_coverage(labels, 12, seed=3, backend=backend)
        first.selected[:] = 0
        first.gains[:] = 0
        assert_same(max_coverage(labels, 12, seed=3, backend=backend),
                    max_coverage_ref(labels, 12, seed=3))
    order = coverage._priority_order(30, "random", 3)
    assert not order.flags.writeable
    assert order is coverage._priority_order(30, "random", 3)
    np.testing.assert_array_equal(order, np.random.default_rng(3).permutation(30))
    wide = coverage._priority_order(10_000, "random", 3)  # not remembered: too big
    assert wide is not coverage._priority_order(10_000, "random", 3)


# ---------------------------------------------------------------------------------------------
# the compiled kernels in a fresh process: first-use cost, a damaged cache, threads

RUN_ONE = """
import json, sys, warnings
import numpy as np
from accelprune.coverage import max_coverage, max_coverage_ref
labels = np.random.default_rng(1).integers(0, 6, (48, 96)).astype(np.int32)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fast = max_coverage(labels, 40, backend="numba")
ref = max_coverage_ref(labels, 40)
print(json.dumps({"equal": fast.selected.tolist() == ref.selected.tolist(),
                  "warnings": [str(w.message) for w in caught]}))
"""


def _fresh_process(code: str, env_extra: dict) -> dict:
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, **env_extra,
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _cache_files(cache_dir, suffix):
    import pathlib

    files = sorted(p for p in pathlib.Path(cache_dir).rglob(f"*coverage*{suffix}"))
    assert files, f"no {suffix} files for accelprune.coverage in {cache_dir}"
    return files


def _truncate(path):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _flip_header(path):
    data = bytearray(path.read_bytes())
    for i in range(min(8, len(data))):
        data[i] ^= 0xA5  # the pickle's protocol header: unreadable
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def pristine_cache(tmp_path_factory):
    """A Numba cache directory written by one fresh process (compiling takes seconds)."""
    cache_dir = tmp_path_factory.mktemp("pristine") / "numba cache"
    assert _fresh_process(RUN_ONE, {"NUMBA_CACHE_DIR": str(cache_dir)}) == {
        "equal": True, "warnings": []}
    return cache_dir


@needs_numba
@pytest.mark.slow
@pytest.mark.parametrize("damage", [("truncate", ".nbi", "flip", ".nbc"),
                                    ("flip", ".nbi", "truncate", ".nbc")])
def test_a_damaged_numba_cache_is_rebuilt_with_a_warning(tmp_path, pristine_cache, damage):
    """Truncated or bit-flipped index/data files (issue 13.6): same result, a warning naming
    the directory, and the next process finds a good cache again."""
    import shutil

    cache_dir = tmp_path / "numba cache"
    shutil.copytree(pristine_cache, cache_dir)
    env = {"NUMBA_CACHE_DIR": str(cache_dir)}
    for how, suffix in (damage[:2], damage[2:]):
        for path in _cache_files(cache_dir, suffix):
            (_truncate if how == "truncate" else _flip_header)(path)
    damaged = _fresh_process(RUN_ONE, env)
    assert damaged["equal"]
    assert damaged["warnings"], damaged
    for message in damaged["warnings"]:
        assert str(cache_dir) in message and "recompiling and rewriting it" in message
    assert _fresh_process(RUN_ONE, env) == {"equal": True, "warnings": []}  # rewritten


@needs_numba
def test_unusable_numba_falls_back_to_the_same_selection(monkeypatch):
    def broken():
        raise KernelsUnavailable("compiler broken")

    monkeypatch.setattr(coverage, "_numba_kernels", broken)
    labels = np.random.default_rng(12).integers(0, 5, (10, 30))
    with pytest.warns(RuntimeWarning, match="NumPy greedy"):
        result = max_coverage(labels, 12, backend="numba")
    assert_same(result, max_coverage_ref(labels, 12))


CONCURRENT = """
import json, threading
import numpy as np
import numba
from accelprune.coverage import max_coverage, warmup
warmup()
layers = [np.random.default_rng(s).integers(0, 64, (512, 1024)).astype(np.int32) for s in range(4)]
expected = [max_coverage(labels, 300, n_threads=1).selected.tolist() for labels in layers]
results = {}
def work(t):
    for rep in range(3):
        i = (t + rep) % len(layers)
        results[(t, rep)] = max_coverage(layers[i], 300).selected.tolist() == expected[i]
threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"all_equal": all(results.values()), "calls": len(results)}))
"""


@needs_numba
@pytest.mark.slow
def test_concurrent_calls_are_safe_under_the_workqueue_layer(tmp_path):
    """Numba's workqueue layer aborts the process when two threads enter parallel regions; the
    coverage kernels use no Numba threading layer (threads are Python's), so this is safe."""
    out = _fresh_process(CONCURRENT, {"NUMBA_THREADING_LAYER": "workqueue",
                                      "NUMBA_CACHE_DIR": str(tmp_path)})
    assert out == {"all_equal": True, "calls": 12}


@needs_numba
def test_warmup_loads_the_kernels_and_is_cheap_afterwards():
    coverage.warmup()
    assert coverage._kernels is not None
    assert coverage.warmup() < 0.05


def test_read_only_labels_after_writable_ones():
    """Numba types a read-only array apart from a writable one: memory-mapped labels after an
    ordinary call still get checked machine code and the same selection."""
    labels = np.random.default_rng(3).integers(0, 6, (24, 40)).astype(np.int32)
    expected = max_coverage(labels, 15, seed=1)
    frozen = labels.copy()
    frozen.setflags(write=False)
    got = max_coverage(frozen, 15, seed=1)
    np.testing.assert_array_equal(got.selected, expected.selected)
    np.testing.assert_array_equal(got.gains, expected.gains)

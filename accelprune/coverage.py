"""Greedy maximum coverage: REPrune's filter selection (ALGORITHMS.md section 2).

``labels[j, i]`` is the cluster of filter i's kernel in input channel j. The universe is the set
of pairs (j, cluster); filter i covers exactly one pair per channel, (j, labels[j, i]). Greedy
picks, k times, the unselected filter that covers the most still-uncovered pairs.

Ties (also once everything is covered) go to the tied filter that comes first in one priority
order of the n filters: ``numpy.random.default_rng(seed).permutation(n)`` for
``tie_break="random"``, ``0, 1, ..., n-1`` for ``tie_break="index"``. Every implementation
follows this rule, so their results are equal, not just equally good.

Public functions:

* :func:`max_coverage`: dispatches to the Numba fast path (or the reference);
* :func:`max_coverage_ref`: the textbook greedy with Python sets, the oracle.

The Numba path keeps a gain vector (uncovered pairs per filter) and, when a pair is first
covered, decrements the gain of every filter in it: each pair is handled once, so a run costs
O(c_in * n + k * n) instead of the textbook O(k * (n - k) * c_in). Coverage is a bitset of
uint64 words. The index of which filters share each pair is built in parallel over channels;
the greedy loop is sequential (each step depends on the last) and touches only what changed.
The result does not depend on the thread count. ResNet-50 (53 convs, 13.4 M kernels, labels
from Ward cuts at 50%) takes about 0.1 s on two cores against ~20 s for a NumPy greedy that
recomputes every gain at every step (benchmarks/bench_coverage.py).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from accelprune._backend import resolve, thread_count
from accelprune._validation import as_int_array, check_int

__all__ = ["CoverageResult", "max_coverage", "max_coverage_ref"]

TIE_BREAKS = ("random", "index")


class CoverageResult(NamedTuple):
    """What greedy selected.

    selected: int64 (k,), filter indices in selection order.
    gains:    int64 (k,), pairs newly covered by each step (non-increasing).
    covered:  total pairs covered by the selection (= gains.sum()).
    """

    selected: np.ndarray
    gains: np.ndarray
    covered: int


# ---------------------------------------------------------------------------------------------
# input checks and the tie-break order


def _check_inputs(labels, k, tie_break, seed) -> tuple[np.ndarray, int, np.ndarray]:
    """Validated (labels: C-contiguous int32/int64 (c_in, n), k, priority order of the filters)."""
    if isinstance(labels, np.ndarray) and labels.dtype == np.int32 and labels.ndim == 2:
        arr = np.ascontiguousarray(labels)  # what cut_linkage returns: used without a copy
    else:
        arr = as_int_array(labels, "labels", ndim=2)
    if arr.size == 0:
        raise ValueError(
            f"labels is empty (shape {arr.shape}); need at least one channel and one filter")
    if arr.min() < 0:
        raise ValueError(f"labels must be non-negative cluster ids, got minimum {arr.min()}")
    n = arr.shape[1]
    k = check_int(k, "k", low=1, high=n)
    if not isinstance(tie_break, str):
        raise TypeError(f"tie_break must be a string, got {type(tie_break).__name__}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"unknown tie_break {tie_break!r}; expected one of {list(TIE_BREAKS)}")
    seed = check_int(seed, "seed", low=0)
    return arr, k, _priority_order(n, tie_break, seed)


def _priority_order(n: int, tie_break: str, seed: int) -> np.ndarray:
    """The filters in tie-break priority order (first wins a tie), int64 (n,)."""
    if tie_break == "index":
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# reference


def max_coverage_ref(labels, k, *, tie_break: str = "random", seed: int = 0) -> CoverageResult:
    """Textbook greedy maximum coverage with Python sets; the oracle for :func:`max_coverage`.

    Costs O(k * n * c_in): fine for tests, minutes for a whole ResNet-50.
    """
    labels, k, order = _check_inputs(labels, k, tie_break, seed)
    c_in, n = labels.shape
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)  # rank[i]: position of filter i in the priority order
    rows = labels.tolist()
    pairs = [{(j, rows[j][i]) for j in range(c_in)} for i in range(n)]  # what filter i covers

    covered: set = set()
    unselected = list(range(n))
    selected, gains = [], []
    for _ in range(k):
        # most newly covered pairs first; among equals, the earliest in the priority order
        best = max(unselected, key=lambda i: (len(pairs[i] - covered), -rank[i]))
        gains.append(len(pairs[best] - covered))
        covered |= pairs[best]
        unselected.remove(best)
        selected.append(best)
    return CoverageResult(np.array(selected, dtype=np.int64), np.array(gains, dtype=np.int64),
                          len(covered))


def _max_coverage_numpy(labels, k, *, tie_break: str = "random", seed: int = 0) -> CoverageResult:
    """Greedy with the gains recomputed in full by NumPy at every step: O(k * n * c_in).

    What one would write without an incremental update; kept as the benchmark's baseline and as
    a second, independent check of the fast path on shapes too big for the set-based reference.
    """
    labels, k, order = _check_inputs(labels, k, tie_break, seed)
    c_in, n = labels.shape
    # pair id of (j, labels[j, i]): dense per channel, offset by channel
    local = np.stack([np.unique(row, return_inverse=True)[1].reshape(-1) for row in labels])
    pair = local + (np.arange(c_in) * n)[:, None]
    covered = np.zeros(c_in * n, dtype=bool)
    available = np.ones(n, dtype=bool)
    selected = np.empty(k, dtype=np.int64)
    gains = np.empty(k, dtype=np.int64)
    for step in range(k):
        gain = (~covered[pair]).sum(axis=0)
        gain_in_order = np.where(available[order], gain[order], -1)
        best = order[np.argmax(gain_in_order)]  # argmax takes the first of equals: priority order
        selected[step], gains[step] = best, gain[best]
        covered[pair[:, best]] = True
        available[best] = False
    return CoverageResult(selected, gains, int(gains.sum()))


# ---------------------------------------------------------------------------------------------
# Numba fast path (compiled on first use and cached on disk; importing accelprune stays cheap)
#
# Filters are handled by their position q in the priority order (order[q] is the filter), so
# "first in priority order" is "lowest position" and the loops need no rank lookups.
#
# Layout, chosen for the caches: each pair's filters are listed contiguously in `members`
# (channel j owns the block [j*n, (j+1)*n)); a pair is named by `start`, the offset of its
# list, which is also its bit in the coverage bitset. slot[q, j] = start * 8 + size class of
# the pair that position q covers in channel j, so selecting q reads one contiguous row.
# Size classes 1.._BIG-1 are exact sizes and _BIG means "_BIG or more, size in pair_size":
# grouping newly covered pairs by size makes the decrement loops branch-predictable, which
# is most of the speed on big layers.

_TILE = 16  # channels per tile in the index build: one 64-byte line of int32 slots per row
_BIG = 7  # size classes fit in the low 3 bits of a slot
_KERNELS_PER_THREAD = 1 << 17  # about half a millisecond of index building
_INT32_SLOT_KERNELS = 1 << 28  # slots (start * 8 + class) fit in int32 up to this many kernels
_INT16_MEMBER_FILTERS = np.iinfo(np.int16).max  # positions and sizes fit in int16 up to here


def _pair_index_py(labels, order, slot, members, pair_size):
    """Build the pair index in place; parallel over tiles of channels (each owns its slots).

    labels  int32/int64 (c_in, n): non-negative cluster ids (any values).
    order   int64 (n,): the filter at each priority position.
    slot (n, c_in), members (c_in * n,), pair_size (c_in * n,): out, as described above
            (pair_size is written at each list's start only); dtypes from :func:`_index_dtypes`.
    """
    c_in, n = labels.shape
    for tile in numba.prange((c_in + _TILE - 1) // _TILE):
        j0, j1 = tile * _TILE, min(tile * _TILE + _TILE, c_in)
        tile_slots = np.empty((_TILE, n), dtype=slot.dtype)
        label = np.empty(n, dtype=np.int64)
        start = np.empty(n + 1, dtype=np.int64)
        cursor = np.empty(n, dtype=np.int64)
        for j in range(j0, j1):
            largest = 0
            for q in range(n):
                label[q] = labels[j, order[q]]
                largest = max(largest, label[q])
            if largest >= n:  # arbitrary ids: renumber into [0, n), same partition
                by_label = np.argsort(label, kind="mergesort")
                renumbered = np.empty(n, dtype=np.int64)
                c = 0
                for t in range(n):
                    if t > 0 and label[by_label[t]] != label[by_label[t - 1]]:
                        c += 1
                    renumbered[by_label[t]] = c
                label[:] = renumbered
            # counting sort of the positions by label: pair c's list is start[c]:start[c + 1]
            start[:] = 0
            for q in range(n):
                start[label[q] + 1] += 1
            for c in range(n):
                start[c + 1] += start[c]
            base = j * n
            for c in range(n):
                if start[c + 1] > start[c]:
                    pair_size[base + start[c]] = start[c + 1] - start[c]
            cursor[:] = start[:n]
            for q in range(n):
                c = label[q]
                members[base + cursor[c]] = q
                cursor[c] += 1
                size_class = min(start[c + 1] - start[c], _BIG)
                tile_slots[j - j0, q] = (base + start[c]) * 8 + size_class
        for q in range(n):  # row q receives the tile's channels as one contiguous run
            for j in range(j0, j1):
                slot[q, j] = tile_slots[j - j0, q]


def _greedy_py(slot, members, pair_size, k):
    """The greedy loop with incremental gains, on the pair index (positions, not filters).

    Returns selected positions, gains (int64 (k,)) and the number of covered pairs.
    """
    n, c_in = slot.shape
    one = np.uint64(1)
    gain = np.full(n, c_in, dtype=np.int64)  # uncovered pairs per position; < 0 once taken
    covered = np.zeros((c_in * n + 63) // 64, dtype=np.uint64)  # bit `start`: that pair
    new_pairs = np.empty((_BIG + 1, c_in), dtype=np.int64)  # this step's, by size class
    n_new = np.zeros(_BIG + 1, dtype=np.int64)
    selected = np.empty(k, dtype=np.int64)
    gains = np.empty(k, dtype=np.int64)
    bound = c_in  # gains only decrease, so the last step's gain bounds this step's best
    total = 0
    for step in range(k):
        best, best_gain = -1, -1
        for q in range(n):  # lowest position among the maxima = first in priority order
            if gain[q] > best_gain:
                best, best_gain = q, gain[q]
                if best_gain == bound:  # nothing later can beat it
                    break
        gain[best] = -1  # taken
        selected[step] = best
        gains[step] = best_gain
        bound = best_gain
        total += best_gain
        if best_gain == 0:
            continue
        # mark best's pairs covered and collect the new ones, without data-dependent branches
        n_new[:] = 0
        for j in range(c_in):
            entry = slot[best, j]
            start, size_class = entry >> 3, entry & 7
            word, bit = start >> 6, one << np.uint64(start & 63)
            is_new = (covered[word] & bit) == 0
            covered[word] |= bit
            new_pairs[size_class, n_new[size_class]] = start
            n_new[size_class] += is_new
        # every filter of a newly covered pair loses it (size 1: only best itself, taken)
        for size in range(2, _BIG):
            for t in range(n_new[size]):
                first = new_pairs[size, t]
                for u in range(first, first + size):
                    gain[members[u]] -= 1
        for t in range(n_new[_BIG]):
            first = new_pairs[_BIG, t]
            for u in range(first, first + pair_size[first]):
                gain[members[u]] -= 1
    return selected, gains, total


@functools.cache
def _numba_kernels():
    # numba is imported here, on first use, and bound as a module global because the kernels
    # above refer to numba.prange
    global numba
    import numba

    pair_index = numba.njit(cache=True, parallel=True, nogil=True)(_pair_index_py)
    greedy = numba.njit(cache=True, nogil=True)(_greedy_py)
    return pair_index, greedy


def _index_dtypes(c_in: int, n: int) -> tuple[type, type]:
    """The narrowest dtypes for (slot, members and pair_size): smaller index, fewer cache misses."""
    slot_dtype = np.int32 if c_in * n <= _INT32_SLOT_KERNELS else np.int64
    member_dtype = np.int16 if n <= _INT16_MEMBER_FILTERS else np.int32
    return slot_dtype, member_dtype


def _max_coverage_numba(labels: np.ndarray, k: int, order: np.ndarray,
                        n_threads: int) -> CoverageResult:
    """Fast path on validated input (see :func:`_check_inputs`)."""
    pair_index, greedy = _numba_kernels()
    c_in, n = labels.shape
    slot_dtype, member_dtype = _index_dtypes(c_in, n)
    slot = np.empty((n, c_in), dtype=slot_dtype)
    members = np.empty(c_in * n, dtype=member_dtype)
    pair_size = np.empty(c_in * n, dtype=member_dtype)
    # a thread per _KERNELS_PER_THREAD kernels at most: below that, starting threads costs more
    # than it saves (and much more when the cores are busy with other work)
    threads = min(n_threads, numba.config.NUMBA_NUM_THREADS, -(-c_in * n // _KERNELS_PER_THREAD))
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        pair_index(labels, order, slot, members, pair_size)
    finally:
        numba.set_num_threads(previous)
    positions, gains, covered = greedy(slot, members, pair_size, k)
    return CoverageResult(order[positions], gains, int(covered))


# ---------------------------------------------------------------------------------------------
# public API


def max_coverage(labels, k, *, tie_break: str = "random", seed: int = 0, backend: str = "auto",
                 n_threads: int | None = None) -> CoverageResult:
    """Pick ``k`` filters by greedy maximum coverage of (channel, cluster) pairs.

    labels: integer array (c_in, n) (numpy, list or CPU tensor); ``labels[j, i]`` is the cluster
        of filter i in input channel j. Ids need not be contiguous; they must be >= 0. Never
        modified.
    k: how many filters to select, 1 <= k <= n.
    tie_break: "random" (default; the paper's random choice among ties, seeded by ``seed``) or
        "index" (lowest index). See the module docstring for the exact rule.
    backend: "auto" | "numba" | "reference".
    n_threads: threads for the parallel part of the Numba path (default: all cores); the result
        does not depend on it, and Numba's thread count is restored afterwards.

    Returns a :class:`CoverageResult` (selected, gains, covered).
    """
    labels, k, order = _check_inputs(labels, k, tie_break, seed)
    threads = thread_count(n_threads)
    if resolve(backend, fast="numba") == "reference":
        return max_coverage_ref(labels, k, tie_break=tie_break, seed=seed)
    return _max_coverage_numba(labels, k, order, threads)

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
uint64 words. The index of which filters share each pair is built by threads over blocks of
channels (one counting sort per channel); the greedy loop is sequential (each step depends on
the last) and touches only what changed. The result does not depend on the thread count.
A small layer's call is a few tens of microseconds: kernel signatures and priority orders are
remembered, the index is built in a buffer each calling thread keeps, and the sign of int32 ids
is checked inside the index pass. benchmarks/bench_coverage.py compares it with a NumPy greedy
that recomputes every gain at every step, on the labels of every conv of ResNet-50 and VGG-16.
"""
from __future__ import annotations

import concurrent.futures
import functools
import itertools
import threading
import time
import warnings
from typing import NamedTuple

import numpy as np

from accelprune._backend import available, resolve, thread_count
from accelprune._numba_cache import KernelsUnavailable, load_or_repair
from accelprune._validation import as_int_array, check_int

__all__ = ["CoverageResult", "max_coverage", "max_coverage_ref", "warmup"]

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


def _check_inputs(labels, k, tie_break, seed, *, sign_checked_later: bool = False
                  ) -> tuple[np.ndarray, int, np.ndarray]:
    """Validated (labels: C-contiguous int32 (c_in, n), or int64 when ids need it; k; priority
    order of the filters, read-only).

    ``sign_checked_later``: int32 labels are not scanned for negative ids here, because the
    Numba index build does it in the pass it makes anyway (and raises the same error).
    """
    if isinstance(labels, np.ndarray) and labels.dtype == np.int32 and labels.ndim == 2:
        arr = np.ascontiguousarray(labels)  # what cut_linkage returns: used without a copy
        if arr.size and not sign_checked_later and arr.min() < 0:
            raise ValueError(f"labels must be non-negative cluster ids, got minimum {arr.min()}")
    else:
        arr = _as_label_array(labels)
    if arr.size == 0:
        raise ValueError(
            f"labels is empty (shape {arr.shape}); need at least one channel and one filter")
    n = arr.shape[1]
    k = check_int(k, "k", low=1, high=n)
    if not isinstance(tie_break, str):
        raise TypeError(f"tie_break must be a string, got {type(tie_break).__name__}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"unknown tie_break {tie_break!r}; expected one of {list(TIE_BREAKS)}")
    seed = check_int(seed, "seed", low=0)
    return arr, k, _priority_order(n, tie_break, seed)


def _as_label_array(labels) -> np.ndarray:
    """Any integer labels as int32 (int64 when an id exceeds int32), checked non-negative.

    uint64 ids of 2**63 and more do not fit int64: those rows are renumbered (ids in order of
    value, per channel), which keeps every channel's partition and so the result.
    """
    if hasattr(labels, "detach") and hasattr(labels, "cpu"):  # torch.Tensor
        labels = labels.detach().cpu().numpy()
    raw = np.asarray(labels)
    if raw.dtype == np.uint64 and raw.ndim == 2 and raw.size and raw.max() > np.iinfo(np.int64).max:
        raw = np.stack([np.unique(row, return_inverse=True)[1].reshape(-1) for row in raw])
    arr = as_int_array(raw, "labels", ndim=2)
    if arr.size:
        low, high = arr.min(), arr.max()
        if low < 0:
            raise ValueError(f"labels must be non-negative cluster ids, got minimum {low}")
        if high <= np.iinfo(np.int32).max:
            arr = arr.astype(np.int32)  # one kernel signature for (almost) every input
    return arr


def _priority_order(n: int, tie_break: str, seed: int) -> np.ndarray:
    """The filters in tie-break priority order (first wins a tie), int64 (n,), read-only.

    Orders of up to 8192 filters (64 KB) are remembered: a pruner calls once per layer with one
    seed and a few distinct widths, and seeding a generator costs more than a small layer's
    whole greedy.
    """
    make = _remembered_order if n <= 8192 else _remembered_order.__wrapped__
    return make(n, tie_break, seed)


@functools.lru_cache(maxsize=64)
def _remembered_order(n: int, tie_break: str, seed: int) -> np.ndarray:
    if tie_break == "index":
        order = np.arange(n, dtype=np.int64)
    else:
        order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    order.flags.writeable = False  # shared between calls
    return order


def _rank(order: np.ndarray) -> np.ndarray:
    """rank[i]: the position of filter i in the priority order."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


# ---------------------------------------------------------------------------------------------
# reference


def max_coverage_ref(labels, k, *, tie_break: str = "random", seed: int = 0) -> CoverageResult:
    """Textbook greedy maximum coverage with Python sets; the oracle for :func:`max_coverage`.

    Costs O(k * n * c_in): fine for tests, minutes for a whole ResNet-50.
    """
    labels, k, order = _check_inputs(labels, k, tie_break, seed)
    c_in, n = labels.shape
    rank = _rank(order)
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
# list, which is also its bit in the coverage bitset. slot[q, j] = (start - j*n) * 8 + size
# class of the pair that position q covers in channel j (offsets within the channel's block
# keep slots in uint16 up to 8191 filters), so selecting q reads one contiguous row.
# Size classes 1.._BIG-1 are exact sizes and _BIG means "_BIG or more": such a list ends at the
# member with the top bit (_last) set. Grouping newly covered pairs by size makes the decrement
# loops branch-predictable, which is most of the speed on big layers.
#
# The kernels are serial and release the GIL; the index build is split between Python threads
# by blocks of channels (each call owns its channels), so no Numba threading layer is involved:
# concurrent calls are safe under every layer (workqueue aborts on concurrent parallel
# regions), there is no thread count to set and restore, and compiling is faster.

_TILE = 16  # channels per tile in the index build: 32 bytes of each uint16 slot row
_BIG = 7  # size classes fit in the low 3 bits of a slot
_KERNELS_PER_THREAD = 1 << 17  # ~0.3 ms of index building; handing a block over costs ~0.04 ms
_UINT16_SLOT_FILTERS = (np.iinfo(np.uint16).max + 1) // 8 - 1  # local slots fit in uint16
_UINT16_MEMBER_FILTERS = np.iinfo(np.int16).max  # positions fit in uint16 beside the _last bit
# Indices are unsigned in the kernels: Numba wraps a negative signed index around (a sign test
# and an add per access), which cost a third of the index build. Mixing uint64 and int64 makes
# Numba compute in float64, hence these typed constants.
_U1, _U3, _U6, _U7, _U63 = (np.uint64(v) for v in (1, 3, 6, 7, 63))


def _pair_index_py(labels, rank, j_begin, j_end, slot, members):
    """Build the pair index of channels ``j_begin .. j_end`` in place; returns 0, or -1 when a
    cluster id is negative (the caller raises; checking here saves a pass over the labels).

    labels  uint32/uint64 (c_in, n): the cluster ids viewed as unsigned, so that a negative id
            reads as a huge one (top bit set).
    rank    uint64 (n,): the priority position of each filter (inverse of the order).
    slot (n, c_in), members (c_in * n,): out, as described above; dtypes from
            :func:`_index_dtypes`.

    Each channel is one counting sort of its filters by cluster id, reading the labels row in
    filter order (contiguous) and scattering positions through ``rank``. Slots are gathered per
    tile of _TILE channels, position-major (``tile[q]`` is position q's run of slots), so that
    each slot row receives the tile as one contiguous copy.
    """
    n = labels.shape[1]
    un = np.uint64(n)
    last = members.dtype.type(1) << members.dtype.type(8 * members.itemsize - 1)
    sign = labels.dtype.type(1) << labels.dtype.type(8 * labels.itemsize - 1)
    tile = np.empty((n, _TILE), dtype=slot.dtype)
    renumbered = np.empty(n, dtype=labels.dtype)
    start = np.empty(n + 1, dtype=np.uint64)  # per cluster: its list's start, then its cursor
    code = np.empty(n, dtype=np.uint64)  # per cluster: its slot value
    big_ends = np.empty(n, dtype=np.uint64)  # the last member of each list of _BIG or more
    for j0 in range(j_begin, j_end, _TILE):
        width, uj0 = min(_TILE, j_end - j0), np.uint64(j0)
        for jj in range(width):
            ids = labels[j0 + jj]
            largest = ids[0]
            for i in range(n):
                largest = max(largest, ids[i])
            if np.uint64(largest) < un:
                n_ids = np.int64(largest) + 1
            elif largest & sign:
                return -1
            else:  # arbitrary ids: renumber into [0, n), same partition
                by_id = np.argsort(ids, kind="mergesort")
                c = 0
                for t in range(n):
                    if t > 0 and ids[by_id[t]] != ids[by_id[t - 1]]:
                        c += 1
                    renumbered[by_id[t]] = c
                ids, n_ids = renumbered, c + 1
            # counting sort: cluster c's list is start[c]:start[c + 1] of this channel's block
            start[: n_ids + 1] = 0
            for i in range(n):
                start[ids[i] + _U1] += _U1
            base, n_big = (uj0 + np.uint64(jj)) * un, 0
            for c in range(n_ids):
                size = start[c + 1]
                start[c + 1] += start[c]
                code[c] = (start[c] << _U3) | min(size, _U7)
                if size >= _U7:  # rare: a branch is cheaper than a store every time
                    big_ends[n_big] = base + start[c + 1] - _U1
                    n_big += 1
            for i in range(n):
                c, q = ids[i], rank[i]
                members[base + start[c]] = q
                start[c] += _U1
                tile[q, jj] = code[c]
            for t in range(n_big):
                members[big_ends[t]] |= last
        for q in range(n):  # row q receives the tile's channels as one contiguous run
            slot_row = slot[q]
            for jj in range(width):
                slot_row[uj0 + np.uint64(jj)] = tile[q, jj]
    return 0


def _greedy_py(slot, members, k):
    """The greedy loop with incremental gains, on the pair index (positions, not filters).

    Returns selected positions, gains (int64 (k,)) and the number of covered pairs.
    """
    n, c_in = slot.shape
    un, uc = np.uint64(n), np.uint64(c_in)
    last = members.dtype.type(1) << members.dtype.type(8 * members.itemsize - 1)
    gain = np.full(n, c_in, dtype=np.int64)  # uncovered pairs per position; < 0 once taken
    covered = np.zeros((c_in * n + 63) // 64, dtype=np.uint64)  # bit `start`: that pair
    # this step's newly covered pairs, by size class s in new_pairs[s * c_in:], up to end[s]
    new_pairs = np.zeros((_BIG + 1) * c_in, dtype=np.uint64)
    end = np.empty(_BIG + 1, dtype=np.uint64)
    selected = np.empty(k, dtype=np.int64)
    gains = np.empty(k, dtype=np.int64)
    # The best is the lowest position with the largest gain (first in priority order). Gains
    # only decrease, so the last step's gain bounds this step's, and no position before the last
    # best has reached the bound since (it would have been picked): the search for another at
    # the bound resumes after the last best, and only when none is left is the maximum found
    # again over all positions.
    bound, resume = c_in, 0
    total = 0
    for step in range(k):
        best = -1
        for q in range(resume, n):
            if gain[q] == bound:
                best = q
                break
        if best < 0:
            best_gain = -1
            for q in range(n):
                if gain[q] > best_gain:
                    best, best_gain = q, gain[q]
            bound = best_gain
        best_gain = bound
        resume = best + 1
        gain[best] = -1  # taken
        selected[step] = best
        gains[step] = best_gain
        total += best_gain
        if best_gain == 0:
            continue
        # mark best's pairs covered and collect the new ones, without data-dependent branches
        for size in range(_BIG + 1):
            end[size] = np.uint64(size) * uc
        slot_row = slot[best]
        for j in range(c_in):
            entry = np.uint64(slot_row[j])
            start, size_class = np.uint64(j) * un + (entry >> _U3), entry & _U7
            word, bit = start >> _U6, _U1 << (start & _U63)
            is_new = (covered[word] & bit) == 0
            covered[word] |= bit
            new_pairs[end[size_class]] = start
            end[size_class] += np.uint64(is_new)
        # every filter of a newly covered pair loses it (size 1: only best itself, taken)
        for size in range(2, _BIG):
            for t in range(np.uint64(size) * uc, end[size]):
                first = new_pairs[t]
                for u in range(first, first + np.uint64(size)):
                    gain[members[u]] -= 1
        for t in range(np.uint64(_BIG) * uc, end[_BIG]):
            u = new_pairs[t]
            while True:  # up to the marked last member
                member = members[u]
                gain[member & ~last] -= 1
                if member & last:
                    break
                u += _U1
    return selected, gains, total


def _index_dtypes(c_in: int, n: int) -> tuple[type, type]:
    """The narrowest dtypes for (slot, members): smaller index, fewer cache misses.

    Unsigned: Numba then indexes with them without a negative-index check.
    """
    slot_dtype = np.uint16 if n <= _UINT16_SLOT_FILTERS else np.uint32
    member_dtype = np.uint16 if n <= _UINT16_MEMBER_FILTERS else np.uint32
    return slot_dtype, member_dtype


_LOAD_LOCK = threading.RLock()  # one thread loads, compiles or repairs the kernels at a time
_POOL_LOCK = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_kernels: tuple | None = None  # (pair_index, greedy) once checked
_compiled: set = set()  # (kernel, argument dtypes) that have machine code: see _ready


def _new_kernels():
    import numba

    pair_index = numba.njit(cache=True, nogil=True)(_pair_index_py)
    greedy = numba.njit(cache=True, nogil=True)(_greedy_py)
    return pair_index, greedy


def _self_check(kernels) -> None:
    """Run a small instance of the common signature and compare with the NumPy greedy.

    Loading from Numba's cache happens here, and a damaged cache file shows up either as an
    exception (UnpicklingError, EOFError, LLVM errors) or, in principle, as wrong machine code;
    both are caught.
    """
    labels = np.random.default_rng(0).integers(0, 5, (20, 40)).astype(np.int32)
    order = _priority_order(40, "random", 0)
    got = _run_kernels(kernels, labels, 25, order, 1)
    expected = _max_coverage_numpy(labels, 25, tie_break="random", seed=0)
    if not (np.array_equal(got.selected, expected.selected)
            and np.array_equal(got.gains, expected.gains)):
        raise RuntimeError("the kernels' results differ from the NumPy greedy")


def _numba_kernels():
    """The two kernels as checked Numba dispatchers, created on first use.

    When loading them fails, or they fail the self-check, the cache is repaired (a warning
    naming its directory, then a recompile; see :mod:`accelprune._numba_cache`), and as a last
    resort :class:`KernelsUnavailable` is raised (:func:`max_coverage` then falls back, with a
    warning).
    """
    global _kernels
    if _kernels is not None:
        return _kernels
    with _LOAD_LOCK:
        if _kernels is None:
            _kernels = load_or_repair(_new_kernels, _self_check, "accelprune.coverage",
                                      stacklevel=3)
        return _kernels


def _ready(kernel, args) -> None:
    """Make sure ``kernel`` has machine code for ``args``' types (a signature other than the
    checked one: wide index dtypes, int64 ids), repairing a damaged cache as above.

    Typing the arguments costs tens of microseconds, more than a small layer's whole run: a
    signature is looked up once, then remembered by its arrays' dtypes and writability (what
    varies: arrays are C-contiguous, the other arguments ints; Numba types a read-only array,
    e.g. memory-mapped labels, apart from a writable one)."""
    key = (kernel, *((a.dtype.char, a.flags.writeable) for a in args
                     if isinstance(a, np.ndarray)))
    if key in _compiled:
        return
    import numba

    signature = tuple(numba.typeof(a) for a in args)
    with _LOAD_LOCK:
        if signature not in kernel.overloads:
            load_or_repair(lambda: (kernel,), lambda kernels: kernel.compile(signature),
                           "accelprune.coverage", stacklevel=5)
        _compiled.add(key)


def _thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _POOL_LOCK:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=thread_count(None), thread_name_prefix="accelprune-coverage")
        return _pool


def _channel_blocks(c_in: int, n: int, n_threads: int) -> list[tuple[int, int]]:
    """Split the channels into at most ``n_threads`` blocks, one per thread, with at least
    _KERNELS_PER_THREAD kernels each (below that a thread costs more than it saves). Blocks
    start at multiples of 64 channels, so that two threads never write one cache line of a
    slot row."""
    align = 4 * _TILE
    units = -(-c_in // align)
    blocks = max(1, min(n_threads, c_in * n // _KERNELS_PER_THREAD, units))
    bounds = [min(c_in, (units * b // blocks) * align) for b in range(blocks + 1)]
    return [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def _build_index(pair_index, labels, rank, slot, members, n_threads) -> None:
    c_in, n = labels.shape
    blocks = _channel_blocks(c_in, n, n_threads)
    ids = labels.view(np.uint32 if labels.itemsize == 4 else np.uint64)  # unsigned: see _U1
    rank = rank.view(np.uint64)
    _ready(pair_index, (ids, rank, 0, c_in, slot, members))
    if len(blocks) == 1:
        status = pair_index(ids, rank, 0, c_in, slot, members)
    else:  # the kernel releases the GIL; this thread builds the first block itself
        futures = [_thread_pool().submit(pair_index, ids, rank, lo, hi, slot, members)
                   for lo, hi in blocks[1:]]
        status = min([pair_index(ids, rank, *blocks[0], slot, members)]
                     + [future.result() for future in futures])
    if status < 0:
        raise ValueError(
            f"labels must be non-negative cluster ids, got minimum {labels.min()}")


_scratch = threading.local()  # per calling thread: the buffer the pair index is built in
_SCRATCH_MAX_BYTES = 64 << 20  # larger indexes get fresh memory, not kept


def _index_arrays(c_in: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Uninitialised slot (n, c_in) and members (c_in * n,) arrays for one call.

    They live in a buffer kept by the calling thread (grown, never shrunk; 8 MB for ResNet-50)
    because fresh pages come zero-filled from the OS, which cost 7% of a ResNet-50 pass. Each
    call overwrites all of both before reading them, and returns neither.
    """
    slot_dtype, member_dtype = _index_dtypes(c_in, n)
    slot_bytes = -(-n * c_in * np.dtype(slot_dtype).itemsize // 64) * 64  # members: aligned
    size = slot_bytes + c_in * n * np.dtype(member_dtype).itemsize
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(size, dtype=np.uint8)
        if size <= _SCRATCH_MAX_BYTES:
            _scratch.buffer = buffer
    slot = buffer[:slot_bytes].view(slot_dtype)[: n * c_in].reshape(n, c_in)
    return slot, buffer[slot_bytes:size].view(member_dtype)


def _run_kernels(kernels, labels, k, order, n_threads) -> CoverageResult:
    pair_index, greedy = kernels
    c_in, n = labels.shape
    rank = _rank(order)
    slot, members = _index_arrays(c_in, n)
    _build_index(pair_index, labels, rank, slot, members, n_threads)
    _ready(greedy, (slot, members, k))
    positions, gains, covered = greedy(slot, members, k)
    return CoverageResult(order[positions], gains, int(covered))


def _max_coverage_numba(labels: np.ndarray, k: int, order: np.ndarray,
                        n_threads: int) -> CoverageResult:
    """Fast path on validated input (see :func:`_check_inputs`; the index build checks the
    sign of int32 ids, which _check_inputs leaves to it)."""
    return _run_kernels(_numba_kernels(), labels, k, order, n_threads)


def warmup() -> float:
    """Load (or, the first time on a machine, compile) the Numba kernels now; returns seconds.

    The first :func:`max_coverage` call of a process otherwise pays this inside the call:
    loading Numba's on-disk cache takes about 0.1-0.3 s, compiling (empty cache) a few seconds.
    Call it where a one-off pause is harmless (e.g. when a pruner is built), so that timed
    pruning events measure the algorithm. It also checks the kernels on a small instance and
    repairs a damaged cache (see :func:`max_coverage`). Costs microseconds once done; a no-op
    without Numba.
    """
    t0 = time.perf_counter()
    if available("numba"):
        try:
            _numba_kernels()
        except KernelsUnavailable:
            pass  # max_coverage warns and falls back when it is called
    return time.perf_counter() - t0


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
    n_threads: threads for building the pair index on the Numba path (default: all cores;
        small layers use one); the result does not depend on it. Calls from several threads at
        once are safe (no Numba threading layer is used, so also under ``workqueue``).

    The first call in a process loads the compiled kernels from Numba's cache (or compiles
    them); :func:`warmup` does that ahead of time. A damaged cache is recompiled and rewritten
    with a RuntimeWarning naming its directory; if Numba cannot compile at all, the NumPy greedy
    gives the same selection, with a warning.

    Returns a :class:`CoverageResult` (selected, gains, covered).
    """
    fast = resolve(backend, fast="numba") == "numba"
    labels, k, order = _check_inputs(labels, k, tie_break, seed, sign_checked_later=fast)
    threads = thread_count(n_threads)
    if not fast:
        return max_coverage_ref(labels, k, tie_break=tie_break, seed=seed)
    try:
        return _max_coverage_numba(labels, k, order, threads)
    except KernelsUnavailable as exc:
        # same selection, by the NumPy greedy (exact, and far faster than the set reference)
        warnings.warn(f"accelprune.coverage: Numba kernels unavailable ({exc}); using the NumPy "
                      "greedy (same result, slower)", RuntimeWarning, stacklevel=2)
        return _max_coverage_numpy(labels, k, tie_break=tie_break, seed=seed)

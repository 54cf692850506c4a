"""The fused CPU pass of the C-SGD transform (Numba), used by :func:`~.csgd.csgd_transform_`.

Per cluster H of a param's rows, in one visit of its rows: sum ``G − ε·W`` over H into a row
buffer, scale to the mean, then write ``G'_a = mean_H(G − ε·W) + (η + ε)·W_a`` for every row a
of H. The cluster's rows are read twice but the second read hits the cache (a few rows of a
few KB), so memory sees W and G read once and G written once: the O(n·F) minimum. The torch
segment form moves about three times that (index_add_ tables, gathers, a separate axpy).

Clusters are independent, so the work is split between Python threads by ranges of clusters
(the kernel releases the GIL); each cluster's arithmetic is the same whichever thread runs it,
so the result does not depend on the thread count. float32 params accumulate in float32 (as
the Triton kernel does), float64 in float64; float16/bfloat16 params take the torch path.

Numba is imported on first use, and the kernel is compiled once per dtype and cached on disk.
"""
from __future__ import annotations

import concurrent.futures
import functools
import threading

import numpy as np
import torch

from accelprune._backend import available as backend_available
from accelprune._backend import thread_count
from accelprune._numba_cache import KernelsUnavailable, load_or_repair

SUPPORTED = (torch.float32, torch.float64)
_WORK_PER_THREAD = 1 << 18  # elements: below this a thread costs more than it saves

_pool_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _segment_pass_py(W, G, rows, bounds, inv_size, c0, c1, eta, eps):
    """G'[a] = mean_H(G − ε·W) + (η + ε)·W[a] for the clusters c0 .. c1 (in place on G).

    W, G   (n, F) float32/float64, C-contiguous; rows (n,) int64 the row indices grouped by
    cluster; bounds (k + 1,) int64 cluster c's rows are rows[bounds[c]:bounds[c + 1]];
    inv_size (k,) 1/|H| and eta, eps scalars, all of W's dtype (the arithmetic stays in it).
    """
    F = W.shape[1]
    centre = np.empty(F, dtype=W.dtype)
    scale = eta + eps
    for c in range(c0, c1):
        lo, hi = bounds[c], bounds[c + 1]
        r = rows[lo]
        for f in range(F):
            centre[f] = G[r, f] - eps * W[r, f]
        for t in range(lo + 1, hi):
            r = rows[t]
            for f in range(F):
                centre[f] += G[r, f] - eps * W[r, f]
        inv = inv_size[c]
        for f in range(F):
            centre[f] *= inv
        for t in range(lo, hi):
            r = rows[t]
            for f in range(F):
                G[r, f] = centre[f] + scale * W[r, f]


@functools.cache
def _kernel():
    import numba

    return numba.njit(cache=True, nogil=True, error_model="numpy")(_segment_pass_py)


def available() -> bool:
    """Whether Numba is installed (the fused pass is then used on the CPU)."""
    return backend_available("numba")


_ready_lock = threading.Lock()
_unusable: set = set()  # dtypes whose kernel could not be loaded nor compiled


def ready(dtype: torch.dtype) -> bool:
    """Load or compile the kernel for ``dtype`` now, before any gradient is touched.

    A damaged on-disk cache is repaired (a RuntimeWarning naming the cache directory, then a
    recompile; see :mod:`accelprune._numba_cache`); False (the caller uses the torch path) if
    the kernel can be neither loaded nor compiled.
    """
    import numba

    kernel = _kernel()
    np_dtype = numba.from_dtype(np.dtype(np.float64 if dtype == torch.float64 else np.float32))
    matrix, index = numba.types.Array(np_dtype, 2, "C"), numba.types.Array(numba.int64, 1, "C")
    signature = (matrix, matrix, index, index, numba.types.Array(np_dtype, 1, "C"),
                 numba.int64, numba.int64, np_dtype, np_dtype)
    if signature in kernel.overloads:
        return True
    with _ready_lock:
        if dtype in _unusable:
            return False
        try:
            load_or_repair(lambda: (kernel,), lambda kernels: kernel.compile(signature),
                           "accelprune.kernels", stacklevel=4)
            return True
        except KernelsUnavailable:
            _unusable.add(dtype)
            return False


def _thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=thread_count(None), thread_name_prefix="accelprune-csgd")
        return _pool


def rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as an (n, F) tensor sharing its memory, each row one dense block; None if ``t``'s
    rows are not dense blocks (row-major and channels_last conv weights are)."""
    n = t.shape[0]
    if t.is_contiguous():
        return t.view(n, -1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(n, -1)  # a view: permuted is contiguous
    return None


def split_work(sizes_per_param: list[np.ndarray], row_lengths: list[int],
               n_threads: int) -> list[list[tuple[int, int, int]]]:
    """Split every param's clusters into ``n_threads`` lists of (param, first, end) cluster
    ranges of about equal work (rows × row length), in order."""
    work = [sizes * f for sizes, f in zip(sizes_per_param, row_lengths, strict=True)]
    total = int(sum(int(w.sum()) for w in work))
    n_threads = max(1, min(n_threads, total // _WORK_PER_THREAD))
    target = -(-total // n_threads)
    chunks: list[list[tuple[int, int, int]]] = [[]]
    done_in_chunk = 0
    for p, w in enumerate(work):
        c = 0
        cumulative = np.cumsum(w)
        while c < len(w):
            room = target - done_in_chunk
            before = int(cumulative[c - 1]) if c else 0
            # the first cluster past the room (at least one cluster per piece)
            end = int(np.searchsorted(cumulative, before + room, side="right"))
            end = min(max(end, c + 1), len(w))
            chunks[-1].append((p, c, end))
            done_in_chunk += int(cumulative[end - 1]) - before
            c = end
            if done_in_chunk >= target and len(chunks) < n_threads:
                chunks.append([])
                done_in_chunk = 0
    return [chunk for chunk in chunks if chunk]


def run(weights, grads, rows, bounds, inv_sizes, etas, epss, chunks) -> None:
    """Apply the fused pass to every (param, first, end) piece of ``chunks``, one thread per
    chunk (this thread runs the first). ``weights``/``grads``: (n, F) numpy arrays; ``rows``,
    ``bounds``, ``inv_sizes``: per param, as :func:`_segment_pass_py` takes them."""
    kernel = _kernel()
    scalars = [(w.dtype.type(e), w.dtype.type(s)) for w, e, s in zip(weights, etas, epss,
                                                                        strict=True)]

    def work(chunk):
        for p, c0, c1 in chunk:
            eta, eps = scalars[p]
            kernel(weights[p], grads[p], rows[p], bounds[p], inv_sizes[p], c0, c1, eta, eps)

    futures = [_thread_pool().submit(work, chunk) for chunk in chunks[1:]]
    try:
        if chunks:
            work(chunks[0])
    finally:
        for future in futures:
            future.result()

"""Ward hierarchical clustering, many small problems at once.

REPrune clusters, for every input channel of a layer, the kernels of all its filters: one Ward
problem per channel, tens of thousands per model. The fast path solves a whole layer's problems
in one call into the C++ extension (nearest-neighbour chains, parallel across problems, GIL
released). The scipy references sit beside it and define the expected output: scipy's linkage
matrix conventions.

Which native path a problem of n points in d dimensions takes (``method="auto"``; measured with
``benchmarks/bench_ward.py``, see :data:`WARD_METHODS`):

* ``"sorted"`` when d == 1: sort (32-bit radix keys when the points are float32 values, as
  REPrune's float32 weights are), then a chain over neighbouring runs; O(n log n) time, O(n)
  memory (exact: 1-D Ward clusters are runs of the sorted points);
* ``"matrix"`` when n <= 256 and d >= n^2 / 256 (every d from 4 at 32 filters; 5x5 kernels of
  64 filters, 7x7 kernels of 112): a stored n x n matrix of squared distances with
  Lance-Williams updates; O(n^2 d + n^2) time, 8 n^2 bytes per thread (it stops fitting in cache
  as n grows, hence the bound);
* ``"centroids"`` otherwise: the Ward cost recomputed from cluster sizes and centroids on every
  chain step (as fastcluster's ``linkage_vector``), vectorised over clusters (SSE2, AVX2+FMA and
  AVX-512 versions, the sum of squares by fused multiply-adds in all of them, so every CPU gives
  the same bits); O(n^2 d) time, O(n d) memory. The scans run in float, twice the lanes, as a
  prefilter with a proven error bound: the few clusters it cannot rule out are costed again in
  double, so the merges are those of an all-double chain, to the bit. This is the path for
  large n: 100,000 points take megabytes, not 80 GB.

Public functions:

* :func:`ward_linkage` / :func:`ward_linkage_batched`: linkage matrices ``Z``;
* :func:`cut_linkage`: flat labels from ``Z`` at a height or a cluster count, with
  ``scipy.cluster.hierarchy.fcluster`` partitions ("distance" / "maxclust") numbered 0..c-1 in
  order of first appearance;
* :func:`ward_cut_layer`: REPrune's layer-wide cut (ALGORITHMS.md 3.2) in one native pass per
  array, without linkage matrices: each problem's merges stay unsorted, the layer's cut-off (the
  largest height of merge m over the problems) is found by selection, and each problem is cut in
  one backward pass over its merges. The same labels and height, to the bit, as
  ``ward_linkage_batched`` + ``cut_linkage``;
* ``*_ref``: the scipy references.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.cluster.hierarchy as sch

from accelprune._backend import native_module, resolve, thread_count
from accelprune._validation import as_float64_array, as_float_array, check_int

__all__ = [
    "WARD_METHODS",
    "ward_method",
    "ward_linkage",
    "ward_linkage_batched",
    "cut_linkage",
    "LayerCut",
    "ward_cut_layer",
    "ward_linkage_ref",
    "ward_linkage_batched_ref",
    "cut_linkage_ref",
    "ward_cut_layer_ref",
]


# ---------------------------------------------------------------------------------------------
# input checks

_MAX_ABS = 1e100


def _points(X, *, batched: bool, check_values: bool = True) -> np.ndarray:
    """X checked, as a float32 or float64 array in its own memory layout where it is one of
    those (a transposed view of a conv weight stays a view: the native engine reads any strides,
    and float32 values are exact in float64), else as float64.

    ``check_values=False`` leaves the values to the native engine, which checks every one as it
    copies a problem in (a ValueError too, and no result): one pass over a large layer, not two.
    """
    name = "X"
    arr = as_float_array(X, name, ndim=3 if batched else 2, finite=check_values)
    n = arr.shape[-2]
    if n == 0:
        raise ValueError(f"{name} has no points (shape {arr.shape}); Ward needs n >= 1")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} has points of dimension 0 (shape {arr.shape})")
    if batched and arr.shape[0] == 0:
        raise ValueError(f"X has no problems (shape {arr.shape})")
    if (check_values and arr.dtype == np.float64 and arr.size
            and max(arr.max(), -arr.min()) > _MAX_ABS):
        # Squared distances of such points overflow float64 (and the native engine hides merged
        # clusters behind a finite 1e300 sentinel). Finite float32 values never get there.
        raise ValueError("X contains values beyond +-1e100 (rescale the data)")
    return arr


def _linkage(Z) -> np.ndarray:
    arr = as_float64_array(Z, "Z", ndim=(2, 3))
    if arr.shape[-1] != 4:
        raise ValueError(f"Z must have 4 columns (scipy linkage format), got shape {arr.shape}")
    return arr


def _as_batch(arr: np.ndarray) -> np.ndarray:
    """(n-1, 4) or (B, n-1, 4) as (B, n-1, 4); a (0, 4) linkage (one point) is one problem."""
    return arr[None] if arr.ndim == 2 else arr


def _check_linkage_values(batch: np.ndarray) -> None:
    """The rules the native cut checks (accelprune._native.check_linkage), for the reference:
    heights >= 0, child ids whole numbers naming clusters formed before the row, each used once,
    counts equal to the children's sizes. Both cuts accept and refuse the same matrices."""
    n_problems, rows = batch.shape[0], batch.shape[1]
    n = rows + 1
    if rows == 0 or n_problems == 0:
        return
    if (batch[..., 2] < 0).any():
        raise ValueError("Z has a negative, NaN or infinite height")
    ids = batch[..., :2]
    limit = n + np.arange(rows)[None, :, None]  # row r may name clusters 0 .. n + r - 1
    if (ids < 0).any() or (ids >= limit).any() or (ids != np.floor(ids)).any():
        raise ValueError("Z names a cluster which does not exist yet")
    ids = ids.astype(np.int64)
    sizes = np.ones((n_problems, 2 * n - 1), dtype=np.int64)
    used = np.zeros((n_problems, 2 * n - 1), dtype=bool)
    problems = np.arange(n_problems)
    for r in range(rows):
        a, b = ids[:, r, 0], ids[:, r, 1]
        if (a == b).any() or used[problems, a].any() or used[problems, b].any():
            raise ValueError("Z uses a cluster twice")
        used[problems, a] = used[problems, b] = True
        sizes[:, n + r] = sizes[problems, a] + sizes[problems, b]
    if (batch[..., 3] != sizes[:, n:]).any():
        raise ValueError("Z has a count that differs from the number of points its children hold")


def relabel_first_appearance(labels) -> np.ndarray:
    """1-D labels renumbered 0..c-1 (int64) in the order of each label's first appearance."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


# ---------------------------------------------------------------------------------------------
# references (scipy)


def ward_linkage_ref(X) -> np.ndarray:
    """scipy's ``linkage(X, "ward")``; for a single point, an empty (0, 4) matrix."""
    arr = np.asarray(_points(X, batched=False), dtype=np.float64, order="C")
    if arr.shape[0] == 1:
        return np.empty((0, 4))
    return sch.linkage(arr, method="ward")


def ward_linkage_batched_ref(X) -> np.ndarray:
    """:func:`ward_linkage_ref` on each problem of X (B, n, d), stacked to (B, n-1, 4)."""
    arr = _points(X, batched=True)
    return np.stack([ward_linkage_ref(x) for x in arr])


def cut_linkage_ref(Z, *, height=None, n_clusters=None) -> np.ndarray:
    """scipy's ``fcluster`` (criterion "distance" or "maxclust"), labels renumbered 0..c-1."""
    arr = _linkage(Z)
    batch = _as_batch(arr)
    heights, counts = _cut_args(batch, height, n_clusters)
    _check_linkage_values(batch)
    labels = []
    for b, z in enumerate(batch):
        n = z.shape[0] + 1
        if n == 1:
            labels.append(np.zeros(1, dtype=np.int32))
        elif heights is not None:
            labels.append(sch.fcluster(z, heights[b], criterion="distance"))
        else:
            labels.append(sch.fcluster(z, counts[b], criterion="maxclust"))
    if batch.shape[0] == 0:
        return np.zeros((0, batch.shape[1] + 1), dtype=np.int32)
    out = np.stack([relabel_first_appearance(lab) for lab in labels]).astype(np.int32)
    return out.reshape(*arr.shape[:-2], arr.shape[-2] + 1)


class LayerCut(NamedTuple):
    """What :func:`ward_cut_layer` returns.

    labels: int32 (problems, n), each problem's flat clusters at ``height``, numbered 0..c-1 in
            order of first appearance; with several arrays, their problems stacked in order.
    height: the cut-off, the largest over all problems of the height of merge ``merges`` (in
            height order, i.e. row ``merges - 1`` of the problem's linkage matrix).
    """

    labels: np.ndarray
    height: float


def _layer_problems(X, merges, *, check_values: bool = True) -> tuple[list[np.ndarray], int]:
    """X (one (B, n, d) array or a list of them with the same n) as checked arrays (see
    :func:`_points`), and merges checked against n."""
    arrays = list(X) if isinstance(X, (list, tuple)) else [X]
    if not arrays:
        raise ValueError("X is an empty list; give at least one (problems, n, d) array")
    checked = [_points(x, batched=True, check_values=check_values) for x in arrays]
    widths = [a.shape[1] for a in checked]
    if len(set(widths)) != 1:
        raise ValueError(f"the arrays of X disagree on the number of points n: {widths}")
    if widths[0] < 2:
        raise ValueError("a layer cut needs n >= 2 points per problem (there is nothing to merge)")
    return checked, check_int(merges, "merges", low=1, high=widths[0] - 1)


def ward_cut_layer_ref(X, merges: int) -> LayerCut:
    """The reference of :func:`ward_cut_layer`: scipy linkages, the largest height of row
    ``merges - 1`` over all problems, and scipy's ``fcluster(Z, height, "distance")`` of each."""
    arrays, merges = _layer_problems(X, merges)
    linkages = [ward_linkage_batched_ref(a) for a in arrays]
    height = float(max(Z[:, merges - 1, 2].max() for Z in linkages))
    labels = np.concatenate([cut_linkage_ref(Z, height=height) for Z in linkages])
    return LayerCut(labels, height)


def _cut_args(batch: np.ndarray, height, n_clusters):
    """Validate the cut and return (heights (B,) or None, counts (B,) or None)."""
    if (height is None) == (n_clusters is None):
        raise ValueError("give exactly one of height= and n_clusters=")
    n_problems, n = batch.shape[0], batch.shape[1] + 1
    if height is not None:
        h = as_float64_array(height, "height", ndim=(0, 1))
        if h.ndim == 1 and h.shape[0] != n_problems:
            raise ValueError(f"height has {h.shape[0]} values for {n_problems} problems")
        if (h < 0).any():
            raise ValueError("height must be >= 0")
        return np.broadcast_to(h, (n_problems,)).copy(), None
    counts = np.asarray(n_clusters)
    if counts.ndim == 0:
        counts = np.full(n_problems, check_int(n_clusters, "n_clusters", low=1, high=n))
    else:
        if counts.shape != (n_problems,):
            raise ValueError(f"n_clusters has shape {counts.shape}, expected ({n_problems},)")
        for c in counts.tolist():
            check_int(c, "n_clusters", low=1, high=n)
    return None, counts.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# public API (dispatches to the native engine)


WARD_METHODS = ("auto", "centroids", "matrix", "sorted")
"""The native Ward paths (see the module docstring); "auto" picks one by n and d."""


def ward_method(n: int, d: int) -> str:
    """The path ``method="auto"`` takes for problems of ``n`` points in ``d`` dimensions."""
    n = check_int(n, "n", low=1)
    d = check_int(d, "d", low=1)
    native = native_module()
    if native is not None:
        return native.ward_method(n, d)
    return "sorted" if d == 1 else "reference"


def _check_method(method, arrays: list[np.ndarray]) -> str:
    """``method`` checked, and against the points of ``arrays`` ("sorted" needs them 1-D)."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    if method not in WARD_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(WARD_METHODS)}")
    dims = sorted({a.shape[-1] for a in arrays} - {1})
    if method == "sorted" and dims:
        raise ValueError(f"method 'sorted' needs 1-D points, got d = {dims[0]}")
    return method


def ward_linkage(X, *, backend: str = "auto", method: str = "auto") -> np.ndarray:
    """Ward linkage of the rows of X (n, d): the same (n-1, 4) float64 matrix as
    ``scipy.cluster.hierarchy.linkage(X, "ward")``.

    X may be float16/32/64 (bfloat16 tensors too) in any memory layout; it is never modified.
    ``method`` picks the native path (see :data:`WARD_METHODS`); every path gives scipy's
    partitions and heights to 1e-9.
    """
    arr = _points(X, batched=False, check_values=False)  # ward_linkage_batched checks them
    return ward_linkage_batched(arr[None], backend=backend, n_threads=1, method=method)[0]


def ward_linkage_batched(X, *, backend: str = "auto", n_threads: int | None = None,
                         method: str = "auto") -> np.ndarray:
    """Ward linkage of every problem in X (B, n, d), in one call: (B, n-1, 4) float64.

    The native path runs the problems in parallel on ``n_threads`` threads (default: all cores)
    with one work buffer per thread, and the result does not depend on the thread count.
    ``method="auto"`` takes the exact O(n log n) path for 1-D points (e.g. 1x1 conv kernels), the
    stored-matrix chain for n <= 256 and d >= n^2 / 256, and the O(n d)-memory centroid
    chain otherwise (see the module docstring). A problem that cannot fit in memory is refused
    with a ValueError before anything is allocated; a failed allocation raises MemoryError.
    """
    use_native = resolve(backend, fast="native") == "native"
    arr = _points(X, batched=True, check_values=not use_native)
    threads = thread_count(n_threads)
    method = _check_method(method, [arr])
    if not use_native:
        return ward_linkage_batched_ref(arr)
    return native_module().ward_linkage_batched(arr, threads, method)


def cut_linkage(Z, *, height=None, n_clusters=None, backend: str = "auto") -> np.ndarray:
    """Flat cluster labels (int32, 0..c-1 in order of first appearance) from linkage matrices.

    Z is (n-1, 4) or (B, n-1, 4), as :func:`ward_linkage` returns it (also (0, 4) for a single
    point); it is checked (ids, counts, heights) by the same rules as :func:`cut_linkage_ref`.
    Give exactly one of

    * ``height``: a scalar or one per problem; the partition of ``fcluster(Z, height,
      "distance")``: points whose cophenetic distance is at most ``height`` share a cluster;
    * ``n_clusters``: a scalar or one per problem; the partition of ``fcluster(Z, n_clusters,
      "maxclust")``: the lowest cut with at most that many clusters (fewer when heights tie).
    """
    arr = _linkage(Z)
    batch = _as_batch(arr)
    heights, counts = _cut_args(batch, height, n_clusters)
    if resolve(backend, fast="native") == "reference":
        return cut_linkage_ref(arr, height=height, n_clusters=n_clusters)
    native = native_module()
    if heights is not None:
        labels = native.cut_linkage_height(batch, heights)
    else:
        labels = native.cut_linkage_maxclust(batch, counts)
    return labels.reshape(*arr.shape[:-2], arr.shape[-2] + 1)


def ward_cut_layer(X, merges: int, *, backend: str = "auto", n_threads: int | None = None,
                   method: str = "auto") -> LayerCut:
    """REPrune's layer-wide cut (ALGORITHMS.md 3.2) in one pass: for every problem, the height of
    its ``merges``-th merge; the cut-off h = the largest of them; every problem's
    ``fcluster(Z, h, "distance")`` labels. The same labels and height (to the bit) as
    :func:`ward_linkage_batched` followed by :func:`cut_linkage` at that height, and as
    :func:`ward_cut_layer_ref` (scipy: partitions exact, heights to 1e-9).

    X: one array (problems, n, d), or a list of them with the same n (e.g. residual-coupled
        producers, whose channels share one cut; d may differ); never modified.
    merges: 1 <= merges <= n - 1 (REPrune: n - k).
    n_threads, method: as :func:`ward_linkage_batched`; the result does not depend on them.

    The native path never builds linkage matrices: each problem's merges stay in the order they
    were made (16 bytes each), the merge height is picked by selection, and the cut joins the
    clusters of every merge at or below h in one backward pass over them (the solvers keep
    heights non-decreasing up the tree, so that is fcluster's partition).
    """
    use_native = resolve(backend, fast="native") == "native"
    arrays, merges = _layer_problems(X, merges, check_values=not use_native)
    threads = thread_count(n_threads)
    method = _check_method(method, arrays)
    if not use_native:
        return ward_cut_layer_ref(arrays, merges)
    labels, height = native_module().ward_cut_layer(arrays, merges, threads, method)
    return LayerCut(labels, height)

"""Ward hierarchical clustering, many small problems at once.

REPrune clusters, for every input channel of a layer, the kernels of all its filters: one Ward
problem per channel, tens of thousands per model. The fast path solves a whole layer's problems
in one call into the C++ extension (nearest-neighbour chain, Lance-Williams updates, parallel
across problems, GIL released; an exact O(n log n) path for 1-D points). The scipy references
sit beside it and define the expected output: scipy's linkage matrix conventions.

Public functions:

* :func:`ward_linkage` / :func:`ward_linkage_batched`: linkage matrices ``Z``;
* :func:`cut_linkage`: flat labels from ``Z`` at a height or a cluster count, with
  ``scipy.cluster.hierarchy.fcluster`` partitions ("distance" / "maxclust") numbered 0..c-1 in
  order of first appearance;
* ``*_ref``: the scipy references.
"""
from __future__ import annotations

import numpy as np
import scipy.cluster.hierarchy as sch

from accelprune._backend import native_module, resolve, thread_count
from accelprune._validation import as_float64_array, check_int

__all__ = [
    "ward_linkage",
    "ward_linkage_batched",
    "cut_linkage",
    "ward_linkage_ref",
    "ward_linkage_batched_ref",
    "cut_linkage_ref",
]


# ---------------------------------------------------------------------------------------------
# input checks

_MAX_ABS = 1e100


def _points(X, *, batched: bool) -> np.ndarray:
    name = "X"
    arr = as_float64_array(X, name, ndim=3 if batched else 2)
    n = arr.shape[-2]
    if n == 0:
        raise ValueError(f"{name} has no points (shape {arr.shape}); Ward needs n >= 1")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} has points of dimension 0 (shape {arr.shape})")
    if batched and arr.shape[0] == 0:
        raise ValueError(f"X has no problems (shape {arr.shape})")
    if arr.size and np.abs(arr).max() > _MAX_ABS:
        # Squared distances of such points overflow float64 (and the native engine hides merged
        # clusters behind a finite 1e300 sentinel).
        raise ValueError(f"X has values beyond +-{_MAX_ABS:g}; rescale the data")
    return arr


def _linkage(Z) -> np.ndarray:
    arr = as_float64_array(Z, "Z", ndim=(2, 3))
    if arr.shape[-1] != 4:
        raise ValueError(f"Z must have 4 columns (scipy linkage format), got shape {arr.shape}")
    return arr


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
    arr = _points(X, batched=False)
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
    batch = arr.reshape(-1, *arr.shape[-2:])
    heights, counts = _cut_args(batch, height, n_clusters)
    labels = []
    for b, z in enumerate(batch):
        n = z.shape[0] + 1
        if n == 1:
            labels.append(np.zeros(1, dtype=np.int32))
        elif heights is not None:
            labels.append(sch.fcluster(z, heights[b], criterion="distance"))
        else:
            labels.append(sch.fcluster(z, counts[b], criterion="maxclust"))
    out = np.stack([relabel_first_appearance(lab) for lab in labels]).astype(np.int32)
    return out.reshape(*arr.shape[:-2], arr.shape[-2] + 1)


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


def ward_linkage(X, *, backend: str = "auto") -> np.ndarray:
    """Ward linkage of the rows of X (n, d): the same (n-1, 4) float64 matrix as
    ``scipy.cluster.hierarchy.linkage(X, "ward")``.

    X may be float32 or float64 in any memory layout; it is never modified.
    """
    arr = _points(X, batched=False)
    return ward_linkage_batched(arr[None], backend=backend, n_threads=1)[0]


def ward_linkage_batched(X, *, backend: str = "auto", n_threads: int | None = None) -> np.ndarray:
    """Ward linkage of every problem in X (B, n, d), in one call: (B, n-1, 4) float64.

    The native path runs the problems in parallel on ``n_threads`` threads (default: all cores)
    with one O(n^2) work buffer per thread, and the result does not depend on the thread count.
    1-D problems (d == 1, e.g. 1x1 conv kernels) take an exact O(n log n) path.
    """
    arr = _points(X, batched=True)
    threads = thread_count(n_threads)
    if resolve(backend, fast="native") == "reference":
        return ward_linkage_batched_ref(arr)
    return native_module().ward_linkage_batched(arr, threads)


def cut_linkage(Z, *, height=None, n_clusters=None, backend: str = "auto") -> np.ndarray:
    """Flat cluster labels (int32, 0..c-1 in order of first appearance) from linkage matrices.

    Z is (n-1, 4) or (B, n-1, 4). Give exactly one of

    * ``height``: a scalar or one per problem; the partition of ``fcluster(Z, height,
      "distance")``: points whose cophenetic distance is at most ``height`` share a cluster;
    * ``n_clusters``: a scalar or one per problem; the partition of ``fcluster(Z, n_clusters,
      "maxclust")``: the lowest cut with at most that many clusters (fewer when heights tie).
    """
    arr = _linkage(Z)
    batch = arr.reshape(-1, *arr.shape[-2:])
    heights, counts = _cut_args(batch, height, n_clusters)
    if resolve(backend, fast="native") == "reference":
        return cut_linkage_ref(arr, height=height, n_clusters=n_clusters)
    native = native_module()
    if heights is not None:
        labels = native.cut_linkage_height(batch, heights)
    else:
        labels = native.cut_linkage_maxclust(batch, counts)
    return labels.reshape(*arr.shape[:-2], arr.shape[-2] + 1)

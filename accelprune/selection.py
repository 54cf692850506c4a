"""Per-layer choices: which filters a layer keeps, how many each layer keeps, which filters are
clustered together. The engines (:mod:`accelprune.cluster`, :mod:`accelprune.coverage`) do the
heavy lifting; the methods (:mod:`accelprune.reprune`, :mod:`accelprune.csgd`) call these on
every layer.

REPrune (ALGORITHMS.md section 3):

* :func:`reprune_select`: for every input channel, Ward-cluster the n kernels of that channel;
  cut all channels' dendrograms at one layer-wide height h_l (the largest height of merge n - k
  over the channels); pick k filters by greedy maximum coverage of the (channel, cluster) pairs.
* :func:`layer_keep_counts`: k_l for every layer from one global threshold on a channel score
  (BatchNorm |γ|), with a floor of ``max(1, ceil(ρ * n_orig))`` per layer (:func:`keep_floor`).

C-SGD (ALGORITHMS.md section 4):

* :func:`cluster_filters`: k-means (or even blocks) of a layer's filters into exactly k clusters.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from accelprune._backend import resolve
from accelprune._validation import as_float64_array, as_float_array, check_fraction, check_int
from accelprune.cluster import relabel_first_appearance, ward_cut_layer
from accelprune.coverage import max_coverage
from accelprune.kmeans import kmeans, split_until_k

__all__ = ["Selection", "reprune_select", "ward_problems", "keep_floor", "layer_keep_counts",
           "cluster_filters", "CLUSTERINGS"]

CLUSTERINGS = ("kmeans", "even")


# ---------------------------------------------------------------------------------------------
# REPrune: which k filters one layer keeps


class Selection(NamedTuple):
    """What :func:`reprune_select` decided for one layer.

    kept:    int64 (k,), filter indices in selection order.
    labels:  int32 (c_in_total, n), cluster of each filter's kernel in each input channel (after
             the cut at ``height``); with several weights, their channels are stacked in order.
    height:  the layer-wide cut-off h_l (0.0 when k == n: nothing is merged).
    covered: (channel, cluster) pairs covered by the kept filters.
    """

    kept: np.ndarray
    labels: np.ndarray
    height: float
    covered: int


def ward_problems(weight, name: str = "weight") -> np.ndarray:
    """A producer's weight (n, c_in, *kernel) as Ward problems (c_in, n, prod(kernel)): a
    transposed view of the weight where it can be (float32 or float64 kept; other dtypes become
    float64). The native Ward engine reads the view as it is: no copy of the layer."""
    arr = as_float_array(weight, name, ndim=tuple(range(2, 6)))
    n, c_in = arr.shape[:2]
    if n == 0 or c_in == 0:
        raise ValueError(f"{name} has shape {arr.shape}; it needs at least one filter and one "
                         "input channel")
    return arr.reshape(n, c_in, -1).transpose(1, 0, 2)


def reprune_select(weight, k, *, tie_break: str = "random", seed: int = 0, backend: str = "auto",
                   return_details: bool = False):
    """The k filters REPrune keeps in one layer.

    weight: the layer's weight (n, c_in, kh, kw) (any (n, c_in, *kernel): Linear (n, c_in) gives
        one scalar per kernel), a torch tensor or numpy array, never modified. A list of weights
        with the same n selects one set of filters for output channels they share (residual-coupled
        producers): their input channels are pooled into one coverage problem and one cut.
    k: filters to keep, 1 <= k <= n. ``k == n`` keeps all, in index order, without clustering.
    tie_break, seed: how greedy coverage breaks ties (see :func:`accelprune.coverage.max_coverage`).
    backend: "auto" | "native" (C++ Ward + Numba coverage) | "reference" (scipy + the Python
        greedy). All select exactly the same filters.

    Returns the kept indices, int64 (k,) in selection order; with ``return_details`` a
    :class:`Selection` (kept, labels, height, covered).
    """
    backend = resolve(backend, fast="native")
    weights = list(weight) if isinstance(weight, (list, tuple)) else [weight]
    if not weights:
        raise ValueError("weight is an empty list; give at least one weight")
    problems = [ward_problems(w, f"weight[{i}]" if len(weights) > 1 else "weight")
                for i, w in enumerate(weights)]
    n = problems[0].shape[1]
    if any(p.shape[1] != n for p in problems):
        widths = [p.shape[1] for p in problems]
        raise ValueError(f"weights disagree on the number of filters: {widths}")
    k = check_int(k, "k", low=1, high=n)

    if k == n:  # nothing to merge: every kernel is its own cluster
        c_total = sum(p.shape[0] for p in problems)
        labels = np.broadcast_to(np.arange(n, dtype=np.int32), (c_total, n)).copy()
        selection = Selection(np.arange(n, dtype=np.int64), labels, 0.0, c_total * n)
        return selection if return_details else selection.kept

    # h_l: the highest of the channels' (n - k)-th merge heights, over all weights. Cutting every
    # channel there leaves each with at most k clusters, and tightly packed channels with fewer.
    labels, height = ward_cut_layer(problems, n - k, backend=backend)
    result = max_coverage(labels, k, tie_break=tie_break, seed=seed, backend=backend)
    selection = Selection(result.selected, labels, height, int(result.covered))
    return selection if return_details else selection.kept


# ---------------------------------------------------------------------------------------------
# REPrune: how many filters each layer keeps


def keep_floor(n_original: int, min_keep_ratio: float) -> int:
    """k_min = max(1, ceil(ρ * n_orig)): a layer is never emptied."""
    # the epsilon absorbs float error such as 0.05 * 20 = 1.0000000000000002
    return max(1, math.ceil(min_keep_ratio * n_original - 1e-9))


def layer_keep_counts(scores: Sequence, original_widths: Sequence[int], target: int, *,
                      min_keep_ratio: float = 0.05) -> tuple[list[int], float]:
    """k_l for every layer from one global threshold on the channel scores (BN |γ|).

    scores: per layer, a 1-D array of |γ| of its *current* channels.
    original_widths: per layer, its width before any pruning (the floor is a share of it).
    target: channels to keep over all layers, e.g. round((1 - s) * original total).

    A channel is pruned when its score is at or below the threshold γ*; a layer keeps
    ``max(k_min, n - #pruned)``. γ* is chosen as low as possible such that the kept total reaches
    ``target``; it never goes below it (the floor may keep the total above it). Equal scores are
    ordered so that they are spread over their layers in proportion (channel c of t tied channels
    of a layer ranks at (c + 0.5) / t), which matters when all γ are equal, as at initialisation.

    Returns (k per layer, γ*); γ* is -inf when nothing is pruned.
    """
    min_keep_ratio = check_fraction(min_keep_ratio, "min_keep_ratio", allow_one=True)
    if len(scores) != len(original_widths):
        raise ValueError(f"{len(scores)} score arrays for {len(original_widths)} widths")
    layers = [as_float64_array(s, f"scores[{i}]", ndim=1) for i, s in enumerate(scores)]
    widths = [len(s) for s in layers]
    floors = [keep_floor(check_int(n0, "original width", low=1), min_keep_ratio)
              for n0 in original_widths]
    for i, (n, n0, f) in enumerate(zip(widths, original_widths, floors, strict=True)):
        if not f <= n <= n0:
            raise ValueError(f"layer {i} has {n} channels, outside [floor {f}, "
                             f"original width {n0}]")
    target = check_int(target, "target", low=0)
    to_remove = sum(widths) - target
    if to_remove <= 0:
        return widths, -math.inf

    value = np.concatenate(layers)
    layer = np.repeat(np.arange(len(layers)), widths)
    tie_rank = np.concatenate([_tie_fraction(s) for s in layers])
    order = np.lexsort((tie_rank, value))  # ascending score, ties spread over layers
    # Only a layer's first n - k_min channels in this order can go; the rest are its floor.
    by_layer = np.argsort(layer[order], kind="stable")  # global order, grouped by layer
    rank_in_layer = np.empty(len(order), dtype=np.int64)
    rank_in_layer[by_layer] = np.arange(len(order)) - np.repeat(np.cumsum(widths) - widths, widths)
    removable = order[rank_in_layer < (np.array(widths) - np.array(floors))[layer[order]]]
    removed = removable[:to_remove]
    counts = np.bincount(layer[removed], minlength=len(layers))
    gamma_star = float(value[removed[-1]]) if len(removed) else -math.inf
    return [n - int(c) for n, c in zip(widths, counts, strict=True)], gamma_star


def _tie_fraction(values: np.ndarray) -> np.ndarray:
    """Rank of each value among the equal values of its array, as (c + 0.5) / t."""
    order = np.argsort(values, kind="stable")
    _, first, inverse, counts = np.unique(values[order], return_index=True, return_inverse=True,
                                          return_counts=True)
    out = np.empty(len(values))
    out[order] = (np.arange(len(values)) - first[inverse] + 0.5) / counts[inverse]
    return out


# ---------------------------------------------------------------------------------------------
# C-SGD: which filters are clustered together


def cluster_filters(filters, n_clusters: int, *, method: str = "kmeans", seed: int = 0,
                    backend: str = "auto") -> np.ndarray:
    """Split the n rows of ``filters`` (n, d) into exactly ``n_clusters`` non-empty clusters.

    method: ``"kmeans"`` or ``"even"`` (k consecutive blocks of the rows, sizes differing by at
        most one; ``filters`` is then only used for n).
    backend: for k-means. ``"auto"`` / ``"torch"``: :func:`accelprune.kmeans.kmeans` (GEMM
        distances in float32 on the tensor's device, k-means++ seeded in at most 16 rounds,
        ties decided in float64; minutes instead of hours for LLM-sized layers).
        ``"reference"``: scipy's float64 kmeans2 with exact k-means++ seeding (``minit="++"``,
        seeded), the oracle. Both agree exactly where k <= 17 and scipy leaves no cluster empty;
        above that the fast path's blocked seeding picks other (equally distributed) seeds.
    Returns int64 labels (n,) in 0..k-1, numbered by first appearance (row 0 is in cluster 0,
    and each cluster's lowest row index increases with its id). Deterministic given ``seed``.

    kmeans2 may leave clusters empty, and its ``++`` init cannot pick k centres among fewer than
    k distinct rows; in both cases clusters are split deterministically until there are k: the
    row farthest from its cluster's mean, among clusters with more than one row (lowest index on
    ties), becomes a cluster of its own.
    """
    X = as_float64_array(filters, "filters", ndim=2)
    n = X.shape[0]
    if n == 0:
        raise ValueError("filters is empty (0 rows); nothing to cluster")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, numbers.Integral):
        raise TypeError(f"n_clusters must be an integer, got {type(n_clusters).__name__}")
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}] (the number of filters), "
                         f"got {n_clusters}")
    k = int(n_clusters)
    if method not in CLUSTERINGS:
        raise ValueError(f"unknown clustering method {method!r}; "
                         f"expected one of {list(CLUSTERINGS)}")
    seed = check_int(seed, "seed", low=0)
    if backend not in ("auto", "torch", "reference"):
        raise ValueError(f"unknown backend {backend!r}; expected one of "
                         "['auto', 'torch', 'reference']")
    if method == "even":
        return (np.arange(n, dtype=np.int64) * k) // n
    if k == n:
        return np.arange(n, dtype=np.int64)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    distinct = len(np.unique(X, axis=0))
    if distinct < k:  # kmeans++ cannot place k centres: start from the groups of equal rows
        labels = np.unique(X, axis=0, return_inverse=True)[1].reshape(-1)
    elif backend != "reference":
        # the caller's tensor as it is (its device); 9 updates = kmeans2's 10 assignments
        data = filters if isinstance(filters, torch.Tensor) and filters.is_floating_point() else X
        return kmeans(data, k, seed=seed, iters=9, tol=0)
    else:
        centres = _kmeans_pp_centres(X, k, np.random.default_rng(seed))
        with warnings.catch_warnings():  # empty clusters are repaired below
            warnings.filterwarnings("ignore", message="One of the clusters is empty")
            _, labels = kmeans2(X, centres, minit="matrix", missing="warn")
    return relabel_first_appearance(split_until_k(X, np.asarray(labels, dtype=np.int64), k))


def _kmeans_pp_centres(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The k initial centres scipy's ``kmeans2(X, k, minit="++", rng=rng)`` picks, in O(n·k·d).

    Same random draws in the same order as scipy's ``_kpp`` (one integer for the first centre,
    then one uniform per centre against the cumulative D² distribution), so the clustering is
    scipy's ``++`` k-means (a test pins the parity). scipy recomputes the distances to *all*
    previous centres at every pick, O(n·k²·d): 90 s for the groups of a ResNet-18 and hours for a
    ResNet-50, where keeping the running minimum distance takes seconds.
    """
    n = X.shape[0]
    centres = np.empty((k, X.shape[1]))
    pick = int(rng.integers(n, dtype=np.int64))
    centres[0] = X[pick]
    nearest = ((X - X[pick]) ** 2).sum(axis=1)  # squared distance to the closest centre so far
    for i in range(1, k):
        cumulative = (nearest / nearest.sum()).cumsum()
        pick = min(int(np.searchsorted(cumulative, rng.uniform())), n - 1)
        centres[i] = X[pick]
        np.minimum(nearest, ((X - X[pick]) ** 2).sum(axis=1), out=nearest)
    return centres

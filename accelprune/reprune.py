"""REPrune: channel pruning through kernel representative selection (ALGORITHMS.md section 3).

One pruning *event* on a model:

1. **How many filters each layer keeps** (:func:`layer_keep_counts`): one global threshold on the
   BatchNorm scales |γ| of the prunable layers, chosen so that the model keeps
   ``round((1 - s) * original total)`` channels, with a floor of ``max(1, ceil(ρ * n_orig))`` per
   layer (accelprune's stand-in for the paper's channel regrowth).
2. **Which filters** (:func:`reprune_select`): for every input channel, Ward-cluster the n kernels
   of that channel; cut all channels' dendrograms at one layer-wide height h_l (the largest
   height of merge n - k over the channels); pick k filters by greedy maximum coverage of the
   (channel, cluster) pairs.
3. **Surgery**: remove the other filters, their BN entries and the consumers' input channels
   through the dependency graph (:mod:`accelprune.graph`).

:class:`REPrune` runs events one-shot (:meth:`REPrune.prune`) or on a schedule while training
(:meth:`REPrune.step`), and :class:`REPruneImportance` exposes the selection to Torch-Pruning
pruners. The optimizer-state carry-over lives in :mod:`accelprune.optim_state`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch_pruning as tp

from accelprune._validation import as_float64_array, check_fraction, check_int
from accelprune.cluster import cut_linkage, ward_linkage_batched
from accelprune.coverage import max_coverage

__all__ = ["Selection", "reprune_select", "layer_keep_counts", "REPruneImportance"]

BACKENDS = ("auto", "native", "reference")


# ---------------------------------------------------------------------------------------------
# one layer: which k filters to keep


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


def _ward_problems(weight, name: str) -> np.ndarray:
    """A producer's weight (n, c_in, *kernel) as Ward problems (c_in, n, prod(kernel)) float64."""
    arr = as_float64_array(weight, name, ndim=tuple(range(2, 6)))
    n, c_in = arr.shape[:2]
    if n == 0 or c_in == 0:
        raise ValueError(f"{name} has shape {arr.shape}; it needs at least one filter and one "
                         "input channel")
    return np.ascontiguousarray(arr.reshape(n, c_in, -1).transpose(1, 0, 2))


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
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    weights = list(weight) if isinstance(weight, (list, tuple)) else [weight]
    if not weights:
        raise ValueError("weight is an empty list; give at least one weight")
    problems = [_ward_problems(w, f"weight[{i}]" if len(weights) > 1 else "weight")
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

    linkages = [ward_linkage_batched(p, backend=backend) for p in problems]
    merges = n - k
    # h_l: the highest of the channels' (n - k)-th merge heights. Cutting every channel there
    # leaves each with at most k clusters, and tightly packed channels with fewer.
    height = float(max(Z[:, merges - 1, 2].max() for Z in linkages))
    # one height per problem (the same for all)
    labels = np.concatenate([cut_linkage(Z, height=np.full(len(Z), height), backend=backend)
                             for Z in linkages])
    result = max_coverage(labels, k, tie_break=tie_break, seed=seed, backend=backend)
    selection = Selection(result.selected, labels, height, int(result.covered))
    return selection if return_details else selection.kept


# ---------------------------------------------------------------------------------------------
# the whole model: how many filters each layer keeps


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
# Torch-Pruning adapter


class REPruneImportance(tp.importance.Importance):
    """REPrune's selection as a Torch-Pruning importance, for ``tp.pruner.MetaPruner``.

    A pruner removes the lowest-scored channels; this importance scores the filters REPrune keeps
    highest, in selection order (the first selected scores highest), and the others below them
    (by their L1 norm, scaled into [0, 0.5]). With the same ``pruning_ratio`` r as a one-step
    MetaPruner (local pruning, the default), the pruner keeps exactly the REPrune selection for
    ``k = int(n * (1 - r))``, the count MetaPruner keeps.

    Producers of a group (its Conv/Linear layers whose outputs are pruned, ``groups == 1``) are
    pooled as in :func:`reprune_select` with a list of weights. Groups without one score None
    (MetaPruner then skips them).
    """

    def __init__(self, pruning_ratio: float = 0.5, *, tie_break: str = "random", seed: int = 0,
                 backend: str = "auto"):
        self.pruning_ratio = check_fraction(pruning_ratio, "pruning_ratio")
        self.tie_break, self.seed, self.backend = tie_break, seed, backend

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        n = len(group[0].idxs)
        weights = []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            if dep.pruning_fn not in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                continue
            if getattr(layer, "transposed", False) or getattr(layer, "groups", 1) != 1:
                continue
            root_idxs = group[i].root_idxs
            if root_idxs is None or sorted(root_idxs) != list(range(n)):
                continue
            w = layer.weight.detach()[list(idxs)]
            aligned = torch.empty_like(w)
            aligned[list(root_idxs)] = w  # row p: the filter of root channel p
            weights.append(aligned.cpu())
        if not weights:
            return None
        k = max(1, int(n * (1 - self.pruning_ratio)))  # MetaPruner keeps int(n * (1 - r))
        kept = reprune_select(weights, min(k, n), tie_break=self.tie_break, seed=self.seed,
                              backend=self.backend)
        l1 = sum(w.abs().flatten(1).sum(1).double() for w in weights)
        scores = 0.5 * l1 / l1.max().clamp_min(1e-300)
        scores[torch.from_numpy(kept)] = 1.0 + torch.arange(len(kept), 0, -1, dtype=torch.float64)
        return scores.float()

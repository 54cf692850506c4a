"""One-shot structured pruning: :func:`prune` with a classic criterion, :func:`prune_with` for any
method by name (the one dispatch the CLI and the demo use), :func:`prune_to_macs` for a MACs
budget.

Channels are scored by an Importance object (accelprune's or any Torch-Pruning one) and ranked
per group or globally; the channel groups, the exclusions (final classifier, ``ignored_layers``,
residual-coupled groups unless ``prune_coupled``) and the surgery are accelprune's
:class:`ModelGraph`, so the cut is checked by a forward pass and is all-or-nothing.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from accelprune._validation import check_fraction, check_int
from accelprune.graph import ModelGraph
from accelprune.importance import IMPORTANCES, get_importance

__all__ = ["METHODS", "prune", "prune_to_macs", "prune_with", "sparsity_for_macs"]

# Every method by name: the classic criteria (scored by :func:`prune`), REPrune, and C-SGD's
# cluster-and-fold (without centripetal training: lossy; train with accelprune.CSGD for lossless).
METHODS = (*IMPORTANCES, "reprune", "csgd")


def prune(
    model: nn.Module,
    example_inputs,
    sparsity: float = 0.5,
    importance="l1",
    *,
    global_ranking: bool = False,
    ignored_layers=None,
    prune_coupled: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Remove the least important channels of ``model``, in place; returns ``model``.

    Args:
        model: the network; pruned in place (the same object is returned). On any failure it is
            left exactly as it was.
        example_inputs: a tensor, tuple/list of positional inputs or dict of keyword inputs.
        sparsity: fraction of channels to remove, in [0, 1). Per layer
            (``global_ranking=False``): each prunable group loses ⌊sparsity · n⌋ of its n
            channels (keeping at least one; where grouped convs split the channels into B blocks
            (:attr:`ChannelGroup.blocks`), ⌊sparsity · n/B⌋ per block).
            Global: the ⌊sparsity · N⌋ lowest-scored of all N prunable channels go, compared by
            raw score across layers (every group keeps at least its best channel; a group of B
            blocks loses channels B at a time, so the count may fall short by less than B).
        importance: "l1", "l2", "bn", "taylor", "gradient", "random", or any Torch-Pruning
            ``Importance`` object (e.g. :class:`accelprune.L1Importance`). "taylor" and "gradient"
            read ``weight.grad``: run ``loss.backward()`` on some data first.
        global_ranking: one threshold over all groups instead of one per group.
        ignored_layers: module names or modules whose output channels are kept.
        prune_coupled: also prune residual-coupled channels (outputs that are summed).
        seed: for ``importance="random"``.
        progress: tqdm bars while the graph is built.

    Never pruned: the model's outputs (the final classifier's outputs), groups that include an
    ignored layer, and (by default) residual-coupled groups. "bn" leaves groups without a
    BatchNorm (e.g. VGG's Linear layers) untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sparsity = check_fraction(sparsity, "sparsity")
    if not isinstance(global_ranking, bool):
        raise TypeError(f"global_ranking must be a bool, got {type(global_ranking).__name__}")
    seed = check_int(seed, "seed", low=0)
    scorer = get_importance(importance, seed=seed)
    graph = ModelGraph(
        model,
        example_inputs,
        ignored_layers=ignored_layers,
        prune_coupled=prune_coupled,
        progress=progress,
    )
    if sparsity == 0 or not graph.groups:
        return model
    plan = _rank(graph, scorer, sparsity, global_ranking)
    graph.prune_groups(plan)
    return model


def _rank(graph: ModelGraph, scorer, sparsity: float, global_ranking: bool) -> list:
    """(group, keep) for every group that loses channels.

    Ranking is done here rather than by Torch-Pruning's MetaPruner, whose global threshold
    (``score <= t``) removes every tied channel: with freshly initialised BN scales (all 1) it
    empties the network. Here exactly ⌊sparsity·n⌋ channels go, ties broken by position.
    """
    # per group: (group, blocks B, per-unit scores); a unit = one channel in each block
    units = []
    for g in graph.groups:
        scores = scorer(g.tp_group())
        if scores is None:  # e.g. "bn" on a group without BatchNorm: not ranked, not pruned
            continue
        scores = torch.as_tensor(scores).detach().double().cpu()
        if scores.shape != (g.n_channels,):
            raise ValueError(
                f"importance {scorer!r} returned {tuple(scores.shape)} scores for group {g.name!r} "
                f"of {g.n_channels} channels"
            )
        if not torch.isfinite(scores).all():
            raise ValueError(f"importance {scorer!r} returned NaN/Inf scores for group {g.name!r}")
        B = g.blocks  # grouped convs: every block must lose the same local channels
        units.append((g, B, scores.view(B, -1).mean(0).numpy()))

    drop: dict[int, np.ndarray] = {}
    if global_ranking:
        total = sum(g.n_channels for g, _, _ in units)
        budget = _n_removed(sparsity, total)
        best = [int(np.argmax(sc)) for _, _, sc in units]  # every group keeps its best unit
        cand = [
            (s, i, j)
            for i, (_, _, sc) in enumerate(units)
            for j, s in enumerate(sc)
            if j != best[i]
        ]
        cand.sort(key=lambda t: t[0])  # stable: ties go in group, then channel order
        chosen: dict[int, list[int]] = {}
        for _, i, j in cand:
            G = units[i][1]
            if budget < G:
                continue
            chosen.setdefault(i, []).append(j)
            budget -= G
            if budget == 0:
                break
        drop = {i: np.array(js) for i, js in chosen.items()}
    else:
        for i, (_, _, sc) in enumerate(units):
            k = min(_n_removed(sparsity, len(sc)), len(sc) - 1)
            if k:
                drop[i] = np.argsort(sc, kind="stable")[:k]

    plan = []
    for i, js in drop.items():
        g, G, sc = units[i]
        size = len(sc)
        keep_units = np.setdiff1d(np.arange(size), js)
        keep = np.concatenate([keep_units + c * size for c in range(G)])
        plan.append((g, keep))
    return plan


def _n_removed(sparsity: float, n: int) -> int:
    return int(np.floor(sparsity * n + 1e-9))  # the epsilon keeps 0.3 * 10 at 3


def prune_with(model: nn.Module, example_inputs, sparsity: float, method: str, *,
               ignored_layers=None, seed: int = 0, progress: bool = False) -> nn.Module:
    """Prune ``model`` in place, one-shot, with the method called ``method`` (see
    :data:`METHODS`); returns ``model``.

    Criteria go to :func:`prune` (per layer); ``"reprune"`` runs one :class:`accelprune.REPrune`
    event; ``"csgd"`` clusters with :class:`accelprune.CSGD` and folds at once, without
    centripetal training (lossy: train with ``CSGD`` for lossless folding). ``sparsity`` is the
    fraction of channels removed, for every method.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    if method == "reprune":
        from accelprune.reprune import REPrune

        REPrune(model, example_inputs, sparsity, ignored_layers=ignored_layers, seed=seed,
                progress=progress).prune()
    elif method == "csgd":
        from accelprune.csgd import CSGD

        sparsity = check_fraction(sparsity, "sparsity")
        if sparsity > 0:
            CSGD(model, example_inputs, sparsity, ignored_layers=ignored_layers, seed=seed,
                 progress=progress).prune()
    else:
        prune(model, example_inputs, sparsity, method, ignored_layers=ignored_layers, seed=seed,
              progress=progress)
    return model


def sparsity_for_macs(model: nn.Module, example_inputs, method: str, macs_reduction: float, *,
                      tolerance: float = 0.02, max_iterations: int = 12, ignored_layers=None,
                      seed: int = 0) -> float:
    """The sparsity at which ``method`` leaves ``model`` with ``1 - macs_reduction`` of its MACs
    (relative error within ``tolerance`` where reachable). ``model`` is not modified.

    Bisection on copies of the model (each is pruned and measured, then dropped), stopping once a
    copy lands within ``tolerance`` of the target or after ``max_iterations``, keeping the
    closest. A method that cannot reach the target (floors, ignored layers) ends at its closest.
    """
    from accelprune.reporting import model_stats

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    macs_reduction = check_fraction(macs_reduction, "macs_reduction")
    tolerance = check_fraction(tolerance, "tolerance", allow_zero=False)
    max_iterations = check_int(max_iterations, "max_iterations", low=1)
    if macs_reduction == 0:
        return 0.0
    target = (1 - macs_reduction) * model_stats(model, example_inputs)["macs"]
    low, high = 0.0, 0.99
    best, best_gap = 0.0, macs_reduction / (1 - macs_reduction)  # the gap of not pruning
    for _ in range(max_iterations):
        mid = (low + high) / 2
        trial = prune_with(copy.deepcopy(model), example_inputs, mid, method,
                           ignored_layers=ignored_layers, seed=seed)
        macs = model_stats(trial, example_inputs)["macs"]
        gap = abs(macs - target) / target
        if gap < best_gap:
            best, best_gap = mid, gap
        if gap <= tolerance:
            break
        low, high = (mid, high) if macs > target else (low, mid)
    return best


def prune_to_macs(model: nn.Module, example_inputs, method: str, macs_reduction: float, *,
                  tolerance: float = 0.02, max_iterations: int = 12, ignored_layers=None,
                  seed: int = 0, progress: bool = False) -> float:
    """Prune ``model`` in place with ``method`` so that it keeps ``1 - macs_reduction`` of its
    MACs (within ``tolerance``, relative, where the method can reach it); returns the sparsity
    used (found by :func:`sparsity_for_macs`). On failure the model is as it was.
    """
    sparsity = sparsity_for_macs(model, example_inputs, method, macs_reduction,
                                 tolerance=tolerance, max_iterations=max_iterations,
                                 ignored_layers=ignored_layers, seed=seed)
    if sparsity > 0:
        prune_with(model, example_inputs, sparsity, method, ignored_layers=ignored_layers,
                   seed=seed, progress=progress)
    return sparsity

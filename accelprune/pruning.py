"""One-shot structured pruning with a classic criterion: :func:`prune`.

Channels are scored by an Importance object (accelprune's or any Torch-Pruning one) and ranked
per group or globally; the channel groups, the exclusions (final classifier, ``ignored_layers``,
residual-coupled groups unless ``prune_coupled``) and the surgery are accelprune's
:class:`ModelGraph`, so
the cut is checked by a forward pass and is all-or-nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from accelprune._validation import check_fraction, check_int
from accelprune.graph import ModelGraph
from accelprune.importance import get_importance

__all__ = ["prune"]


def prune(
    model: nn.Module,
    example_inputs,
    importance="l1",
    ratio: float = 0.5,
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
        importance: "l1", "l2", "bn", "taylor", "gradient", "random", or any Torch-Pruning
            ``Importance`` object (e.g. :class:`accelprune.L1Importance`). "taylor" and "gradient"
            read ``weight.grad``: run ``loss.backward()`` on some data first.
        ratio: fraction of channels to remove, in [0, 1). Per layer (``global_ranking=False``):
            each prunable group loses ⌊ratio · n⌋ of its n channels (keeping at least one; with
            a grouped conv of G groups, ⌊ratio · n/G⌋ per conv group).
            Global: the ⌊ratio · N⌋ lowest-scored of all N prunable channels go, compared by raw
            score across layers (every group keeps at least its best channel; a grouped conv's
            channels go G at a time, so the count may fall short by less than G).
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
    ratio = check_fraction(ratio, "ratio")
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
    if ratio == 0 or not graph.groups:
        return model
    plan = _rank(graph, scorer, ratio, global_ranking)
    graph.prune_groups(plan)
    return model


def _rank(graph: ModelGraph, scorer, ratio: float, global_ranking: bool) -> list:
    """(group, keep) for every group that loses channels.

    Ranking is done here rather than by Torch-Pruning's MetaPruner, whose global threshold
    (``score <= t``) removes every tied channel: with freshly initialised BN scales (all 1) it
    empties the network. Here exactly ⌊ratio·n⌋ channels go, ties broken by position.
    """
    # per group: (group, conv groups G, per-unit scores); a unit = one channel in each conv group
    units = []
    for g in graph.groups:
        scores = scorer(graph._tp_group(g))
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
        G = _conv_groups(graph, g)  # grouped convs must lose the same channels in every group
        units.append((g, G, scores.view(G, -1).mean(0).numpy()))

    drop: dict[int, np.ndarray] = {}
    if global_ranking:
        total = sum(g.n_channels for g, _, _ in units)
        budget = _n_removed(ratio, total)
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
        for i, (g, G, sc) in enumerate(units):
            k = min(_n_removed(ratio, len(sc)), len(sc) - 1)
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


def _n_removed(ratio: float, n: int) -> int:
    return int(np.floor(ratio * n + 1e-9))  # the epsilon keeps 0.3 * 10 at 3


def _conv_groups(graph: ModelGraph, g) -> int:
    """Number of conv groups the channels are split into by grouped (not depthwise) convs."""
    G = 1
    for name in g.producers + g.consumers:
        m = graph.module(name)
        if (
            isinstance(m, nn.modules.conv._ConvNd)
            and 1 < m.groups
            and not (m.groups == m.in_channels == m.out_channels)
        ):
            G = max(G, m.groups)
    if g.n_channels % G:
        raise ValueError(
            f"group {g.name!r}: {g.n_channels} channels do not split into {G} conv groups"
        )
    return G

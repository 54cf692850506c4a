"""Classic channel-importance criteria (ALGORITHMS.md §5) as Torch-Pruning ``Importance`` objects.

Each criterion is called on a channel group and returns one float32 score per channel (higher =
more important). A group is either an :class:`accelprune.graph.ChannelGroup` or a Torch-Pruning
``Group`` — so the same objects work in :func:`accelprune.prune` and in Torch-Pruning's own
pruners (``tp.pruner.MetaPruner(..., importance=accelprune.L1Importance())``).

Per-filter scores (filter i = output channel i of a producing conv / linear):

* :class:`L1Importance` Σ|W_i|, :class:`L2Importance` ‖W_i‖₂;
* :class:`BNScaleImportance` |γ_i| of the BatchNorms over the channel (network slimming; train
  with :func:`bn_l1_penalty_`); groups without an affine BatchNorm get ``None`` (Torch-Pruning's
  convention: the group is skipped, so it is not pruned);
* :class:`TaylorImportance` Σ|W_i ⊙ ∂L/∂W_i| (first-order Taylor) and :class:`GradientImportance`
  Σ|∂L/∂W_i|: both read ``weight.grad``, so run ``loss.backward()`` on a batch (or accumulate over
  a few) before scoring; a missing gradient is an error, not a silent zero;
* :class:`RandomImportance` uniform scores from a seeded generator (a baseline);
* :class:`REPruneImportance` REPrune's selection (Ward clustering + maximum coverage) as scores.

A group with several producers (residual-coupled outputs; a depthwise conv after a 1×1) scores
channel c by the mean over producers (over BNs for the BN criterion) of their per-filter score.
The per-layer scoring goes through :func:`accelprune.kernels.filter_scores` (one batched Triton
launch on CUDA, the eager reference elsewhere).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from accelprune._backend import resolve
from accelprune._validation import check_fraction
from accelprune.kernels import filter_scores
from accelprune.layers import BATCHNORM_TYPES, PRODUCER_TYPES, out_channel_view
from accelprune.selection import reprune_select

__all__ = [
    "ChannelImportance",
    "L1Importance",
    "L2Importance",
    "BNScaleImportance",
    "TaylorImportance",
    "GradientImportance",
    "RandomImportance",
    "REPruneImportance",
    "IMPORTANCES",
    "get_importance",
    "bn_l1_penalty_",
]

def _as_tp_group(group):
    """Torch-Pruning's full group for an accelprune ChannelGroup; a tp Group as it is."""
    from accelprune.graph import ChannelGroup

    if isinstance(group, ChannelGroup):
        return group.tp_group()
    if isinstance(group, tp.dependency.Group):
        return group
    raise TypeError(
        "group must be an accelprune ChannelGroup or a Torch-Pruning Group, "
        f"got {type(group).__name__}"
    )


class ChannelImportance(tp.importance.Importance):
    """Base class: score members of the group with :func:`filter_scores`, mean per channel.

    Subclasses set ``kind`` (a ``filter_scores`` kind) and ``_members`` (which tensors to score).
    backend: ``filter_scores``' backend ("auto" | "triton" | "reference").
    """

    kind = "l1"

    def __init__(self, *, backend: str = "auto"):
        resolve(backend, fast="triton")  # a bad name fails here, not at the first score
        self.backend = backend

    def _members(self, tp_group):
        """Yield (module, parameter, idxs, root_idxs) for each scored member of the group."""
        DG = tp_group._DG
        for item in tp_group:
            m = item.dep.target.module
            if isinstance(m, PRODUCER_TYPES) and DG.is_out_channel_pruning_fn(item.dep.handler):
                yield m, m.weight, item.idxs, item.root_idxs

    def _score(self, modules, params):
        """One 1-D score tensor per member (filter_scores on the output-channel-first weights)."""
        return filter_scores(
            [out_channel_view(m, p.detach()) for m, p in zip(modules, params, strict=True)],
            kind=self.kind,
            backend=self.backend,
        )

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        tp_group = _as_tp_group(group)
        members = list(self._members(tp_group))
        if not members:
            return None
        root_positions = {int(r): i for i, r in enumerate(tp_group[0].root_idxs)}
        scores = self._score([m for m, _, _, _ in members], [p for _, p, _, _ in members])
        device = scores[0].device
        total = torch.zeros(len(root_positions), dtype=torch.float32, device=device)
        count = torch.zeros(len(root_positions), dtype=torch.float32, device=device)
        for s, (_, _, idxs, root_idxs) in zip(scores, members, strict=True):
            pos = [
                (int(i), root_positions[int(r)])
                for i, r in zip(idxs, root_idxs, strict=True)
                if int(r) in root_positions
            ]
            if not pos:
                continue
            local, where = (torch.tensor(v, dtype=torch.long, device=device)
                            for v in zip(*pos, strict=True))
            total.index_add_(0, where, s.to(device)[local])
            count.index_add_(0, where, torch.ones_like(where, dtype=torch.float32))
        return total / count.clamp_min(1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class L1Importance(ChannelImportance):
    """Σ|W_i| of each producer's filter i (Li et al., 2017)."""

    kind = "l1"


class L2Importance(ChannelImportance):
    """‖W_i‖₂ of each producer's filter i."""

    kind = "l2"


class BNScaleImportance(ChannelImportance):
    """|γ_i| of the affine BatchNorms over the channel (Liu et al., 2017, network slimming)."""

    kind = "abs"

    def _members(self, tp_group):
        for item in tp_group:
            m = item.dep.target.module
            if isinstance(m, BATCHNORM_TYPES) and m.affine:
                yield m, m.weight, item.idxs, item.root_idxs


class _GradientCriterion(ChannelImportance):
    @staticmethod
    def _grads(modules, params):
        """The gradients, output channels first; a missing one is the caller's mistake."""
        for m, p in zip(modules, params, strict=True):
            if p.grad is None:
                raise ValueError(
                    f"{type(m).__name__} weight {tuple(p.shape)} has no gradient: run "
                    f"loss.backward() on a batch before scoring with a gradient-based criterion"
                )
        return [out_channel_view(m, p.grad.detach()) for m, p in zip(modules, params, strict=True)]


class TaylorImportance(_GradientCriterion):
    """Σ|W_i ⊙ ∂L/∂W_i| (first-order Taylor, Molchanov et al., 2019); needs ``weight.grad``."""

    kind = "taylor"

    def _score(self, modules, params):
        weights = [out_channel_view(m, p.detach()) for m, p in zip(modules, params, strict=True)]
        return filter_scores(
            weights, kind="taylor", grads=self._grads(modules, params), backend=self.backend
        )


class GradientImportance(_GradientCriterion):
    """Σ|∂L/∂W_i| (gradient magnitude); needs ``weight.grad``."""

    kind = "l1"

    def _score(self, modules, params):
        return filter_scores(self._grads(modules, params), kind="l1", backend=self.backend)


class RandomImportance(tp.importance.Importance):
    """Uniform random scores from a seeded generator (a baseline; deterministic given ``seed``)."""

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    def __call__(self, group) -> torch.Tensor:
        tp_group = _as_tp_group(group)
        return torch.rand(len(tp_group[0].idxs), generator=self._gen)

    def __repr__(self) -> str:
        return f"RandomImportance(seed={self.seed})"


IMPORTANCES = {"l1": L1Importance, "l2": L2Importance, "bn": BNScaleImportance,
               "taylor": TaylorImportance, "gradient": GradientImportance,
               "random": RandomImportance}
"""Each criterion name of :data:`accelprune.methods.CRITERIA` (the same names in the same order:
tests/test_architecture.py checks) and its class."""


def get_importance(importance, *, seed: int = 0) -> tp.importance.Importance:
    """An Importance from a name in :data:`IMPORTANCES` (``seed`` for "random") or an object."""
    if isinstance(importance, str):
        if importance not in IMPORTANCES:
            raise ValueError(
                f"unknown importance {importance!r}; expected one of {sorted(IMPORTANCES)} "
                f"or a torch_pruning Importance object"
            )
        cls = IMPORTANCES[importance]
        return cls(seed) if cls is RandomImportance else cls()
    if isinstance(importance, tp.importance.Importance):
        return importance
    raise TypeError(
        "importance must be a name or a torch_pruning Importance object, "
        f"got {type(importance).__name__}"
    )


def bn_l1_penalty_(model: nn.Module, strength: float) -> None:
    """Network slimming's L1 penalty on BatchNorm scales: ``γ.grad += strength · sign(γ)``.

    Call after ``loss.backward()`` and before ``optimizer.step()`` (the gradient of
    ``strength · Σ|γ|`` added in place; a BN without a gradient gets just the penalty).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"strength must be a number, got {type(strength).__name__}")
    strength = float(strength)
    if not np.isfinite(strength) or strength < 0:
        raise ValueError(f"strength must be a finite number >= 0, got {strength}")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BATCHNORM_TYPES) and m.affine and m.weight.requires_grad:
                penalty = torch.sign(m.weight) * strength
                if m.weight.grad is None:
                    m.weight.grad = penalty
                else:
                    m.weight.grad.add_(penalty)


class REPruneImportance(tp.importance.Importance):
    """REPrune's selection as a Torch-Pruning importance, for ``tp.pruner.MetaPruner``.

    A pruner removes the lowest-scored channels; this importance scores the filters REPrune keeps
    highest, in selection order (the first selected scores highest), and the others below them
    (by their L1 norm, scaled into [0, 0.5]). With ``sparsity`` equal to the ratio r given to
    a one-step MetaPruner's ``pruning_ratio`` (local pruning, the default), the pruner keeps
    exactly the REPrune selection for ``k = int(n * (1 - r))``, the count MetaPruner keeps.

    Producers of a group (its Conv/Linear layers whose outputs are pruned, ``groups == 1``) are
    pooled as in :func:`reprune_select` with a list of weights. Groups without one score None
    (MetaPruner then skips them).
    """

    def __init__(self, sparsity: float = 0.5, *, tie_break: str = "random", seed: int = 0,
                 backend: str = "auto"):
        self.sparsity = check_fraction(sparsity, "sparsity")
        resolve(backend, fast="native")
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
        k = max(1, int(n * (1 - self.sparsity)))  # MetaPruner keeps int(n * (1 - r))
        kept = reprune_select(weights, min(k, n), tie_break=self.tie_break, seed=self.seed,
                              backend=self.backend)
        l1 = sum(w.abs().flatten(1).sum(1).double() for w in weights)
        scores = 0.5 * l1 / l1.max().clamp_min(1e-300)
        scores[torch.from_numpy(kept)] = 1.0 + torch.arange(len(kept), 0, -1, dtype=torch.float64)
        return scores.float()

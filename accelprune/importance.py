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
* :class:`RandomImportance` uniform scores from a seeded generator (a baseline).

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

from accelprune.kernels import filter_scores

__all__ = [
    "ChannelImportance",
    "L1Importance",
    "L2Importance",
    "BNScaleImportance",
    "TaylorImportance",
    "GradientImportance",
    "RandomImportance",
    "IMPORTANCES",
    "get_importance",
    "bn_l1_penalty_",
]

_PRODUCER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_BN_TYPES = nn.modules.batchnorm._BatchNorm


def _as_tp_group(group):
    """Torch-Pruning's full group for an accelprune ChannelGroup; a tp Group as it is."""
    from accelprune.graph import ChannelGroup

    if isinstance(group, ChannelGroup):
        return group._graph._tp_group(group)
    if isinstance(group, tp.dependency.Group):
        return group
    raise TypeError(
        "group must be an accelprune ChannelGroup or a Torch-Pruning Group, "
        f"got {type(group).__name__}"
    )


def _out_rows(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a weight or its gradient) with output channels first."""
    if isinstance(m, nn.modules.conv._ConvNd) and m.transposed:
        if m.groups != 1:
            raise ValueError(
                "grouped transposed convolutions are not supported by the weight criteria"
            )
        return t.transpose(0, 1)
    return t


class ChannelImportance(tp.importance.Importance):
    """Base class: score members of the group with :func:`filter_scores`, mean per channel.

    Subclasses set ``kind`` (a ``filter_scores`` kind) and ``_members`` (which tensors to score).
    backend: ``filter_scores``' backend ("auto" | "triton" | "torch").
    """

    kind = "l1"

    def __init__(self, *, backend: str = "auto"):
        self.backend = backend

    def _members(self, tp_group):
        """Yield (module, parameter, idxs, root_idxs) for each scored member of the group."""
        DG = tp_group._DG
        for item in tp_group:
            m = item.dep.target.module
            if isinstance(m, _PRODUCER_TYPES) and DG.is_out_channel_pruning_fn(item.dep.handler):
                yield m, m.weight, item.idxs, item.root_idxs

    def _score(self, modules, params):
        """One 1-D score tensor per member (filter_scores on the output-channel-first weights)."""
        return filter_scores(
            [_out_rows(m, p.detach()) for m, p in zip(modules, params, strict=True)],
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
            local, where = (torch.tensor(v, dtype=torch.long, device=device) for v in zip(*pos, strict=True))
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
            if isinstance(m, _BN_TYPES) and m.affine:
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
        return [_out_rows(m, p.grad.detach()) for m, p in zip(modules, params, strict=True)]


class TaylorImportance(_GradientCriterion):
    """Σ|W_i ⊙ ∂L/∂W_i| (first-order Taylor, Molchanov et al., 2019); needs ``weight.grad``."""

    kind = "taylor"

    def _score(self, modules, params):
        weights = [_out_rows(m, p.detach()) for m, p in zip(modules, params, strict=True)]
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


IMPORTANCES = {
    "l1": L1Importance,
    "l2": L2Importance,
    "bn": BNScaleImportance,
    "taylor": TaylorImportance,
    "gradient": GradientImportance,
    "random": RandomImportance,
}


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
            if isinstance(m, _BN_TYPES) and m.affine and m.weight.requires_grad:
                penalty = torch.sign(m.weight) * strength
                if m.weight.grad is None:
                    m.weight.grad = penalty
                else:
                    m.weight.grad.add_(penalty)

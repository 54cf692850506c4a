"""Centripetal SGD (Ding et al., CVPR 2019; ALGORITHMS.md section 4): train, then prune losslessly.

C-SGD does not pick filters to throw away. It splits every prunable layer's n filters into k
clusters and trains with a modified gradient that pulls the filters of each cluster together
(the "centripetal" term) while the loss keeps shaping their common mean. Once the members of a
cluster are equal they compute the same channel, so all but one can be removed, their
contribution being added into the consumers' kept input slice: the pruned model computes exactly
what the trained one did.

::

    csgd = accelprune.CSGD(model, example_inputs, 0.5, centripetal_strength=3e-3)  # sparsity
    optimizer = torch.optim.SGD(csgd.param_groups(), lr=0.1, momentum=0.9)
    csgd.register_hook(optimizer)       # or call csgd.apply_gradients() before every step()
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    print(csgd.deviation().total)       # -> 0 as the clusters converge
    print(csgd.prune())                 # params and MACs before and after

What is clustered, and how (this module's decisions where the paper leaves things open):

* **Layers**: every channel group of :class:`accelprune.graph.ModelGraph` (any architecture the
  dependency graph understands; the classifier's outputs are never a group) **whose fold is
  exact** (:func:`fold_blockers`): its members are Conv/Linear producers, BatchNorms and
  Conv/Linear consumers, and everything between them acts on each channel separately. Groups
  with a LayerNorm / RMSNorm / GroupNorm over their channels (a transformer's residual stream),
  attention (MultiheadAttention's packed in_proj, q·kᵀ, softmax), a reduction over the channels
  or an unwrapped parameter over them (a position embedding) are never clustered: by default they
  are skipped and listed with the reasons in :attr:`CSGD.skipped` and in the report;
  ``strict=True`` makes them an error at construction. Transformer MLPs (fc1 rows clustered,
  folded into fc2; SwiGLU's gate and up rows clustered together) are exact. With
  ``prune_coupled=True`` (the default) residual-coupled groups (outputs summed by an add) are
  clustered too, with **one** clustering for all their producers, computed on the concatenation
  of the producers' flattened filters along the feature axis.
* **k** = ``max(1, round((1 - sparsity) * n))`` per group (Python's ``round``: halves go to
  even). Grouped convs (not depthwise) split a group's channels into B blocks
  (:attr:`ChannelGroup.blocks <accelprune.graph.ChannelGroup.blocks>`) that must not be mixed
  and must all keep the same local channels: the B blocks then share one clustering of the
  n/B positions (k = B·max(1, round((1 - sparsity)·n/B))). Depthwise convs are per channel: their
  filters, biases and BNs are clustered with the group, like any producer's.
* **k-means** (:func:`accelprune.selection.cluster_filters`): :func:`scipy.cluster.vq.kmeans2`
  with ``minit="++"`` seeded by
  ``numpy.random.default_rng(seed + group index)`` (the ``++`` seeding is computed here with
  scipy's exact random draws, in O(n·k·d) instead of scipy's O(n·k²·d); see
  :func:`accelprune.selection.cluster_filters`). kmeans2 can return empty clusters, and its
  ``++`` init fails when there are fewer distinct filters than k; both are repaired
  deterministically so that there are always exactly k non-empty clusters: the filter farthest
  from its cluster mean (lowest index on ties) among clusters with more than one member is moved
  into a new cluster, until there are k. ``"even"`` clustering cuts
  the filters into k consecutive blocks whose sizes differ by at most one.
* Cluster ids are numbered by first appearance: cluster c's lowest index is smaller than cluster
  c+1's, and the lowest index of each cluster is the filter :meth:`CSGD.prune` keeps.
* **The transform** (:func:`accelprune.kernels.csgd_transform_`, one fused launch on GPU):
  ``G' = mean_H(G) + η·W + ε·(W − mean_H(W))`` on conv / linear kernels (η =
  ``weight_decay``, ε = ``centripetal_strength``), with η = 0 and 0.1·ε on the producers' biases
  and the BN γ and β. The optimizer's own weight decay must be off for these params
  (:meth:`CSGD.param_groups` does that); params without a ``.grad`` at a step are skipped, as an
  optimizer skips them.
* **Distributed**: under ``torch.distributed`` the clusters are computed on rank 0 and
  broadcast; with DistributedDataParallel the transform runs on the already all-reduced grads
  (``backward()`` returns after DDP's all-reduce), so every rank applies the same update.
* **Folding** (:func:`fold_and_prune`, ALGORITHMS.md §4.3): in every cluster keep the lowest
  channel; add the consumers' input slices of the other members into the kept slice, then remove
  them. :meth:`CSGD.prune` folds every group in one all-or-nothing surgery.
* **Whole attention heads** (opt-in: ``head_sparsity``; :mod:`accelprune.csgd_heads`): units
  (a query head; under GQA a KV head with its query heads) with equal q/k/v rows compute equal
  outputs, so one is removed after adding its output-projection columns onto the other's. Units
  are clustered per attention module on their q/k/v rows, the transform pulls corresponding rows
  together, and :meth:`CSGD.prune` folds heads and channel groups in one surgery. Attention
  whose heads are not uniform (state besides the projections, a forward that treats heads
  differently, a layout not recognised) is refused by name, like a channel group.
"""
from __future__ import annotations

import collections
import dataclasses
import numbers

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from accelprune import csgd_heads, surgery
from accelprune._backend import resolve
from accelprune._distributed import on_rank0
from accelprune._validation import as_int_array, check_fraction, check_int, check_saved_state
from accelprune.attention import HeadGroup
from accelprune.graph import (
    MATMUL_OPS,
    ChannelGroup,
    ModelGraph,
    attention_kind,
    op_name,
    unsupported_hint,
)
from accelprune.hf import sync_config
from accelprune.layers import BATCHNORM_TYPES, PRODUCER_TYPES, conv_groups, is_depthwise
from accelprune.reporting import size_stats
from accelprune.selection import CLUSTERINGS, cluster_filters
from accelprune.tables import format_table

__all__ = ["CSGD", "CSGDReport", "ClusterAssignment", "Deviation", "SkippedGroup",
           "TransformedParam", "feeds_attention", "fold_and_prune", "fold_blockers"]

# Biases and BN affine params are pulled together 10x more gently than kernels, and not decayed.
_SECONDARY_CENTRIPETAL = 0.1


# ---------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class ClusterAssignment:
    """The clusters of one channel group (``labels[i]``: output channel i's cluster) or of one
    attention module's head units (``labels[u]``: unit u's cluster)."""
    name: str               # the group's name (its first producer)
    producers: list[str]    # the layers whose filters were clustered together
    labels: np.ndarray      # (n,) int64, 0..n_clusters-1, numbered by first appearance
    n_clusters: int

    @property
    def kept(self) -> np.ndarray:
        """The channel that survives :meth:`CSGD.prune` in each cluster (its lowest index)."""
        return np.unique(self.labels, return_index=True)[1].astype(np.int64)


@dataclasses.dataclass
class SkippedGroup:
    """A channel group C-SGD leaves alone because folding it would not be exact."""
    name: str               # the group's name (its first producer)
    reasons: list[str]      # see :func:`fold_blockers`

    def __str__(self) -> str:
        return f"{self.name}: {'; '.join(self.reasons)}"


@dataclasses.dataclass
class Deviation:
    """Σ of squared distances of the rows from their cluster means (the paper's χ)."""
    total: float
    groups: dict[str, float]


@dataclasses.dataclass
class CSGDReport:
    """What :meth:`CSGD.prune` removed."""
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: list[tuple[str, int, int]]  # (group name, channels before, channels after)
    skipped: list[SkippedGroup] = dataclasses.field(default_factory=list)  # not foldable exactly
    # with ``head_sparsity``: (attention module, query heads before, query heads after)
    heads: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        rows = [(what, f"{before:,}", f"{after:,}", f"{after / before:.1%}")
                for what, before, after in (("params", self.params_before, self.params_after),
                                            ("MACs", self.macs_before, self.macs_after))]
        return (format_table(("", "before", "after", "kept"), rows)
                + f"\n{len(self.layers)} channel groups: {sum(b for _, b, _ in self.layers)} -> "
                  f"{sum(a for _, _, a in self.layers)} channels"
                + (f"\n{len(self.heads)} attention modules: {sum(b for _, b, _ in self.heads)} -> "
                   f"{sum(a for _, _, a in self.heads)} query heads" if self.heads else "")
                + "".join(f"\nskipped (fold not exact) {s}" for s in self.skipped))


@dataclasses.dataclass
class TransformedParam:
    """One param C-SGD transforms: which group it belongs to and its coefficients."""
    name: str
    param: torch.Tensor
    group: int
    weight_decay: float     # η
    centripetal: float      # ε
    kernel: bool            # a conv / linear kernel (the paper's filters), not a bias or BN param
    role: str = ""          # head params: the projection ("q", "k", "v", "qkv"); "" otherwise

    @property
    def head(self) -> bool:
        """Whether ``group`` indexes :attr:`CSGD.head_groups` (else :attr:`CSGD.groups`)."""
        return bool(self.role)


# ---------------------------------------------------------------------------------------------
# the pipeline


def _nonnegative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


class CSGD:
    """Centripetal SGD on a model: cluster, train with :meth:`apply_gradients`, :meth:`prune`.

    model, example_inputs: the network (pruned in place by :meth:`prune`; a
        DistributedDataParallel wrapper is unwrapped) and inputs for tracing it.
    sparsity: in [0, 1): the fraction of each group's channels removed; a group keeps
        ``max(1, round((1 - sparsity) * n))`` clusters (per block of n/B channels where grouped
        convs split them into B blocks).
    centripetal_strength: ε (paper: 3e-3 for CIFAR ResNet-56, 0.05 for ImageNet ResNet-50).
    weight_decay: η, applied to the clustered kernels inside the transform (and by
        :meth:`param_groups`, by default, to every other param through the optimizer).
    clustering: ``"kmeans"`` or ``"even"`` (see :func:`accelprune.selection.cluster_filters`).
    ignored_layers: module names or modules whose output channels are not clustered.
    prune_coupled: also cluster residual-coupled groups (one clustering shared by all producers).
    strict: what to do with a group whose fold would not be exact (:func:`fold_blockers`: a
        LayerNorm or attention over its channels, ...). False (default): leave it out of the
        clustering and record it, with the reasons, in :attr:`skipped` (and in the report of
        :meth:`prune`); True: raise a ValueError naming every such group and why. Either way
        C-SGD never clusters a group it cannot fold losslessly.
    seed: k-means seed; group i uses ``seed + i`` (i counts the clustered groups).
    backend: ``"auto"`` | ``"triton"`` | ``"reference"``, for
        :func:`accelprune.kernels.csgd_transform_` (``"auto"``: Triton on CUDA tensors).
    process_group: the torch.distributed group whose ranks must agree (default: the world).
    progress: a tqdm bar while tracing the model.
    head_sparsity: ``None`` or 0 (default): heads are left alone, exactly as without it. In
        (0, 1): also remove that fraction of every attention module's units (a unit: a query
        head, or under grouped-query attention a KV head with its query heads; see
        :class:`~accelprune.attention.HeadGroup`). Each module keeps
        ``max(1, round((1 - head_sparsity) * units))`` clusters, found by ``clustering`` on each
        unit's q, k, v rows and biases concatenated (seed ``seed + len(groups) + module index``).
        The transform pulls row j of every unit's q (k, v) block towards the cluster's mean of
        row j (η, ε on weights, 0 and 0.1·ε on biases); :meth:`prune` keeps each cluster's lowest
        unit, adds the others' output-projection columns onto its columns and cuts them, updating
        the modules' head counts and a Hugging Face config. Exact for LLaMA-style q/k/v/o
        Linear layers (RoPE, GQA, per-head-dim q/k norms), BERT, timm's fused qkv and
        nn.MultiheadAttention; attention whose fold would not be exact (state besides the
        projections such as per-head biases, a forward that treats heads differently, found by
        a probe run, an unrecognised layout) goes to :attr:`skipped` (``strict``: raises).
        Clusters in :attr:`head_clusters` (``producers``: the q/k/v projections), modules in
        :attr:`head_groups`.
    """

    def __init__(self, model: nn.Module, example_inputs, sparsity: float, *,
                 centripetal_strength: float = 3e-3, weight_decay: float = 1e-4,
                 clustering: str = "kmeans", ignored_layers=None, prune_coupled: bool = True,
                 strict: bool = False, seed: int = 0, backend: str = "auto", process_group=None,
                 progress: bool = False, head_sparsity: float | None = None):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.sparsity = check_fraction(sparsity, "sparsity")
        self.head_sparsity = (0.0 if head_sparsity is None
                              else check_fraction(head_sparsity, "head_sparsity"))
        self.centripetal_strength = _nonnegative(centripetal_strength, "centripetal_strength")
        self.weight_decay = _nonnegative(weight_decay, "weight_decay")
        if clustering not in CLUSTERINGS:
            raise ValueError(f"unknown clustering {clustering!r}; "
                             f"expected one of {list(CLUSTERINGS)}")
        self.clustering = clustering
        self.seed = check_int(seed, "seed", low=0)
        resolve(backend, fast="triton")  # a bad name fails here, not at the first step
        self.backend, self.process_group = backend, process_group
        self.model, self.example_inputs = model, example_inputs

        self.graph = ModelGraph(model, example_inputs, ignored_layers=ignored_layers,
                                prune_coupled=prune_coupled, progress=progress)
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        self.groups, self.skipped = [], []
        with self.graph.unchanged():
            for g in self.graph.groups:
                reasons = fold_blockers(g)
                if reasons:
                    self.skipped.append(SkippedGroup(g.name, reasons))
                else:
                    self.groups.append(g)
        self.head_groups: list[HeadGroup] = []
        if self.head_sparsity > 0:
            self.head_groups, refused = csgd_heads.foldable_head_groups(self.graph)
            self.skipped += [SkippedGroup(name, reasons) for name, reasons in refused]
        if strict and self.skipped:
            raise ValueError("C-SGD cannot fold these channel groups or attention heads exactly "
                             "(pass their layers in ignored_layers, or strict=False to skip "
                             "them): " + " | ".join(str(s) for s in self.skipped))
        if not self.groups and not self.head_groups:
            skipped = ("; not exactly foldable: " + " | ".join(str(s) for s in self.skipped)
                       if self.skipped else "")
            raise ValueError("the model has nothing C-SGD can prune: the dependency graph found no "
                             "prunable channel groups (after ignored_layers"
                             f"{'' if prune_coupled else ' and coupled groups'}){skipped}"
                             f"{unsupported_hint(model)}")
        self._transformed = self._collect_params()

        labels = on_rank0(self._cluster_all, self.process_group)
        self.clusters = [ClusterAssignment(g.name, list(g.producers), lab, int(lab.max()) + 1)
                         for g, lab in zip(self.groups, labels, strict=True)]
        head_labels = on_rank0(lambda: csgd_heads.cluster_heads(
            self.head_groups, self.head_sparsity, method=self.clustering,
            seed=self.seed + len(self.groups), backend=self.backend),
            self.process_group) if self.head_groups else []
        self.head_clusters = [_head_assignment(g, lab)
                              for g, lab in zip(self.head_groups, head_labels, strict=True)]
        self._row_labels = self._param_labels()
        self._plans: dict[tuple[int, ...], object] = {}
        self._hooks: list = []
        self.pruned = False

    # -- setup ---------------------------------------------------------------------------------

    def _collect_params(self) -> list[TransformedParam]:
        """Every param whose rows are a group's channels (or heads' q/k/v rows), with its (η, ε);
        checks the layers."""
        eps = self.centripetal_strength
        found: list[TransformedParam] = []
        names = {id(p): n for n, p in self.model.named_parameters()}
        for gi, g in enumerate(self.groups):
            for name in g.producers:
                m = self.graph.module(name)
                if not isinstance(m, PRODUCER_TYPES) or getattr(m, "transposed", False):
                    raise ValueError(f"C-SGD cannot cluster the outputs of {name!r} "
                                     f"({type(m).__name__}): its transform pulls rows of dim 0 "
                                     "together, and it supports Conv1d/2d/3d and Linear producers "
                                     "(not transposed convs); pass it in ignored_layers")
                found.append(TransformedParam(names[id(m.weight)], m.weight, gi,
                                              self.weight_decay, eps, kernel=True))
                if m.bias is not None:
                    found.append(TransformedParam(names[id(m.bias)], m.bias, gi, 0.0,
                                                  _SECONDARY_CENTRIPETAL * eps, kernel=False))
            for name in g.bns:
                m = self.graph.module(name)
                for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if isinstance(p, nn.Parameter):
                        found.append(TransformedParam(names[id(p)], p, gi, 0.0,
                                                      _SECONDARY_CENTRIPETAL * eps, kernel=False))
        for hi, g in enumerate(self.head_groups):
            for role, m, attr, kernel in csgd_heads.head_params(g):
                p = getattr(m, attr)
                found.append(TransformedParam(names[id(p)], p, hi,
                                              self.weight_decay if kernel else 0.0,
                                              eps if kernel else _SECONDARY_CENTRIPETAL * eps,
                                              kernel=kernel, role=role))
        seen: dict[int, str] = {}
        for t in found:
            g = self.head_groups[t.group] if t.head else self.groups[t.group]
            if not t.head and t.param.shape[0] != g.n_channels:
                raise ValueError(f"{t.name} has {t.param.shape[0]} rows but group {g.name!r} has "
                                 f"{g.n_channels} channels; C-SGD needs output channels on dim 0")
            if id(t.param) in seen:
                raise ValueError(f"{t.name} belongs to two channel groups ({seen[id(t.param)]!r} "
                                 f"and {g.name!r}); C-SGD cannot cluster it twice")
            seen[id(t.param)] = g.name
        return found

    def _features(self, gi: int) -> np.ndarray:
        """The group's filters (n, Σ F): its producers' kernels flattened and concatenated."""
        kernels = [t.param.detach() for t in self._transformed
                   if t.group == gi and t.kernel and not t.head]
        rows = [k.reshape(k.shape[0], -1).cpu().double() for k in kernels]
        return torch.cat(rows, dim=1).numpy()

    def _cluster_all(self) -> list[np.ndarray]:
        """Labels per group. With grouped convs the channels' B blocks share one clustering of
        the per-block position (features: the B blocks' filters at that position, concatenated),
        so every cluster lies inside one block and each block keeps the same local channels."""
        out = []
        for gi, g in enumerate(self.groups):
            blocks = g.blocks
            per_block = g.n_channels // blocks
            features = self._features(gi).reshape(blocks, per_block, -1)
            features = features.transpose(1, 0, 2).reshape(per_block, -1)
            k = max(1, round((1 - self.sparsity) * per_block))
            try:
                local = cluster_filters(features, k, method=self.clustering, seed=self.seed + gi,
                                        backend="reference" if self.backend == "reference"
                                        else "auto")
            except ValueError as e:
                raise ValueError(f"cannot cluster group {g.name!r}: {e}") from None
            out.append((np.arange(blocks)[:, None] * k + local[None, :]).reshape(-1))
        return out

    def _param_labels(self) -> list[np.ndarray]:
        """Each transformed param's row labels: its channel group's labels, or for a head
        param the rows of each unit block (:func:`accelprune.csgd_heads.head_row_labels`)."""
        return [csgd_heads.head_row_labels(self.head_groups[t.group], t.role,
                                           self.head_clusters[t.group].labels)
                if t.head else self.clusters[t.group].labels for t in self._transformed]

    def _check_live(self) -> None:
        if self.pruned:
            raise RuntimeError("this CSGD has already pruned its model; its clusters no longer "
                               "match the layers (build a new CSGD to train the pruned model)")

    # -- training ------------------------------------------------------------------------------

    @property
    def transformed(self) -> list[TransformedParam]:
        """The params C-SGD transforms, in group order, with their group index, η and ε."""
        return list(self._transformed)

    def param_groups(self, **options) -> list[dict]:
        """Optimizer param groups: weight decay off for the transformed params, on for the rest.

        ``options`` (lr, momentum, ...) go into both groups; ``weight_decay`` (default: this
        CSGD's η) only into the group of the other params. Use as
        ``torch.optim.SGD(csgd.param_groups(), lr=0.1, momentum=0.9)``.
        """
        weight_decay = options.pop("weight_decay", self.weight_decay)
        ids = {id(t.param) for t in self._transformed}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        groups = [{"params": rest, **options, "weight_decay": weight_decay}] if rest else []
        groups.append({"params": [t.param for t in self._transformed], **options,
                       "weight_decay": 0.0})
        return groups

    def _plan(self, present: tuple[int, ...]):
        from accelprune.kernels import CSGDPlan

        if present not in self._plans:
            picked = [self._transformed[i] for i in present]
            self._plans[present] = CSGDPlan([t.param for t in picked],
                                            [self._row_labels[i] for i in present])
        return self._plans[present]

    def apply_gradients(self) -> None:
        """Transform every clustered param's ``.grad`` in place (one call, one launch on GPU).

        Call after ``backward()`` (under DDP: on the all-reduced grads) and before
        ``optimizer.step()``, exactly once per step; or let :meth:`register_hook` call it. With a
        ``GradScaler``, call ``scaler.unscale_(optimizer)`` first (the hook runs after it).
        """
        from accelprune.kernels import csgd_transform_

        self._check_live()
        present = tuple(i for i, t in enumerate(self._transformed) if t.param.grad is not None)
        if not present:
            return
        picked = [self._transformed[i] for i in present]
        csgd_transform_([t.param for t in picked], self._plan(present),
                        weight_decay=[t.weight_decay for t in picked],
                        centripetal=[t.centripetal for t in picked], backend=self.backend)

    def register_hook(self, optimizer: torch.optim.Optimizer):
        """Run :meth:`apply_gradients` at the start of every ``optimizer.step()``.

        Composes with any optimizer (momentum, Adam, ...): the optimizer sees the transformed
        gradients. The optimizer must not decay the transformed params itself (η is in the
        transform); build it from :meth:`param_groups`. Returns the removable hook handle (also
        removed by :meth:`prune`).
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("optimizer must be a torch.optim.Optimizer, "
                            f"got {type(optimizer).__name__}")
        self._check_live()
        ids = {id(t.param): t.name for t in self._transformed}
        for group in optimizer.param_groups:
            if group.get("weight_decay", 0):
                decayed = [ids[id(p)] for p in group["params"] if id(p) in ids]
                if decayed:
                    raise ValueError(f"the optimizer applies weight_decay={group['weight_decay']} "
                                     f"to params C-SGD transforms ({decayed[0]}, ...), which would "
                                     "decay them twice; build it from csgd.param_groups()")
        handle = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.apply_gradients())
        self._hooks.append(handle)
        return handle

    def deviation(self, *, kernels_only: bool = False) -> Deviation:
        """Σ‖row − its cluster's mean‖² per group (and per attention module, keyed by its name,
        with ``head_sparsity``) and in total (the paper's χ).

        By default over every transformed param of a group (kernels, biases, BN γ and β: all
        must converge for pruning to be lossless); ``kernels_only=True`` gives χ over the
        filters alone.
        """
        self._check_live()
        groups = {g.name: 0.0 for g in [*self.groups, *self.head_groups]}
        with torch.no_grad():
            for t, labels in zip(self._transformed, self._row_labels, strict=True):
                if kernels_only and not t.kernel:
                    continue
                W = t.param.detach().reshape(t.param.shape[0], -1).double()
                k = int(labels.max()) + 1  # on the host: no device sync
                labels = torch.from_numpy(labels).to(W.device)
                sums = W.new_zeros(k, W.shape[1]).index_add_(0, labels, W)
                means = sums / torch.bincount(labels, minlength=k).to(W.dtype)[:, None]
                name = (self.head_groups if t.head else self.groups)[t.group].name
                groups[name] += float(((W - means[labels]) ** 2).sum())
        return Deviation(sum(groups.values()), groups)

    # -- pruning -------------------------------------------------------------------------------

    def prune(self) -> CSGDReport:
        """Keep the lowest index of every cluster, fold the others into the consumers, remove them.

        Lossless once the clusters have converged (:meth:`deviation` ≈ 0, and the BN running
        statistics with them). The model is changed in place, all groups or none: if any fold
        fails the model is restored exactly and a ValueError names the fold and the reason
        (:func:`accelprune.csgd_heads.fold_checked`). The optimizer and any
        DistributedDataParallel wrapper must be rebuilt for the new params. Every rank prunes its
        own replica with the shared clusters, so DDP replicas stay identical.
        """
        self._check_live()
        for g, c in zip(self.groups, self.clusters, strict=True):
            if g.n_channels != len(c.labels):
                raise RuntimeError(f"group {g.name!r} has {g.n_channels} channels but was "
                                   f"clustered with {len(c.labels)}: the model was pruned by "
                                   "someone else")
        for g, c in zip(self.head_groups, self.head_clusters, strict=True):
            if g.n_units != len(c.labels):
                raise RuntimeError(f"attention {g.name!r} has {g.n_units} units but was "
                                   f"clustered with {len(c.labels)}: its heads were pruned by "
                                   "someone else")
        before = size_stats(self.model, self.example_inputs)
        widths = [g.n_channels for g in self.groups]
        heads = [g.num_heads for g in self.head_groups]
        folding = [(g, c) for g, c in zip(self.groups, self.clusters, strict=True)
                   if c.n_clusters < g.n_channels]
        head_folding = [(g, c) for g, c in zip(self.head_groups, self.head_clusters, strict=True)
                        if c.n_clusters < g.n_units]
        if folding or head_folding:  # one surgery, one check, one wording of its failures
            csgd_heads.fold_checked(self.graph, [(g, c.labels) for g, c in folding],
                                    [(g, c.labels) for g, c in head_folding], _fold)
            sync_config(self.model)  # a Hugging Face config follows the new widths and heads
        self.pruned = True  # the clusters no longer describe the model
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        after = size_stats(self.model, self.example_inputs)
        layers = [(g.name, n, g.n_channels) for g, n in zip(self.groups, widths, strict=True)]
        return CSGDReport(before["params"], after["params"], before["macs"], after["macs"], layers,
                          list(self.skipped),
                          [(g.name, h, g.num_heads)
                           for g, h in zip(self.head_groups, heads, strict=True)])

    def __repr__(self) -> str:
        channels = sum(c.labels.size for c in self.clusters)
        kept = sum(c.n_clusters for c in self.clusters)
        skipped = f", {len(self.skipped)} skipped (fold not exact)" if self.skipped else ""
        if self.head_groups:
            units = sum(c.labels.size for c in self.head_clusters)
            skipped = (f", {len(self.head_groups)} attention modules, {units} -> "
                       f"{sum(c.n_clusters for c in self.head_clusters)} head units{skipped}")
        return (f"CSGD({len(self.groups)} groups, {channels} -> {kept} channels{skipped}, "
                f"clustering={self.clustering!r}, ε={self.centripetal_strength}, "
                f"η={self.weight_decay}{', pruned' if self.pruned else ''})")

    # -- checkpoint / resume -------------------------------------------------------------------

    _STATE_CONFIG = ("sparsity", "centripetal_strength", "weight_decay", "clustering", "seed",
                     "head_sparsity")
    _STATE_DEFAULTS = {"head_sparsity": 0.0}  # states saved before the key existed

    def state_dict(self) -> dict:
        """The clusters (which training pulls together) and settings: rebuilding a CSGD on a
        checkpointed model would re-run k-means on the trained filters and find other clusters.
        Plain data and int64 tensors (``torch.load(..., weights_only=True)`` reads it).

        Resuming an interrupted run, bit for bit::

            # after some epoch t
            accelprune.save(model, "model.pt")
            torch.save({"csgd": csgd.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(), "epoch": t}, "state.pt")
            # later, in a new process
            model = accelprune.load("model.pt", build_model())
            state = torch.load("state.pt", weights_only=True)
            csgd = CSGD(model, example_inputs, sparsity, ...)  # the same settings
            csgd.load_state_dict(state["csgd"])
            optimizer = torch.optim.SGD(csgd.param_groups(...), ...)
            optimizer.load_state_dict(state["optimizer"])
            csgd.register_hook(optimizer)
            torch.set_rng_state(state["rng"])
        """
        return {
            "format": "accelprune.CSGD", "version": 1,
            "config": {k: getattr(self, k) for k in self._STATE_CONFIG},
            "groups": [g.name for g in self.groups],
            "labels": [torch.from_numpy(c.labels.copy()) for c in self.clusters],
            "head_groups": [g.name for g in self.head_groups],
            "head_labels": [torch.from_numpy(c.labels.copy()) for c in self.head_clusters],
            "pruned": self.pruned,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (see there for the recipe): the clusters replace
        this CSGD's own. Same settings and the same (unpruned) model required; otherwise
        ValueError, and nothing is changed."""
        check_saved_state(state, "CSGD", {k: getattr(self, k) for k in self._STATE_CONFIG},
                          self._STATE_DEFAULTS)
        if list(state["groups"]) != [g.name for g in self.groups]:
            raise ValueError("the state's channel groups differ from this CSGD's: build it on "
                             "the model saved with the state, with the same ignored_layers")
        if list(state.get("head_groups", [])) != [g.name for g in self.head_groups]:
            raise ValueError("the state's attention head groups differ from this CSGD's: build "
                             "it on the model saved with the state, with the same settings")
        if state["pruned"]:
            raise ValueError("the state is of a CSGD that has already pruned its model")
        clusters = []
        for g, c, labels in zip(self.groups, self.clusters, state["labels"], strict=True):
            labels = as_int_array(labels, f"labels of {g.name!r}", ndim=1)
            if labels.shape != c.labels.shape or not _numbered(labels):
                raise ValueError(f"the state's labels of {g.name!r} do not fit its "
                                 f"{g.n_channels} channels")
            clusters.append(ClusterAssignment(c.name, list(c.producers), labels,
                                              int(labels.max()) + 1))
        head_clusters = []
        for g, labels in zip(self.head_groups, state.get("head_labels", []), strict=True):
            labels = as_int_array(labels, f"head labels of {g.name!r}", ndim=1)
            if labels.shape != (g.n_units,) or not _numbered(labels):
                raise ValueError(f"the state's head labels of {g.name!r} do not fit its "
                                 f"{g.n_units} units")
            head_clusters.append(_head_assignment(g, labels))
        self.clusters, self.head_clusters = clusters, head_clusters
        self._row_labels = self._param_labels()
        self._plans.clear()  # built from the old labels


def _numbered(labels: np.ndarray) -> bool:
    """Labels are 0..k-1, each used."""
    return labels.size > 0 and np.array_equal(np.unique(labels), np.arange(labels.max() + 1))


def _head_assignment(group: HeadGroup, labels: np.ndarray) -> ClusterAssignment:
    """The clusters of an attention module's units (``producers``: its q/k/v projections)."""
    return ClusterAssignment(group.name, [n for r, n in group.projections.items() if r != "o"],
                             labels, int(labels.max()) + 1)


# ---------------------------------------------------------------------------------------------
# when is a fold exact?
#
# Folding cluster members into one channel (add the consumers' input columns, drop the others) is
# exact when, between the producers and the consumers, every channel is computed on its own and
# enters the consumers linearly: then equal producer rows give equal channels, and a linear
# consumer of k equal channels equals one channel times the summed columns. So the group's members
# must be Conv/Linear producers (their rows pulled together), BatchNorms (γ, β pulled together,
# statistics per channel), and Conv/Linear consumers; and every operation on the way must act on
# each channel separately (activations, adds of clustered tensors, products of clustered tensors,
# reshapes, per-channel pooling, a consumer's own matmul). A LayerNorm / RMSNorm / GroupNorm over
# the channels, attention (q·kᵀ contracts the channels; a softmax mixes them), a reduction over
# the channel dim or a per-channel tensor that is not pulled together (a position embedding, a
# layer scale) makes every remaining channel depend on the removed ones: not foldable exactly.

# grad_fn names (without the "Backward<n>" suffix) of operations that act on every channel on its
# own: element-wise arithmetic and activations, moves of data, dropout, per-channel pooling.
# Left out on purpose: repeat / flip / roll (they may duplicate or reorder the channels).
_PER_CHANNEL_OPS = frozenset("""
    Add Sub Mul Div Neg Abs Exp Log Pow Sqrt Rsqrt Erf Reciprocal Sign Clamp ClampMin ClampMax
    Relu Relu6 Gelu Silu Sigmoid Tanh Hardtanh Hardswish Hardsigmoid LeakyRelu Elu Selu Celu
    Softplus Mish Threshold Where MaskedFill
    ToCopy Clone Alias View UnsafeView Reshape Permute Transpose T Squeeze Unsqueeze Expand
    Select Slice Cat Split SplitWithSizes Unbind Stack ConstantPadNd Narrow
    NativeDropout Dropout
    AvgPool1D AvgPool2D AvgPool3D MaxPool2DWithIndices MaxPool3DWithIndices AdaptiveAvgPool2D
    AdaptiveAvgPool3D AdaptiveMaxPool2D AdaptiveMaxPool3D UpsampleNearest1D UpsampleNearest2D
    UpsampleBilinear2D
""".split())
# Matrix products (accelprune.graph.MATMUL_OPS): exact only as a consumer's own product (Linear
# on a 3-D input runs an addmm Torch-Pruning lists separately); elsewhere they contract the
# channels with something that is not a weight (attention's q·kᵀ, attention-weighted values).
# Reductions: exact when the reduced dims are not the channels' (global average pooling).
_REDUCTION_OPS = frozenset("Mean Sum Amax Amin Max Min Prod Std Var".split())

_WHY_MODULE = {
    "LayerNorm": "normalises over these channels: every channel's output depends on the removed "
                 "ones (mean and variance)",
    "RMSNorm": "normalises over these channels: every channel's output depends on the removed "
               "ones (root mean square)",
    "GroupNorm": "normalises over groups of these channels: every channel's output depends on the "
                 "removed ones",
    "MultiheadAttention": "packs q, k and v into in_proj and contracts these channels in q·kᵀ "
                          "(then softmax): attention is not linear in them",
    "Embedding": "produces these channels from a lookup table C-SGD does not pull together",
}


def _module_blocker(graph: ModelGraph, m: nn.Module, name: str, fn) -> str | None:
    if isinstance(m, PRODUCER_TYPES) and graph.DG.is_in_channel_pruning_fn(fn):
        return None  # a consumer: its input columns are folded
    if isinstance(m, PRODUCER_TYPES):
        return None  # a producer (a transposed conv is refused by name when params are collected)
    if isinstance(m, BATCHNORM_TYPES):
        return None
    kind = type(m).__name__
    why = next((v for k, v in _WHY_MODULE.items() if k.lower() in kind.lower()), None)
    if why is None and "norm" in kind.lower():
        why = _WHY_MODULE["LayerNorm"]
    if why is None:
        why = ("is a member C-SGD can neither pull together (it pulls Conv/Linear rows and "
               "BatchNorm γ, β) nor fold")
    return f"{kind} {name!r} {why}"


def _op_blocker(graph: ModelGraph, group: ChannelGroup, node, consumers: set) -> str | None:
    if node.type == tp.ops.OPTYPE.PARAMETER:
        param = getattr(graph.DG, "_param_to_name", {}).get(node.module, "?")
        owner_name = param.rpartition(".")[0]
        owner = graph.model.get_submodule(owner_name) if owner_name else None
        if owner is not None and "norm" in type(owner).__name__.lower():
            return _module_blocker(graph, owner, owner_name, None)  # a norm Torch-Pruning
            # does not know (LlamaRMSNorm): its weight shows up as a bare parameter
        return (f"parameter {param!r} (e.g. a position embedding, class token or layer scale) "
                "carries these channels and is not pulled together")
    if node.type in (tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT,
                     tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND, tp.ops.OPTYPE.SLICE):
        return None  # data moves: channel identity is kept (Torch-Pruning maps the indices)
    if node.type != tp.ops.OPTYPE.ELEMENTWISE or node.grad_fn is None:
        return f"operation {node.name} is not known to act on each channel separately"
    op = op_name(node)
    if op in _PER_CHANNEL_OPS:
        return None
    if op in MATMUL_OPS:
        if node.outputs and all(o.module in consumers for o in node.outputs):
            return None  # the consumer's own product (Linear on 3-D inputs)
        return (f"a matrix product ({op}) contracts these channels with something other than a "
                "consumer's weight (attention's q·kᵀ or attention-weighted values)")
    if op in _REDUCTION_OPS:
        dims = getattr(node.grad_fn, "_saved_dim", None)
        sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
        if dims is not None and sizes is not None:
            rank = len(sizes)
            dims = [d - (1 << 64) if d >= (1 << 63) else d for d in dims]  # saved as uint64
            if all(-rank <= d < rank for d in dims):
                dims = [d % rank for d in dims]
                n = group.n_channels
                if all(sizes[d] != n for d in dims):
                    return None  # no reduced dim can be the channels'
                if rank >= 3 and sizes[1] == n and min(dims) >= 2:
                    return None  # channels-first (N, C, *space) pooled over space
        return f"a reduction ({op}) over these channels: the result depends on the removed ones"
    return (f"operation {op} acts across these channels (e.g. a softmax, a normalisation or "
            "attention), or is not known to act on each one separately")


def _members(group: ChannelGroup, tp_group=None):
    """(node, handler) of every member of the group, and the consumers' modules.
    ``tp_group``: the group's :meth:`~ChannelGroup.tp_group` when the caller has it already."""
    DG = group._graph.DG
    tp_group = group.tp_group() if tp_group is None else tp_group
    members = [(dep.target, dep.handler) for dep, _ in tp_group]
    consumers = {node.module for node, fn in members
                 if isinstance(node.module, PRODUCER_TYPES) and DG.is_in_channel_pruning_fn(fn)}
    return members, consumers


def feeds_attention(group: ChannelGroup) -> bool:
    """Whether the group's channels go through attention: a MultiheadAttention member, a
    scaled-dot-product attention or softmax, or a matrix product that is not a consumer's own
    (q·kᵀ). Such channels are heads' q/k/v or the residual stream; removing single channels of
    q/k/v breaks the reshape into heads, so only whole heads could go.

    On a graph with no attention-like node at all (:attr:`ModelGraph.attention_free`, answered
    once per graph) no group is searched: False at once, as the search would find."""
    if group._graph.attention_free:
        return False
    return _group_feeds_attention(group)


def _group_feeds_attention(group: ChannelGroup) -> bool:
    """The search of :func:`feeds_attention` through the group's members (the reference its
    graph-wide shortcut must agree with)."""
    members, consumers = _members(group)
    for node, _ in members:
        kind = attention_kind(node)
        if kind == "attention":
            return True
        if kind == "matmul" and not (node.outputs
                                     and all(o.module in consumers for o in node.outputs)):
            return True
    return False


def fold_blockers(group: ChannelGroup) -> list[str]:
    """Why C-SGD's fold of ``group`` would not be exact (empty when it is exact).

    The fold is exact when every member is a Conv/Linear producer (rows pulled together), a
    BatchNorm (γ, β pulled together) or a Conv/Linear consumer (columns folded), and every
    operation between producers and consumers acts on each channel separately: element-wise
    arithmetic and activations (including products and sums of clustered tensors), reshapes,
    concats and splits, dropout, per-channel pooling and reductions over other dims, and a
    consumer's own matrix product. Anything else is a reason: a LayerNorm / RMSNorm /
    GroupNorm over the channels, MultiheadAttention (packed in_proj, q·kᵀ), another matrix product,
    softmax, a reduction over the channels, an unwrapped parameter over them (a position
    embedding), an Embedding producer, an unknown module or operation (refused to be safe).
    """
    if not isinstance(group, ChannelGroup):
        raise TypeError(f"group must be a ChannelGroup, got {type(group).__name__}")
    graph, tp_group = group._graph, group.tp_group()
    members, consumers = _members(group, tp_group)
    reasons: list[str] = [
        f"{type(group.module(name)).__name__} {name!r} has {width} channels, the group "
        f"{group.n_channels} (a concat): its rows are not the group's channels"
        for name, width in group.partial_members]
    for node, fn in members:
        m = node.module
        name = graph._names.get(m) if isinstance(m, nn.Module) else None
        if name is not None:
            why = _module_blocker(graph, m, name, fn)
        else:
            why = _op_blocker(graph, group, node, consumers)
        if why is not None and why not in reasons:
            reasons.append(why)
    reasons += _uneven_consumers(group, tp_group)
    return reasons


def _uneven_consumers(group: ChannelGroup, tp_group) -> list[str]:
    """Consumers whose input columns are not the same number for every channel of the group
    (Torch-Pruning's mapping through a strided reshape, as in LeViT's attention subsample):
    the fold adds one channel's columns onto another's, so it needs blocks of equal size.
    Found here, before training, rather than when :meth:`CSGD.prune` folds."""
    graph, out = group._graph, []
    for item in tp_group:
        m = item.dep.target.module
        if not (isinstance(m, PRODUCER_TYPES)
                and graph.DG.is_in_channel_pruning_fn(item.dep.handler) and not is_depthwise(m)):
            continue
        counts = collections.Counter(int(root) for root in item.root_idxs)  # columns per channel
        if len(set(counts.values())) > 1 or len(counts) not in (0, group.n_channels):
            out.append(f"consumer {graph.name_of(m)!r} sees the channels through column blocks "
                       "of different sizes (a reshape Torch-Pruning maps unevenly): the fold "
                       "cannot add one channel's columns onto another's")
    return out


# ---------------------------------------------------------------------------------------------
# folding (ALGORITHMS.md §4.3)


def fold_and_prune(group: ChannelGroup, clusters) -> None:
    """C-SGD's pruning of one channel group: in every cluster keep the lowest channel; add the
    consumers' input slices of the other members into the kept slice, then remove them.

    clusters: 1-D int labels, one per current channel (any integers; equal = same cluster).
    Lossless once the producers' filters (and BN entries) of each cluster are identical. All or
    nothing: checked by a forward pass; on failure the model is restored exactly and a ValueError
    says why, as :meth:`CSGD.prune` does (:func:`accelprune.csgd_heads.fold_checked`). A group whose
    fold cannot be exact (:func:`fold_blockers`) is refused with a ValueError giving the reasons.
    """
    if not isinstance(group, ChannelGroup):
        raise TypeError(f"group must be a ChannelGroup, got {type(group).__name__}")
    labels = as_int_array(clusters, "clusters", ndim=1)
    if labels.shape[0] != group.n_channels:
        raise ValueError(f"clusters has {labels.shape[0]} labels, but group {group.name!r} has "
                         f"{group.n_channels} channels")
    reasons = fold_blockers(group)
    if reasons:
        raise ValueError(f"group {group.name!r} cannot be folded exactly: {'; '.join(reasons)}")
    if len(np.unique(labels)) == group.n_channels:
        return
    csgd_heads.fold_checked(group._graph, [(group, labels)], [], _fold)


def _fold(graph: ModelGraph, group: ChannelGroup, labels: np.ndarray) -> None:
    """Fold and cut one group (unchecked: callers run it under
    :func:`accelprune.csgd_heads.fold_checked`)."""
    kept_of = dict(zip(*np.unique(labels, return_index=True), strict=True))
    merge = [(c, int(kept_of[lab])) for c, lab in enumerate(labels) if kept_of[lab] != c]
    for item in group.tp_group():
        m = item.dep.target.module
        if not (isinstance(m, PRODUCER_TYPES)
                and graph.DG.is_in_channel_pruning_fn(item.dep.handler) and not is_depthwise(m)):
            continue
        # the consumer's input indices of each group channel: one for a conv (at the concat
        # offset, if any), a block of columns for a Linear after flatten
        cols: dict[int, list[int]] = {}
        for local, root in zip(item.idxs, item.root_idxs, strict=True):
            cols.setdefault(int(root), []).append(int(local))
        _fold_weight(m, graph.name_of(m), cols, merge)
    surgery.cut_group(graph, group, np.sort(np.array(list(kept_of.values()), dtype=np.int64)))


def _fold_weight(m: nn.Module, name: str, cols: dict[int, list[int]], merge) -> None:
    """New weight for consumer ``m``: column block of c added into that of k (per conv group)."""
    w = m.weight.detach().clone()
    if isinstance(m, nn.Linear):
        view, in_per_group, out_per_group = w, w.shape[1], w.shape[0]
    elif m.transposed:  # (in, out/groups, ...): input channels are rows
        if m.groups > 1:
            raise ValueError(
                f"fold_and_prune does not support grouped transposed conv consumer {name!r}")
        view, in_per_group, out_per_group = w.transpose(0, 1), w.shape[0], w.shape[1]
    else:  # (out, in/groups, ...)
        view, in_per_group = w, w.shape[1]
        out_per_group = w.shape[0] // conv_groups(m) if conv_groups(m) > 1 else w.shape[0]
    for c, k in merge:
        src, dst = cols.get(c, []), cols.get(k, [])
        if len(src) != len(dst):
            raise ValueError(
                f"consumer {name!r} sees channels {c} and {k} through blocks of different sizes")
        for s, d in zip(src, dst, strict=True):
            gs, gd = s // in_per_group, d // in_per_group
            if gs != gd:
                raise ValueError(f"cannot fold channel {c} into {k}: they feed different groups "
                                 f"of grouped conv {name!r}")
            rows = slice(gs * out_per_group, (gs + 1) * out_per_group)  # that conv group's outputs
            view[rows, d % in_per_group] += view[rows, s % in_per_group]
    new = nn.Parameter(w, requires_grad=m.weight.requires_grad)
    if m.weight.grad is not None:  # keep the gradient (optimizer-state tracking relies on it)
        new.grad = m.weight.grad
    m.weight = new

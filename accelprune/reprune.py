"""REPrune on a whole model: one-shot, or concurrent with training on a sparsity schedule.

See :mod:`accelprune.selection` for the per-layer selection (:func:`reprune_select`,
:func:`layer_keep_counts`) and ALGORITHMS.md section 3 for the method. This module decides
*which layers* are pruned and *when*:

* prunable layers are the channel groups of :class:`accelprune.graph.ModelGraph` with a single
  producing layer (``prune_coupled=False``: the paper's residual rules; outputs that feed a
  residual add are coupled and left alone), minus the stem (the first conv the input meets)
  unless ``prune_stem=True``; the classifier's outputs are never a group. Gated MLPs (SwiGLU,
  GeGLU: two producers whose outputs are *multiplied*, e.g. LLaMA's gate_proj and up_proj) are
  not residual-coupled: they are pruned by default, one selection over both producers' filters;
* each layer's budget k_l comes from one global threshold on a per-channel score (BatchNorm |γ|
  as in the paper, or, without BatchNorm, a norm's |γ| or the filter's L2 norm made comparable
  across layers; see :class:`REPrune`, "Layer budgets");
* a pruning event targets ``round((1 - s) * original total)`` kept channels, s taken from the
  schedule at that epoch: always measured against the original widths, so events never compound;
* under ``torch.distributed`` rank 0 decides and broadcasts the kept indices, so every rank
  ends the event with the same model.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from accelprune._backend import resolve
from accelprune._distributed import on_rank0
from accelprune._validation import check_fraction, check_int, check_saved_state
from accelprune.coverage import warmup
from accelprune.csgd import feeds_attention
from accelprune.graph import ModelGraph, unsupported_hint
from accelprune.layers import BATCHNORM_TYPES, PRODUCER_TYPES, out_channel_view
from accelprune.optim_state import track_parameters
from accelprune.reporting import meta_copy, size_stats
from accelprune.schedule import SCHEDULES, sparsity_at
from accelprune.selection import keep_floor, layer_keep_counts, reprune_select
from accelprune.tables import format_table

__all__ = ["REPrune", "REPruneReport", "PruningEvent", "LayerRecord", "BUDGETS"]

# How REPrune sets each layer's number of kept channels (see REPrune's docstring).
BUDGETS = ("auto", "uniform")


@dataclass
class LayerRecord:
    """One layer in one pruning event."""

    name: str
    original: int             # width before any pruning
    before: int               # width when the event started
    kept: int                 # k_l
    sparsity: float           # 1 - k_l / original
    # into the channels at the start of the event, in selection order
    kept_indices: list[int] = field(repr=False, default_factory=list)
    # the clustering; None where the event pruned nothing in this layer (no clustering run)
    height: float | None = None          # layer-wide cut-off h_l
    clusters_min: int | None = None      # clusters per input channel after the cut
    clusters_mean: float | None = None
    clusters_max: int | None = None
    coverage: float | None = None        # share of the (channel, cluster) pairs kept filters cover
    # what ranked this layer's channels for the budget: "bn" (BatchNorm |γ|), "norm" (another
    # norm's |γ|: LayerNorm, RMSNorm), "filter" (L2 norm of the filters), "uniform"
    score: str | None = None


@dataclass
class PruningEvent:
    epoch: int | None
    target_sparsity: float
    target_channels: int      # round((1 - s) * original total)
    kept_channels: int        # >= target (the floor may hold it above)
    gamma_threshold: float    # γ* (on the scores the budget used); -inf when nothing was pruned
    layers: list[LayerRecord]
    seconds: dict[str, float]  # "selection" (threshold, clustering, coverage), "surgery"


@dataclass
class REPruneReport:
    """Per-layer state after the latest event, and the model's size before and now."""

    layers: list[LayerRecord]
    events: list[PruningEvent]
    original_channels: int
    kept_channels: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    @property
    def sparsity(self) -> float:
        return 1 - self.kept_channels / self.original_channels

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity}

    def __str__(self) -> str:
        def fmt(v, spec):
            return "-" if v is None else format(v, spec)

        rows = []
        for r in self.layers:
            clusters = ("-" if r.clusters_min is None
                        else f"{r.clusters_min}/{r.clusters_mean:.1f}/{r.clusters_max}")
            rows.append((r.name, r.original, r.kept, f"{r.sparsity:.1%}", fmt(r.height, ".4f"),
                         clusters, fmt(r.coverage, ".1%")))
        table = format_table(("layer", "orig", "kept", "s_l", "h_l", "clusters min/mean/max",
                              "coverage"), rows)
        return (f"{table}\nchannels {self.original_channels} -> {self.kept_channels} "
                f"(sparsity {self.sparsity:.1%}); params {self.params_before:,} -> "
                f"{self.params_after:,}; MACs {self.macs_before:,} -> {self.macs_after:,}")


def _norm_scales(group) -> list[torch.Tensor]:
    """The per-channel scales γ of the non-BatchNorm norms (LayerNorm, RMSNorm, ...) over exactly
    the group's channels: weights with n entries of modules whose class name contains "Norm".
    Torch-Pruning lists known norms as modules and unknown ones (LlamaRMSNorm) by their weight."""
    graph, n = group._graph, group.n_channels
    found: dict[int, torch.Tensor] = {}
    for dep, _ in group.tp_group():
        m = dep.target.module
        if isinstance(m, nn.Parameter):  # a bare weight: find the module that owns it
            owner = getattr(graph.DG, "_param_to_name", {}).get(m, "").rpartition(".")[0]
            m = graph.model.get_submodule(owner) if owner else None
        if (isinstance(m, nn.Module) and not isinstance(m, BATCHNORM_TYPES)
                and "norm" in type(m).__name__.lower()):
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == n:
                found[id(m)] = w.detach()
    return list(found.values())


def _bn_scales(group) -> list[torch.Tensor]:
    """|γ| of each BatchNorm over the group's channels, at those channels, in channel order.
    A BatchNorm after a concat (DenseNet's norm1 over all earlier layers' outputs) is wider
    than the group: the group's channels are a slice of it, found through Torch-Pruning's
    index mapping (``idxs``: positions in that BatchNorm, ``root_idxs``: the group's own)."""
    wanted = {id(group.module(b)) for b in group.bns}
    found: dict[int, torch.Tensor] = {}
    for item in group.tp_group():
        m = item.dep.target.module
        if id(m) not in wanted or id(m) in found:
            continue
        pairs = [(int(i), int(r)) for i, r in zip(item.idxs, item.root_idxs, strict=True)
                 if 0 <= int(r) < group.n_channels]
        if not pairs:
            continue
        local, root = (torch.as_tensor(v) for v in zip(*pairs, strict=True))
        scale = torch.full((group.n_channels,), float("nan"), dtype=torch.float64)
        scale[root] = m.weight.detach().abs().cpu().double()[local]
        if not torch.isnan(scale).any():  # a BatchNorm over only part of them scores none
            found[id(m)] = scale
    return list(found.values())


class REPrune:
    """REPrune on a model: ``prune()`` once, or ``step(epoch, optimizer)`` every epoch.

    model, example_inputs: the network (pruned in place) and inputs for tracing it.
    sparsity: final channel sparsity s over the prunable layers, in [0, 1): the model keeps
        ``round((1 - s) * original total)`` of their channels (more where floors hold).
    schedule: "constant" (the whole target at the first event: one-shot) or a ramp from
        :data:`accelprune.schedule.SCHEDULES` ("linear", "cubic", ...), from 0 at epoch 0 to s at
        the last event.
    delta_t, t_prune: events happen at epochs t with ``t % delta_t == 0 and t <= t_prune``.
        ``t_prune`` is required for ramps (it sets where s is reached); for "constant" None
        means no limit (events after the first find the target reached and do nothing).
    min_keep_ratio: floor ρ: a layer keeps at least ``max(1, ceil(ρ * original width))``.
    budget: "auto" (the global threshold below) or "uniform" (every layer keeps
        ``max(k_min, round((1 - s) * original width))`` of its channels, capped at its width).
    ignored_layers: module names or modules whose output channels are not pruned.
    prune_coupled: also prune groups with several producers (residual adds) - off by default,
        as in the paper; their score is the mean |γ| of their BNs, and their producers' input
        channels are pooled into one selection.
    prune_stem: also prune the first convolution's outputs (off by default, as in the paper).
    tie_break, seed: greedy coverage ties (layer i uses ``seed + i``).
    backend: "auto" | "native" | "reference", as :func:`accelprune.selection.reprune_select`
        (all select the same filters).
    progress: show a tqdm bar over layers during an event.
    process_group: the torch.distributed group whose ranks must agree (default: the world).

    Attributes: ``groups`` (the layers pruned) and ``skipped`` (``{group name: reason}``): groups
    whose channels go through attention (q/k/v of a head: only whole heads could go, which
    REPrune does not select; a residual stream with a MultiheadAttention in it) and, unless
    ``prune_coupled``, residual-coupled groups (a transformer's hidden size).

    Layer budgets (``budget="auto"``). Each channel c of layer l gets a score r_c:

    * ``"bn"``: |γ_c| of the BatchNorm(s) over the group's channels (mean over them when several);
    * ``"norm"``, where no BatchNorm is there: |γ_c| of the LayerNorm / RMSNorm (any module whose
      class name contains "Norm" with a per-channel ``weight``) whose weight has exactly the
      group's n entries, i.e. that normalises exactly these channels (mean over several);
    * ``"filter"``, where neither is: the L2 norm of channel c's filter, all producers' rows
      concatenated (for a gated MLP: [gate_c, up_c]).

    When every layer scores by "bn" (the paper's setting) the threshold γ* is taken on raw |γ|
    exactly as in ALGORITHMS.md §3.1. Otherwise the scores are made comparable across layers by
    dividing each layer's scores by their mean over its current channels (r_c / mean_l r, so every
    layer averages 1, whatever its fan-in or norm scale), and the same rule applies to these:
    γ* is the lowest threshold such that pruning every channel with score <= γ* in each layer
    (never below the floor k_min) keeps the target total; ties are spread over layers in
    proportion (:func:`accelprune.selection.layer_keep_counts`). Every event recomputes the
    scores from the current weights.

    Under DistributedDataParallel, give REPrune the inner module (``ddp.module``) and re-wrap it
    after an event (:meth:`due` says when one runs): DDP cannot follow parameters that change.
    """

    def __init__(self, model: nn.Module, example_inputs, sparsity: float, *,
                 schedule: str = "constant", delta_t: int = 2, t_prune: int | None = None,
                 min_keep_ratio: float = 0.05, budget: str = "auto", ignored_layers=None,
                 prune_coupled: bool = False,
                 prune_stem: bool = False, tie_break: str = "random", seed: int = 0,
                 backend: str = "auto", progress: bool = False, process_group=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.sparsity = check_fraction(sparsity, "sparsity")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {list(SCHEDULES)}")
        self.schedule = schedule
        self.delta_t = check_int(delta_t, "delta_t", low=1)
        if t_prune is None and schedule != "constant":
            raise ValueError(f"schedule={schedule!r} needs t_prune, the last epoch with an event")
        self.t_prune = None if t_prune is None else check_int(t_prune, "t_prune", low=0)
        self._t_end = 0 if t_prune is None else (self.t_prune // self.delta_t) * self.delta_t
        if schedule != "constant" and self._t_end == 0:
            raise ValueError(f"schedule={schedule!r} needs events after epoch 0: t_prune "
                             f"({t_prune}) must be >= delta_t ({delta_t})")
        self.min_keep_ratio = check_fraction(min_keep_ratio, "min_keep_ratio", allow_one=True)
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; expected one of {list(BUDGETS)}")
        self.budget = budget
        self.tie_break, self.seed = tie_break, check_int(seed, "seed", low=0)
        if resolve(backend, fast="native") != "reference":  # a bad name fails here, not later
            warmup()  # load Numba's compiled coverage now: events time the algorithm
        self.backend = backend
        self.progress, self.process_group = progress, process_group

        self.model, self.example_inputs = model, example_inputs
        # every group, coupled ones too: gated MLPs are coupled by a product, not a residual sum
        self.graph = ModelGraph(model, example_inputs, ignored_layers=ignored_layers,
                                prune_coupled=True, progress=progress)
        stem = None if prune_stem else self.graph.first_run(nn.modules.conv._ConvNd)
        self.groups, self.skipped = [], {}
        with self.graph.unchanged():
            for g in self.graph.groups:
                if any(self.graph.module(p) is stem for p in g.producers):
                    continue
                if feeds_attention(g):  # q/k/v (heads), or a stream with MHA
                    self.skipped[g.name] = ("its channels go through attention (q·kᵀ, softmax): "
                                            "single channels of q/k/v cannot be removed, only "
                                            "heads")
                elif partial := [n for n, _ in g.partial_members if n in g.filter_producers]:
                    self.skipped[g.name] = (
                        f"producers {partial} make more or fewer channels than the group's "
                        f"{g.n_channels} (a concat): a channel's filter is not a whole row of "
                        "each producer, so the filters cannot be clustered together")
                elif g.coupled and not (prune_coupled or g.gated):
                    self.skipped[g.name] = ("residual-coupled (outputs summed); pass "
                                            "prune_coupled=True to prune it")
                else:
                    self.groups.append(g)
        if not self.groups:
            skipped = "".join(f"; {name}: {why}" for name, why in self.skipped.items())
            raise ValueError("the model has no prunable layers (after ignored_layers, the stem and "
                             f"coupled groups are left out){skipped}{unsupported_hint(model)}")
        for g in self.groups:
            self._check_group(g)
        self.original_widths = [g.n_channels for g in self.groups]
        self.original_channels = sum(self.original_widths)
        # the model as found, shapes only (no storage): params/MACs "before" when asked
        self._original = meta_copy(model)
        self._stats_before: dict | None = None
        self.events: list[PruningEvent] = []

    # -- checks and helpers ------------------------------------------------------------------

    def _check_group(self, g) -> None:
        for name in g.filter_producers:
            m = self.graph.module(name)
            if not isinstance(m, PRODUCER_TYPES) or (getattr(m, "transposed", False)
                                                     and m.groups != 1):
                groups = f", groups={m.groups}" if hasattr(m, "groups") else ""
                raise ValueError(f"REPrune cannot cluster the filters of {name!r} "
                                 f"({type(m).__name__}{groups}): it supports convolutions "
                                 "(grouped ones too, but not grouped transposed ones) and Linear "
                                 "layers; pass it in ignored_layers")
        if not g.filter_producers:
            raise ValueError(f"REPrune has no filters to cluster in group {g.name!r} (only "
                             "depthwise convs produce it); pass it in ignored_layers")
        for name in g.bns:
            if getattr(self.graph.module(name), "weight", None) is None:
                raise ValueError(f"BatchNorm {name!r} after {g.name!r} has no learnable scale γ "
                                 "(affine=False); REPrune needs it")

    def filters_of(self, g) -> list[torch.Tensor]:
        """The group's filters for selection, one tensor per producer, pooled over conv-group
        blocks: with B blocks, row p holds the filters at position p of every block side by side
        (as extra input channels), so one selection of positions serves every block alike."""
        B = g.blocks
        out = []
        for name in g.filter_producers:
            m = self.graph.module(name)
            w = out_channel_view(m, m.weight.detach())
            w = w.reshape(B, w.shape[0] // B, *w.shape[1:]).transpose(0, 1)
            out.append(w.reshape(w.shape[0], B * w.shape[2], *w.shape[3:]))
        return out

    def _score(self, g) -> tuple[str, np.ndarray]:
        """(kind, per-channel score) of a group for the layer budget (see the class docstring)."""
        scales = _bn_scales(g) if g.bns else []
        if scales:
            return "bn", torch.stack(scales).mean(0).numpy()
        norms = _norm_scales(g)
        if norms:
            return "norm", torch.stack([w.abs().cpu().double() for w in norms]).mean(0).numpy()
        rows = []
        for name in g.filter_producers:  # each channel's own filter (not pooled over blocks)
            m = self.graph.module(name)
            w = out_channel_view(m, m.weight.detach())
            rows.append(w.reshape(w.shape[0], -1).cpu().double())
        return "filter", torch.linalg.vector_norm(torch.cat(rows, dim=1), dim=1).numpy()

    def _keep_counts(self, sparsity: float, target: int) -> tuple[list[int], float, list[str]]:
        """k_l per layer, γ*, and what scored each layer (see "Layer budgets")."""
        if self.budget == "uniform":
            ks = [min(g.n_channels, max(keep_floor(n0, self.min_keep_ratio),
                                        round((1 - sparsity) * n0)))
                  for g, n0 in zip(self.groups, self.original_widths, strict=True)]
            return ks, -math.inf, ["uniform"] * len(ks)
        with self.graph.unchanged():  # scoring only reads the graph
            kinds, scores = zip(*(self._score(g) for g in self.groups), strict=True)
        if any(k != "bn" for k in kinds):  # comparable across layers: each layer averages 1
            scores = [s / s.mean() if s.mean() > 0 else np.ones_like(s) for s in scores]
        ks, gamma_star = layer_keep_counts(list(scores), self.original_widths, target,
                                           min_keep_ratio=self.min_keep_ratio)
        return ks, gamma_star, list(kinds)

    # -- schedule ----------------------------------------------------------------------------

    def due(self, epoch: int) -> bool:
        """Whether :meth:`step` runs a pruning event at this epoch."""
        epoch = check_int(epoch, "epoch", low=0)
        return epoch % self.delta_t == 0 and (self.t_prune is None or epoch <= self.t_prune)

    def target_at(self, epoch: int) -> float:
        """The scheduled global sparsity s(t), measured against the original widths."""
        return sparsity_at(epoch, final=self.sparsity, t_start=0, t_end=self._t_end,
                           kind=self.schedule)

    # -- events ------------------------------------------------------------------------------

    def step(self, epoch: int, optimizer: torch.optim.Optimizer | None = None):
        """Call once per epoch (after training it, epochs counted from 0). Runs a pruning event
        when due and returns ``optimizer`` updated in place for the new parameters, with the
        state (momentum, ...) of kept channels carried over; None when none was given."""
        if not self.due(epoch):
            return optimizer
        return self._event(self.target_at(epoch), epoch, optimizer)

    def prune(self) -> nn.Module:
        """One event at the final sparsity (one-shot pruning of a trained model).

        Returns the model (pruned in place)."""
        self._event(self.sparsity, None, None)
        return self.model

    def _event(self, sparsity: float, epoch: int | None, optimizer):
        target = round((1 - sparsity) * self.original_channels)
        if sum(g.n_channels for g in self.groups) <= target:  # reached: nothing to do
            return optimizer
        t0 = time.perf_counter()
        event = on_rank0(lambda: self._plan(sparsity, target, epoch), self.process_group)
        t1 = time.perf_counter()
        cuts = [(g, np.asarray(r.kept_indices, dtype=np.int64))
                for g, r in zip(self.groups, event.layers, strict=True) if r.kept < r.before]
        if optimizer is None:  # Torch-Pruning slices real gradients itself: nothing to track
            self.graph.prune_groups(cuts)  # one surgery, checked by one forward pass
        else:
            with track_parameters(self.model) as tracker:
                self.graph.prune_groups(cuts)
            optimizer = tracker.remap(optimizer)
        event.seconds = {"selection": t1 - t0, "surgery": time.perf_counter() - t1}
        self.events.append(event)
        return optimizer

    def _plan(self, sparsity: float, target: int, epoch: int | None) -> PruningEvent:
        ks, gamma_star, kinds = self._keep_counts(sparsity, target)
        layers = []
        bar = tqdm(list(zip(self.groups, ks, strict=True)), desc="REPrune",
                   disable=not self.progress)
        for i, (g, k) in enumerate(bar):
            n, n0 = g.n_channels, self.original_widths[i]
            record = LayerRecord(g.name, original=n0, before=n, kept=k, sparsity=1 - k / n0,
                                 kept_indices=list(range(n)), score=kinds[i])
            if k < n:
                B = g.blocks
                k_block = max(1, round(k / B))  # every block keeps the same positions
                sel = reprune_select(self.filters_of(g), k_block, tie_break=self.tie_break,
                                     seed=self.seed + i, backend=self.backend,
                                     return_details=True)
                clusters = sel.labels.max(axis=1).astype(np.int64) + 1  # labels: 0..c-1 per row
                record.kept = B * k_block
                record.sparsity = 1 - record.kept / n0
                record.kept_indices = [b * (n // B) + int(p) for b in range(B) for p in sel.kept]
                record.height = sel.height
                record.clusters_min, record.clusters_max = int(clusters.min()), int(clusters.max())
                record.clusters_mean = float(clusters.mean())
                record.coverage = sel.covered / int(clusters.sum())
            layers.append(record)
        return PruningEvent(epoch, sparsity, target, sum(r.kept for r in layers), gamma_star,
                            layers, {})

    # -- reporting ---------------------------------------------------------------------------

    def _before_stats(self) -> dict:
        """Params and MACs of the model as REPrune found it (counted once, on demand)."""
        if self._stats_before is None:
            self._stats_before = size_stats(self._original, self.example_inputs)
        return self._stats_before

    def report(self) -> REPruneReport:
        """Per layer s_l, k_l, h_l, clusters per channel and coverage of the latest event (layers
        it left alone show their current width), and params / MACs before any pruning and now."""
        latest = {r.name: r for r in self.events[-1].layers} if self.events else {}
        layers = []
        for g, n0 in zip(self.groups, self.original_widths, strict=True):
            r = latest.get(g.name)
            if r is None or r.height is None:
                r = LayerRecord(g.name, original=n0, before=g.n_channels, kept=g.n_channels,
                                sparsity=1 - g.n_channels / n0)
            layers.append(r)
        after = size_stats(self.model, self.example_inputs)
        before = self._before_stats()
        return REPruneReport(layers, list(self.events), self.original_channels,
                             sum(g.n_channels for g in self.groups),
                             before["params"], after["params"], before["macs"], after["macs"])

    # -- checkpoint / resume -----------------------------------------------------------------

    _STATE_CONFIG = ("sparsity", "schedule", "delta_t", "t_prune", "min_keep_ratio", "budget",
                     "tie_break", "seed")

    def state_dict(self) -> dict:
        """What a resumed run needs beyond the model: the original widths (so that events keep
        measuring against them instead of compounding), the events done (the schedule position)
        and the settings they were made with. Plain data: ``torch.save`` it next to the model,
        ``torch.load(..., weights_only=True)`` reads it. (Selection draws no global random
        numbers: its tie-breaking is seeded by ``seed``, which the state holds.)

        Resuming an interrupted run, bit for bit::

            # after epoch t's step()
            accelprune.save(model, "model.pt")
            torch.save({"pruner": pruner.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(), "epoch": t}, "state.pt")
            # later, in a new process
            model = accelprune.load("model.pt", build_model())  # a fresh, unpruned instance
            state = torch.load("state.pt", weights_only=True)
            pruner = REPrune(model, example_inputs, sparsity, ...)  # the same settings
            pruner.load_state_dict(state["pruner"])
            optimizer = torch.optim.SGD(model.parameters(), ...)
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            for epoch in range(state["epoch"] + 1, epochs): ...
        """
        def plain(v):  # numpy scalars pickle as globals that weights-only loading refuses
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v.item() if isinstance(v, np.generic) else v

        return plain({
            "format": "accelprune.REPrune", "version": 1,
            "config": {k: getattr(self, k) for k in self._STATE_CONFIG},
            "groups": [g.name for g in self.groups],
            "original_widths": list(self.original_widths),
            "stats_before": self._before_stats(),
            "events": [asdict(e) for e in self.events],
        })

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (see there for the recipe). This REPrune must have
        the same settings and be built on the model as it was saved with that state; otherwise
        ValueError, and nothing is changed."""
        check_saved_state(state, "REPrune", {k: getattr(self, k) for k in self._STATE_CONFIG})
        names = [g.name for g in self.groups]
        if list(state["groups"]) != names or len(state["original_widths"]) != len(names):
            raise ValueError("the state's layers differ from this REPrune's: build it on the "
                             "model saved with the state, with the same ignored_layers")
        events = [PruningEvent(**{**e, "layers": [LayerRecord(**r) for r in e["layers"]]})
                  for e in state["events"]]
        widths = [int(w) for w in state["original_widths"]]
        for event in events:
            widths = [min(r.kept, r.before) for r in event.layers]
        current = [g.n_channels for g in self.groups]
        if widths != current:
            raise ValueError(f"the model's widths {current} are not those the state ends with "
                             f"({widths}): load the model saved with this state")
        self.original_widths = [int(w) for w in state["original_widths"]]
        self.original_channels = sum(self.original_widths)
        self._stats_before = state["stats_before"]
        self.events = events

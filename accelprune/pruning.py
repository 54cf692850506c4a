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
import dataclasses
import math
import warnings

import numpy as np
import torch
from torch import nn

from accelprune._validation import check_fraction, check_int
from accelprune.csgd import feeds_attention
from accelprune.graph import ModelGraph, unsupported_hint
from accelprune.importance import BNScaleImportance, RandomImportance, get_importance
from accelprune.methods import METHODS
from accelprune.tracing import refuse_meta_tensors

__all__ = ["prune", "prune_to_macs", "prune_with", "sparsity_for_macs"]


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
    layer_sparsity: dict[str, float] | None = None,
    max_sparsity: float | None = None,
    round_to: int | None = None,
    normalize: str | None = "auto",
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
            Global: the ⌊sparsity · N⌋ lowest-scored of all N prunable channels go, compared
            across layers after ``normalize`` (every group keeps at least its best channel; a
            group of B blocks loses channels B at a time, so the count may fall short by less
            than B).
        importance: "l1", "l2", "bn", "taylor", "gradient", "random", or any Torch-Pruning
            ``Importance`` object (e.g. :class:`accelprune.L1Importance`). "taylor" and "gradient"
            read ``weight.grad``: run ``loss.backward()`` on some data first.
        global_ranking: one threshold over all groups instead of one per group.
        ignored_layers: module names or modules whose output channels are kept.
        prune_coupled: also prune residual-coupled channels (outputs that are summed).
        seed: for ``importance="random"``.
        progress: tqdm bars while the graph is built.
        layer_sparsity: ``{module name: sparsity}`` for some layers, overriding ``sparsity``
            there: each named group loses ⌊s · n⌋ channels, ranked within itself, also under
            ``global_ranking`` (the global budget is then ``sparsity`` of the other groups'
            channels). A name is a producing Conv/Linear of a group (any of them, for coupled
            groups) or a container holding them (``"layer3"``); the most specific name wins. A
            name that covers no prunable group is an error.
        max_sparsity: no group loses more than ⌊max_sparsity · n⌋ of its n channels: caps the
            global ranking (which otherwise may empty a layer down to one channel) and the
            per-layer default; a ``layer_sparsity`` entry above it is an error.
        round_to: every pruned group keeps a multiple of ``round_to`` channels (tensor cores
            and vector units work in multiples of 8/16/64: an unaligned width is often no
            faster). The kept width is rounded *up* (never more is removed than asked); a group
            that would round back to its full width is left alone, and a group's existing width
            need not be a multiple. Under global ranking the total removed may therefore fall
            short of the budget.
        normalize: how scores are made comparable across groups for ``global_ranking``
            (per-layer ranking is unaffected). ``"mean"``: each group's scores divided by
            their mean (a channel scores 1 when it is as important as its layer's average: raw L1
            norms grow with fan-in, so raw global ranking strips the thin layers); ``"max"``:
            divided by their maximum; ``None``: raw scores. ``"auto"`` (default): raw for
            ``"bn"`` (network slimming's global threshold on γ, which L1-penalised training
            makes comparable) and ``"random"``, ``"mean"`` otherwise. A group whose scores are
            all zero stays at zero.

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
    controls = _LayerControls.checked(layer_sparsity, max_sparsity, round_to, normalize,
                                      importance)
    scorer = get_importance(importance, seed=seed)
    graph = ModelGraph(
        model,
        example_inputs,
        ignored_layers=ignored_layers,
        prune_coupled=prune_coupled,
        progress=progress,
    )
    _drop_attention_inner_groups(graph)
    if not graph.groups and (hint := unsupported_hint(model)):
        raise ValueError(f"the model has no channel group prune() can remove{hint}")
    controls.check_names(graph)
    if (sparsity == 0 and not controls.layer_sparsity) or not graph.groups:
        return model
    plan = _rank(graph, scorer, sparsity, global_ranking, controls)
    graph.prune_groups(plan)
    return model


def _drop_attention_inner_groups(graph: ModelGraph) -> None:
    """Leave out the groups whose channels are an attention layer's inner width (q, k or v
    rows): ModelGraph drops those of the attention layouts it recognises, but q·kᵀ also runs in
    layouts it does not (timm's Swin and LeViT, OPT), and removing single channels there shifts
    the head boundaries. Residual streams that reach attention stay as they were."""
    with graph.unchanged():
        graph.groups = [g for g in graph.groups if g.residual or not feeds_attention(g)]


NORMALIZERS = ("auto", "mean", "max", None)


@dataclasses.dataclass
class _LayerControls:
    """The per-layer arguments of :func:`prune`, checked."""

    layer_sparsity: dict[str, float]
    max_sparsity: float | None
    round_to: int | None
    normalize: str | None  # "mean", "max" or None once "auto" is resolved

    @classmethod
    def checked(cls, layer_sparsity, max_sparsity, round_to, normalize, importance):
        if layer_sparsity is None:
            layer_sparsity = {}
        if not isinstance(layer_sparsity, dict):
            raise TypeError("layer_sparsity must be a dict {module name: sparsity}, got "
                            f"{type(layer_sparsity).__name__}")
        checked = {}
        for name, value in layer_sparsity.items():
            if not isinstance(name, str):
                raise TypeError(f"layer_sparsity keys must be module names, got {name!r}")
            checked[name] = check_fraction(value, f"layer_sparsity[{name!r}]")
        if max_sparsity is not None:
            max_sparsity = check_fraction(max_sparsity, "max_sparsity", allow_one=True)
            over = {k: v for k, v in checked.items() if v > max_sparsity}
            if over:
                name, value = next(iter(over.items()))
                raise ValueError(f"layer_sparsity[{name!r}] = {value} exceeds max_sparsity = "
                                 f"{max_sparsity}")
        if round_to is not None:
            round_to = check_int(round_to, "round_to", low=1)
        if normalize is not None and not isinstance(normalize, str):
            raise TypeError(f"normalize must be a string or None, got {type(normalize).__name__}")
        if normalize not in NORMALIZERS:
            raise ValueError(f"unknown normalize {normalize!r}; expected one of {NORMALIZERS}")
        if normalize == "auto":
            raw = importance in ("bn", "random") or isinstance(
                importance, (BNScaleImportance, RandomImportance))
            normalize = None if raw else "mean"
        return cls(checked, max_sparsity, round_to, normalize)

    def check_names(self, graph: ModelGraph) -> None:
        for name in self.layer_sparsity:
            graph.module(name)  # ValueError when the model has no such module
            if not any(self._covers(name, g) for g in graph.groups):
                raise ValueError(
                    f"layer_sparsity: {name!r} covers no prunable layer (the model's output, a "
                    "residual-coupled group without prune_coupled=True, an ignored layer, or "
                    "not a Conv/Linear)")

    @staticmethod
    def _covers(name: str, group) -> bool:
        return any(p == name or p.startswith(name + ".") for p in group.producers) or name == ""

    def sparsity_of(self, group) -> float | None:
        """The ``layer_sparsity`` entry for ``group`` (the most specific name), or None."""
        matches = [n for n in self.layer_sparsity if self._covers(n, group)]
        if not matches:
            return None
        longest = max(len(n) for n in matches)
        values = {self.layer_sparsity[n] for n in matches if len(n) == longest}
        if len(values) > 1:
            raise ValueError(f"layer_sparsity gives group {group.name!r} several sparsities "
                             f"through {sorted(n for n in matches if len(n) == longest)}")
        return values.pop()

    def cap(self, size: int) -> int:
        """Most units a group of ``size`` units may lose (always keeping one)."""
        cap = size - 1
        if self.max_sparsity is not None:
            cap = min(cap, _n_removed(self.max_sparsity, size))
        return cap

    def rounded(self, drop: np.ndarray, size: int, blocks: int) -> np.ndarray:
        """``drop`` (unit indices, least important first) cut back so that the kept width is a
        multiple of ``round_to``."""
        if self.round_to is None or len(drop) == 0:
            return drop
        step = self.round_to // math.gcd(self.round_to, blocks)  # in units of B channels
        kept = -(-(size - len(drop)) // step) * step  # rounded up
        return drop[: max(0, size - kept)]

    def normalized(self, scores: np.ndarray) -> np.ndarray:
        if self.normalize is None:
            return scores
        scale = scores.mean() if self.normalize == "mean" else scores.max()
        return scores / scale if scale > 0 else scores


def _rank(graph: ModelGraph, scorer, sparsity: float, global_ranking: bool,
          controls: _LayerControls | None = None) -> list:
    """(group, keep) for every group that loses channels.

    Ranking is done here rather than by Torch-Pruning's MetaPruner, whose global threshold
    (``score <= t``) removes every tied channel: with freshly initialised BN scales (all 1) it
    empties the network. Here exactly ⌊sparsity·n⌋ channels go, ties broken by position.
    """
    if controls is None:
        controls = _LayerControls({}, None, None, None)
    units = _unit_scores(graph, scorer)
    ranked_names = [g for g, _, _ in units]
    for name in controls.layer_sparsity:
        if not any(controls._covers(name, g) for g in ranked_names):
            raise ValueError(f"layer_sparsity: importance {scorer!r} cannot rank {name!r} "
                             "(e.g. 'bn' on layers without BatchNorm)")
    drop: dict[int, np.ndarray] = {}
    ranked_globally = []
    for i, (g, _, sc) in enumerate(units):
        own = controls.sparsity_of(g)
        if own is None and global_ranking:
            ranked_globally.append(i)
            continue
        k = min(_n_removed(sparsity if own is None else own, len(sc)), controls.cap(len(sc)))
        if k:
            drop[i] = np.argsort(sc, kind="stable")[:k]
    if ranked_globally:
        drop.update(_global_drop(units, ranked_globally, sparsity, controls))

    plan = []
    for i, js in drop.items():
        g, G, sc = units[i]
        size = len(sc)
        js = controls.rounded(np.asarray(js, dtype=np.int64), size, G)
        if len(js) == 0:
            continue
        keep_units = np.setdiff1d(np.arange(size), js)
        keep = np.concatenate([keep_units + c * size for c in range(G)])
        plan.append((g, keep))
    return plan


def _unit_scores(graph: ModelGraph, scorer) -> list:
    """Per ranked group: (group, blocks B, per-unit scores); a unit = one channel in each
    block. Groups the scorer returns None for (e.g. "bn" without BatchNorm) are left out."""
    units = []
    with graph.unchanged():  # one group search for all groups (scorers only read)
        for g in graph.groups:
            scores = scorer(g.tp_group())
            if scores is None:  # e.g. "bn" on a group without BatchNorm: not ranked, not pruned
                continue
            scores = torch.as_tensor(scores).detach().double().cpu()
            if scores.shape != (g.n_channels,):
                raise ValueError(
                    f"importance {scorer!r} returned {tuple(scores.shape)} scores for group "
                    f"{g.name!r} of {g.n_channels} channels"
                )
            if not torch.isfinite(scores).all():
                raise ValueError(
                    f"importance {scorer!r} returned NaN/Inf scores for group {g.name!r}")
            B = g.blocks  # grouped convs: every block must lose the same local channels
            units.append((g, B, scores.view(B, -1).mean(0).numpy()))
    return units


def _global_drop(units, ranked: list[int], sparsity: float, controls: _LayerControls) -> dict:
    """Units to drop from the groups ``ranked`` together: the lowest normalised scores, each
    group keeping its best unit and losing at most ``controls.cap``."""
    budget = _n_removed(sparsity, sum(units[i][0].n_channels for i in ranked))
    cand = []
    for i in ranked:
        sc = controls.normalized(units[i][2])
        best = int(np.argmax(sc))  # every group keeps its best unit
        cand.extend((float(s), i, j) for j, s in enumerate(sc) if j != best)
    cand.sort(key=lambda t: t[0])  # stable: ties go in group, then channel order
    chosen: dict[int, list[int]] = {}
    for _, i, j in cand:
        G, size = units[i][1], len(units[i][2])
        if budget < G or len(chosen.get(i, ())) >= controls.cap(size):
            continue
        chosen.setdefault(i, []).append(j)
        budget -= G
        if budget == 0:
            break
    return {i: np.array(js) for i, js in chosen.items()}


def _n_removed(sparsity: float, n: int) -> int:
    return int(np.floor(sparsity * n + 1e-9))  # the epsilon keeps 0.3 * 10 at 3


def prune_with(model: nn.Module, example_inputs, sparsity: float, method: str, *,
               ignored_layers=None, seed: int = 0, progress: bool = False,
               **method_options) -> nn.Module:
    """Prune ``model`` in place, one-shot, with the method called ``method`` (see
    :data:`METHODS`); returns ``model``.

    Criteria go to :func:`prune` (per layer); ``"reprune"`` runs one :class:`accelprune.REPrune`
    event; ``"csgd"`` clusters with :class:`accelprune.CSGD` and folds at once, without
    centripetal training (lossy: train with ``CSGD`` for lossless folding). ``sparsity`` is the
    fraction of channels removed, for every method. ``method_options`` go to that function or
    class as they are (e.g. ``round_to=8`` or ``layer_sparsity=`` for a criterion,
    ``budget="uniform"`` for REPrune); one it does not take is a TypeError naming it, before
    anything changes, whenever the method runs (``"csgd"`` at sparsity 0 does nothing and
    checks nothing).
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    common = dict(ignored_layers=ignored_layers, seed=seed, progress=progress, **method_options)
    if method == "reprune":
        from accelprune.reprune import REPrune

        REPrune(model, example_inputs, sparsity, **common).prune()
    elif method == "csgd":
        from accelprune.csgd import CSGD

        sparsity = check_fraction(sparsity, "sparsity")
        if sparsity > 0:
            CSGD(model, example_inputs, sparsity, **common).prune()
    else:
        prune(model, example_inputs, sparsity, method, **common)
    return model


def sparsity_for_macs(model: nn.Module, example_inputs, method: str, macs_reduction: float, *,
                      tolerance: float = 0.02, max_iterations: int = 12, ignored_layers=None,
                      seed: int = 0, **method_options) -> float:
    """The sparsity at which ``method`` leaves ``model`` with ``1 - macs_reduction`` of its MACs
    (relative error within ``tolerance`` where reachable). ``model`` is not modified.

    Bisection on copies of the model (each is pruned and measured, then dropped), stopping once a
    copy lands within ``tolerance`` of the target or after ``max_iterations``, keeping the
    closest. A method that cannot reach the target (floors, ignored layers) ends at its closest.
    ``method_options`` go to :func:`prune_with` for every trial.
    """
    from accelprune.reporting import model_stats

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    macs_reduction = check_fraction(macs_reduction, "macs_reduction")
    tolerance = check_fraction(tolerance, "tolerance", allow_zero=False)
    max_iterations = check_int(max_iterations, "max_iterations", low=1)
    refuse_meta_tensors(model, example_inputs)
    if macs_reduction == 0:
        return 0.0
    target = (1 - macs_reduction) * model_stats(model, example_inputs)["macs"]
    low, high = 0.0, 0.99
    best, best_gap = 0.0, macs_reduction / (1 - macs_reduction)  # the gap of not pruning
    for _ in range(max_iterations):
        mid = (low + high) / 2
        trial = prune_with(_copy_with_grads(model), example_inputs, mid, method,
                           ignored_layers=ignored_layers, seed=seed, **method_options)
        macs = model_stats(trial, example_inputs)["macs"]
        gap = abs(macs - target) / target
        if gap < best_gap:
            best, best_gap = mid, gap
        if gap <= tolerance:
            break
        low, high = (mid, high) if macs > target else (low, mid)
    if best_gap > tolerance:
        warnings.warn(f"method {method!r} cannot bring the model within {tolerance:.1%} of "
                      f"{1 - macs_reduction:.0%} of its MACs; the closest is {best_gap:.1%} "
                      f"away (sparsity {best:.3f}): layer floors, ignored layers or per-layer "
                      "rounding limit it", RuntimeWarning, stacklevel=2)
    return best


def _copy_with_grads(model: nn.Module) -> nn.Module:
    """A deep copy that keeps the parameters' ``.grad`` (deepcopy drops them), so gradient
    criteria (taylor, gradient) score the trial copies as they would score the model."""
    from accelprune.reporting import non_leaf_memo

    twin = copy.deepcopy(model, non_leaf_memo(model, lambda t: t.detach().clone()))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        if p.grad is not None:
            q.grad = p.grad.detach().clone()
    return twin


def prune_to_macs(model: nn.Module, example_inputs, method: str, macs_reduction: float, *,
                  tolerance: float = 0.02, max_iterations: int = 12, ignored_layers=None,
                  seed: int = 0, progress: bool = False, **method_options) -> float:
    """Prune ``model`` in place with ``method`` so that it keeps ``1 - macs_reduction`` of its
    MACs (within ``tolerance``, relative, where the method can reach it); returns the sparsity
    used (found by :func:`sparsity_for_macs`). ``method_options`` go to :func:`prune_with`, in
    the search and in the final prune alike. On failure the model is as it was.
    """
    sparsity = sparsity_for_macs(model, example_inputs, method, macs_reduction,
                                 tolerance=tolerance, max_iterations=max_iterations,
                                 ignored_layers=ignored_layers, seed=seed, **method_options)
    if sparsity > 0:
        prune_with(model, example_inputs, sparsity, method, ignored_layers=ignored_layers,
                   seed=seed, progress=progress, **method_options)
    return sparsity

"""Unstructured pruning with masks, on top of ``torch.nn.utils.prune``.

Pruned tensors are reparametrised exactly as ``torch.nn.utils.prune`` does it: the dense values
live in ``weight_orig`` (a Parameter the optimizer updates), the 0/1 mask in the buffer
``weight_mask``, and ``weight = weight_orig * weight_mask`` is recomputed before every forward.
Gradients reach ``weight_orig`` multiplied by the mask, so pruned entries stay zero in the
forward pass through any optimizer (momentum and weight decay may move ``weight_orig`` there,
but the mask hides it). :func:`make_permanent` bakes the zeros in and removes the
reparametrisation, leaving plain Parameters (for saving, fusing, exporting).

What accelprune adds over calling ``torch.nn.utils.prune`` directly:

* ``sparsity`` is the *total* target, measured against all entries of the pruned tensors, not
  a fraction of what is left: calling with 0.5 then 0.8 ends at exactly 80% zeros in the mask,
  as a sparsity schedule expects. Masks only grow: a target at or below the current mask
  sparsity leaves the masks as they are.
* Exactly ``round(sparsity * n)`` entries are masked (per tensor for ``scope="layer"``, over all
  selected tensors together for ``scope="global"``), ties broken by ``torch.topk``.
* Scores are computed from the *current* ``weight_orig`` (torch's global pruning would read
  ``weight``, which is stale after an optimizer step until the next forward).
* Gradient-magnitude masks (|∂L/∂W|, seed 002) use the same machinery.
* Attention is covered: ``nn.MultiheadAttention`` keeps its q/k/v projection outside any Linear
  (the packed ``in_proj_weight``, or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``
  when key and value dims differ); those are pruned by default with every Conv/Linear weight
  (its ``out_proj`` is a Linear). The returned sparsities are those of the tensors actually
  masked, measured on the masks, so a report never claims more than was done.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import prune

from accelprune._validation import check_fraction

__all__ = [
    "masks_all_or_nothing",
    "gradient_magnitude_prune",
    "get_masks",
    "layer_sparsity",
    "magnitude_prune",
    "make_permanent",
    "prunable_parameters",
    "weight_sparsity",
]

SCOPES = ("global", "layer")

# Layers whose weights are pruned by default: every conv and fully connected layer.
_DEFAULT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d, nn.Linear)


def is_reparametrised(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is under a ``torch.nn.utils.prune`` mask."""
    return (prune.is_pruned(module) and hasattr(module, name + "_orig")
            and hasattr(module, name + "_mask"))


def dense_parameter(module: nn.Module, name: str) -> nn.Parameter:
    """The trainable Parameter behind ``module.<name>``: ``<name>_orig`` when masked."""
    if is_reparametrised(module, name):
        return getattr(module, name + "_orig")
    return getattr(module, name)


def _mask(module: nn.Module, name: str) -> torch.Tensor | None:
    return getattr(module, name + "_mask") if is_reparametrised(module, name) else None


def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _weight_names(module: nn.Module) -> list[str]:
    """The names of a module's prunable weight tensors: ``weight`` for a Conv/Linear, the q/k/v
    projection(s) for MultiheadAttention (packed ``in_proj_weight`` or the three separate ones)."""
    if isinstance(module, nn.MultiheadAttention):
        if _has_weight(module, "in_proj_weight"):
            return ["in_proj_weight"]
        return [n for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
                if _has_weight(module, n)]
    return ["weight"]


def _has_weight(module: nn.Module, name: str) -> bool:
    dense = getattr(module, name + "_orig", None) if is_reparametrised(module, name) \
        else getattr(module, name, None)
    return isinstance(dense, nn.Parameter)


def prunable_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every weight pruned by default, in model order: ``(module, "weight")`` of each Conv /
    ConvTranspose / Linear layer (MultiheadAttention's ``out_proj`` included), and
    MultiheadAttention's q/k/v projection (``in_proj_weight``, or ``q_proj_weight``,
    ``k_proj_weight`` and ``v_proj_weight`` when key and value dims differ from the query's)."""
    _check_model(model)
    return [(m, name) for m in model.modules()
            if isinstance(m, (*_DEFAULT_LAYERS, nn.MultiheadAttention))
            for name in _weight_names(m)]


def resolve_parameters(model: nn.Module, parameters=None) -> list[tuple[nn.Module, str]]:
    """The ``(module, name)`` pairs to prune.

    parameters: None (see :func:`prunable_parameters`), or an iterable of ``(module, name)``
        pairs, modules or module names, all inside ``model``; a module stands for its ``weight``
        (a MultiheadAttention for its q/k/v projection weights).
    """
    _check_model(model)
    if parameters is None:
        pairs = prunable_parameters(model)
    else:
        if isinstance(parameters, (str, nn.Module)) or not isinstance(parameters, Iterable):
            raise TypeError("parameters must be an iterable of (module, name) pairs, modules or "
                            f"module names, got {type(parameters).__name__}")
        modules = dict(model.named_modules())
        inside = {id(m) for m in modules.values()}
        pairs = []
        for item in parameters:
            if isinstance(item, str):
                if item not in modules:
                    raise ValueError(f"model has no module named {item!r}")
                module, names = modules[item], _weight_names(modules[item])
            elif isinstance(item, nn.Module):
                module, names = item, _weight_names(item)
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], nn.Module) \
                    and isinstance(item[1], str):
                module, names = item[0], [item[1]]
            else:
                raise TypeError(f"cannot prune {item!r}: expected a (module, name) pair, a module "
                                "or a module name")
            if id(module) not in inside:
                raise ValueError(f"{type(module).__name__} module is not part of the model")
            for name in names or ["weight"]:
                if not _has_weight(module, name):
                    raise ValueError(f"{type(module).__name__} module has no parameter {name!r} "
                                     "to prune")
                pairs.append((module, name))
    if not pairs:
        raise ValueError("nothing to prune: the model has no Conv/Linear/MultiheadAttention "
                         "weights (pass parameters=[(module, name), ...])")
    if len({(id(m), n) for m, n in pairs}) != len(pairs):
        raise ValueError("parameters lists the same tensor twice")
    return pairs


def _names(model: nn.Module, pairs) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{names[id(m)]}.{p}" if names[id(m)] else p for m, p in pairs]


def _n_masked(module: nn.Module, name: str) -> int:
    mask = _mask(module, name)
    return 0 if mask is None else int((mask == 0).sum())


def _magnitude_scores(module, name):
    return dense_parameter(module, name).detach().abs()


def _gradient_scores(module, name):
    grad = dense_parameter(module, name).grad
    if grad is None:
        raise ValueError(f"{type(module).__name__}.{name} has no gradient: run loss.backward() "
                         "before gradient-magnitude pruning")
    return grad.detach().abs()


def _prune(model, sparsity, scope, parameters, score_fn) -> dict[str, float]:
    _check_model(model)
    sparsity = check_fraction(sparsity, "sparsity")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {list(SCOPES)}")
    pairs = resolve_parameters(model, parameters)
    names = _names(model, pairs)
    scores = {}
    for (module, name), full in zip(pairs, names, strict=True):
        s = score_fn(module, name)
        if not torch.isfinite(s).all():
            raise ValueError(f"scores of {full} contain NaN or Inf")
        scores[(module, name)] = s
    with torch.no_grad(), masks_all_or_nothing({m for m, _ in pairs}):
        if scope == "global":
            total = sum(s.numel() for s in scores.values())
            extra = round(sparsity * total) - sum(_n_masked(m, n) for m, n in pairs)
            # global_unstructured with an int amount masks exactly that many more entries, chosen
            # among the still-unmasked ones (torch's PruningContainer), across all tensors.
            prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured,
                                      importance_scores=scores, amount=max(0, extra))
        else:
            for module, name in pairs:
                s = scores[(module, name)]
                extra = round(sparsity * s.numel()) - _n_masked(module, name)
                prune.l1_unstructured(module, name, amount=max(0, extra), importance_scores=s)
    return layer_sparsity(model, pairs)


@contextlib.contextmanager
def masks_all_or_nothing(modules):
    """A context for applying ``torch.nn.utils.prune`` masks to ``modules``. On any exception,
    put back what ``torch.nn.utils.prune`` changes on them (the parameter, mask buffer and
    forward pre-hook dicts, and the plain ``weight`` attribute), so a failure on a later tensor
    leaves no mask on the earlier ones."""
    saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers),
              dict(m._forward_pre_hooks)) for m in modules]
    # a third pruning extends an existing PruningContainer in place: keep its list too
    containers = [(h, h._pruning_methods) for m in modules for h in m._forward_pre_hooks.values()
                  if isinstance(h, prune.PruningContainer)]
    try:
        yield
    except BaseException:
        for container, methods in containers:
            container._pruning_methods = methods
        for m, attrs, params, buffers, hooks in saved:
            for d, content in ((m._parameters, params), (m._buffers, buffers),
                               (m._forward_pre_hooks, hooks)):
                d.clear()
                d.update(content)
            for k in set(m.__dict__) - set(attrs):
                del m.__dict__[k]
            m.__dict__.update(attrs)
        raise


def magnitude_prune(model: nn.Module, sparsity: float, *, scope: str = "global",
                    parameters=None) -> dict[str, float]:
    """Mask the smallest-|W| entries so that a fraction ``sparsity`` of them is masked.

    scope: "global" (one threshold over all selected tensors) or "layer" (each tensor reaches
        ``sparsity`` on its own).
    parameters: which tensors (see :func:`resolve_parameters`); default every Conv/Linear weight
        and MultiheadAttention's q/k/v projections (:func:`prunable_parameters`).
    Returns ``{"layer.weight": sparsity}`` of exactly the tensors that carry a mask now (the
    fraction of zeros the forward pass sees), e.g. ``"attn.in_proj_weight"``. In place.
    """
    return _prune(model, sparsity, scope, parameters, _magnitude_scores)


def gradient_magnitude_prune(model: nn.Module, sparsity: float, *, scope: str = "global",
                             parameters=None) -> dict[str, float]:
    """As :func:`magnitude_prune`, scored by |∂L/∂W| from the last ``backward()`` (seed 002)."""
    return _prune(model, sparsity, scope, parameters, _gradient_scores)


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every ``torch.nn.utils.prune`` mask in the model, keyed ``"layer.weight"``."""
    _check_model(model)
    masks = {}
    for mname, module in model.named_modules():
        for bname, buf in module.named_buffers(recurse=False):
            pname = bname[: -len("_mask")]
            if bname.endswith("_mask") and is_reparametrised(module, pname):
                masks[f"{mname}.{pname}" if mname else pname] = buf.detach().clone()
    return masks


def layer_sparsity(model: nn.Module, parameters=None) -> dict[str, float]:
    """Fraction of zero entries of each selected tensor as the forward pass sees it
    (``weight_orig * mask`` for masked tensors)."""
    pairs = resolve_parameters(model, parameters)
    out = {}
    with torch.no_grad():
        for (module, name), full in zip(pairs, _names(model, pairs), strict=True):
            w = dense_parameter(module, name)
            mask = _mask(module, name)
            effective = w if mask is None else w * mask
            out[full] = float((effective == 0).sum()) / effective.numel()
    return out


def weight_sparsity(model: nn.Module, parameters=None) -> float:
    """Fraction of zero entries over all selected tensors together."""
    pairs = resolve_parameters(model, parameters)
    per = layer_sparsity(model, pairs)
    sizes = [dense_parameter(m, n).numel() for m, n in pairs]
    return sum(s * n for s, n in zip(per.values(), sizes, strict=True)) / sum(sizes)


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every ``torch.nn.utils.prune`` reparametrisation: ``weight = weight_orig * mask``
    becomes a plain Parameter (zeros kept), the mask buffer and hook go. In place; returns model."""
    _check_model(model)
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model

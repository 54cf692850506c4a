"""Lottery-ticket iterative magnitude pruning (Frankle & Carbin 2019) with weight rewinding.

One round: train, mask the smallest-magnitude fraction of the *remaining* weights, rewind every
parameter and buffer to a saved state (the initialisation, or an early point of training for
"late rewinding", Frankle et al. 2020) while keeping the masks. After n rounds of fraction p the
sparsity is 1 - (1 - p)^n; the rewound, masked model is the candidate winning ticket, to be
trained once more.

Masks are ``torch.nn.utils.prune`` masks (see :mod:`accelprune.masks`), so a ticket trains with
any optimizer, and :func:`accelprune.masks.make_permanent` finalises it.

Unlike seed 002's sketch, which re-derives the mask from ``original_weights != 0`` (always all
ones) and rewinds only tensors that are not entirely zero, the mask here is the real pruning
mask and rewinding restores every tensor, BatchNorm statistics included.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn.utils import prune

from accelprune._validation import check_fraction, check_int
from accelprune.masks import (
    SCOPES,
    dense_parameter,
    get_masks,
    is_reparametrised,
    magnitude_prune,
    resolve_parameters,
)

__all__ = ["LotteryTicket", "iterative_magnitude_pruning"]


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state under its unpruned names: ``weight_orig`` as ``weight``, masks left out."""
    state = {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for pname, p in module.named_parameters(recurse=False):
            if pname.endswith("_orig") and is_reparametrised(module, pname[:-5]):
                pname = pname[:-5]
            state[prefix + pname] = p
        for bname, b in module.named_buffers(recurse=False):
            if b is None or bname in module._non_persistent_buffers_set:
                continue
            if bname.endswith("_mask") and is_reparametrised(module, bname[:-5]):
                continue
            state[prefix + bname] = b
    return state


def _normalise_state(model: nn.Module, state) -> dict[str, torch.Tensor]:
    """A detached copy of ``state`` (a state_dict, pruned or not) under the model's plain names,
    checked against the model for missing keys and shapes."""
    if not isinstance(state, Mapping):
        raise TypeError("rewind_state must be a state_dict (a mapping), got "
                        f"{type(state).__name__}")
    plain = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"rewind_state[{key!r}] must be a tensor, got {type(value).__name__}")
        if key.endswith("_mask"):
            continue  # masks are the ticket's, never rewound
        plain[key[:-5] if key.endswith("_orig") else key] = value.detach().clone()
    target = _plain_state(model)
    missing = [k for k in target if k not in plain]
    if missing:
        raise ValueError(f"rewind_state lacks {len(missing)} entries of the model, "
                         f"e.g. {missing[:3]}")
    for key, tensor in target.items():
        if plain[key].shape != tensor.shape:
            raise ValueError(f"rewind_state[{key!r}] has shape {tuple(plain[key].shape)}, the "
                             f"model has {tuple(tensor.shape)} (was the model pruned "
                             "structurally since?)")
    return {k: plain[k] for k in target}


class LotteryTicket:
    """Masks plus a rewind point for one model.

    model: pruned in place (``torch.nn.utils.prune`` masks on the selected tensors).
    rewind_state: the state_dict to rewind to; default a copy of the model's state now (its
        initialisation when created before training; an early state for late rewinding).
    scope: "global" (one magnitude threshold over all tensors, as in Frankle & Carbin's deeper
        networks) or "layer" (every tensor pruned by the same fraction).
    parameters: tensors to prune (see :func:`accelprune.masks.resolve_parameters`); default all
        Conv/Linear weights.
    """

    def __init__(self, model: nn.Module, *, rewind_state=None, scope: str = "global",
                 parameters=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected one of {list(SCOPES)}")
        self.model = model
        self.scope = scope
        self.parameters = resolve_parameters(model, parameters)
        self._rewind_state = _normalise_state(model, model.state_dict() if rewind_state is None
                                              else rewind_state)
        self.history: list[dict] = []

    def _mask_sparsity(self, pairs) -> float:
        masked = total = 0
        for module, name in pairs:
            n = dense_parameter(module, name).numel()
            total += n
            if is_reparametrised(module, name):
                masked += int((getattr(module, name + "_mask") == 0).sum())
        return masked / total

    @property
    def sparsity(self) -> float:
        """Fraction of masked entries over the selected tensors."""
        return self._mask_sparsity(self.parameters)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Copies of the current masks, keyed ``"layer.weight"``."""
        return get_masks(self.model)

    def prune(self, fraction: float) -> float:
        """Mask the smallest-magnitude ``fraction`` (in [0, 1)) of the still-unmasked weights
        (over all tensors, or per tensor for scope="layer"); returns the new sparsity."""
        fraction = check_fraction(fraction, "fraction")
        groups = [self.parameters] if self.scope == "global" else [[p] for p in self.parameters]
        for pairs in groups:
            target = 1.0 - (1.0 - self._mask_sparsity(pairs)) * (1.0 - fraction)
            magnitude_prune(self.model, min(target, _BELOW_ONE), scope=self.scope, parameters=pairs)
        return self.sparsity

    def rewind(self) -> None:
        """Restore every parameter and buffer to the rewind state; masks are kept, so pruned
        entries stay zero in the forward pass."""
        model_state = _plain_state(self.model)
        with torch.no_grad():
            for key, tensor in model_state.items():
                tensor.copy_(self._rewind_state[key])
            # Recompute weight = weight_orig * mask now, as the forward pre-hook would: code that
            # reads module.weight before the next forward must not see pre-rewind values.
            for module in self.model.modules():
                for hook in module._forward_pre_hooks.values():
                    if isinstance(hook, prune.BasePruningMethod):
                        setattr(module, hook._tensor_name, hook.apply_mask(module))


# check_fraction keeps sparsity below 1; a product of many (1 - p) can round to exactly 1.
_BELOW_ONE = 1.0 - 1e-12


def iterative_magnitude_pruning(model: nn.Module, train_fn: Callable[[nn.Module], object],
                                rounds: int, fraction_per_round: float, *, rewind_to=None,
                                scope: str = "global", parameters=None) -> LotteryTicket:
    """Frankle & Carbin's IMP: ``rounds`` times train, prune ``fraction_per_round`` of the
    remaining weights, rewind.

    train_fn: ``train_fn(model)`` trains the model in place (building its own optimizer over
        ``model.parameters()``, which includes the masked ``weight_orig``); whatever it returns
        (e.g. accuracy) is recorded in ``ticket.history``.
    rewind_to: state_dict to rewind to; default the model's state at this call (the
        initialisation, or an early state if the model was trained for a few steps first).
    Returns the :class:`LotteryTicket`; its model is left rewound and masked (the ticket, not yet
    trained), with sparsity ``1 - (1 - fraction_per_round) ** rounds`` up to rounding.
    """
    if not callable(train_fn):
        raise TypeError(f"train_fn must be callable, got {type(train_fn).__name__}")
    rounds = check_int(rounds, "rounds", low=1)
    fraction_per_round = check_fraction(fraction_per_round, "fraction_per_round", allow_zero=False)
    ticket = LotteryTicket(model, rewind_state=rewind_to, scope=scope, parameters=parameters)
    for r in range(rounds):
        result = train_fn(model)
        sparsity = ticket.prune(fraction_per_round)
        ticket.rewind()
        ticket.history.append({"round": r, "train_result": result, "sparsity": sparsity})
    return ticket

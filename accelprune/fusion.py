"""Conv-BatchNorm fusion for deployment.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it folds into the
convolution's weight and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval`` does the arithmetic).
:func:`fuse_conv_bn` replaces each such convolution by the fused one and the BatchNorm by
``nn.Identity``; the model keeps its class and forward code, so it works for ``nn.Sequential``,
torchvision / CIFAR ResNet blocks and any other model whose forward torch.fx can trace, pruned
(physically smaller) or not.

How pairs are found, and why not by module order: the seed's approach (a conv immediately
followed by a BN in ``model.modules()``) fuses wrong pairs whenever registration order differs
from execution order, e.g. a block that registers ``bn1`` after ``conv2``, a shortcut conv listed
next to the main path's BN, or a conv whose output also feeds a residual add before the BN. So
accelprune traces the model with ``torch.fx`` and fuses a (conv, bn) pair only when the data flow
proves it safe:

* the BN's only input is the conv's output, and nothing else reads the conv's output;
* each module is called exactly once in the forward (shared modules are left alone);
* the BN has running statistics and its width and dimensionality match the conv's;
* the conv is a plain ``Conv1d/2d/3d`` (or a ``ConvTranspose`` with groups = 1).

Anything else is left unfused. A model torch.fx cannot trace gets a ValueError; such a model can
still be fused by listing ``pairs`` explicitly (then the caller vouches for the data flow).
Linear + BatchNorm1d is not fused: without shapes the graph cannot tell whether the BN normalises
the Linear's features (2-D input) or another dimension (3-D input).
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.utils import prune
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["find_conv_bn_pairs", "fuse_conv_bn"]

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_TRANSPOSES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_BNS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.SyncBatchNorm: None}


def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _compatible(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn`` over ``conv``'s output can be folded into it (types, widths, statistics)."""
    conv_dim = _CONVS.get(type(conv)) or _CONV_TRANSPOSES.get(type(conv))
    if conv_dim is None or type(bn) not in _BNS:
        return False
    if type(conv) in _CONV_TRANSPOSES and conv.groups != 1:
        return False  # torch's transposed fusion scales dim 1, which is out/groups per group
    bn_dim = _BNS[type(bn)]
    if bn_dim is not None and bn_dim != conv_dim:
        return False
    return (bn.num_features == conv.out_channels and bn.track_running_stats
            and bn.running_mean is not None and bn.running_var is not None)


def _is_masked(module: nn.Module) -> bool:
    return prune.is_pruned(module)


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` of every pair :func:`fuse_conv_bn` would fuse, in forward order.

    Raises ValueError when torch.fx cannot trace the model (see the module docstring).
    """
    _check_model(model)
    try:
        graph = fx.Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError)
        raise ValueError(
            f"cannot find conv-bn pairs: torch.fx could not trace {type(model).__name__} "
            f"({type(exc).__name__}: {exc}); pass pairs=[(conv_name, bn_name), ...] to "
            "fuse_conv_bn explicitly") from exc
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in _BNS:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[src.target] != 1 or calls[node.target] != 1:
            continue
        if _compatible(modules[src.target], modules[node.target]):
            pairs.append((src.target, node.target))
    return pairs


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fuse_conv_bn(model: nn.Module, *, inplace: bool = False, pairs=None) -> nn.Module:
    """The model with every safe conv -> BatchNorm pair folded into the conv; in eval mode.

    Outputs equal the unfused model's in eval mode up to float rounding. Training the result
    is not equivalent (BN's batch statistics are gone): fusion is for deployment.

    inplace: modify ``model`` itself (default: work on a deep copy, ``model`` is untouched).
    pairs: ``[(conv_name, bn_name), ...]`` to fuse instead of the traced ones
        (:func:`find_conv_bn_pairs`); the caller then vouches that each BN reads only its conv.
    Convs under ``torch.nn.utils.prune`` masks must be finalised first
    (:func:`accelprune.masks.make_permanent`).
    """
    _check_model(model)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if pairs is None:
        pairs = find_conv_bn_pairs(model)
        _check_unmasked(dict(model.named_modules()), pairs)
    else:
        pairs = _check_pairs(model, pairs)
    if not inplace:
        model = copy.deepcopy(model)
    # All or nothing: build every fused conv first (fuse_conv_bn_eval works on copies), and only
    # then swap the modules in and switch to eval mode, so a failure leaves ``model`` as it was.
    fused = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        transpose = type(conv) in _CONV_TRANSPOSES
        conv_mode, bn_mode = conv.training, bn.training
        try:
            conv.eval(), bn.eval()
            with torch.no_grad():
                fused.append(fuse_conv_bn_eval(conv, bn, transpose=transpose))
        finally:
            conv.train(conv_mode), bn.train(bn_mode)
    model.eval()
    for (conv_name, bn_name), new in zip(pairs, fused, strict=True):
        _set_submodule(model, conv_name, new)
        _set_submodule(model, bn_name, nn.Identity())
    return model


def _check_pairs(model: nn.Module, pairs) -> list[tuple[str, str]]:
    modules = dict(model.named_modules())
    checked, seen = [], set()
    for item in pairs:
        is_pair = isinstance(item, (tuple, list)) and len(item) == 2
        if not (is_pair and all(isinstance(s, str) for s in item)):
            raise TypeError(f"pairs must hold (conv_name, bn_name) string pairs, got {item!r}")
        conv_name, bn_name = item
        for name in item:
            if name not in modules:
                raise ValueError(f"model has no module named {name!r}")
            if name in seen:
                raise ValueError(f"module {name!r} appears in more than one pair")
            seen.add(name)
        conv, bn = modules[conv_name], modules[bn_name]
        if not _compatible(conv, bn):
            raise ValueError(f"cannot fuse {conv_name!r} ({type(conv).__name__}, "
                             f"{getattr(conv, 'out_channels', '?')} channels) with {bn_name!r} "
                             f"({type(bn).__name__}, {getattr(bn, 'num_features', '?')} features): "
                             "need a conv and a matching BatchNorm with running statistics")
        checked.append((conv_name, bn_name))
    _check_unmasked(modules, checked)
    return checked


def _check_unmasked(modules, pairs) -> None:
    for conv_name, _ in pairs:
        if _is_masked(modules[conv_name]):
            raise ValueError(f"{conv_name!r} is under a torch.nn.utils.prune mask; call "
                             "accelprune.masks.make_permanent(model) before fusing")

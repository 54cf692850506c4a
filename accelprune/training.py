"""Small training helpers for the demo, the benchmarks, the examples and the tests.

Nothing clever: an epoch of SGD, an accuracy evaluation, a seeded loader, and
:func:`recalibrate_bn` (BatchNorm statistics re-estimated after pruning). The hooks let the
pruning pipelines step in where they need to (C-SGD after ``backward()``, REPrune between epochs).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["evaluate", "loader", "recalibrate_bn", "train_epoch"]

_BATCHNORM = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, SyncBatchNorm, lazy ones


def loader(dataset: Dataset, *, batch_size: int = 64, shuffle: bool = True,
           seed: int = 0) -> DataLoader:
    """A DataLoader whose shuffling is fixed by ``seed`` (same batches on every run)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def train_epoch(
    model: nn.Module,
    data: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    after_backward: Callable[[], None] | None = None,
    loss_fn: Callable = nn.functional.cross_entropy,
    progress=None,
) -> float:
    """One epoch of training; returns the mean loss.

    ``after_backward`` runs between ``backward()`` and ``optimizer.step()`` (C-SGD's gradient
    transform, network slimming's L1 penalty). ``progress`` is an optional tqdm bar to advance.
    """
    model.train()
    total, count = 0.0, 0
    for inputs, targets in data:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        total += loss.item() * len(targets)
        count += len(targets)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: DataLoader) -> float:
    """Top-1 accuracy in [0, 1]."""
    model.eval()
    correct, count = 0, 0
    for inputs, targets in data:
        correct += (model(inputs).argmax(dim=1) == targets).sum().item()
        count += len(targets)
    return correct / max(count, 1)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, *, momentum: float | None = None,
                   max_batches: int | None = None) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``batches``; returns ``model``.

    After structured pruning a BN's running statistics describe the channels the unpruned network
    fed it, not what the pruned one does: one-shot accuracy often falls to chance although the
    weights are fine. Re-estimating the statistics on a few batches (no gradients, no parameter
    change) is the standard cheap fix, done before or instead of fine-tuning.

    Args:
        model: the network; only the BN buffers (``running_mean``, ``running_var``,
            ``num_batches_tracked``) change. Every module's train/eval flag and every BN's
            ``momentum`` are as before afterwards. The forward passes run with the model in eval
            mode except the BNs (dropout off: the statistics are those of inference).
        batches: an iterable of batches, each a tensor (``model(x)``), a tuple/list whose first
            element is the input (a DataLoader's ``(inputs, targets)``) or a dict of keyword
            inputs (``model(**batch)``).
        momentum: None (default) for the cumulative average of the batches' statistics (every
            batch weighs the same, starting from reset statistics); a number in (0, 1] for
            BN's exponential average starting from the current statistics instead.
        max_batches: use at most this many batches (None: all of ``batches``).

    A model without BatchNorm (or whose BNs track no running statistics) is returned unchanged.
    Raises ValueError when ``batches`` yields nothing, TypeError for a batch of another form; on
    any failure the statistics are restored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if momentum is not None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise TypeError(f"momentum must be None or a number, got {type(momentum).__name__}")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1] or None, got {momentum}")
    if max_batches is not None:
        if isinstance(max_batches, bool) or not isinstance(max_batches, int):
            raise TypeError(f"max_batches must be None or an int, got {type(max_batches).__name__}")
        if max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    bns = [m for m in model.modules() if isinstance(m, _BATCHNORM) and m.track_running_stats]
    if not bns:
        return model
    stream = iter(batches if max_batches is None else itertools.islice(batches, max_batches))
    first = next(stream, None)
    if first is None:  # checked before anything changes: reset statistics would be worse
        raise ValueError("batches yielded no batch; recalibrating BatchNorm needs at least one")

    saved_buffers = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    saved_momentum = [m.momentum for m in bns]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in bns:
            m.train()
            m.momentum = momentum
            if momentum is None:  # the cumulative average counts from zero
                m.reset_running_stats()
        for batch in itertools.chain([first], stream):
            _run_batch(model, batch)
    except BaseException:
        for m, buffers in zip(bns, saved_buffers, strict=True):
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
        raise
    finally:
        for m, value in zip(bns, saved_momentum, strict=True):
            m.momentum = value
        for m, flag in flags:
            m.training = flag
    return model


def _run_batch(model: nn.Module, batch) -> None:
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise TypeError("a batch is an empty tuple/list; expected (inputs, ...)")
        batch = batch[0]
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, torch.Tensor):
        model(batch)
    else:
        raise TypeError("each batch must be a tensor, a tuple/list whose first element is the "
                        f"input, or a dict of keyword inputs; got {type(batch).__name__}")

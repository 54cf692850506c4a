"""Small training helpers for the demo, the examples and the tests.

Nothing clever: an epoch of SGD, an accuracy evaluation, and a seeded loader. The hooks let the
pruning pipelines step in where they need to (C-SGD after ``backward()``, REPrune between epochs).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset


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

"""Built-in data that needs no download: scikit-learn's handwritten digits.

The 1,797 8x8 grey images ship inside scikit-learn. They are upsampled to ``size`` x ``size``
and repeated over 3 channels, so CIFAR-style networks (3 x 32 x 32 input) take them unchanged.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def digits(size: int = 32, *, test_fraction: float = 0.2,
           seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of digits as float32 (3, size, size) images and int64 labels.

    Images are scaled to [0, 1], resized bilinearly and standardised with the training set's
    mean and standard deviation. The split is stratified-free but fixed by ``seed``.
    """
    from sklearn.datasets import load_digits

    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))

    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    n_test = int(round(test_fraction * len(labels)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return (TensorDataset(images[train_idx], labels[train_idx]),
            TensorDataset(images[test_idx], labels[test_idx]))

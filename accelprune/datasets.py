"""Built-in data that needs no download: scikit-learn's handwritten digits.

The 1,797 8x8 grey images ship inside scikit-learn. They are upsampled to ``size`` x ``size``
and repeated over 3 channels, so CIFAR-style networks (3 x 32 x 32 input) take them unchanged.

* :func:`digits`: the images as they are. Easy: a ResNet-20 reaches ~99%, and every pruning
  method fine-tunes back to it at -50% MACs, so it cannot tell methods apart.
* :func:`distorted_digits`: the same images randomly rotated, scaled, shifted and noised - afresh
  at every access for training (augmentation), once and for all (seeded) for the test set. The
  test digits are harder than the training originals, accuracy is no longer saturated, and
  pruning a small network costs accuracy that the methods differ in recovering.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DistortedDigits", "digits", "distorted_digits"]


def digits(size: int = 32, *, test_fraction: float = 0.2,
           seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of digits as float32 (3, size, size) images and int64 labels.

    Images are scaled to [0, 1], resized bilinearly and standardised with the training set's
    mean and standard deviation. The split is stratified-free but fixed by ``seed``.
    """
    images, labels, train_idx, test_idx = _split(size, test_fraction, seed)
    images = images.expand(-1, 3, -1, -1)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return (TensorDataset(images[train_idx], labels[train_idx]),
            TensorDataset(images[test_idx], labels[test_idx]))


def _split(size, test_fraction, seed):
    """Grey images (N, 1, size, size) in [0, 1], labels, and the seeded train / test indices."""
    from sklearn.datasets import load_digits

    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    n_test = int(round(test_fraction * len(labels)))
    return images, labels, order[n_test:], order[:n_test]


@torch.no_grad()
def _distort(images: torch.Tensor, generator: torch.Generator, *, rotation: float, scale: float,
             shift: float, noise: float) -> torch.Tensor:
    """Random affine warp (rotation in degrees, scale factor range 1 ± scale, shift as a
    fraction of the side) plus Gaussian pixel noise, per image; images (N, 1, H, W) in [0, 1]
    with background 0 (the warp brings in background)."""
    n = len(images)
    u = torch.rand(n, 4, generator=generator) * 2 - 1  # uniform in [-1, 1)
    angle = u[:, 0] * math.radians(rotation)
    zoom = 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * 2 * shift], 1),
                         torch.stack([sin, cos, u[:, 3] * 2 * shift], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return warped + noise * torch.randn(warped.shape, generator=generator)


class DistortedDigits(Dataset):
    """Training digits distorted afresh at every access (augmentation), standardised, 3 channels.

    Deterministic given ``seed`` and the order of accesses (a seeded loader gives the same
    epochs on every run).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, *,
                 seed: int, **distortion):
        self.images, self.labels = images, labels
        self.mean, self.std, self.distortion = mean, std, distortion
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = _distort(self.images[i][None], self.generator, **self.distortion)[0]
        return ((image - self.mean) / self.std).expand(3, -1, -1), self.labels[i]


def distorted_digits(size: int = 16, *, rotation: float = 20.0, scale: float = 0.15,
                     shift: float = 0.12, noise: float = 0.25, test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[DistortedDigits, TensorDataset]:
    """(train, test) digits made harder: rotated by up to ``rotation`` degrees, scaled by
    1 ± ``scale``, shifted by up to ``shift`` of the side, plus Gaussian noise of std ``noise``
    (on the [0, 1] scale), at ``size`` x ``size``, 3 channels.

    The training set draws a new distortion at every access (augmentation); the test set is
    distorted once, from ``seed`` (a fixed, harder test). Standardised with the mean and std of
    the distorted training images. The train / test split is :func:`digits`' for the same seed.
    """
    for name, value in (("rotation", rotation), ("scale", scale), ("shift", shift),
                        ("noise", noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if scale >= 1:
        raise ValueError(f"scale must be < 1 (zoom 1 ± scale), got {scale}")
    images, labels, train_idx, test_idx = _split(size, test_fraction, seed)
    distortion = {"rotation": rotation, "scale": scale, "shift": shift, "noise": noise}
    generator = torch.Generator().manual_seed(seed + 1)
    sample = _distort(images[train_idx], generator, **distortion)  # for the standardisation
    mean, std = float(sample.mean()), float(sample.std())
    test = (_distort(images[test_idx], generator, **distortion) - mean) / std
    train = DistortedDigits(images[train_idx], labels[train_idx], mean, std, seed=seed + 2,
                            **distortion)
    return train, TensorDataset(test.expand(-1, 3, -1, -1).contiguous(), labels[test_idx])

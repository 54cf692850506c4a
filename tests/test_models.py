"""accelprune.models (CIFAR ResNet-20/56, small VGG); save / load are in test_serialization.py."""


import pytest
import torch
from torch import nn

from accelprune import models


def _convs(model, k):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (k, k)]


@pytest.mark.parametrize("build,n", [(models.resnet20, 3), (models.resnet56, 9)])
def test_cifar_resnet_structure(build, n):
    torch.manual_seed(0)
    model = build(num_classes=7)
    # depth 6n+2: stem + 2 convs per block + fc; option-B projections only where stages change
    assert len(_convs(model, 3)) == 6 * n + 1
    assert len(_convs(model, 1)) == 2
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [n, n, n]
    assert [s[0].conv2.out_channels for s in (model.layer1, model.layer2, model.layer3)] == [
        16,
        32,
        64,
    ]
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer2[0].shortcut[0], nn.Conv2d) and model.layer2[0].shortcut[
        0
    ].stride == (2, 2)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_parameter_counts_match_the_papers_scale():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # He et al.: ResNet-20 0.27 M, ResNet-56 0.85 M (option A); option B adds two small projections
    assert 0.27e6 <= count(models.resnet20()) <= 0.28e6
    assert 0.85e6 <= count(models.resnet56()) <= 0.87e6


def test_vgg_small_forward_and_flatten_linear():
    model = models.vgg_small(num_classes=10)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert model.classifier[0].in_features == 256 * 2 * 2


@pytest.mark.parametrize("build", [models.resnet20, models.resnet56, models.vgg_small])
def test_bad_num_classes(build):
    with pytest.raises(ValueError, match="num_classes"):
        build(num_classes=0)
    with pytest.raises(TypeError, match="num_classes"):
        build(num_classes=2.5)

# save / load: tests/test_serialization.py

import copy

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from accelprune.fusion import find_conv_bn_pairs, fuse_conv_bn
from accelprune.masks import magnitude_prune, make_permanent
from accelprune.models import resnet20

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomise_bn(model, seed=0):
    """Non-trivial BN statistics and affine terms, so that a wrong fusion shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN_TYPES) and m.track_running_stats:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def assert_fusion_exact(model, x, n_pairs=None):
    model.eval()
    state = copy.deepcopy(model.state_dict())
    fused = fuse_conv_bn(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    # the input model is untouched (inplace=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    n_bn = sum(isinstance(m, _BN_TYPES) for m in fused.modules())
    if n_pairs is not None:
        assert sum(isinstance(m, _BN_TYPES) for m in model.modules()) - n_bn == n_pairs
    assert not fused.training
    return fused


def test_sequential_conv_bn_with_and_without_bias():
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 6, 3, bias=True), nn.BatchNorm2d(6), nn.ReLU(),
                                       nn.Conv2d(6, 4, 3, bias=False), nn.BatchNorm2d(4)))
    assert find_conv_bn_pairs(model) == [("0", "1"), ("3", "4")]
    fused = assert_fusion_exact(model, torch.randn(2, 3, 9, 9), n_pairs=2)
    assert isinstance(fused[1], nn.Identity)
    assert fused[0].bias is not None and fused[3].bias is not None
    assert type(fused) is nn.Sequential


def test_cifar_resnet20_every_bn_fused():
    model = randomise_bn(resnet20())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    pairs = find_conv_bn_pairs(model)
    assert len(pairs) == n_bn
    assert ("layer2.0.shortcut.0", "layer2.0.shortcut.1") in pairs
    assert_fusion_exact(model, torch.randn(2, 3, 32, 32), n_pairs=n_bn)


def test_torchvision_resnet18_downsample_pairs():
    model = randomise_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    pairs = find_conv_bn_pairs(model)
    assert ("layer3.0.downsample.0", "layer3.0.downsample.1") in pairs
    assert ("layer1.1.conv2", "layer1.1.bn2") in pairs
    assert_fusion_exact(model, torch.randn(1, 3, 48, 48), n_pairs=20)


def test_fusion_on_a_structurally_pruned_model():
    model = randomise_bn(resnet20())
    x = torch.randn(2, 3, 32, 32)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    assert model.layer1[0].conv1.out_channels < 16  # physically smaller
    model.eval()
    assert_fusion_exact(model, x, n_pairs=len(find_conv_bn_pairs(model)))


def test_fusion_after_unstructured_masks_are_made_permanent():
    model = randomise_bn(resnet20())
    magnitude_prune(model, 0.6)
    with pytest.raises(ValueError, match="make_permanent"):
        fuse_conv_bn(model)
    make_permanent(model)
    zeros_before = (model.layer1[0].conv1.weight == 0)
    fused = assert_fusion_exact(model, torch.randn(2, 3, 32, 32))
    assert torch.all(fused.layer1[0].conv1.weight[zeros_before] == 0)


class CrossedPairs(nn.Module):
    """Registration order says (conv_a, bn_a), but bn_a normalises conv_b's output."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_b(self.conv_a(x)) + 2 * self.bn_a(self.conv_b(x))


class ConvOutputReusedAndSharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.conv3, self.shared_bn = (nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1),
                                                  nn.BatchNorm2d(4))
        self.conv4 = nn.Conv2d(4, 4, 1)
        self.stats_free_bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        y = self.conv1(x)
        y = self.bn1(y) + y                           # conv1's output is read twice
        y = self.shared_bn(self.conv2(y)) + self.shared_bn(self.conv3(y))   # BN called twice
        return self.stats_free_bn(self.conv4(y))      # BN without running statistics


def test_pairs_follow_data_flow_not_module_order():
    model = randomise_bn(CrossedPairs())
    assert sorted(find_conv_bn_pairs(model)) == [("conv_a", "bn_b"), ("conv_b", "bn_a")]
    assert_fusion_exact(model, torch.randn(2, 3, 8, 8), n_pairs=2)


def test_unsafe_pairs_are_left_alone():
    model = randomise_bn(ConvOutputReusedAndSharedBN())
    assert find_conv_bn_pairs(model) == []
    fused = assert_fusion_exact(model, torch.randn(2, 3, 8, 8), n_pairs=0)
    assert isinstance(fused.bn1, nn.BatchNorm2d)


def test_conv1d_and_transposed_conv():
    torch.manual_seed(1)
    model = randomise_bn(nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), nn.ReLU(),
                                       nn.Unflatten(2, (1, 6)),
                                       nn.ConvTranspose2d(5, 4, 3, stride=2),
                                       nn.BatchNorm2d(4)))
    assert find_conv_bn_pairs(model) == [("0", "1"), ("4", "5")]
    assert_fusion_exact(model, torch.randn(2, 3, 8), n_pairs=2)


def test_linear_bn_is_not_fused():
    # without shapes the graph cannot tell which dimension BatchNorm1d normalises after a Linear
    model = randomise_bn(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    assert find_conv_bn_pairs(model) == []


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace this
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_model_needs_explicit_pairs():
    model = randomise_bn(DataDependent())
    with pytest.raises(ValueError, match="torch.fx could not trace"):
        fuse_conv_bn(model)
    fused = fuse_conv_bn(model, pairs=[("conv", "bn")])
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


def test_inplace():
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    out = fuse_conv_bn(model, inplace=True)
    assert out is model and isinstance(model[1], nn.Identity)


@pytest.mark.parametrize("pairs, exc, match", [
    ([("0", "nope")], ValueError, "no module named"),
    ([("0", "2")], ValueError, "cannot fuse"),
    ([("0", "1"), ("0", "1")], ValueError, "more than one pair"),
    (["0"], TypeError, "pairs"),
])
def test_bad_pairs(pairs, exc, match):
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(2)))
    with pytest.raises(exc, match=match):
        fuse_conv_bn(model, pairs=pairs)


def test_bad_model():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fuse_conv_bn("resnet")
    with pytest.raises(TypeError, match="inplace"):
        fuse_conv_bn(nn.Conv2d(1, 1, 1), inplace=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fusion_on_cuda():
    model = randomise_bn(resnet20()).cuda()
    # TF32 convolutions would round fused and unfused weights differently, beyond float tolerance
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        fused = assert_fusion_exact(model, torch.randn(2, 3, 32, 32, device="cuda"))
    assert all(p.is_cuda for p in fused.parameters())

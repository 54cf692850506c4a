"""accelprune.importance: criteria against hand-computed scores, Torch-Pruning compatibility,
network slimming's BN penalty."""

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

import accelprune
from accelprune import models
from accelprune.graph import ModelGraph
from accelprune.importance import (
    IMPORTANCES,
    BNScaleImportance,
    GradientImportance,
    L1Importance,
    L2Importance,
    RandomImportance,
    TaylorImportance,
    bn_l1_penalty_,
    get_importance,
)


class Small(nn.Module):
    """conv(3→4)-BN-ReLU, conv(4→3), classifier: two groups, the second without a BN."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 2, bias=False), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


@pytest.fixture
def small():
    torch.manual_seed(0)
    model = Small()
    with torch.no_grad():
        # integer-valued weights: hand sums below are exact
        model.conv1.weight.copy_(torch.randint(-3, 4, model.conv1.weight.shape).float())
        model.conv2.weight.copy_(torch.randint(-3, 4, model.conv2.weight.shape).float())
        model.bn1.weight.copy_(torch.tensor([0.5, -2.0, 0.0, 1.5]))
    x = torch.randn(2, 3, 5, 5)
    graph = ModelGraph(model, x)
    return model, x, graph


def _hand(w, fn):
    return torch.tensor([fn(w[i].tolist()) for i in range(w.shape[0])], dtype=torch.float32)


def _flat(v):
    return [a for b in v for a in (_flat(b) if isinstance(b, list) else [b])]


def test_magnitude_and_bn_criteria_match_hand_computed(small):
    model, _, graph = small
    g1, g2 = graph.groups
    w = model.conv1.weight.detach()
    l1 = _hand(w, lambda f: sum(abs(v) for v in _flat(f)))
    l2 = _hand(w, lambda f: sum(v * v for v in _flat(f)) ** 0.5)
    torch.testing.assert_close(L1Importance()(g1), l1)
    torch.testing.assert_close(L2Importance()(g1), l2)
    torch.testing.assert_close(BNScaleImportance()(g1), torch.tensor([0.5, 2.0, 0.0, 1.5]))
    assert BNScaleImportance()(g2) is None  # no BatchNorm: Torch-Pruning's "skip this group"
    assert L1Importance()(g1).dtype == torch.float32


def test_gradient_criteria_match_hand_computed(small):
    model, x, graph = small
    with pytest.raises(ValueError, match="backward"):
        TaylorImportance()(graph.groups[0])
    with pytest.raises(ValueError, match="backward"):
        GradientImportance()(graph.groups[0])
    model(x).sum().backward()
    w, gw = model.conv1.weight.detach(), model.conv1.weight.grad
    taylor = (w * gw).abs().flatten(1).sum(1)
    torch.testing.assert_close(TaylorImportance()(graph.groups[0]), taylor)
    torch.testing.assert_close(GradientImportance()(graph.groups[0]), gw.abs().flatten(1).sum(1))


def test_random_importance_is_seeded():
    model = models.resnet20()
    graph = ModelGraph(model, torch.randn(1, 3, 32, 32))
    g = graph.groups[4]
    a, b = RandomImportance(seed=3), RandomImportance(seed=3)
    s = a(g)
    assert s.shape == (g.n_channels,) and ((s >= 0) & (s < 1)).all()
    assert torch.equal(s, b(g))
    assert not torch.equal(s, RandomImportance(seed=4)(g))
    with pytest.raises(TypeError, match="seed"):
        RandomImportance(seed=1.5)


class Residual(nn.Module):
    """Two convs whose outputs are summed: one coupled group with two producers and two BNs."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.b, self.bn_b = nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5)
        self.c = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x)))
        return self.fc(self.c(y).mean((2, 3)))


def test_coupled_group_scores_are_the_mean_over_producers():
    torch.manual_seed(0)
    model = Residual()
    with torch.no_grad():
        model.bn_a.weight.uniform_(-1, 1)
        model.bn_b.weight.uniform_(-1, 1)
    graph = ModelGraph(model, torch.randn(1, 3, 6, 6), prune_coupled=True)
    g = next(g for g in graph.groups if g.coupled)
    assert g.producers == ["a", "b"] and g.bns == ["bn_a", "bn_b"]
    wa, wb = model.a.weight.detach().flatten(1), model.b.weight.detach().flatten(1)
    torch.testing.assert_close(L1Importance()(g), (wa.abs().sum(1) + wb.abs().sum(1)) / 2)
    torch.testing.assert_close(L2Importance()(g), (wa.norm(dim=1) + wb.norm(dim=1)) / 2)
    torch.testing.assert_close(
        BNScaleImportance()(g), (model.bn_a.weight.abs() + model.bn_b.weight.abs()).detach() / 2
    )


def test_linear_producer_and_partial_torch_pruning_group():
    torch.manual_seed(0)
    model = models.vgg_small()
    graph = ModelGraph(model, torch.randn(1, 3, 32, 32))
    g = next(g for g in graph.groups if g.name == "classifier.0")
    w = model.classifier[0].weight.detach()
    full = L2Importance()(g)
    torch.testing.assert_close(full, w.norm(dim=1))
    # a Torch-Pruning group over a few channels gets their scores, in the group's order
    part = graph.DG.get_pruning_group(model.classifier[0], tp.prune_linear_out_channels, [9, 2, 6])
    torch.testing.assert_close(L2Importance()(part), full[[9, 2, 6]])


@pytest.mark.parametrize("name", sorted(IMPORTANCES))
def test_criteria_work_inside_torch_pruning_metapruner(name):
    torch.manual_seed(0)
    model = models.resnet20()
    x = torch.randn(2, 3, 32, 32)
    if name in ("taylor", "gradient"):
        nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    pruner = tp.pruner.MetaPruner(
        model, x, importance=get_importance(name), pruning_ratio=0.5, ignored_layers=[model.fc]
    )
    pruner.step()
    assert model.layer1[0].conv1.out_channels == 8
    assert model(x).shape == (2, 10)


def test_get_importance():
    assert isinstance(get_importance("l1"), L1Importance)
    imp = TaylorImportance()
    assert get_importance(imp) is imp
    assert get_importance(tp.importance.MagnitudeImportance()) is not None
    with pytest.raises(ValueError, match="unknown importance"):
        get_importance("l3")
    with pytest.raises(TypeError, match="importance"):
        get_importance(lambda group: None)
    with pytest.raises(TypeError, match="ChannelGroup"):
        L1Importance()("conv1")


def test_bn_l1_penalty_adds_strength_times_sign():
    torch.manual_seed(0)
    model = models.resnet20()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.linspace(-1, 1, 16))  # includes negative scales
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.weight.grad.clone() for m in bns]
    conv_grad = model.conv1.weight.grad.clone()
    bn_l1_penalty_(model, 1e-3)
    for m, g0 in zip(bns, before, strict=True):
        torch.testing.assert_close(m.weight.grad, g0 + 1e-3 * torch.sign(m.weight.detach()))
        assert m.bias.grad is not None
    assert torch.equal(model.conv1.weight.grad, conv_grad)  # only γ is penalised

    fresh = models.resnet20()  # no backward yet: the gradient is just the penalty
    bn_l1_penalty_(fresh, 0.5)
    torch.testing.assert_close(fresh.bn1.weight.grad, torch.full((16,), 0.5))


@pytest.mark.parametrize(
    "strength,err", [(-1.0, ValueError), (float("nan"), ValueError), ("1", TypeError)]
)
def test_bn_l1_penalty_bad_input(strength, err):
    with pytest.raises(err, match="strength"):
        bn_l1_penalty_(models.resnet20(), strength)
    with pytest.raises(TypeError, match="model"):
        bn_l1_penalty_([], 1.0)


def test_slimming_penalty_drives_scales_down():
    """A few SGD steps on the penalty alone shrink |γ| (and a top-level export exists)."""
    model = models.resnet20()
    opt = torch.optim.SGD(
        [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)], lr=0.1
    )
    for _ in range(3):
        opt.zero_grad()
        accelprune.bn_l1_penalty_(model, 1.0)
        opt.step()
    assert np.allclose(model.bn1.weight.detach().numpy(), 0.7)

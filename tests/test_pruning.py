"""accelprune.prune: one-shot pruning of torchvision and CIFAR models with every criterion."""

import copy
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from toy_models import ChunkCat, Detached

import accelprune
from accelprune import models
from accelprune.graph import ModelGraph
from accelprune.reporting import model_stats


def _tv(name, **kw):
    return lambda: getattr(torchvision.models, name)(weights=None, **kw)


BUILDERS = {
    "resnet18": (_tv("resnet18"), (1, 3, 64, 64)),
    "resnet50": (_tv("resnet50"), (1, 3, 64, 64)),
    "vgg16_bn": (_tv("vgg16_bn", num_classes=10), (1, 3, 64, 64)),
    "mobilenet_v2": (_tv("mobilenet_v2"), (1, 3, 64, 64)),
    "densenet121": (_tv("densenet121"), (1, 3, 64, 64)),
    "resnet56": (models.resnet56, (1, 3, 32, 32)),
}

# every criterion on resnet18; every model with one or two criteria (keeps the module fast)
CASES = [("resnet18", c, False) for c in ("l1", "l2", "bn", "taylor", "gradient", "random")] + [
    ("resnet18", "l1", True),
    ("resnet50", "taylor", False),
    ("vgg16_bn", "l2", False),
    ("vgg16_bn", "bn", True),
    ("mobilenet_v2", "l1", False),
    ("mobilenet_v2", "random", True),
    ("densenet121", "bn", False),
    ("resnet56", "l1", False),
    ("resnet56", "taylor", True),
]


def _randomise_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.05)
    return model


def _widths(model):
    return {
        n: m.weight.shape[1 if getattr(m, "transposed", False) else 0]
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


@pytest.mark.parametrize(
    "name,criterion,global_ranking",
    CASES,
    ids=[f"{n}-{c}-{'global' if g else 'layer'}" for n, c, g in CASES],
)
def test_prune_keeps_the_model_working_and_smaller(name, criterion, global_ranking):
    build, shape = BUILDERS[name]
    torch.manual_seed(0)
    model = _randomise_bn(build())
    x = torch.randn(*shape)
    ratio = 0.3 if name in ("resnet18", "resnet56") else 0.5
    if criterion in ("taylor", "gradient"):
        model(torch.randn(2, *shape[1:])).sum().backward()
    groups = ModelGraph(model, x).groups
    before_widths = {g.name: g.n_channels for g in groups}
    with torch.no_grad():
        out_shape = model.eval()(x).shape
    stats0 = model_stats(model, x)

    out = accelprune.prune(model, x, ratio, criterion, global_ranking=global_ranking)

    assert out is model  # in place
    with torch.no_grad():
        assert model.eval()(x).shape == out_shape
    stats1 = model_stats(model, x)
    assert stats1["params"] < stats0["params"] and stats1["macs"] < stats0["macs"]
    widths = _widths(model)
    ranked = [
        g for g in groups if criterion != "bn" or g.bns
    ]  # "bn" skips groups without BatchNorm
    if global_ranking:
        removed = sum(before_widths[g.name] - widths[g.name] for g in ranked)
        assert removed == math.floor(ratio * sum(before_widths[g.name] for g in ranked))
        assert all(widths[g.name] >= 1 for g in ranked)
    else:
        for g in ranked:
            n = before_widths[g.name]
            assert widths[g.name] == n - math.floor(ratio * n), g.name
    # groups that were not prunable (classifier, residual-coupled, stem) keep their width
    prunable = {p for g in groups for p in g.producers}
    untouched = [n for n in _widths(build()) if n not in prunable]
    fresh = _widths(build())
    assert all(widths[n] == fresh[n] for n in untouched)


def test_prune_coupled_prunes_residual_channels_too():
    torch.manual_seed(0)
    model, x = models.resnet20(), torch.randn(1, 3, 32, 32)
    accelprune.prune(model, x, 0.5, "l1", prune_coupled=True)
    assert model.conv1.out_channels == 8 and model.layer1[2].conv2.out_channels == 8
    assert model.fc.in_features == 32 and model.fc.out_features == 10
    assert model(x).shape == (1, 10)


def test_lowest_l1_channels_go_and_zero_channels_are_removed_losslessly():
    torch.manual_seed(0)
    model, x = models.resnet20(), torch.randn(4, 3, 32, 32)
    graph = ModelGraph(model, x[:1])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
        for g in graph.groups:
            idx = torch.randperm(g.n_channels, generator=gen)[: g.n_channels // 4]
            conv, bn = graph.module(g.producers[0]), graph.module(g.bns[0])
            conv.weight[idx] = 0
            bn.weight[idx] = 0
            bn.bias[idx] = 0  # else the channel outputs relu(β), not zero
    with torch.no_grad():
        expected = model.eval()(x)
    accelprune.prune(model, x[:1], 0.25, "l1")
    for g in graph.groups:  # exactly the zeroed channels went (the others have γ = 1)
        assert graph.module(g.name).out_channels == 3 * (16 * 2 ** (int(g.name[5]) - 1)) // 4
        assert (graph.module(g.bns[0]).weight != 0).all()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_ignored_layers_are_kept():
    model, x = models.resnet20(), torch.randn(1, 3, 32, 32)
    accelprune.prune(model, x, 0.5, "l2", ignored_layers=["layer1.0.conv1", model.layer3])
    assert model.layer1[0].conv1.out_channels == 16 and model.layer1[1].conv1.out_channels == 8
    assert all(b.conv1.out_channels == 64 for b in model.layer3)


def test_ratio_zero_changes_nothing():
    model, x = models.resnet20(), torch.randn(1, 3, 32, 32)
    params = list(model.parameters())
    accelprune.prune(model, x, 0.0, "l1")
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))


def test_global_bn_ranking_prunes_the_smallest_scales():
    torch.manual_seed(0)
    model, x = _randomise_bn(models.resnet20()), torch.randn(1, 3, 32, 32)
    graph = ModelGraph(model, x)
    gammas = np.concatenate([graph.module(g.bns[0]).weight.detach().numpy() for g in graph.groups])
    threshold = np.sort(gammas)[int(0.4 * len(gammas)) - 1]
    expected = {
        g.name: int((graph.module(g.bns[0]).weight.detach().numpy() > threshold).sum())
        for g in graph.groups
    }
    accelprune.prune(model, x, 0.4, "bn", global_ranking=True)
    assert {g.name: graph.module(g.name).out_channels for g in graph.groups} == expected


def test_torch_pruning_importance_objects_are_accepted():
    import torch_pruning as tp

    model, x = models.resnet20(), torch.randn(1, 3, 32, 32)
    accelprune.prune(model, x, 0.5, tp.importance.MagnitudeImportance(p=1))
    assert model.layer2[0].conv1.out_channels == 16


def test_failed_prune_leaves_the_model_untouched():
    torch.manual_seed(0)
    model, x = ChunkCat(), torch.randn(2, 3, 8, 8)
    params = {k: (p, p.detach().clone()) for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match="'c0'"):
        accelprune.prune(model, x, 0.5, "l1")
    assert all(model.get_parameter(k) is p and torch.equal(p, v) for k, (p, v) in params.items())
    # leaving the offending layer alone works
    accelprune.prune(model, x, 0.5, "l1", ignored_layers=["c0"])
    assert model.ca.out_channels == 3 and model.c0.out_channels == 8


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"sparsity": 1.0}, ValueError, "sparsity"),
        ({"sparsity": -0.1}, ValueError, "sparsity"),
        ({"sparsity": float("nan")}, ValueError, "sparsity"),
        ({"sparsity": "0.5"}, TypeError, "sparsity"),
        ({"importance": "l3"}, ValueError, "unknown importance"),
        ({"importance": 3}, TypeError, "importance"),
        ({"ignored_layers": ["layer4"]}, ValueError, "layer4"),
        ({"global_ranking": 1}, TypeError, "global_ranking"),
    ],
    ids=[
        "ratio1",
        "ratio_neg",
        "ratio_nan",
        "ratio_str",
        "unknown_importance",
        "importance_type",
        "unknown_layer",
        "global_type",
    ],
)
def test_bad_input(kwargs, err, match):
    model, x = models.resnet20(), torch.randn(1, 3, 32, 32)
    args = {"importance": "l1", "sparsity": 0.5, **kwargs}
    with pytest.raises(err, match=match):
        accelprune.prune(model, x, args.pop("sparsity"), args.pop("importance"), **args)
    assert model.layer1[0].conv1.out_channels == 16


def test_untraceable_model_names_the_op():
    with pytest.raises(ValueError, match="'conv1'"):
        accelprune.prune(Detached(), torch.randn(1, 3, 8, 8), 0.5, "l1")
    with pytest.raises(TypeError, match="nn.Module"):
        accelprune.prune("resnet", torch.randn(1), 0.5, "l1")


def test_taylor_without_gradients_is_an_error():
    model = models.resnet20()
    with pytest.raises(ValueError, match="backward"):
        accelprune.prune(model, torch.randn(1, 3, 32, 32), 0.5, "taylor")
    assert model.layer1[0].conv1.out_channels == 16


def _grouped_conv_model():
    """A conv, a grouped conv with 2 groups and a conv, with BNs and a classifier."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 3),
    )  # fmt: skip
    return model, torch.randn(2, 3, 8, 8)


def test_grouped_convs_lose_the_same_channels_in_every_group():
    model, x = _grouped_conv_model()
    w0 = model[0].weight.detach().clone()
    scores = w0.abs().flatten(1).sum(1).view(2, 4).mean(0)  # per conv-group position
    keep = torch.sort(torch.argsort(scores)[2:]).values
    m = accelprune.prune(copy.deepcopy(model), x, 0.5, "l1")
    assert m[0].out_channels == 4 and m[3].weight.shape[1] == 2
    torch.testing.assert_close(m[0].weight, w0[torch.cat([keep, keep + 4])])
    assert m(x).shape == (2, 3)
    m = accelprune.prune(copy.deepcopy(model), x, 0.5, "l1", global_ranking=True)
    assert m[0].out_channels % 2 == 0 and m[3].out_channels % 2 == 0  # whole units of 2
    # 10 of the 20 channels of the 3 groups, short by less than one unit of 2 at most
    assert 10 <= m[0].out_channels + m[3].out_channels + m[6].out_channels < 12
    assert m(x).shape == (2, 3)


# -- per-layer control: round_to, max_sparsity, layer_sparsity, normalize ----------------------

RESNET20_GROUPS = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]


def _group_widths(model):
    return {n: model.get_submodule(n).out_channels for n in RESNET20_GROUPS}


def _resnet20():
    torch.manual_seed(0)
    return models.resnet20(), torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("sparsity,expected", [(0.3, (16, 24, 48)), (0.5, (8, 16, 32))])
def test_round_to_rounds_kept_widths_up_to_a_multiple(sparsity, expected):
    # 0.3: 16 -> 12 rounds back to 16 (untouched); 32 -> 23 -> 24; 64 -> 45 -> 48
    model, x = _resnet20()
    accelprune.prune(model, x, sparsity, "l1", round_to=8)
    widths = _group_widths(model)
    assert widths == {n: expected[int(n[5]) - 1] for n in RESNET20_GROUPS}
    assert model(x).shape == (1, 10)


def test_round_to_under_global_ranking_keeps_multiples():
    model, x = _resnet20()
    accelprune.prune(model, x, 0.4, "l1", global_ranking=True, round_to=8)
    widths = _group_widths(model)
    assert all(w % 8 == 0 for w in widths.values())
    assert sum(widths.values()) >= 336 - math.floor(0.4 * 336)  # rounding only keeps more


def test_round_to_counts_whole_blocks_of_grouped_convs():
    model, x = _grouped_conv_model()
    # 8 channels in 2 blocks of 4: 0.25 drops one unit (2 channels), kept 6 rounds up to 8
    m = accelprune.prune(copy.deepcopy(model), x, 0.25, "l1", round_to=4)
    assert m[0].out_channels == 8
    m = accelprune.prune(copy.deepcopy(model), x, 0.5, "l1", round_to=4)
    assert m[0].out_channels == 4 and m(x).shape == (2, 3)


def test_max_sparsity_caps_global_ranking():
    model, x = _resnet20()
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(1e-3)  # raw global ranking would empty this layer
    raw = accelprune.prune(copy.deepcopy(model), x, 0.3, "l1", global_ranking=True,
                           normalize=None)
    assert raw.layer1[0].conv1.out_channels == 1
    accelprune.prune(model, x, 0.3, "l1", global_ranking=True, normalize=None, max_sparsity=0.5)
    widths = _group_widths(model)
    assert widths["layer1.0.conv1"] == 8
    before = {n: 16 * 2 ** (int(n[5]) - 1) for n in RESNET20_GROUPS}
    assert all(before[n] - widths[n] <= math.floor(0.5 * before[n]) for n in widths)
    assert sum(before.values()) - sum(widths.values()) == math.floor(0.3 * 336)


def test_max_sparsity_caps_the_per_layer_default():
    model, x = _resnet20()
    accelprune.prune(model, x, 0.75, "l1", max_sparsity=0.5)
    assert _group_widths(model) == {n: 8 * 2 ** (int(n[5]) - 1) for n in RESNET20_GROUPS}


def test_layer_sparsity_overrides_by_layer_and_container():
    model, x = _resnet20()
    accelprune.prune(model, x, 0.25, "l1",
                     layer_sparsity={"layer3": 0.75, "layer1.0.conv1": 0.5,
                                     "layer2": 0.5, "layer2.1.conv1": 0.0})
    assert _group_widths(model) == {
        "layer1.0.conv1": 8, "layer1.1.conv1": 12, "layer1.2.conv1": 12,
        "layer2.0.conv1": 16, "layer2.1.conv1": 32, "layer2.2.conv1": 16,
        "layer3.0.conv1": 16, "layer3.1.conv1": 16, "layer3.2.conv1": 16,
    }
    assert model(x).shape == (1, 10)


def test_layer_sparsity_under_global_ranking():
    model, x = _resnet20()
    accelprune.prune(model, x, 0.5, "l1", global_ranking=True, layer_sparsity={"layer3": 0.25})
    widths = _group_widths(model)
    assert all(widths[f"layer3.{b}.conv1"] == 48 for b in range(3))
    rest = [n for n in RESNET20_GROUPS if not n.startswith("layer3")]
    assert sum(widths[n] for n in rest) == 144 - math.floor(0.5 * 144)


def test_layer_sparsity_alone_with_zero_sparsity():
    model, x = _resnet20()
    accelprune.prune(model, x, 0.0, "l1", layer_sparsity={"layer2.2.conv1": 0.5})
    widths = _group_widths(model)
    assert widths["layer2.2.conv1"] == 16
    assert all(widths[n] == 16 * 2 ** (int(n[5]) - 1) for n in RESNET20_GROUPS
               if n != "layer2.2.conv1")


@pytest.mark.parametrize("normalize", ["mean", "max"])
def test_normalised_global_ranking_ignores_each_layers_scale(normalize):
    model, x = _resnet20()
    scaled = copy.deepcopy(model)
    with torch.no_grad():  # L1 scores of a layer scale with its weights; normalised ones do not
        for i, n in enumerate(RESNET20_GROUPS):
            scaled.get_submodule(n).weight.mul_(10.0 ** (i % 4 - 1))
    a = accelprune.prune(model, x, 0.4, "l1", global_ranking=True, normalize=normalize)
    b = accelprune.prune(scaled, x, 0.4, "l1", global_ranking=True, normalize=normalize)
    assert _group_widths(a) == _group_widths(b)
    assert sum(_group_widths(a).values()) == 336 - math.floor(0.4 * 336)


def test_mean_normalisation_matches_a_hand_ranking():
    model, x = _resnet20()
    graph = ModelGraph(model, x)
    scores = {}
    for g in graph.groups:
        s = graph.module(g.name).weight.detach().abs().flatten(1).sum(1).double().numpy()
        scores[g.name] = s / s.mean()
    cand = sorted((s, k, j) for k, (name, sc) in enumerate(scores.items())
                  for j, s in enumerate(sc) if j != int(np.argmax(sc)))
    removed = dict.fromkeys(scores, 0)
    for _, k, _ in cand[: math.floor(0.4 * 336)]:
        removed[list(scores)[k]] += 1
    accelprune.prune(model, x, 0.4, "l1", global_ranking=True)  # "auto" is "mean" for l1
    assert _group_widths(model) == {n: len(scores[n]) - removed[n] for n in scores}


def test_raw_global_ranking_strips_the_smallest_layers_scale():
    model, x = _resnet20()
    with torch.no_grad():
        model.layer3[0].conv1.weight.mul_(100.0)
    accelprune.prune(model, x, 0.3, "l1", global_ranking=True, normalize=None)
    assert model.layer3[0].conv1.out_channels == 64  # raw: the scaled layer looks important


@pytest.mark.parametrize("kwargs,err,match", [
    ({"round_to": 0}, ValueError, "round_to"),
    ({"round_to": 2.0}, TypeError, "round_to"),
    ({"max_sparsity": 1.5}, ValueError, "max_sparsity"),
    ({"layer_sparsity": [("layer1", 0.5)]}, TypeError, "layer_sparsity must be a dict"),
    ({"layer_sparsity": {1: 0.5}}, TypeError, "module names"),
    ({"layer_sparsity": {"layer1": 1.0}}, ValueError, "layer1"),
    ({"layer_sparsity": {"layer9": 0.5}}, ValueError, "layer9"),
    ({"layer_sparsity": {"fc": 0.5}}, ValueError, "covers no prunable layer"),
    ({"layer_sparsity": {"layer1": 0.8}, "max_sparsity": 0.5}, ValueError, "exceeds"),
    ({"normalize": "median"}, ValueError, "normalize"),
    ({"normalize": 1}, TypeError, "normalize"),
])
def test_bad_per_layer_input(kwargs, err, match):
    model, x = _resnet20()
    with pytest.raises(err, match=match):
        accelprune.prune(model, x, 0.5, "l1", **kwargs)
    assert _group_widths(model)["layer1.0.conv1"] == 16


# -- prune_to_macs ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,ratio", [
    ("l1", 0.3),
    ("bn", 0.5),
    pytest.param("reprune", 0.5, marks=pytest.mark.slow),
    pytest.param("csgd", 0.3, marks=pytest.mark.slow),
])
def test_prune_to_macs_reaches_the_target_within_2_percent(method, ratio):
    model, x = _resnet20()
    if method == "bn":
        _randomise_bn(model)
    macs0 = model_stats(model, x)["macs"]
    sparsity = accelprune.prune_to_macs(model, x, method, ratio)
    assert 0 < sparsity < 1
    macs = model_stats(model, x)["macs"]
    target = (1 - ratio) * macs0
    assert abs(macs - target) <= 0.02 * target, (macs / macs0, sparsity)
    assert model(x).shape == (1, 10)


def test_sparsity_for_macs_leaves_the_model_alone_and_agrees_with_prune_to_macs():
    model, x = _resnet20()
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    s = accelprune.sparsity_for_macs(model, x, "l2", 0.4)
    assert all(torch.equal(p, params[k]) for k, p in model.named_parameters())
    assert accelprune.prune_to_macs(model, x, "l2", 0.4) == s
    assert accelprune.prune_to_macs(models.resnet20(), x, "l2", 0.0) == 0.0


def test_prune_to_macs_passes_method_options_to_every_trial():
    model, x = _resnet20()
    macs0 = model_stats(model, x)["macs"]
    # widths of 16/32/64 in steps of 8 cannot land within 2% of the target: a looser tolerance
    accelprune.prune_to_macs(model, x, "l1", 0.4, tolerance=0.2, round_to=8)
    widths = _group_widths(model)
    assert all(w % 8 == 0 for w in widths.values()) and min(widths.values()) < 16, widths
    assert model_stats(model, x)["macs"] < macs0
    model, x = _resnet20()  # an option the method does not take: named, nothing changes
    with pytest.raises(TypeError, match="round_up"):
        accelprune.prune_to_macs(model, x, "l1", 0.4, round_up=8)
    assert _group_widths(model)["layer1.0.conv1"] == 16
    with pytest.raises(TypeError, match="round_to"):
        accelprune.prune_with(model, x, 0.4, "reprune", round_to=8)
    assert _group_widths(model)["layer1.0.conv1"] == 16


@pytest.mark.parametrize("kwargs,err,match", [
    ({"method": "l3"}, ValueError, "unknown method"),
    ({"macs_reduction": 1.0}, ValueError, "macs_reduction"),
    ({"macs_reduction": "half"}, TypeError, "macs_reduction"),
    ({"tolerance": 0.0}, ValueError, "tolerance"),
    ({"max_iterations": 0}, ValueError, "max_iterations"),
])
def test_prune_to_macs_bad_input(kwargs, err, match):
    model, x = _resnet20()
    args = {"method": "l1", "macs_reduction": 0.5, **kwargs}
    with pytest.raises(err, match=match):
        accelprune.prune_to_macs(model, x, args.pop("method"), args.pop("macs_reduction"), **args)
    assert model.layer1[0].conv1.out_channels == 16


@pytest.mark.parametrize("seed", range(4))
def test_per_layer_controls_hold_together(seed):
    rng = np.random.default_rng(seed)
    sparsity = float(rng.choice([0.2, 0.45, 0.7]))
    round_to = int(rng.choice([2, 4, 8]))
    max_sparsity = float(rng.choice([0.5, 0.75]))
    own = {str(rng.choice(RESNET20_GROUPS)): 0.5}
    model, x = _resnet20()
    with torch.no_grad():  # layers of very different scales
        for n in RESNET20_GROUPS:
            model.get_submodule(n).weight.mul_(float(rng.uniform(0.01, 10)))
    accelprune.prune(model, x, sparsity, "l1", global_ranking=bool(seed % 2),
                     round_to=round_to, max_sparsity=max_sparsity, layer_sparsity=own)
    widths = _group_widths(model)
    before = {n: 16 * 2 ** (int(n[5]) - 1) for n in RESNET20_GROUPS}
    for n, w in widths.items():
        if w < before[n]:
            assert w % round_to == 0, (n, w)
        assert before[n] - w <= math.floor(max_sparsity * before[n]), (n, w)
    (name, s), = own.items()
    k = math.floor(s * before[name])
    assert widths[name] == -(-(before[name] - k) // round_to) * round_to
    rest = [n for n in RESNET20_GROUPS if n != name]
    # per layer: a sum of floors; global: the budget (rounding and caps only keep more)
    assert sum(before[n] - widths[n] for n in rest) <= math.floor(
        sparsity * sum(before[n] for n in rest))
    assert model(x).shape == (1, 10)


def test_layer_sparsity_names_any_producer_of_a_coupled_group():
    model, x = _resnet20()
    accelprune.prune(model, x, 0.0, "l1", prune_coupled=True,
                     layer_sparsity={"layer1.1.conv2": 0.5})
    # the residual stream of stage 1: the stem and every block's conv2 shrink together
    assert model.conv1.out_channels == 8 and model.layer1[2].conv2.out_channels == 8
    assert model.layer1[0].conv1.out_channels == 16 and model(x).shape == (1, 10)


class _UnlistedAttention(nn.Module):
    """Self-attention in a layout find_head_groups does not recognise (as timm's Swin and
    LeViT, or OPT): q·kᵀ still runs on to_q's and to_k's channels."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x):
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_prune_leaves_the_inner_width_of_unlisted_attention_alone():
    """Regression (zoo sweep: timm Swin and LeViT, HF OPT): prune() ranked q/k/v rows of an
    attention layout it does not recognise as channel groups, so every call was refused; the
    groups whose channels meet q·kᵀ are left out, as REPrune and C-SGD leave them."""
    torch.manual_seed(0)
    model, x = _UnlistedAttention(), torch.randn(1, 5, 16)
    accelprune.prune(model, x, 0.5)
    assert model.fc1.out_features == 16
    assert [m.out_features for m in (model.to_q, model.to_k, model.to_v)] == [16, 16, 16]
    assert model(x).shape == (1, 5, 16)

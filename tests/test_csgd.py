"""Tests for accelprune.csgd: clustering, the gradient transform on real models, lossless pruning.

Models are small (CIFAR ResNet-20 at 16×16, torchvision ResNet-18 at 32×32, tiny hand-made nets
for flatten / avgpool / depthwise folding) so the module stays fast on two CPU cores. Where
training to convergence would be slow, convergence is forced by setting every cluster's members
equal (params and BN running statistics) and the fold is then checked to be lossless.
"""
from __future__ import annotations

import copy
import inspect
import warnings

import numpy as np
import pytest
import torch
from convergence import collapse_clusters
from failsafe import leaves_unchanged
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.vq import kmeans2
from torch import nn

import accelprune
from accelprune import selection as selection_mod
from accelprune import surgery
from accelprune.csgd import CSGD
from accelprune.models import resnet20, vgg_small
from accelprune.selection import cluster_filters

ETA, EPS = 1e-3, 0.05


def co_membership(labels) -> np.ndarray:
    labels = np.asarray(labels)
    return labels[:, None] == labels[None, :]


# ---------------------------------------------------------------------------------------------
# cluster_filters


# scipy >= 1.15 takes ``rng``; older versions call the same argument ``seed``.
KMEANS_RNG = "rng" if "rng" in inspect.signature(kmeans2).parameters else "seed"


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), d=st.integers(1, 40), frac=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**31))
def test_kmeans_is_scipys_kmeans2_plus_plus(n, d, frac, seed):
    """Same partition as ``kmeans2(X, k, minit="++", rng=default_rng(seed))`` (the ++ seeding is
    reimplemented for speed with scipy's random draws)."""
    X = np.random.default_rng(seed).normal(size=(n, d))
    k = max(1, round(frac * n))
    labels = cluster_filters(X, k, seed=seed, backend="reference")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="One of the clusters is empty")
        _, raw = kmeans2(X, k, minit="++", **{KMEANS_RNG: np.random.default_rng(seed)})
    if len(np.unique(raw)) == k:  # otherwise cluster_filters repairs what scipy left empty
        np.testing.assert_array_equal(co_membership(labels), co_membership(raw))


def test_kmeans_pp_centres_are_scipys():
    from scipy.cluster.vq import _kpp  # private, but the very function being reproduced

    X = np.random.default_rng(3).normal(size=(50, 9))
    for seed in range(5):
        ours = selection_mod._kmeans_pp_centres(X, 12, np.random.default_rng(seed))
        theirs = _kpp(X, 12, np.random.default_rng(seed), np)
        np.testing.assert_array_equal(ours, theirs)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), d=st.integers(1, 6), frac=st.floats(0.0, 1.0), seed=st.integers(0, 50),
       rounded=st.booleans(), method=st.sampled_from(["kmeans", "even"]))
def test_exactly_k_clusters_numbered_by_first_appearance(n, d, frac, seed, rounded, method):
    X = np.random.default_rng(seed).normal(size=(n, d))
    if rounded:  # many duplicate rows, often fewer distinct rows than k
        X = X.round(0)
    k = max(1, min(n, round(frac * n)))
    labels = cluster_filters(X, k, method=method, seed=seed)
    assert labels.dtype == np.int64 and labels.shape == (n,)
    assert sorted(np.unique(labels)) == list(range(k))
    first = np.unique(labels, return_index=True)[1]
    assert np.all(np.diff(first) > 0) and first[0] == 0
    np.testing.assert_array_equal(labels, cluster_filters(X, k, method=method, seed=seed))


def test_even_clusters_are_consecutive_blocks():
    labels = cluster_filters(np.zeros((10, 2)), 4, method="even")
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    assert np.all(np.diff(labels) >= 0)
    sizes = np.bincount(cluster_filters(np.zeros((37, 1)), 5, method="even"))
    assert sizes.max() - sizes.min() <= 1


def test_fewer_distinct_filters_than_clusters():
    labels = cluster_filters(np.zeros((6, 4)), 3)  # all equal: kmeans++ cannot place 3 centres
    assert sorted(np.unique(labels)) == [0, 1, 2]
    X = np.repeat(np.eye(2), 3, axis=0)  # two distinct rows, four clusters
    labels = cluster_filters(X, 4)
    assert sorted(np.unique(labels)) == [0, 1, 2, 3]
    # clusters only ever split groups of equal rows: no cluster mixes the two distinct rows
    for c in range(4):
        assert len(np.unique(X[labels == c], axis=0)) == 1


def test_empty_kmeans_clusters_are_repaired_by_splitting_off_the_farthest_row(monkeypatch):
    X = np.array([[0.0], [0.1], [0.2], [5.0], [9.0], [5.1]])

    def kmeans2_with_empty_cluster(data, centres, **kwargs):  # as if iterations emptied one
        return centres, np.array([0, 0, 0, 1, 1, 1])

    monkeypatch.setattr(selection_mod, "kmeans2", kmeans2_with_empty_cluster)
    labels = cluster_filters(X, 3, backend="reference")
    # cluster {5.0, 9.0, 5.1} has mean 6.37: 9.0 is the farthest row and becomes its own cluster
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 2, 1])


def test_cluster_filters_does_not_modify_input():
    X = np.random.default_rng(0).normal(size=(12, 5))
    before = X.copy()
    cluster_filters(X, 4)
    np.testing.assert_array_equal(X, before)
    T = torch.from_numpy(before.copy())
    cluster_filters(T, 4)
    assert torch.equal(T, torch.from_numpy(before))


@pytest.mark.parametrize("k, exc, match", [
    (0, ValueError, "n_clusters"), (6, ValueError, "more|n_clusters"),
    (2.0, TypeError, "integer"), (True, TypeError, "integer")])
def test_cluster_filters_bad_k(k, exc, match):
    with pytest.raises(exc, match=match):
        cluster_filters(np.zeros((5, 3)), k)


def test_fast_kmeans_is_the_reference_where_seeding_is_exact():
    """k <= 17: the torch k-means seeds exactly as scipy's k-means++ (blocked seeding only
    differs above), so on well-separated data both give the same partition."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 6)) * 20
    X = centres[rng.integers(0, 12, 90)] + rng.normal(size=(90, 6)) * 0.1
    fast = cluster_filters(X, 12, seed=4)
    np.testing.assert_array_equal(fast, cluster_filters(X, 12, seed=4, backend="reference"))
    with pytest.raises(ValueError, match="unknown backend"):
        cluster_filters(X, 12, backend="scipy")


def test_cluster_filters_bad_input():
    with pytest.raises(ValueError, match="unknown clustering"):
        cluster_filters(np.zeros((5, 3)), 2, method="spectral")
    with pytest.raises(ValueError, match="NaN"):
        cluster_filters(np.array([[0.0, np.nan], [1.0, 2.0]]), 1)
    with pytest.raises(ValueError, match="2-D"):
        cluster_filters(np.zeros((2, 3, 4)), 1)
    with pytest.raises(ValueError, match="empty"):
        cluster_filters(np.zeros((0, 3)), 1)
    with pytest.raises(ValueError, match="seed"):
        cluster_filters(np.zeros((5, 3)), 2, seed=-1)


# ---------------------------------------------------------------------------------------------
# helpers for models


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN params and running statistics (γ=1, β=0, μ=0, σ²=1 would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_lossless(before: torch.Tensor, after: torch.Tensor) -> None:
    scale = before.abs().max().item()
    assert before.shape == after.shape
    assert (before - after).abs().max().item() < 1e-4 * max(scale, 1.0), \
        f"max |Δ| {(before - after).abs().max().item():.3g} at logit scale {scale:.3g}"


def cifar_batch(n=4, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(t.shape[0], -1).double()


def cluster_means(t: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """(n, F): every row replaced by its cluster's mean."""
    R = rows(t)
    idx = torch.from_numpy(labels)
    sums = torch.zeros(int(labels.max()) + 1, R.shape[1], dtype=R.dtype).index_add_(0, idx, R)
    return (sums / torch.bincount(idx)[:, None].to(R.dtype))[idx]


@pytest.fixture(scope="module")
def resnet_csgd():
    """A CSGD on ResNet-20 (16×16 inputs) with random BN, and a pristine copy of the model."""
    torch.manual_seed(0)
    model = randomize_norms(resnet20())
    x, _ = cifar_batch()
    csgd = CSGD(model, x, 0.5, centripetal_strength=EPS, weight_decay=ETA)
    return csgd, copy.deepcopy(model)


def fresh(resnet_csgd):
    """A new CSGD (same clusters, same seed) on a fresh copy of the fixture's model."""
    _, pristine = resnet_csgd
    model = copy.deepcopy(pristine)
    return CSGD(model, cifar_batch()[0], 0.5, centripetal_strength=EPS, weight_decay=ETA), model


# ---------------------------------------------------------------------------------------------
# clusters on models


def test_clusters_per_group_and_shared_by_coupled_producers(resnet_csgd):
    csgd, _ = resnet_csgd
    assert len(csgd.clusters) == len(csgd.groups) > 0
    coupled = 0
    for gi, (g, c) in enumerate(zip(csgd.groups, csgd.clusters, strict=True)):
        assert c.name == g.name and c.labels.shape == (g.n_channels,)
        assert c.n_clusters == max(1, round(0.5 * g.n_channels)) == len(np.unique(c.labels))
        # one clustering for all producers, on their filters concatenated along the feature axis
        feats = np.concatenate([rows(csgd.graph.module(p).weight).numpy() for p in g.producers], 1)
        np.testing.assert_array_equal(c.labels, cluster_filters(feats, c.n_clusters, seed=gi))
        coupled += len(g.producers) > 1
    assert coupled > 0  # prune_coupled=True: the residual stages are clustered too
    np.testing.assert_array_equal(csgd.clusters[0].kept, np.unique(csgd.clusters[0].labels,
                                                                   return_index=True)[1])


def test_even_clustering_and_seed(resnet_csgd):
    _, pristine = resnet_csgd
    x = cifar_batch()[0]
    even = CSGD(copy.deepcopy(pristine), x, 0.75, clustering="even")
    for g, c in zip(even.groups, even.clusters, strict=True):
        blocks = (np.arange(g.n_channels) * c.n_clusters) // g.n_channels
        np.testing.assert_array_equal(c.labels, blocks)
    a = CSGD(copy.deepcopy(pristine), x, 0.5, seed=3)
    b = CSGD(copy.deepcopy(pristine), x, 0.5, seed=3)
    for ca, cb in zip(a.clusters, b.clusters, strict=True):
        np.testing.assert_array_equal(ca.labels, cb.labels)


def test_ignored_layers_and_prune_coupled(resnet_csgd):
    _, pristine = resnet_csgd
    x = cifar_batch()[0]
    single = CSGD(copy.deepcopy(pristine), x, 0.5, prune_coupled=False)
    assert all(len(g.producers) == 1 for g in single.groups)
    ignored = CSGD(copy.deepcopy(pristine), x, 0.5, ignored_layers=["layer1.0.conv1"])
    assert "layer1.0.conv1" not in {p for g in ignored.groups for p in g.producers}


# ---------------------------------------------------------------------------------------------
# the transform on a real model


def backward_once(model, seed=0):
    x, y = cifar_batch(seed=seed)
    model.train()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def test_invariant_on_real_model(resnet_csgd):
    csgd, model = fresh(resnet_csgd)
    backward_once(model)
    before = {n: (rows(p), rows(p.grad)) for n, p in model.named_parameters()}
    csgd.apply_gradients()
    transformed = {t.name: (t.weight_decay, t.centripetal, csgd.clusters[t.group])
                   for t in csgd.transformed}
    kinds = set()
    for name, p in model.named_parameters():
        W, G = before[name]
        if name not in transformed:  # classifier etc.: untouched
            assert torch.equal(rows(p.grad), G), name
            continue
        eta, eps, c = transformed[name]
        kinds.add((eta, eps))
        Gp = rows(p.grad)
        # G'_a − G'_b = (η + ε)(W_a − W_b) for a, b in one cluster: compare every row to its
        # cluster's first member
        rep = torch.from_numpy(c.kept[c.labels])
        torch.testing.assert_close(Gp - Gp[rep], (eta + eps) * (W - W[rep]), rtol=1e-5, atol=1e-7)
        # and the cluster's mean gradient is the mean of G plus η times the mean of W
        torch.testing.assert_close(cluster_means(p.grad, c.labels),
                                   cluster_means(G, c.labels) + eta * cluster_means(W, c.labels),
                                   rtol=1e-5, atol=1e-7)
    # kernels (η, ε); biases and BN (0, 0.1·ε)
    assert sorted(kinds) == [(0.0, pytest.approx(0.1 * EPS)), (ETA, EPS)]


def test_spread_shrinks_by_exactly_one_minus_lr_eta_eps_per_step(resnet_csgd):
    csgd, model = fresh(resnet_csgd)
    lr = 0.5
    opt = torch.optim.SGD(csgd.param_groups(), lr=lr)
    csgd.register_hook(opt)
    for step in range(3):
        spread = {t.name: rows(t.param) - cluster_means(t.param, csgd.clusters[t.group].labels)
                  for t in csgd.transformed}
        backward_once(model, seed=step)
        opt.step()
        for t in csgd.transformed:
            now = rows(t.param) - cluster_means(t.param, csgd.clusters[t.group].labels)
            torch.testing.assert_close(now, (1 - lr * (t.weight_decay + t.centripetal))
                                       * spread[t.name], rtol=1e-4, atol=1e-6)


def test_hook_composes_with_momentum(resnet_csgd):
    hooked, model_a = fresh(resnet_csgd)
    manual, model_b = fresh(resnet_csgd)
    opt_a = torch.optim.SGD(hooked.param_groups(), lr=0.05, momentum=0.9, nesterov=True)
    opt_b = torch.optim.SGD(manual.param_groups(), lr=0.05, momentum=0.9, nesterov=True)
    hooked.register_hook(opt_a)
    for step in range(3):
        backward_once(model_a, seed=step)
        opt_a.step()
        backward_once(model_b, seed=step)
        manual.apply_gradients()
        opt_b.step()
    pairs = zip(model_a.named_parameters(), model_b.named_parameters(), strict=True)
    for (na, pa), (_, pb) in pairs:
        assert torch.equal(pa, pb), na
    # momentum really was in play: the transformed update differs from a plain one
    assert all(opt_a.state[t.param].get("momentum_buffer") is not None for t in hooked.transformed)


def test_hook_refuses_optimizer_weight_decay_on_transformed_params(resnet_csgd):
    csgd, model = fresh(resnet_csgd)
    with pytest.raises(ValueError, match="twice"):
        csgd.register_hook(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4))
    with pytest.raises(TypeError, match="Optimizer"):
        csgd.register_hook(model)


def test_param_groups(resnet_csgd):
    csgd, model = fresh(resnet_csgd)
    groups = csgd.param_groups(lr=0.1, momentum=0.9)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every param exactly once
    transformed = {id(t.param) for t in csgd.transformed}
    for g in groups:
        assert g["lr"] == 0.1 and g["momentum"] == 0.9
        if all(id(p) in transformed for p in g["params"]):
            assert g["weight_decay"] == 0.0
        else:
            assert not any(id(p) in transformed for p in g["params"])
            assert g["weight_decay"] == ETA
    assert csgd.param_groups(weight_decay=5e-4)[0]["weight_decay"] == 5e-4
    assert model.fc.weight in groups[0]["params"]  # the classifier's outputs are never clustered


def test_params_without_grad_are_skipped(resnet_csgd):
    csgd, model = fresh(resnet_csgd)
    backward_once(model)
    param = csgd.transformed[0].param
    param.grad = None
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    csgd.apply_gradients()
    assert param.grad is None
    assert any(not torch.equal(p.grad, grads[n]) for n, p in model.named_parameters()
               if p.grad is not None)


def test_deviation(resnet_csgd):
    csgd, model = fresh(resnet_csgd)
    dev = csgd.deviation()
    expected = {g.name: 0.0 for g in csgd.groups}
    for t in csgd.transformed:
        labels = csgd.clusters[t.group].labels
        spread = rows(t.param) - cluster_means(t.param, labels)
        expected[csgd.groups[t.group].name] += float((spread ** 2).sum())
    assert dev.groups == pytest.approx(expected)
    assert dev.total == pytest.approx(sum(expected.values())) and dev.total > 0
    assert 0 < csgd.deviation(kernels_only=True).total < dev.total
    collapse_clusters(csgd)
    assert csgd.deviation().total < 1e-20


# ---------------------------------------------------------------------------------------------
# lossless pruning


def test_training_converges_and_pruning_is_lossless():
    """Real C-SGD training on ResNet-20 (residual-coupled groups included) until the clusters
    converge, then a fold that changes nothing.

    A large ε·lr makes the spread shrink fast: |1 − lr·(η+ε)| = 0.8 for kernels and
    |1 − lr·0.1·ε| = 0.82 for biases and BN. BN running statistics converge afterwards (their
    EMA forgets the old spread at 0.9 per step); recomputing them on a few batches (common
    practice after training) makes them exact.
    """
    torch.manual_seed(0)
    model = randomize_norms(resnet20())
    x, _ = cifar_batch(8)
    csgd = CSGD(model, x, 0.5, centripetal_strength=180.0, weight_decay=1e-4)
    opt = torch.optim.SGD(csgd.param_groups(), lr=0.01)
    csgd.register_hook(opt)
    start = csgd.deviation().total
    for step in range(70):
        xb, yb = cifar_batch(8, seed=step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    assert csgd.deviation().total < 1e-10 * start
    with torch.no_grad():  # recompute BN statistics with the converged filters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        for step in range(3):
            model(cifar_batch(8, seed=100 + step)[0])
    test_x = cifar_batch(16, seed=1000)[0]
    before = logits(model, test_x)
    report = csgd.prune()
    assert_lossless(before, logits(model, test_x))
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    layers = zip(report.layers, csgd.clusters, strict=True)
    assert all(after == c.n_clusters for (_, _, after), c in layers)


def test_lossless_on_torchvision_resnet18():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = randomize_norms(resnet18(weights=None, num_classes=10))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    csgd = CSGD(model, x, 0.5)
    assert any(len(g.producers) > 1 for g in csgd.groups)
    collapse_clusters(csgd)
    before = logits(model, x)
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    report = csgd.prune()
    assert_lossless(before, logits(model, x))
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert model.conv1.out_channels == 32 < widths["conv1"]  # the residual stream was folded


class FlattenNet(nn.Module):
    """conv-BN-ReLU → flatten (4×4 columns per channel) → Linear → ReLU → Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.hidden = nn.Linear(8 * 4 * 4, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.hidden(torch.flatten(x, 1))))


class DepthwiseNet(nn.Module):
    """MobileNet-style: pointwise → depthwise (groups = channels) → pointwise → pool → fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.pw = nn.Conv2d(12, 10, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.bn3(self.pw(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class GroupedNet(nn.Module):
    """conv → grouped conv (4 groups) → 1×1 conv → avgpool → fc (ResNeXt-style)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.grouped(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def test_grouped_conv_clusters_stay_in_blocks_and_repeat():
    csgd = CSGD(randomize_norms(GroupedNet()), torch.randn(2, 3, 8, 8), 0.5)
    by_name = {c.name: c for c in csgd.clusters}
    for name in ("conv1", "grouped"):  # consumed / produced by the 4-group conv: blocks of 4
        labels = by_name[name].labels.reshape(4, 4)
        assert by_name[name].n_clusters == 8
        for b in range(4):  # clusters never cross blocks; every block has the same pattern
            assert set(labels[b]) == set(range(2 * b, 2 * b + 2))
            np.testing.assert_array_equal(labels[b] - 2 * b, labels[0])
    assert by_name["conv3"].n_clusters == 4  # an ordinary group: k = round(0.5 · 8)


@pytest.mark.parametrize("make, shape", [(FlattenNet, (2, 3, 4, 4)), (DepthwiseNet, (2, 3, 8, 8)),
                                         (GroupedNet, (2, 3, 8, 8)), (vgg_small, (2, 3, 32, 32))])
def test_fold_is_lossless_through_flatten_avgpool_and_depthwise(make, shape):
    torch.manual_seed(0)
    model = randomize_norms(make())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    csgd = CSGD(model, x, 0.5, seed=1)
    collapse_clusters(csgd)
    before = logits(model, x)
    report = csgd.prune()
    assert_lossless(before, logits(model, x))
    assert report.params_after < report.params_before
    if make is FlattenNet:  # 8 channels → 4, so 64 of the Linear's 128 input columns remain
        assert model.hidden.in_features == 4 * 16 and model.hidden.out_features == 6
    if make is GroupedNet:
        assert model.grouped.in_channels == model.grouped.out_channels == 8
        assert model.grouped.groups == 4
    if make is DepthwiseNet:
        dw = model.dw
        assert dw.groups == dw.in_channels == dw.out_channels == model.stem.out_channels < 12


def test_without_convergence_the_fold_changes_outputs(resnet_csgd):
    """The check above is not vacuous: unconverged clusters do change the logits."""
    csgd, model = fresh(resnet_csgd)
    x = cifar_batch()[0]
    before = logits(model, x)
    csgd.prune()
    assert (before - logits(model, x)).abs().max() > 1e-2


def test_after_prune_the_csgd_is_spent(resnet_csgd):
    csgd, model = fresh(resnet_csgd)
    opt = torch.optim.SGD(csgd.param_groups(), lr=0.01)
    csgd.register_hook(opt)
    csgd.prune()
    for method in (csgd.apply_gradients, csgd.deviation, csgd.prune):
        with pytest.raises(RuntimeError, match="already pruned"):
            method()
    # the hook was removed: the old optimizer steps without the stale clusters
    backward_once(model)
    opt.step()


def _raise_on_call(monkeypatch, owner, name, n):
    """``owner.name`` raises RuntimeError("injected") on its n-th call (1-based)."""
    real, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(None)
        if len(calls) == n:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


RESTORED = "; the model was restored unchanged"


def test_a_failing_fold_is_named_with_its_reason(resnet_csgd, monkeypatch):
    csgd, model = fresh(resnet_csgd)
    folded = [g.name for g, c in zip(csgd.groups, csgd.clusters, strict=True)
              if c.n_clusters < g.n_channels]
    assert len(folded) >= 2
    _raise_on_call(monkeypatch, surgery, "cut_group", 2)
    with leaves_unchanged(model, cifar_batch()[0], raises=ValueError) as failure:
        csgd.prune()
    # the fold that failed, not the first one
    assert str(failure.value) == (f"folding channel group {folded[1]!r} failed "
                                  f"(RuntimeError: injected){RESTORED}")
    assert not csgd.pruned


def test_a_failing_check_after_the_folds_is_worded_alike(resnet_csgd, monkeypatch):
    csgd, model = fresh(resnet_csgd)
    folded = [g.name for g, c in zip(csgd.groups, csgd.clusters, strict=True)
              if c.n_clusters < g.n_channels]
    _raise_on_call(monkeypatch, surgery, "check_forward", 1)
    with pytest.raises(ValueError) as failure:
        csgd.prune()
    assert str(failure.value) == (
        f"folding channel group {folded[0]!r} and {len(folded) - 1} more (the forward check "
        f"after folding) failed (RuntimeError: injected){RESTORED}")
    _raise_on_call(monkeypatch, surgery, "check_forward", 1)
    g, c = csgd.groups[0], csgd.clusters[0]
    with pytest.raises(ValueError) as failure:  # fold_and_prune: one fold, the same shape
        accelprune.fold_and_prune(g, c.labels)
    assert str(failure.value) == (f"folding channel group {g.name!r} (the forward check after "
                                  f"folding) failed (RuntimeError: injected){RESTORED}")


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("sparsity, exc", [(1.0, ValueError), (1.5, ValueError),
                                           (-0.2, ValueError), (float("nan"), ValueError),
                                           ("0.5", TypeError)])
def test_bad_sparsity(resnet_csgd, sparsity, exc):
    _, pristine = resnet_csgd
    with pytest.raises(exc, match="sparsity"):
        CSGD(copy.deepcopy(pristine), cifar_batch()[0], sparsity)


def test_bad_arguments(resnet_csgd):
    _, pristine = resnet_csgd
    x = cifar_batch()[0]
    with pytest.raises(ValueError, match="unknown clustering"):
        CSGD(pristine, x, 0.5, clustering="spectral")
    with pytest.raises(ValueError, match="centripetal_strength"):
        CSGD(pristine, x, 0.5, centripetal_strength=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        CSGD(pristine, x, 0.5, weight_decay=float("inf"))
    with pytest.raises(TypeError, match="nn.Module"):
        CSGD("resnet", x, 0.5)


def test_model_with_nothing_to_prune():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))  # only a classifier
    with pytest.raises(ValueError, match="nothing C-SGD can prune"):
        CSGD(model, torch.randn(2, 3, 2, 2), 0.5)


def test_sparsity_zero_is_plain_weight_decay(resnet_csgd):
    csgd, model = fresh(resnet_csgd)
    csgd = CSGD(model, cifar_batch()[0], 0.0, centripetal_strength=EPS, weight_decay=ETA)
    assert all(c.n_clusters == len(c.labels) for c in csgd.clusters)
    backward_once(model)
    before = {t.name: (t.param.detach().clone(), t.param.grad.clone()) for t in csgd.transformed}
    csgd.apply_gradients()
    for t in csgd.transformed:
        W, G = before[t.name]
        torch.testing.assert_close(t.param.grad, G + t.weight_decay * W)


def test_model_is_not_modified_by_construction(resnet_csgd):
    _, pristine = resnet_csgd
    model = copy.deepcopy(pristine)
    state = copy.deepcopy(model.state_dict())
    CSGD(model, cifar_batch()[0], 0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_exported():
    assert accelprune.CSGD is CSGD and accelprune.cluster_filters is cluster_filters


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_transform_matches_cpu(resnet_csgd):
    """On CUDA apply_gradients runs the fused Triton kernel: same result as the CPU path."""
    cpu, model = fresh(resnet_csgd)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = CSGD(gpu_model, cifar_batch()[0].cuda(), 0.5, centripetal_strength=EPS, weight_decay=ETA)
    for a, b in zip(cpu.clusters, gpu.clusters, strict=True):
        np.testing.assert_array_equal(a.labels, b.labels)
    backward_once(model)
    for p, q in zip(model.parameters(), gpu_model.parameters(), strict=True):
        q.grad = p.grad.cuda()
    cpu.apply_gradients()
    gpu.apply_gradients()
    for (name, p), q in zip(model.named_parameters(), gpu_model.parameters(), strict=True):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_nan_filters_name_the_group(resnet_csgd):
    _, pristine = resnet_csgd
    model = copy.deepcopy(pristine)
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer2.0.conv1.*NaN"):
        CSGD(model, cifar_batch()[0], 0.5)


def test_layers_over_a_concat_are_skipped_not_fatal():
    """Regression (zoo sweep, DenseNet-121 and GhostNet): a BatchNorm or producer wider than its
    group (over a concat) made CSGD refuse the whole model ('has 96 rows but group ... has 64
    channels'); such groups are now skipped with the layer named (strict=True raises)."""
    from toy_models import GhostSE

    torch.manual_seed(0)
    model, x = GhostSE().eval(), torch.randn(1, 3, 8, 8)
    csgd = CSGD(model, x, 0.5)
    reasons = {s.name: " ".join(s.reasons) for s in csgd.skipped}
    assert "Conv2d 'expand' has 8 channels, the group 4" in reasons["primary"]
    assert "stem" in [g.name for g in csgd.groups]
    collapse_clusters(csgd)
    reference = model(x)
    csgd.prune()
    assert model.stem.out_channels == 3
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'expand' has 8 channels"):
        CSGD(GhostSE(), x, 0.5, strict=True)


class _StridedSubsample(nn.Module):
    """LeViT's attention subsample in small: tokens viewed as a 4x4 grid, every other row and
    column kept, then a Linear: Torch-Pruning maps a's channels to b's columns unevenly."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        n, _, c = y.shape
        y = y.view(n, 4, 4, c)[:, ::2, ::2].reshape(n, -1, c)
        return self.c(torch.relu(self.b(y))).mean(1)


def test_an_uneven_consumer_mapping_is_skipped_at_construction():
    """Regression (zoo sweep, timm LeViT): C-SGD clustered a group whose fold could not work and
    failed only in prune(), after training ('sees channels 29 and 20 through blocks of different
    sizes'); the group is now skipped when C-SGD is built, with the consumer named."""
    torch.manual_seed(0)
    model, x = _StridedSubsample(), torch.randn(1, 16, 4)
    csgd = CSGD(model, x, 0.5)
    reasons = {s.name: " ".join(s.reasons) for s in csgd.skipped}
    assert "consumer 'b' sees the channels through column blocks" in reasons["a"]
    assert [g.name for g in csgd.groups] == ["b"]
    collapse_clusters(csgd)
    reference = model(x)
    csgd.prune()
    assert model.b.out_features == 4 and model.a.out_features == 8
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)

"""accelprune.graph: channel groups, checked surgery with exact restore, C-SGD fold-and-prune."""

import numpy as np
import pytest
import torch
import torchvision
from failsafe import leaves_unchanged
from torch import nn
from toy_models import ChunkCat, Detached, tiny_llama

import accelprune
from accelprune import models
from accelprune.csgd import fold_and_prune
from accelprune.graph import ChannelGroup, ModelGraph, prune_channels
from accelprune.group_search import GraphSearch, pruning_group


def _randomise_bn(model, seed=0):
    """Trained-like BN parameters and statistics (init has γ=1, β=0, mean 0, var 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _group(graph, name) -> ChannelGroup:
    return next(g for g in graph.groups if g.name == name)


# -- listing groups ------------------------------------------------------------------------------


def test_resnet20_groups():
    model = models.resnet20()
    graph = ModelGraph(model, torch.randn(1, 3, 32, 32))
    # one group per block (conv1's outputs), in model order; coupled residual groups left out
    assert [g.name for g in graph.groups] == [
        f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)
    ]
    g = _group(graph, "layer2.1.conv1")
    assert (g.producers, g.bns, g.consumers, g.n_channels, g.coupled) == (
        ["layer2.1.conv1"],
        ["layer2.1.bn1"],
        ["layer2.1.conv2"],
        32,
        False,
    )

    coupled = ModelGraph(model, torch.randn(1, 3, 32, 32), prune_coupled=True)
    stem = _group(coupled, "conv1")
    assert stem.coupled and stem.producers == ["conv1"] + [f"layer1.{b}.conv2" for b in range(3)]
    assert "layer2.0.shortcut.0" in stem.consumers and "layer2.0.conv1" in stem.consumers
    last = next(g for g in coupled.groups if "layer3.0.shortcut.0" in g.producers)
    assert last.coupled and "fc" in last.consumers
    # the classifier's outputs are never a prunable group
    assert all("fc" not in g.producers for g in coupled.groups)
    assert any("fc" in g.producers for g in coupled.all_groups)


def test_output_of_a_fully_convolutional_model_is_not_pruned():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten()
    )
    graph = ModelGraph(model, torch.randn(1, 3, 8, 8))
    assert [g.name for g in graph.groups] == ["0"]


def test_depthwise_and_concat_groups():
    model = torchvision.models.mobilenet_v2(weights=None)
    graph = ModelGraph(model, torch.randn(1, 3, 64, 64))
    g = _group(graph, "features.2.conv.0.0")  # expand 1x1 then depthwise 3x3 share channels
    assert g.producers == ["features.2.conv.0.0", "features.2.conv.1.0"] and not g.coupled
    assert g.consumers == ["features.2.conv.2"]
    assert all("classifier.1" not in g.producers for g in graph.groups)

    dense = torchvision.models.densenet121(weights=None)
    dgraph = ModelGraph(dense, torch.randn(1, 3, 32, 32))
    g = _group(dgraph, "features.denseblock1.denselayer1.conv2")
    # concatenated into every later layer of the block and the transition
    assert g.consumers == [f"features.denseblock1.denselayer{i}.conv1" for i in range(2, 7)] + [
        "features.transition1.conv"
    ]


def test_ignored_layers_by_name_and_module():
    model = models.resnet20()
    x = torch.randn(1, 3, 32, 32)
    graph = ModelGraph(model, x, ignored_layers=["layer1.0.conv1", model.layer2])
    names = [g.name for g in graph.groups]
    assert "layer1.0.conv1" not in names and not any(n.startswith("layer2") for n in names)
    assert "layer1.1.conv1" in names and "layer3.0.conv1" in names


@pytest.mark.parametrize(
    "bad,err,match",
    [
        (["layer9.conv1"], ValueError, "layer9.conv1"),
        ([nn.Conv2d(1, 1, 1)], ValueError, "not part of the model"),
        ([3], TypeError, "ignored_layers"),
    ],
)
def test_ignored_layers_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        ModelGraph(models.resnet20(), torch.randn(1, 3, 32, 32), ignored_layers=bad)


def test_building_the_graph_leaves_the_model_as_it_was():
    model = _randomise_bn(models.resnet20()).train()
    model.conv1.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    x0 = x.clone()
    ModelGraph(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad
    assert all(
        torch.equal(v, model.state_dict()[k]) for k, v in state.items()
    )  # no BN stat updates
    assert torch.equal(x, x0)


def test_progress_bar(capsys):
    ModelGraph(models.resnet20(), torch.randn(1, 3, 32, 32), progress=True)
    assert "channel groups" in capsys.readouterr().err


# -- prune_channels ------------------------------------------------------------------------------


def test_prune_channels_keeps_exactly_the_given_channels_and_groups_stay_valid():
    torch.manual_seed(0)
    model = _randomise_bn(models.resnet20())
    graph = ModelGraph(model, torch.randn(1, 3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    keeps = {}
    for g in reversed(graph.groups):  # later groups first: earlier groups' indices must still hold
        keep = np.sort(rng.choice(g.n_channels, size=g.n_channels // 2 + 1, replace=False))
        keep_arg = keep.copy()
        prune_channels(g, keep_arg)
        assert np.array_equal(keep_arg, keep)  # input not modified
        keeps[g.name] = keep
    sd = model.state_dict()
    for g in graph.groups:
        k = torch.as_tensor(keeps[g.name])
        assert g.n_channels == len(k)
        block = g.name.rsplit(".", 1)[0]
        assert torch.equal(sd[f"{block}.conv1.weight"], before[f"{block}.conv1.weight"][k])
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(sd[f"{block}.bn1.{key}"], before[f"{block}.bn1.{key}"][k])
        assert torch.equal(sd[f"{block}.conv2.weight"], before[f"{block}.conv2.weight"][:, k])
    assert _out(model, torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _zero_channels(graph, g, idxs):
    """Make channels idxs of g exactly zero after BN (conv filter, bias, γ and β all 0)."""
    with torch.no_grad():
        for name in g.producers:
            m = graph.module(name)
            m.weight[idxs] = 0
            if m.bias is not None:
                m.bias[idxs] = 0
        for name in g.bns:
            bn = graph.module(name)
            bn.weight[idxs] = 0
            bn.bias[idxs] = 0


@pytest.mark.parametrize(
    "build,x",
    [
        (models.resnet20, torch.randn(3, 3, 32, 32)),
        (models.vgg_small, torch.randn(3, 3, 32, 32)),  # last group feeds a Linear after flatten
        (
            lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10),
            torch.randn(2, 3, 64, 64),
        ),
    ],
    ids=["resnet20", "vgg_small", "mobilenet_v2"],
)
def test_removing_zero_channels_is_lossless(build, x):
    torch.manual_seed(0)
    model = _randomise_bn(build())
    graph = ModelGraph(model, x[:1])
    plan = []
    for i, g in enumerate(graph.groups):
        zero = np.arange(i % 3, g.n_channels, 3)
        _zero_channels(graph, g, torch.as_tensor(zero))
        plan.append((g, np.setdiff1d(np.arange(g.n_channels), zero)))
    expected = _out(model, x)
    graph.prune_groups(plan)
    assert all(g.n_channels == len(k) for g, k in plan)
    torch.testing.assert_close(_out(model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "keep,err,match",
    [
        ([], ValueError, "at least one"),
        ([0, 16], ValueError, "outside"),
        ([-1, 3], ValueError, "outside"),
        ([1, 1, 2], ValueError, "repeated"),
        ([0.0, 1.0], TypeError, "integer"),
        ([[0, 1]], ValueError, "1-D"),
    ],
)
def test_prune_channels_bad_keep(keep, err, match):
    graph = ModelGraph(models.resnet20(), torch.randn(1, 3, 32, 32))
    with pytest.raises(err, match=match):
        graph.prune_channels(graph.groups[0], np.array(keep))
    assert graph.groups[0].n_channels == 16


def test_group_from_another_graph_is_refused():
    a = ModelGraph(models.resnet20(), torch.randn(1, 3, 32, 32))
    b = ModelGraph(models.resnet20(), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="another ModelGraph"):
        a.prune_channels(b.groups[0], [0, 1])
    with pytest.raises(TypeError, match="ChannelGroup"):
        prune_channels("layer1.0.conv1", [0])


# -- failed surgery restores the model exactly -----------------------------------------------------


def test_broken_surgery_restores_the_model_and_names_the_group():
    torch.manual_seed(0)
    model = ChunkCat()
    x = torch.randn(2, 3, 8, 8)
    graph = ModelGraph(model, x)
    params = dict(model.named_parameters())
    values = {k: v.detach().clone() for k, v in params.items()}
    expected = _out(model, x)
    with pytest.raises(ValueError, match="'c0'.*restored"):
        graph.prune_channels(_group(graph, "c0"), [0, 2, 3])
    # the very same parameter objects, unchanged, and the same layer sizes
    assert all(model.get_parameter(k) is p for k, p in params.items())
    assert all(torch.equal(p, values[k]) for k, p in params.items())
    assert (model.c0.out_channels, model.ca.in_channels, model.cb.in_channels) == (8, 4, 4)
    assert _group(graph, "c0").n_channels == 8
    torch.testing.assert_close(_out(model, x), expected, rtol=0, atol=0)
    # the graph is still usable: other groups prune normally afterwards
    graph.prune_channels(_group(graph, "ca"), [1, 4])
    assert model.ca.out_channels == 2 and model.c2.in_channels == 8
    assert _out(model, x).shape == (2, 3)


def test_prune_groups_is_all_or_nothing():
    model = ChunkCat()
    x = torch.randn(2, 3, 8, 8)
    graph = ModelGraph(model, x)
    params = {k: p for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match="'c0'"):
        graph.prune_groups([(_group(graph, "ca"), [0, 1]), (_group(graph, "c0"), [0, 2, 3])])
    assert all(model.get_parameter(k) is p for k, p in params.items())
    assert model.ca.out_channels == 6 and _group(graph, "ca").n_channels == 6


def test_grouped_conv_needs_the_same_channels_removed_per_group():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 36, 3),
    )
    x = torch.randn(2, 3, 8, 8)
    graph = ModelGraph(model, x)
    g = _group(graph, "0")
    assert g.consumers == ["3"]
    with pytest.raises(ValueError, match="same channels removed from each"):
        graph.prune_channels(g, [0, 1, 2, 4, 5])
    graph.prune_channels(g, [0, 2, 4, 6])  # channels 1, 3 of both conv groups
    assert model[3].in_channels == 4 and model[3].weight.shape == (8, 2, 3, 3)
    assert _out(model, x).shape == (2, 3)


# -- fold_and_prune ------------------------------------------------------------------------------


def _make_clusters_identical(graph, g, labels):
    """Copy the kept (lowest) member's filters, biases and BN entries onto its cluster."""
    with torch.no_grad():
        for c, lab in enumerate(labels):
            k = int(np.flatnonzero(labels == lab)[0])
            for name in g.producers:
                m = graph.module(name)
                rows = m.weight.transpose(0, 1) if getattr(m, "transposed", False) else m.weight
                rows[c] = rows[k]
                if m.bias is not None:
                    m.bias[c] = m.bias[k]
            for name in g.bns:
                bn = graph.module(name)
                for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                    t[c] = t[k]


class DepthwiseBlock(nn.Module):
    """1x1 expand, depthwise 3x3, 1x1 project (MobileNetV2 style), then a flatten Linear."""

    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(3, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.dw, self.bn2 = (
            nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False),
            nn.BatchNorm2d(12),
        )
        self.project = nn.Conv2d(12, 5, 1)
        self.fc = nn.Linear(5 * 16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.expand(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc(torch.flatten(self.project(x), 1))


class ConcatNet(nn.Module):
    """Two branches concatenated (DenseNet style): branch a's channels sit at an offset."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(10, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        y = torch.cat([self.b(x), torch.relu(self.bn_a(self.a(x)))], 1)
        return self.fc(self.c(y).mean((2, 3)))


@pytest.mark.parametrize(
    "case", ["resnet20", "resnet20_coupled", "vgg_small_flatten", "depthwise", "concat", "grouped"]
)
def test_fold_identical_filters_is_lossless(case):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    if case.startswith("resnet20"):
        model, name = models.resnet20(), ("conv1" if case.endswith("coupled") else "layer2.1.conv1")
    elif case == "vgg_small_flatten":
        model, name = (
            models.vgg_small(),
            "features.24",
        )  # consumer: Linear over 2x2 blocks of columns
    elif case == "depthwise":
        model, name, x = DepthwiseBlock(), "expand", torch.randn(3, 3, 4, 4)
    elif case == "concat":
        model, name, x = ConcatNet(), "a", torch.randn(3, 3, 8, 8)
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 8, 1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, groups=2),
            nn.Flatten(),
            nn.Linear(6 * 36, 3),
        )
        name, x = "0", torch.randn(3, 3, 8, 8)
    model = _randomise_bn(model)
    graph = ModelGraph(model, x[:1], prune_coupled=True)
    g = _group(graph, name)
    n = g.n_channels
    rng = np.random.default_rng(1)
    if case == "grouped":  # clusters inside each conv group, the same pattern in both
        labels = np.array([0, 0, 1, 2, 4, 4, 5, 6])
    else:
        labels = rng.integers(0, max(2, n // 3), size=n)
    _make_clusters_identical(graph, g, labels)
    expected = _out(model, x)
    fold_and_prune(g, labels)
    assert g.n_channels == len(np.unique(labels))
    for name in g.producers:
        m = graph.module(name)
        assert (
            m.weight.shape[1] if getattr(m, "transposed", False) else m.weight.shape[0]
        ) == g.n_channels
    torch.testing.assert_close(_out(model, x), expected, rtol=1e-4, atol=1e-4)


def test_fold_sums_consumer_slices_into_the_lowest_channel():
    torch.manual_seed(0)
    model = ConcatNet()
    graph = ModelGraph(model, torch.randn(1, 3, 8, 8))
    w = model.c.weight.detach().clone()
    fold_and_prune(_group(graph, "a"), np.array([3, 1, 3, 1, 0, 3]))  # clusters {0,2,5}, {1,3}, {4}
    # a's channels sit after b's 4 channels in c's input
    expected = torch.cat(
        [w[:, :4], (w[:, 4] + w[:, 6] + w[:, 9])[:, None], (w[:, 5] + w[:, 7])[:, None], w[:, 8:9]],
        1,
    )
    torch.testing.assert_close(model.c.weight, expected)
    assert model.a.out_channels == 3 and model.bn_a.num_features == 3


def test_fold_bad_input_leaves_model_untouched():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.Flatten(),
        nn.Linear(8 * 36, 3),
    )
    graph = ModelGraph(model, torch.randn(1, 3, 8, 8))
    g = _group(graph, "0")
    w = model[3].weight
    with pytest.raises(ValueError, match="8 channels"):
        fold_and_prune(g, np.zeros(5, dtype=np.int64))
    with pytest.raises(TypeError, match="integer"):
        fold_and_prune(g, np.zeros(8))
    with pytest.raises(
        ValueError, match="different groups"
    ):  # channel 4 is in the other conv group
        fold_and_prune(g, np.array([0, 1, 2, 3, 0, 5, 6, 7]))
    assert model[3].weight is w and g.n_channels == 8
    with pytest.raises(TypeError, match="ChannelGroup"):
        fold_and_prune(None, [0])


# -- models that cannot be traced ------------------------------------------------------------------


class NoGrad(Detached):
    def forward(self, x):
        with torch.no_grad():
            x = self.conv1(x)
        return self.fc(self.conv2(x).mean((2, 3)))


class ReturnsFloat(Detached):
    def forward(self, x):
        return float(self.fc(self.conv2(self.conv1(x)).mean((2, 3))).sum())


class DetachedOutput(Detached):
    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x)).mean((2, 3))).detach()


@pytest.mark.parametrize(
    "model,x,match",
    [
        (Detached(), torch.randn(1, 3, 8, 8), "'conv1'"),
        (NoGrad(), torch.randn(1, 3, 8, 8), "'conv1'.*without autograd"),
        (ReturnsFloat(), torch.randn(1, 3, 8, 8), "float"),
        (DetachedOutput(), torch.randn(1, 3, 8, 8), "after module 'fc'"),
        (Detached(), torch.randn(1, 5, 8, 8), "failed in module 'conv1'.*RuntimeError"),
    ],
    ids=["detach", "no_grad", "float_output", "detached_output", "forward_error"],
)
def test_untraceable_models_name_the_failing_op(model, x, match):
    with pytest.raises(ValueError, match=match):
        ModelGraph(model, x)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        ModelGraph(lambda x: x, torch.randn(1))


def test_residual_and_gated_groups_are_told_apart():
    """Summed producers make a residual group; multiplied ones (a gated MLP, squeeze-and-
    excitation) a gated group; a plain group is neither."""
    llama = tiny_llama()
    graph = ModelGraph(llama, {"input_ids": torch.randint(0, 64, (1, 8))}, prune_coupled=True)
    kinds = {g.name: (g.residual, g.gated) for g in graph.groups}
    assert kinds["model.layers.0.mlp.gate_proj"] == (False, True)
    assert kinds["model.layers.0.self_attn.o_proj"] == (True, False)  # the residual stream
    graph = ModelGraph(models.resnet20(), torch.randn(1, 3, 32, 32), prune_coupled=True)
    kinds = {g.name: (g.coupled, g.residual, g.gated) for g in graph.groups}
    assert kinds["layer1.0.conv1"] == (False, False, False)
    assert (True, True, False) in kinds.values() and not any(k[2] for k in kinds.values())
    mobilenet = torchvision.models.mobilenet_v3_small(weights=None).eval()
    graph = ModelGraph(mobilenet, torch.randn(1, 3, 64, 64), prune_coupled=True)
    assert any(g.gated and not g.residual for g in graph.groups)  # squeeze-and-excitation


def test_first_run_is_the_first_module_the_input_meets():
    class Backwards(nn.Module):  # registered in the opposite order to the one they run in
        def __init__(self):
            super().__init__()
            self.late = nn.Conv2d(4, 4, 3, padding=1)
            self.early = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.late(self.early(x))

    model = Backwards()
    graph = ModelGraph(model, torch.randn(1, 3, 8, 8))
    assert graph.first_run(nn.Conv2d) is model.early
    assert graph.first_run(nn.Linear) is None


def _as_sets(tp_group):
    return [(dep.target.name, str(dep.handler), sorted(int(i) for i in idxs))
            for dep, idxs in tp_group]


def _count_searches(monkeypatch) -> list:
    """The group searches ModelGraph builds from now on, as they are built."""
    built = []

    class Counted(GraphSearch):
        def __init__(self, DG):
            super().__init__(DG)
            built.append(self)

    monkeypatch.setattr("accelprune.graph.GraphSearch", Counted)
    return built


@pytest.mark.parametrize("build, x", [
    (lambda: torchvision.models.resnet18(weights=None), torch.randn(1, 3, 64, 64)),
    (lambda: ChunkCat(), torch.randn(2, 3, 8, 8)),
    (lambda: tiny_llama(), torch.randint(0, 64, (1, 8))),
])
def test_unchanged_shares_one_group_search_with_the_same_groups(build, x, monkeypatch):
    """Inside ``unchanged()`` the groups' Torch-Pruning groups come from one shared search, built
    on the first group read (nested blocks share it), and are the ones each would get alone;
    surgery inside it is refused and changes nothing."""
    torch.manual_seed(0)
    graph = ModelGraph(build().eval(), x)
    alone = [_as_sets(g.tp_group()) for g in graph.groups]
    built = _count_searches(monkeypatch)
    with graph.unchanged():
        assert graph.read_only and not built  # nothing read yet: no search
        shared = [_as_sets(g.tp_group()) for g in graph.groups[:1]]
        with graph.unchanged():  # nested: the same search
            shared += [_as_sets(g.tp_group()) for g in graph.groups[1:]]
        shared += [_as_sets(g.tp_group()) for g in graph.groups[:1]]
    assert shared == alone + alone[:1] and len(built) == 1 and not graph.read_only
    g = graph.groups[0]
    with graph.unchanged(), leaves_unchanged(graph.model, x, raises=RuntimeError,
                                             match="unchanged", backward=False):
        graph.prune_channels(g, np.arange(g.n_channels - 1))
    with graph.unchanged(), pytest.raises(RuntimeError, match="unchanged"):
        graph.prune_channels(g, np.arange(g.n_channels))  # keeps all: an empty plan, refused too
    assert not graph.read_only


def test_unchanged_builds_no_group_search_when_no_group_is_read(monkeypatch):
    """A block that reads no group (nested or not, or a snapshot of no groups) builds no search;
    the next block that reads one builds its own, over the graph as pruned since."""
    from accelprune.surgery import ModelSnapshot

    graph = ModelGraph(models.resnet20(), torch.randn(1, 3, 32, 32))
    built = _count_searches(monkeypatch)
    with graph.unchanged():
        with graph.unchanged():
            assert [g.n_channels for g in graph.groups]  # plain attributes: no search
    ModelSnapshot(graph, [])
    assert not built
    g = graph.groups[0]
    graph.prune_channels(g, np.arange(g.n_channels - 1))  # its snapshot reads the group
    assert len(built) == 1
    with graph.unchanged():
        assert len(g.tp_group()[0][1]) == g.n_channels
    assert len(built) == 2


def test_a_group_search_of_another_graph_is_refused():
    x = torch.randn(1, 3, 32, 32)
    one, other = ModelGraph(models.resnet20(), x), ModelGraph(models.resnet20(), x)
    g = one.groups[0]
    with pytest.raises(ValueError, match="another dependency graph"):
        pruning_group(one.DG, g._root, g._root_fn, [0], search=GraphSearch(other.DG))


class _TiedHead(nn.Module):
    """BERT's MLM head in small: a transform (dense, LayerNorm) before a decoder whose weight
    is the word embedding; the transform's channels reach the decoder but not the embedding."""

    def __init__(self, vocab=12, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 16), nn.Linear(16, dim)
        self.dense, self.norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.decoder(self.norm(torch.relu(self.dense(h))))


def test_a_group_reaching_only_one_holder_of_a_tied_weight_is_not_prunable():
    """Regression (zoo sweep, HF BertForMaskedLM): prune() chose the MLM transform's group,
    whose cut would untie the decoder from the embedding, and every call was refused."""
    torch.manual_seed(0)
    model, ids = _TiedHead(), torch.randint(0, 12, (1, 6))
    graph = ModelGraph(model, ids)
    assert [g.name for g in graph.groups] == ["fc1"]
    assert "dense" in [g.name for g in graph.all_groups]
    accelprune.prune(model, ids, 0.5)
    assert model.fc1.out_features == 8 and model.dense.out_features == 8
    assert model.decoder.weight is model.emb.weight
    assert model(ids).shape == (1, 6, 12)


class _ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle between two convs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        n, c, h, w = y.shape
        return self.b(y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w))


def test_a_channel_shuffle_is_not_pruned_through():
    """Regression (found while reducing the zoo sweep's ShuffleNet failure): Torch-Pruning
    treats the shuffle's transpose as element-wise, so the cut ran and gave a model whose conv
    `b` read the wrong channels (0.36 away from the original with the same channels zeroed)."""
    torch.manual_seed(0)
    model, x = _ChannelShuffle(), torch.randn(1, 3, 4, 4)
    assert ModelGraph(model, x).groups == []
    accelprune.prune(model, x, 0.25)
    assert model.a.out_channels == 8


def test_shufflenet_refusal_names_the_op_and_the_module():
    """Zoo sweep: Torch-Pruning fails with a bare ZeroDivisionError on ShuffleNet-v2's channel
    shuffle; the ValueError says where and why."""
    model = torchvision.models.shufflenet_v2_x0_5(weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"at ViewBackward0 after module 'stage\d\.\d\.branch2"
                                         r".*channel shuffle"):
        accelprune.prune(model, torch.randn(1, 3, 32, 32), 0.3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

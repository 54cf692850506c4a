"""Structure facts computed once (accelprune.layers, ChannelGroup properties) and both pipelines
on the layers that make them matter: grouped convs with 2 and 3 groups, and a transposed conv."""

import copy

import pytest
import torch
from test_csgd import assert_lossless, collapse_clusters, logits, randomize_norms
from torch import nn

import accelprune
from accelprune.graph import ModelGraph
from accelprune.layers import blocks_of, conv_groups, is_depthwise, out_channel_view


class MixedGroups(nn.Module):
    """conv1 has 2 groups and feeds conv2 with 3: its 12 channels fall into lcm(2, 3) = 6 blocks.
    ``up`` is a transposed conv, producing channels stored on its weight's dim 1."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(12)
        self.conv1 = nn.Conv2d(12, 12, 3, padding=1, groups=2)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 1, groups=3)
        self.bn2 = nn.BatchNorm2d(12)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2)
        self.bn3 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv0(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.up(x)))
        return self.head(x.mean((2, 3)))


def mixed(seed=0):
    torch.manual_seed(seed)
    return randomize_norms(MixedGroups(), seed)


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def widths(m):
    return [m.conv0.out_channels, m.conv1.out_channels, m.conv2.out_channels, m.up.out_channels]


def test_layer_facts():
    m = MixedGroups()
    assert [conv_groups(x) for x in (m.conv0, m.conv1, m.conv2, m.up, m.head)] == [1, 2, 3, 1, 1]
    assert not is_depthwise(m.conv1)
    depthwise = nn.Conv2d(4, 4, 3, groups=4)
    assert is_depthwise(depthwise) and conv_groups(depthwise) == 1
    assert blocks_of([m.conv1, m.conv2], 12) == 6
    assert blocks_of([m.conv1, m.conv2], 8) == 1  # 6 does not divide 8: not this group's blocks
    assert out_channel_view(m.up, m.up.weight).shape[0] == 6
    with pytest.raises(ValueError, match="grouped transposed"):
        out_channel_view(nn.ConvTranspose2d(4, 4, 2, groups=2), torch.zeros(4, 2, 2, 2))


def test_group_facts():
    graph = ModelGraph(mixed(), X)
    facts = {g.name: (g.n_channels, g.blocks, g.producers, g.consumers) for g in graph.groups}
    assert facts == {
        "conv0": (12, 2, ["conv0"], ["conv1"]),
        "conv1": (12, 6, ["conv1"], ["conv2"]),
        "conv2": (12, 3, ["conv2"], ["up"]),
        "up": (6, 1, ["up"], ["head"]),
    }


def _block_uniform(kept: list[int], n: int, blocks: int) -> bool:
    per = n // blocks
    local = [sorted(i % per for i in kept if i // per == b) for b in range(blocks)]
    return all(b == local[0] for b in local)


@pytest.mark.parametrize("method", ["l1", "l2", "bn", "random", "reprune"])
def test_criteria_and_reprune_prune_every_block_alike(method):
    model = mixed()
    accelprune.prune_with(model, X, 0.5, method, seed=0)
    w = widths(model)
    assert w[1] % 6 == 0 and w[2] % 3 == 0 and w[0] % 2 == 0  # whole positions per block
    assert w != [12, 12, 12, 6]
    assert model(X).shape == (2, 4)


def test_reprune_selection_is_the_same_in_every_block():
    model = mixed()
    pruner = accelprune.REPrune(model, X, 0.5, prune_stem=True)
    pruner.prune()
    for record, blocks in zip(pruner.events[-1].layers, [2, 6, 3, 1], strict=True):
        assert _block_uniform(record.kept_indices, record.before, blocks), record.name


def test_csgd_refuses_the_transposed_producer_by_name_then_folds_losslessly():
    model = mixed()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="'up'.*transposed"):
        accelprune.CSGD(model, X, 0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    csgd = accelprune.CSGD(model, X, 0.5, ignored_layers=["up"])
    for g, c in zip(csgd.groups, csgd.clusters, strict=True):
        per = g.n_channels // g.blocks
        # every cluster lies inside one block, and each block keeps the same count
        counts = {len(set(c.labels[b * per:(b + 1) * per].tolist())) for b in range(g.blocks)}
        assert len(counts) == 1
        block_of = [i // per for i in range(g.n_channels)]
        for label in set(c.labels.tolist()):
            assert len({block_of[i] for i in range(g.n_channels) if c.labels[i] == label}) == 1
    collapse_clusters(csgd)
    reference = logits(model, X)
    csgd.prune()
    assert widths(model)[:3] == [6, 6, 6]
    assert_lossless(reference, logits(model, X))

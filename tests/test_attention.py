"""Transformer building blocks as channel-group members: norms (LayerNorm, RMSNorm, GroupNorm,
ConvNeXt's LayerNorm2d) and whole attention heads (accelprune.attention)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accelprune.graph import ModelGraph
from accelprune.layers import is_norm, normalises_over_channels


class _Norms(nn.Module):
    """fc1 → RMSNorm → LayerNorm → GroupNorm → fc2: every norm is over fc1's channels."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.rms = nn.RMSNorm(16)
        self.ln = nn.LayerNorm(16)
        self.gn = nn.GroupNorm(4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = self.ln(self.rms(self.fc1(x)))
        return self.fc2(self.gn(h.unsqueeze(-1)).squeeze(-1))


def test_norms_are_group_members_and_pruned():
    torch.manual_seed(0)
    model = _Norms()
    graph = ModelGraph(model, torch.randn(2, 8))
    (group,) = graph.groups
    assert group.norms == ["rms", "ln", "gn"]
    assert group.bns == []
    graph.prune_channels(group, [0, 1, 2, 3, 8, 9, 10, 11])  # whole GroupNorm groups
    assert model.rms.normalized_shape == (8,) and model.rms.weight.shape == (8,)
    assert model.ln.normalized_shape == (8,) and model.gn.num_channels == 8
    assert model(torch.randn(2, 8)).shape == (2, 4)


def test_normalises_over_channels():
    assert normalises_over_channels(nn.LayerNorm(4))
    assert normalises_over_channels(nn.RMSNorm(4))
    assert normalises_over_channels(nn.GroupNorm(2, 4))
    assert not normalises_over_channels(nn.GroupNorm(4, 4))  # per-channel statistics
    assert not normalises_over_channels(nn.BatchNorm1d(4))
    assert not normalises_over_channels(nn.Linear(4, 4))


def test_is_norm_recognises_other_libraries():
    from torchvision.models.convnext import LayerNorm2d as TvLayerNorm2d
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert is_norm(LlamaRMSNorm(4)) and normalises_over_channels(LlamaRMSNorm(4))
    assert is_norm(TvLayerNorm2d(4))
    assert not is_norm(nn.BatchNorm2d(4)) and not is_norm(nn.Linear(2, 2))


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_convnext_layernorm2d_in_group(library):
    if library == "torchvision":
        from torchvision.models.convnext import LayerNorm2d
    else:
        from timm.layers import LayerNorm2d

    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.norm = LayerNorm2d(8)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(self.norm(self.conv(x)))

    model = Stem()
    graph = ModelGraph(model, torch.randn(1, 3, 8, 8))
    (group,) = graph.groups
    assert group.norms == ["norm"]
    graph.prune_channels(group, [0, 2, 4, 6])
    assert model.norm.weight.shape == (4,)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 2, 6, 6)

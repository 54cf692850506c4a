"""Transformer building blocks as channel-group members: norms (LayerNorm, RMSNorm, GroupNorm,
ConvNeXt's LayerNorm2d) and whole attention heads (accelprune.attention)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from failsafe import ModelState
from torch import nn

import accelprune
from accelprune import surgery
from accelprune.attention import (
    HeadPrunedMultiheadAttention,
    find_head_groups,
    prune_heads,
    unsupported_attention,
)
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


# -- whole heads of nn.MultiheadAttention ---------------------------------------------------------

def _zero_head_outputs(mha, heads):
    """Zero the out_proj columns of ``heads``: removing them must not change the output."""
    with torch.no_grad():
        for h in heads:
            mha.out_proj.weight[:, h * mha.head_dim:(h + 1) * mha.head_dim] = 0


@pytest.mark.parametrize("batch_first", [True, False])
def test_head_pruned_mha_forward_matches_torch(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    pruned = copy.deepcopy(mha)
    pruned.__class__ = HeadPrunedMultiheadAttention  # same weights, accelprune's forward
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": causal},
                   {"attn_mask": causal, "key_padding_mask": padding,
                    "average_attn_weights": False}):
        want, want_w = mha(x, x, x, **kwargs)
        got, got_w = pruned(x, x, x, **kwargs)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_w, want_w)


def test_transformer_encoder_heads_pruned_exactly():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2).eval()
    for layer in enc.layers:
        _zero_head_outputs(layer.self_attn, [1, 3])
    x = torch.randn(2, 5, 16)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's nested-tensor fast path is "prototype"
        before, before_masked = enc(x), enc(x, src_key_padding_mask=padding)
    prune_heads(enc, x, 0.5)
    for layer in enc.layers:
        attn = layer.self_attn
        assert isinstance(attn, HeadPrunedMultiheadAttention) and attn.num_heads == 2
        assert attn.in_proj_weight.shape == (24, 16) and attn.out_proj.in_features == 8
    with torch.no_grad():
        torch.testing.assert_close(enc(x), before)
        masked = enc(x, src_key_padding_mask=padding)
    torch.testing.assert_close(masked[0], before_masked[0])  # padded rows may differ (nested)


def test_torchvision_vit_heads():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4,
                              hidden_dim=32, mlp_dim=64, num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    groups = find_head_groups(model)
    assert [g.layout for g in groups] == ["packed", "packed"]
    prune_heads(model, x, 0.25)
    assert model.encoder.layers[0].self_attention.num_heads == 3
    assert model(x).shape == (1, 3)
    accelprune.prune(model, x, 0.3, "l1")  # the graph is traced through the pruned attention
    assert model.encoder.layers[0].mlp[0].out_features == 45
    assert model(x).shape == (1, 3)


@pytest.mark.parametrize("training", [False, True])
def test_failed_head_pruning_restores_mha(monkeypatch, training):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
    enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True).train(training)
    x = torch.randn(1, 5, 16)
    state = ModelState(enc, x)  # weights, widths, hooks, modes, grads and the output
    monkeypatch.setattr(surgery, "check_forward", lambda checker: 1 / 0)
    with pytest.raises(ValueError, match="restored unchanged"):
        prune_heads(enc, x, 0.5)
    state.assert_unchanged()
    attn = enc.layers[0].self_attn
    assert type(attn) is nn.MultiheadAttention and attn._qkv_same_embed_dim
    assert attn.num_heads == 4 and enc.use_nested_tensor


def test_unsupported_mha_is_named():
    model = nn.Sequential(nn.Linear(4, 8))
    model.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    assert unsupported_attention(model) == ["attn"]
    with pytest.raises(ValueError, match="not recognised: 'attn': nn.MultiheadAttention with "
                                         "separate key/value widths"):
        prune_heads(model, torch.randn(1, 4), 0.5)


def test_torchvision_convnext_norms_and_residual_stream():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = ModelGraph(model, x, prune_coupled=True)
    stem = graph.groups[0]
    assert stem.residual and stem.norms == ["features.0.1", "features.1.0.block.2", "features.2.0"]
    assert all(normalises_over_channels(graph.module(n)) for n in stem.norms)
    accelprune.prune(model, x, 0.25, "l1", prune_coupled=True)
    assert model.features[0][1].weight.shape == (12,)  # the stem's LayerNorm2d
    assert model(x).shape == (1, 3)


def _tiny_hf(config_cls, model_cls, **kw):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=64, num_hidden_layers=1, hidden_size=32,
                                               num_attention_heads=4, **kw)
    return getattr(transformers, model_cls)(config).eval(), torch.randint(0, 64, (1, 6))


@pytest.mark.parametrize("config_cls, model_cls, o_proj, kw", [
    ("OPTConfig", "OPTForCausalLM", "out_proj", dict(ffn_dim=64, word_embed_proj_dim=32)),
    ("PhiConfig", "PhiForCausalLM", "dense", dict(intermediate_size=64)),
], ids=["opt", "phi"])
def test_hf_attention_with_out_proj_or_dense_is_recognised(config_cls, model_cls, o_proj, kw):
    """Zoo sweep: OPT's (out_proj) and Phi's (dense) attention were not recognised, so
    prune_heads refused them ('no attention module whose heads can be pruned') and prune()
    took their q/k/v rows for channel groups."""
    model, ids = _tiny_hf(config_cls, model_cls, **kw)
    groups = find_head_groups(model)
    assert len(groups) == 1 and groups[0].projections["o"].endswith(o_proj)
    shape = model(ids).logits.shape
    with pytest.warns(UserWarning, match="config cannot describe"):  # no head_dim in the config
        prune_heads(model, ids, 0.5)
    attn = model.get_submodule(groups[0].name)
    assert attn.q_proj.out_features == 16 and getattr(attn, o_proj).in_features == 16
    assert model(ids).logits.shape == shape


class _BiasedAttention(nn.Module):
    """Swin's window attention in small: fused qkv and proj, plus a position-bias table with
    one column per head, which head pruning would have to cut too."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.num_heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(5, heads))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2)) + self.relative_position_bias_table[:t, :].T[None, :, None]
        return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


def test_unrecognised_attention_is_named_with_its_reason():
    """Zoo sweep (Swin, LeViT, GPT-2): prune_heads said only 'no attention module whose heads can
    be pruned'; it now names the modules that look like attention and why they are left."""
    model = nn.Sequential(_BiasedAttention())
    with pytest.raises(ValueError, match=r"not recognised: '0': _BiasedAttention '0' has per-head "
                                         r"position biases \['relative_position_bias_table'\]"):
        prune_heads(model, torch.randn(1, 5, 8), 0.5)

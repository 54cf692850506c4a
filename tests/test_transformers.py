"""Transformers and LLMs: C-SGD folds only what it can fold exactly, masks cover attention's packed
projections, REPrune prunes MLP widths without BatchNorm.

Every model is built from a config with random weights (nothing downloads), at toy sizes:
nn.TransformerEncoder, a BERT-style encoder, torchvision's VisionTransformer and a timm ViT,
ConvNeXt, LLaMA's gated MLP (and a whole LlamaForCausalLM where the channel groups can be built).
"""
from __future__ import annotations

import copy

import pytest
import torch
from convergence import collapse_clusters
from failsafe import ModelState, leaves_unchanged
from torch import nn
from toy_models import Encoder, tiny_llama

from accelprune import CSGD
from accelprune.csgd import fold_and_prune, fold_blockers

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

# LLaMA's attention modules are ignored in most LLaMA tests (it keeps them fast, and pruning heads
# is graph.py's work); one test runs with attention, through graph.py's group search.


def llama_attention(model):
    return [n for n, _ in model.named_modules() if n.endswith("self_attn")]


# ---------------------------------------------------------------------------------------------
# models


class LlamaMLPNet(nn.Module):
    """LLaMA's own RMSNorm + gated MLP (SiLU(gate) * up → down) between two Linear layers."""

    def __init__(self, hidden=32, intermediate=64):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate)
        self.inp = nn.Linear(8, hidden)
        self.norm = LlamaRMSNorm(hidden)
        self.mlp = LlamaMLP(cfg)
        self.head = nn.Linear(hidden, 5)

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.mlp(self.norm(h)))


class FunctionalRMSNorm(nn.Module):
    """fc1 → RMS normalisation written out (no module) → fc2: the reduction is over the channels."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


class SoftmaxMix(nn.Module):
    """fc1 → softmax over its channels → fc2."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.softmax(self.fc1(x), dim=-1))


def tv_vit():
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=5)


def timm_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=2, embed_dim=32, num_heads=2, num_classes=5)


def convnext():
    return timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1),
                             dims=(16, 24, 32, 40), num_classes=5)


def bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32)
    return transformers.BertModel(cfg, add_pooling_layer=False)


def llama(layers=1):
    return tiny_llama(layers=layers, hidden=64, intermediate=128, heads=8, kv_heads=4,
                      use_cache=False)


def image(seed=0):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tokens(seed=0):
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def sequence(seed=0):
    return torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(seed))


# (builder, example inputs, the groups C-SGD must cluster: the MLP hidden widths)
MODELS = {
    "encoder": (Encoder, sequence, ["enc.layers.0.linear1", "enc.layers.1.linear1"]),
    "llama_mlp": (LlamaMLPNet, sequence, ["mlp.gate_proj"]),
    "tv_vit": (tv_vit, image, ["encoder.layers.encoder_layer_0.mlp.0",
                               "encoder.layers.encoder_layer_1.mlp.0"]),
    "timm_vit": (timm_vit, image, ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]),
    "convnext": (convnext, image, [f"stages.{i}.blocks.0.mlp.fc1" for i in range(4)]),
    "bert": (bert, tokens, ["encoder.layer.0.intermediate.dense",
                            "encoder.layer.1.intermediate.dense"]),
}


def build(key, seed=0):
    make, inputs, expected = MODELS[key]
    torch.manual_seed(seed)
    return make().eval(), inputs(), expected


def output(model, x):
    model.eval()
    with torch.no_grad():
        out = model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---------------------------------------------------------------------------------------------
# C-SGD: exact folds only


@pytest.mark.parametrize("key", list(MODELS))
def test_csgd_clusters_exactly_the_mlp_widths_and_folds_them_losslessly(key):
    model, x, expected = build(key)
    csgd = CSGD(model, x, 0.5, seed=0)
    assert [g.name for g in csgd.groups] == expected
    assert all(s.reasons for s in csgd.skipped)  # every skipped group says why
    collapse_clusters(csgd)
    before = output(model, x)
    report = csgd.prune()
    after = output(model, x)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert report.params_after < report.params_before
    assert [s.name for s in report.skipped] == [s.name for s in csgd.skipped]
    for name, n_before, n_after in report.layers:
        assert n_after == round(0.5 * n_before), name


def test_transformer_encoder_residual_stream_is_never_clustered():
    """The issue's case: default C-SGD pruned the residual stream 64 → 32 and moved the output by
    0.29 even with fully collapsed clusters. Now it is skipped, by name, with the reasons."""
    model, x, _ = build("encoder")
    csgd = CSGD(model, x, 0.5)
    skipped = {s.name: " ".join(s.reasons) for s in csgd.skipped}
    assert list(skipped) == ["inp"]
    for why in ("LayerNorm 'enc.layers.0.norm1'", "MultiheadAttention 'enc.layers.0.self_attn'",
                "in_proj"):
        assert why in skipped["inp"]
    assert "inp" in str(csgd) or "skipped" in repr(csgd)
    collapse_clusters(csgd)
    csgd.prune()
    assert model.inp.out_features == 32 and model.head.in_features == 32  # residual untouched
    assert model.enc.layers[0].linear1.out_features == 32


def test_strict_refuses_at_construction_naming_group_and_reason():
    model, x, _ = build("encoder")
    with leaves_unchanged(model, x, raises=ValueError,
                          match=r"inp: .*LayerNorm 'enc\.layers\.0\.norm1'"):
        CSGD(model, x, 0.5, strict=True)
    with pytest.raises(TypeError, match="strict"):
        CSGD(model, x, 0.5, strict=1)


@pytest.mark.parametrize("key, group", [("timm_vit", "blocks.0.attn.qkv"),
                                        ("bert", "encoder.layer.0.attention.self.query")])
def test_attention_inner_widths_are_never_channel_groups(key, group):
    """Heads go whole (accelprune.attention): q/k/v widths are head groups, not channel groups,
    so C-SGD neither clusters nor lists them."""
    model, x, _ = build(key)
    csgd = CSGD(model, x, 0.5)
    assert group not in {g.name for g in csgd.graph.groups}
    assert group not in {s.name for s in csgd.skipped}
    assert csgd.graph.head_groups


@pytest.mark.parametrize("key, group, why", [
    ("timm_vit", "patch_embed.proj", "parameter 'pos_embed'"),
    ("tv_vit", "conv_proj", "MultiheadAttention 'encoder.layers.encoder_layer_0.self_attention'"),
    ("convnext", "stem.0", "LayerNorm2d 'stem.1'"),
    ("llama_mlp", "inp", "LlamaRMSNorm 'norm'"),
])
def test_attention_norms_and_embeddings_block_the_fold(key, group, why):
    model, x, _ = build(key)
    csgd = CSGD(model, x, 0.5)
    skipped = {s.name: " ".join(s.reasons) for s in csgd.skipped}
    assert why in skipped[group]


@pytest.mark.parametrize("make, why", [(FunctionalRMSNorm, "reduction (Mean)"),
                                       (SoftmaxMix, "operation Softmax")])
def test_functional_channel_mixing_blocks_the_fold(make, why):
    torch.manual_seed(0)
    model = make()
    with pytest.raises(ValueError, match=r"fc1: .*" + why.replace("(", r"\(").replace(")", r"\)")):
        CSGD(model, torch.randn(3, 8), 0.5, strict=True)


def test_fold_and_prune_refuses_a_group_it_cannot_fold_exactly():
    model, x, _ = build("encoder")
    csgd = CSGD(model, x, 0.5)
    residual = next(g for g in csgd.graph.groups if g.name == "inp")
    assert fold_blockers(residual)
    with leaves_unchanged(model, x, raises=ValueError,
                          match="cannot be folded exactly.*LayerNorm"):
        fold_and_prune(residual, torch.arange(32) // 2)
    mlp = csgd.groups[0]
    assert fold_blockers(mlp) == []


def test_without_collapse_the_mlp_fold_changes_outputs():
    """The lossless checks above are not vacuous."""
    model, x, _ = build("timm_vit")
    csgd = CSGD(model, x, 0.5)
    before = output(model, x)
    csgd.prune()
    assert (before - output(model, x)).abs().max() > 1e-3


def test_cnn_groups_stay_exact():
    """Residual adds, BatchNorm, max/avg pooling and flatten keep CNN groups foldable."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=5)
    csgd = CSGD(model, image(), 0.5)
    assert csgd.skipped == []
    assert any(g.coupled for g in csgd.groups)


def test_csgd_on_llama_folds_the_mlps_and_generate_works():
    model = llama(layers=2).eval()
    x = tokens()
    csgd = CSGD(model, x, 0.5, ignored_layers=llama_attention(model))
    assert {g.name for g in csgd.groups} == {f"model.layers.{i}.mlp.gate_proj" for i in range(2)}
    collapse_clusters(csgd)
    before = output(model, x)
    csgd.prune()
    torch.testing.assert_close(output(model, x), before, atol=1e-5, rtol=1e-5)
    assert model.model.layers[0].mlp.down_proj.in_features == 64
    out = model.generate(x[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_csgd_leaves_model_as_it_was_when_nothing_is_foldable():
    torch.manual_seed(0)
    model, x = SoftmaxMix(), torch.randn(3, 8)
    with leaves_unchanged(model, x, raises=ValueError, match="nothing C-SGD can prune.*Softmax"):
        CSGD(model, x, 0.5)
    copy.deepcopy(model)(torch.randn(3, 8))


# ---------------------------------------------------------------------------------------------
# masks: attention's packed projections are masked, and reports say what was masked


def _effective_zeros(model):
    """(zeros, entries) over every Conv/Linear weight and MHA projection, as the forward sees."""
    zeros = total = 0
    for m in model.modules():
        names = []
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            names = ["weight"]
        elif isinstance(m, nn.MultiheadAttention):
            names = (["in_proj_weight"] if m._qkv_same_embed_dim
                     else ["q_proj_weight", "k_proj_weight", "v_proj_weight"])
        for n in names:
            w = getattr(m, n)
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros, total


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_prune_masks_multihead_attention_in_proj(scope):
    from accelprune.masks import magnitude_prune, make_permanent, weight_sparsity

    model, x, _ = build("encoder")
    report = magnitude_prune(model, 0.5, scope=scope)
    for i in range(2):
        assert f"enc.layers.{i}.self_attn.in_proj_weight" in report
        assert f"enc.layers.{i}.self_attn.out_proj.weight" in report
    model(x)  # the masks are applied by a forward pre-hook
    zeros, total = _effective_zeros(model)
    assert zeros == round(0.5 * total) if scope == "global" else abs(zeros / total - 0.5) < 1e-2
    assert weight_sparsity(model) == pytest.approx(zeros / total)
    if scope == "layer":
        assert report["enc.layers.0.self_attn.in_proj_weight"] == pytest.approx(0.5)
    before = output(model, x)
    make_permanent(model)
    assert isinstance(model.enc.layers[0].self_attn.in_proj_weight, nn.Parameter)
    torch.testing.assert_close(output(model, x), before)
    assert _effective_zeros(model)[0] == zeros


def test_masks_cover_separate_qkv_projections_and_gradient_scores():
    from accelprune.masks import gradient_magnitude_prune, prunable_parameters

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True)
    model = nn.ModuleDict({"attn": mha})
    names = [n for _, n in prunable_parameters(model)]
    assert names == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "weight"]
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    mha(q, kv, kv)[0].sum().backward()
    report = gradient_magnitude_prune(model, 0.25, scope="layer")
    assert set(report) == {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                           "attn.out_proj.weight"}
    assert all(v == pytest.approx(0.25, abs=0.01) for v in report.values())
    mha(q, kv, kv)  # still runs with masked projections
    assert int((mha.q_proj_weight == 0).sum()) == round(0.25 * mha.q_proj_weight.numel())


def test_a_module_in_parameters_stands_for_its_attention_projection():
    from accelprune.masks import magnitude_prune

    model, x, _ = build("encoder")
    attn = model.enc.layers[0].self_attn
    report = magnitude_prune(model, 0.5, parameters=[attn, "enc.layers.1.self_attn"])
    assert set(report) == {"enc.layers.0.self_attn.in_proj_weight",
                           "enc.layers.1.self_attn.in_proj_weight"}
    assert model.inp.weight.ne(0).all()  # nothing else was masked


# ---------------------------------------------------------------------------------------------
# REPrune without BatchNorm: MLP widths, budgets from a norm's γ or comparable filter norms


def mlp_widths(model, names):
    return [model.get_submodule(n).out_features if isinstance(model.get_submodule(n), nn.Linear)
            else model.get_submodule(n).out_channels for n in names]


@pytest.mark.parametrize("key", list(MODELS))
def test_reprune_prunes_the_mlp_widths(key):
    from accelprune import REPrune

    model, x, expected = build(key)
    widths = mlp_widths(model, expected)
    shape = output(model, x).shape
    pruner = REPrune(model, x, 0.5, tie_break="index")
    assert [g.name for g in pruner.groups] == expected
    pruner.prune()
    report = pruner.report()
    assert {r.score for r in report.layers} == {"filter"}
    assert report.kept_channels == round(0.5 * sum(widths))
    new = mlp_widths(model, expected)
    assert all(0 < a < b for a, b in zip(new, widths, strict=True))
    assert output(model, x).shape == shape
    if key == "llama_mlp":  # gate and up lose the same rows, down the same columns
        mlp = model.mlp
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features


def test_reprune_budget_is_scale_invariant_without_batchnorm():
    """Filter norms are divided by the layer's mean: scaling a layer's weights (a different fan-in,
    a different init) does not move its budget."""
    from accelprune import REPrune

    model, x, expected = build("timm_vit")
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.blocks[0].mlp.fc1.weight.mul_(100.0)
    a, b = REPrune(model, x, 0.5, tie_break="index"), REPrune(scaled, x, 0.5, tie_break="index")
    a.prune(), b.prune()
    assert [r.kept for r in a.report().layers] == [r.kept for r in b.report().layers]
    assert mlp_widths(model, expected) == mlp_widths(scaled, expected)


def test_reprune_budget_from_a_layernorm_over_the_mlp_width():
    """timm's scale_mlp_norm puts a LayerNorm over the MLP hidden width: its |γ| ranks channels."""
    from accelprune import REPrune

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              depth=2, embed_dim=32, num_heads=2, num_classes=5,
                              scale_mlp_norm=True).eval()
    with torch.no_grad():  # 3/4 of block 0's channels are scaled to almost nothing
        model.blocks[0].mlp.norm.weight.fill_(1.0)[:96] = 0.01
        model.blocks[1].mlp.norm.weight.uniform_(0.9, 1.1)
    x = image()
    pruner = REPrune(model, x, 0.5, tie_break="index")
    pruner.prune()
    layers = pruner.report().layers
    assert [r.score for r in layers] == ["norm", "norm"]
    # normalised by their mean (0.26), block 0's small γ are 0.04, below all of block 1's (~1):
    # the 128 channels to remove are block 0's 96 and block 1's 32 lowest
    assert [r.kept for r in layers] == [32, 96]
    assert model.blocks[0].mlp.norm.weight.numel() == model.blocks[0].mlp.fc1.out_features
    model(x)


def test_reprune_uniform_budget():
    from accelprune import REPrune

    model, x, expected = build("tv_vit")
    pruner = REPrune(model, x, 0.25, budget="uniform")
    pruner.prune()
    assert mlp_widths(model, expected) == [48, 48]
    assert {r.score for r in pruner.report().layers} == {"uniform"}
    with pytest.raises(ValueError, match="budget"):
        REPrune(model, x, 0.25, budget="global")


@pytest.mark.filterwarnings("ignore:the config cannot describe the pruned model")
def test_reprune_on_llama_prunes_gate_up_and_down_and_generate_works():
    """Layers may keep different widths (the budget is global): the config then cannot describe
    them, which accelprune.hf says in a warning (tested in test_hf.py)."""
    from accelprune import REPrune

    model = llama(layers=2).eval()
    x = tokens()
    pruner = REPrune(model, x, 0.5, ignored_layers=llama_attention(model))
    assert {g.name for g in pruner.groups} == {f"model.layers.{i}.mlp.gate_proj" for i in range(2)}
    pruner.prune()
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features
    assert model.generate(x[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_reprune_refuses_attention_only_model_naming_why_and_leaves_it_unchanged():
    from accelprune import REPrune

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 16), nn.TransformerEncoder(layer, 1,
                                                                   enable_nested_tensor=False),
                          nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 4)
    state = ModelState(model, x)
    pruner = REPrune(model, x, 0.5, prune_coupled=True)
    assert not pruner.graph.attention_free  # so every group is searched for attention
    assert "attention" in pruner.skipped["0"]
    assert [g.name for g in pruner.groups] == ["1.layers.0.linear1"]
    state.assert_unchanged()  # building a pruner changes nothing


def test_llama_with_attention_skips_heads_and_residual_stream():
    from accelprune import REPrune

    model = llama(layers=2).eval()
    csgd = CSGD(model, tokens(), 0.5)
    mlps = {f"model.layers.{i}.mlp.gate_proj" for i in range(2)}
    assert {g.name for g in csgd.groups} == mlps
    skipped = {s.name: " ".join(s.reasons) for s in csgd.skipped}
    # heads are head groups (accelprune.attention), never channel groups: not even listed
    assert "model.layers.0.self_attn.q_proj" not in skipped
    assert any("Embedding 'model.embed_tokens'" in why for why in skipped.values())
    pruner = REPrune(model, tokens(), 0.5)
    assert not pruner.graph.attention_free  # its groups are searched one by one
    assert {g.name for g in pruner.groups} == mlps
    assert "model.layers.0.self_attn.q_proj" not in pruner.skipped


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_layer=1, n_embd=32, n_head=4, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval(), torch.randint(0, 64, (1, 8))


def test_gpt2_traces_with_its_kv_cache_left_off():
    """Regression (zoo sweep, HF GPT-2): the traced forward built a KV cache whose torch.cat
    Torch-Pruning cannot map ('int' + 'NoneType'); the trace now runs with use_cache off, and
    the config is put back."""
    from accelprune.graph import ModelGraph

    model, ids = _tiny_gpt2()
    assert model.config.use_cache is True
    ModelGraph(model, ids)
    assert model.config.use_cache is True


def test_gpt2_conv1d_layers_are_refused_by_name():
    """Zoo sweep: GPT-2's layers are Hugging Face Conv1D (no Torch-Pruning pruner): prune() did
    nothing, silently; every method now says which layers and why, and changes nothing."""
    from accelprune import REPrune, prune

    model, ids = _tiny_gpt2()
    with leaves_unchanged(model, ids, raises=ValueError,
                          match=r"'transformer.h.0.attn.c_attn'.*Conv1D modules"):
        prune(model, ids, 0.3)
    for method in (REPrune, CSGD):
        with pytest.raises(ValueError, match="Conv1D"):
            method(model, ids, 0.3)

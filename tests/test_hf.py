"""Hugging Face models built from tiny configs (nothing downloads): tracing with caches and dict
inputs, MLP / head / hidden-size pruning, configs kept in step, save/load round trips."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import toy_models
from failsafe import ModelState

import accelprune
from accelprune import surgery
from accelprune.attention import find_head_groups, prune_heads
from accelprune.graph import ModelGraph
from accelprune.hf import load_pruned

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_llama(tie=False):
    return toy_models.tiny_llama(intermediate=48, vocab=VOCAB, tie=tie)


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=16)
    return transformers.BertModel(cfg).eval()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def round_trip(model, tmp_path, ids, loader=None):
    model.save_pretrained(tmp_path)
    if loader is None:
        loaded = type(model).from_pretrained(tmp_path, local_files_only=True).eval()
    else:
        loaded = loader(type(model), tmp_path)
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    torch.testing.assert_close(a[0], b[0])
    return loaded


def test_llama_prune_mlp_with_default_cache(ids, tmp_path):
    model = tiny_llama()
    assert model.config.use_cache
    accelprune.prune(model, ids, 0.3, "l1")
    assert hooks(model) == 0
    for layer in model.model.layers:
        assert layer.mlp.down_proj.in_features == 34 == layer.mlp.intermediate_size
        assert layer.self_attn.q_proj.out_features == 32  # heads are not channel groups
    assert model.config.intermediate_size == 34
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
    round_trip(model, tmp_path, ids)


def test_llama_attention_inner_groups_are_not_channel_groups(ids):
    graph = ModelGraph(tiny_llama(), ids, prune_coupled=True)
    names = [g.name for g in graph.groups]
    assert not any("q_proj" in n for n in names)
    assert [h.name for h in graph.head_groups] == [f"model.layers.{i}.self_attn" for i in (0, 1)]
    mlp = next(g for g in graph.groups if g.name.endswith("mlp.gate_proj"))
    assert mlp.coupled and not mlp.residual  # gate * up: coupled, not a residual stream
    stream = next(g for g in graph.groups if g.residual)  # the residual stream
    assert "model.norm" in stream.norms and "model.layers.0.input_layernorm" in stream.norms


def test_llama_prune_heads_gqa(ids, tmp_path):
    model = tiny_llama()
    (g0, _) = find_head_groups(model)
    assert (g0.num_heads, g0.num_kv_heads, g0.heads_per_unit) == (4, 2, 2)
    prune_heads(model, ids, 0.5)
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 8
        assert attn.v_proj.out_features == 8 and attn.o_proj.in_features == 16
        assert attn.num_key_value_groups == 2
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 8)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
    round_trip(model, tmp_path, ids)


def test_prune_heads_keeps_the_chosen_heads_outputs(ids):
    """Removing a KV group whose o_proj columns are zero does not change the output."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, :16] = 0  # KV group 0 = query heads 0, 1
        before = model(ids).logits
    prune_heads(model, ids, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


def test_prune_heads_failure_restores_everything(ids, monkeypatch):
    model = tiny_llama()
    state, cfg = ModelState(model, ids), copy.deepcopy(model.config.to_dict())

    def broken(checker):
        raise RuntimeError("boom")

    monkeypatch.setattr(surgery, "check_forward", broken)
    with pytest.raises(ValueError, match="restored unchanged"):
        prune_heads(model, ids, 0.5)
    state.assert_unchanged()  # weights (the very same tensors), shapes, hooks, modes, outputs
    assert model.config.to_dict() == cfg
    assert [(g.num_heads, g.num_kv_heads) for g in find_head_groups(model)] == [(4, 2)] * 2


def test_tied_llama_hidden_size(ids, tmp_path):
    model = tiny_llama(tie=True)
    accelprune.prune(model, ids, 0.25, "l1", prune_coupled=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.hidden_size == model.model.embed_tokens.embedding_dim == 24
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
    round_trip(model, tmp_path, ids)


def test_hidden_size_the_config_refuses(ids, tmp_path):
    """LLaMA's config wants hidden_size % heads == 0: 23 is kept out of it, load_pruned loads."""
    model = tiny_llama(tie=True)
    with pytest.warns(UserWarning, match="load_pruned"):
        accelprune.prune(model, ids, 0.3, "l1", prune_coupled=True)
    assert model.model.embed_tokens.embedding_dim == 23 and model.config.hidden_size == 32
    assert model.config.accelprune_pruned == {"hidden_size": {"model": 23}}
    loaded = round_trip(model, tmp_path, ids, loader=load_pruned)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_global_ranking_uneven_widths_load_pruned(ids, tmp_path):
    model = tiny_llama()
    with torch.no_grad():  # make layer 1's MLP much weaker: global ranking prunes it more
        model.model.layers[1].mlp.gate_proj.weight.mul_(0.01)
        model.model.layers[1].mlp.up_proj.weight.mul_(0.01)
    with pytest.warns(UserWarning, match="load with accelprune.hf.load_pruned"):
        accelprune.prune(model, ids, 0.3, "l1", global_ranking=True)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert widths[0] != widths[1]
    assert "intermediate_size" in model.config.accelprune_pruned
    round_trip(model, tmp_path, ids, loader=load_pruned)


def test_bert_dict_inputs_mlp_and_heads(ids, tmp_path):
    model = tiny_bert()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    accelprune.prune(model, inputs, 0.3, "l1")
    assert hooks(model) == 0
    assert model.config.intermediate_size == 34
    assert [h.name for h in find_head_groups(model)] == [
        f"encoder.layer.{i}.attention.self" for i in (0, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BERT's config cannot say pruned heads
        prune_heads(model, inputs, 0.25)
    attn = model.encoder.layer[0].attention.self
    assert attn.num_attention_heads == 3 and attn.all_head_size == 24
    assert model.encoder.layer[0].attention.output.dense.in_features == 24
    assert model(**inputs).last_hidden_state.shape == (1, 8, 32)
    assert model.config.accelprune_pruned["num_attention_heads"]
    round_trip(model, tmp_path, inputs["input_ids"], loader=load_pruned)


def _timm_vit(depth):
    """A ViT-Tiny of ``depth`` blocks on 32x32 images (3 heads of 64), and an input."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth,
                              num_classes=3).eval()
    return model, torch.randn(1, 3, 32, 32)


def test_timm_vit_heads_and_default_prune():
    model, x = _timm_vit(depth=2)
    graph = ModelGraph(model, x)
    assert not any(g.name.endswith("attn.qkv") for g in graph.groups)
    accelprune.prune(model, x, 0.3, "l1")
    assert model.blocks[0].mlp.fc1.out_features == 538
    prune_heads(model, x, 0.34)
    attn = model.blocks[0].attn
    assert attn.num_heads == 2 and attn.attn_dim == 128 and attn.qkv.out_features == 384
    assert model(x).shape == (1, 3)


def test_bert_hidden_states_are_output_not_pruned(ids):
    """BERT returns its residual stream (last_hidden_state): that group reaches the output and
    is never listed, while its MLPs still prune with prune_coupled=True."""
    model = tiny_bert()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    graph = ModelGraph(model, inputs, prune_coupled=True)
    assert not any(g.residual for g in graph.groups)
    accelprune.prune(model, inputs, 0.25, "l1", prune_coupled=True)
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 36
    assert model(**inputs).last_hidden_state.shape == (1, 8, 32)


def test_head_scores_l1_owns_q_k_v_rows_and_o_columns():
    from accelprune.attention import head_scores

    model = tiny_llama()
    g = find_head_groups(model)[0]
    attn = model.model.layers[0].self_attn
    D = 8  # unit 1 = KV head 1 = query heads 2, 3
    parts = [attn.q_proj.weight[2 * D:4 * D], attn.k_proj.weight[D:2 * D],
             attn.v_proj.weight[D:2 * D], attn.o_proj.weight[:, 2 * D:4 * D]]
    want = sum(p.detach().double().abs().sum() for p in parts)
    scores = head_scores(g, "l1")
    assert scores.shape == (2,)
    assert scores[1] == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(ValueError, match="unknown head importance"):
        head_scores(g, "bn")


def test_head_groups_respect_ignored_layers(ids):
    model = tiny_llama()
    groups = find_head_groups(model, ignored_layers=["model.layers.0"])
    assert [g.name for g in groups] == ["model.layers.1.self_attn"]
    graph = ModelGraph(model, ids, ignored_layers=["model.layers.1.self_attn.k_proj"])
    assert [g.name for g in graph.head_groups] == ["model.layers.0.self_attn"]
    with pytest.warns(UserWarning, match="load_pruned"):  # layers now differ
        prune_heads(model, ids, 0.5, ignored_layers=["model.layers.0"])
    assert model.model.layers[0].self_attn.q_proj.out_features == 32
    assert model.model.layers[1].self_attn.q_proj.out_features == 16
    with pytest.raises(ValueError, match="sparsity"):
        prune_heads(model, ids, 1.5)


def test_reprune_heads_drop_a_duplicated_kv_group(ids):
    """REPrune's selection over heads: a KV group whose q/k/v rows copy another's covers no
    cluster of its own, so it (or its twin) is the one that goes."""
    # 4 KV groups of 2 query heads of dim 6 (hidden 48: 6 heads after the cut still divide it)
    model = toy_models.tiny_llama(hidden=48, heads=8, kv_heads=4)
    q_rows = [slice(12 * u, 12 * u + 12) for u in range(4)]
    kv_rows = [slice(6 * u, 6 * u + 6) for u in range(4)]
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight[q_rows[3]] = attn.q_proj.weight[q_rows[1]]
            attn.k_proj.weight[kv_rows[3]] = attn.k_proj.weight[kv_rows[1]]
            attn.v_proj.weight[kv_rows[3]] = attn.v_proj.weight[kv_rows[1]]
    originals = [layer.self_attn.q_proj.weight.detach().clone() for layer in model.model.layers]
    prune_heads(model, ids, 0.25, importance="reprune")
    for layer, q in zip(model.model.layers, originals, strict=True):
        kept = layer.self_attn.q_proj.weight
        assert kept.shape == (36, 48)
        # units 0 and 2 stay; of the twins 1 and 3 exactly one does (they are equal)
        twin_first = torch.equal(kept[12:24], q[q_rows[1]])  # kept 0, 1, 2 (else 0, 2, 3)
        assert torch.equal(kept[:12], q[q_rows[0]])
        assert torch.equal(kept[24:] if twin_first else kept[12:24], q[q_rows[2]])
        assert torch.equal(kept[12:24] if twin_first else kept[24:], q[q_rows[1]])
    assert model.config.num_key_value_heads == 3
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 10)


def test_reprune_heads_select_what_reprune_select_selects(ids):
    from accelprune.selection import reprune_select

    model = toy_models.tiny_llama(hidden=48, heads=8, kv_heads=4)
    group = find_head_groups(model)[0]
    kernels = [w.transpose(1, 2) for w in group.unit_weights()]
    # units (KV groups), input columns, a unit's rows: 2 query heads or 1 KV head of dim 6
    assert [tuple(k.shape) for k in kernels] == [(4, 48, 12), (4, 48, 6), (4, 48, 6)]
    expected = np.sort(reprune_select(kernels, 2, seed=3, backend="reference"))
    rows = np.concatenate([np.arange(u * 12, u * 12 + 12) for u in expected])
    query = group.module("q").weight.detach().clone()
    twin = copy.deepcopy(model)
    prune_heads(model, ids, 0.5, importance="reprune", seed=3)
    assert torch.equal(group.module("q").weight, query[rows])
    prune_heads(twin, ids, 0.5, importance="reprune", seed=3)  # deterministic given the seed
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(),
                                                  strict=True))


def test_reprune_heads_on_fused_qkv_and_unknown_importance():
    model, x = _timm_vit(depth=1)
    prune_heads(model, x, 0.34, importance="reprune")
    assert model.blocks[0].attn.num_heads == 2 and model(x).shape == (1, 3)
    with pytest.raises(ValueError, match="unknown head importance 'ward'"):
        prune_heads(model, x, 0.5, importance="ward")
    assert model.blocks[0].attn.num_heads == 2

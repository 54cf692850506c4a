"""C-SGD on whole attention heads (``CSGD(..., head_sparsity=...)``): units clustered by their
q/k/v rows, pulled together by the same transform, folded exactly into the output projection.

Models are built from configs at toy sizes (nothing downloads): a LLaMA with grouped-query
attention, a BERT encoder, a timm ViT (fused qkv), nn.TransformerEncoder (packed in_proj) and
small hand-made attentions for the refusals. Convergence is forced by copying each cluster's
kept unit into the others (the transform itself is checked on its invariant and by training).
"""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from convergence import collapse_clusters
from failsafe import ModelState, leaves_unchanged
from torch import nn
from toy_models import Encoder, tiny_llama

from accelprune import CSGD, csgd_heads, surgery
from accelprune.attention import (
    HeadPrunedMultiheadAttention,
    find_head_groups,
    unrecognised_attention,
    unsupported_attention,
)
from accelprune.csgd_heads import head_row_labels

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

ETA, EPS = 1e-3, 0.05


# ---------------------------------------------------------------------------------------------
# models


def llama(layers=2):
    return tiny_llama(layers=layers, hidden=64, intermediate=128, heads=8, kv_heads=4,
                      use_cache=False)


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def timm_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=2, embed_dim=32, num_heads=4, num_classes=5).eval()


def tv_vit():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                             hidden_dim=32, mlp_dim=64, num_classes=5).eval()


def encoder():
    torch.manual_seed(0)
    return Encoder().eval()


class ToyAttention(nn.Module):
    """q/k/v/o Linear layers with ``head_dim`` (the layout of LLaMA's attention), optionally
    treating heads differently: a learned per-head temperature (state), or scores scaled by the
    head's index (no state: only the probe can see it)."""

    def __init__(self, d=16, heads=4, temperature=False, by_index=False):
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.temperature = nn.Parameter(torch.rand(heads) + 0.5) if temperature else None
        self.by_index = by_index

    def forward(self, x):
        B, L, _ = x.shape
        D = self.head_dim
        q, k, v = (p(x).view(B, L, -1, D).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = q @ k.transpose(-2, -1) * D ** -0.5
        if self.temperature is not None:
            scores = scores * self.temperature.view(1, -1, 1, 1)
        if self.by_index:
            scores = scores * torch.arange(1, scores.shape[1] + 1).view(1, -1, 1, 1)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, -1)
        return self.o_proj(out)


class ToyNet(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = ToyAttention(**kwargs)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.attn(self.inp(x)))


class GPT2LikeAttention(nn.Module):
    """A fused ``c_attn`` layout accelprune.attention does not recognise."""

    def __init__(self, d=16):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        return self.c_proj((q @ k.transpose(-2, -1)).softmax(-1) @ v)


class UnknownNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.attn, self.head = nn.Linear(8, 16), GPT2LikeAttention(), nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.attn(self.inp(x)))


def toy(**kwargs):
    torch.manual_seed(0)
    return ToyNet(**kwargs).eval()


def tokens(seed=0):
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def image(seed=0):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def sequence(seed=0):
    return torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(seed))


def output(model, x):
    model.eval()
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---------------------------------------------------------------------------------------------
# forcing convergence


CASES = {  # builder, inputs, head groups, units per group
    "llama": (llama, tokens, [f"model.layers.{i}.self_attn" for i in range(2)], 4),
    "bert": (bert, lambda: {"input_ids": tokens(), "attention_mask": torch.ones(2, 8).long()},
             [f"encoder.layer.{i}.attention.self" for i in range(2)], 4),
    "timm_vit": (timm_vit, image, [f"blocks.{i}.attn" for i in range(2)], 4),
    "encoder": (encoder, sequence, [f"enc.layers.{i}.self_attn" for i in range(2)], 4),
    "tv_vit": (tv_vit, image, [f"encoder.layers.encoder_layer_{i}.self_attention"
                               for i in range(2)], 4),
    "toy": (toy, sequence, ["attn"], 4),
}


# ---------------------------------------------------------------------------------------------
# lossless folds


@pytest.mark.parametrize("key", list(CASES))
def test_collapsed_heads_fold_exactly_and_physically(key):
    make, inputs, names, units = CASES[key]
    model, x = make(), inputs()
    csgd = CSGD(model, x, 0.5, head_sparsity=0.5, seed=0)
    assert [g.name for g in csgd.head_groups] == names
    assert [g.n_units for g in csgd.head_groups] == [units] * len(names)
    assert all(c.n_clusters == units // 2 for c in csgd.head_clusters)
    assert not any(s.name in names for s in csgd.skipped)
    heads_before = [g.num_heads for g in csgd.head_groups]
    collapse_clusters(csgd)
    assert csgd.deviation().total == 0
    before = output(model, x)
    if key == "bert":  # BERT's config derives the head size from hidden_size: it cannot say
        with pytest.warns(UserWarning, match="load_pruned"):
            report = csgd.prune()
    else:
        report = csgd.prune()
    torch.testing.assert_close(output(model, x), before, atol=1e-5, rtol=1e-5)
    assert report.heads == [(n, h, h // 2) for n, h in zip(names, heads_before, strict=True)]
    assert report.params_after < report.params_before
    for g in csgd.head_groups:
        assert g.num_heads == g.heads_per_unit * units // 2
        o = g.module("o")
        assert o.in_features == o.weight.shape[1] == g.num_heads * g.head_dim
        attn = g.module()
        for attr in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(attn, attr, None), int):
                assert getattr(attn, attr) == g.num_heads
    if key in ("encoder", "tv_vit"):
        assert all(isinstance(g.module(), HeadPrunedMultiheadAttention)
                   for g in csgd.head_groups)


def test_llama_gqa_units_config_generate_and_round_trip(tmp_path):
    model, x = llama(), tokens()
    csgd = CSGD(model, x, 0.5, head_sparsity=0.5)
    g = csgd.head_groups[0]
    assert (g.num_heads, g.num_kv_heads, g.heads_per_unit) == (8, 4, 2)  # a unit = a KV group
    rows = head_row_labels(g, "q", csgd.head_clusters[0].labels)
    assert rows.shape == (64,) and rows.max() + 1 == 2 * 16  # 2 clusters × 2 heads × head_dim 8
    collapse_clusters(csgd)
    before = output(model, x)
    csgd.prune()
    torch.testing.assert_close(output(model, x), before, atol=1e-5, rtol=1e-5)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 16
    assert attn.o_proj.in_features == 32 and attn.num_key_value_groups == 2
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 64)
    assert model.generate(x[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, local_files_only=True).eval()
    torch.testing.assert_close(output(loaded, x), output(model, x))


def test_training_pulls_heads_together_and_the_fold_is_then_lossless():
    """Real C-SGD steps on the toy attention (with q/k/v biases): lr·(η + ε) = 0.5 halves every
    kernel spread per step, biases (0.1·ε) shrink by 0.95 per step."""
    model, x = toy(), sequence()
    csgd = CSGD(model, x, 0.0, head_sparsity=0.5, centripetal_strength=50.0, weight_decay=0.0)
    opt = torch.optim.SGD(csgd.param_groups(), lr=0.01)
    csgd.register_hook(opt)
    start = csgd.deviation().groups["attn"]
    for step in range(300):
        opt.zero_grad()
        output_train = model(sequence(step))
        output_train.pow(2).mean().backward()
        opt.step()
    assert csgd.deviation().groups["attn"] < 1e-10 * start  # float32 rounding: not exactly 0
    before = output(model, x)
    csgd.prune()
    torch.testing.assert_close(output(model, x), before, atol=1e-5, rtol=1e-5)
    assert model.attn.q_proj.out_features == 8


@pytest.mark.parametrize("key", ["llama", "bert", "timm_vit"])
def test_transform_invariant_on_head_rows(key):
    """Row by row, G'_a = mean_H(G) + η·W_a + ε·(W_a − mean_H(W)) over the corresponding rows H
    of a cluster's units (η, ε on kernels; 0 and 0.1·ε on biases): so for rows a, b of one such
    set G'_a − G'_b = (η + ε)(W_a − W_b), and rows of other clusters are not mixed in."""
    make, inputs, _, _ = CASES[key]
    model, x = make(), inputs()
    csgd = CSGD(model, x, 0.5, head_sparsity=0.5, centripetal_strength=EPS, weight_decay=ETA)
    out = model(**x) if isinstance(x, dict) else model(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    out.pow(2).mean().backward()
    heads = [t for t in csgd.transformed if t.head]
    assert any(t.kernel for t in heads) and (key == "llama") == all(t.kernel for t in heads)
    raw = {t.name: t.param.grad.clone() for t in heads}
    csgd.apply_gradients()
    for t in heads:
        g, c = csgd.head_groups[t.group], csgd.head_clusters[t.group]
        eta, eps = t.weight_decay, t.centripetal
        assert (eta, eps) == ((ETA, EPS) if t.kernel else (0.0, 0.1 * EPS))
        W = t.param.detach().double().reshape(t.param.shape[0], -1)
        G = t.param.grad.double().reshape(W.shape)
        R = raw[t.name].double().reshape(W.shape)
        labels = head_row_labels(g, t.role, c.labels)
        for lab in np.unique(labels):
            rows = torch.from_numpy(np.flatnonzero(labels == lab))
            want = R[rows].mean(0) + eta * W[rows] + eps * (W[rows] - W[rows].mean(0))
            torch.testing.assert_close(G[rows], want, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("kwargs, why", [
    ({"temperature": True}, r"state besides its q/k/v/o projections \(attn.temperature\)"),
    ({"by_index": True}, "treats its heads differently"),
])
def test_heads_that_are_not_uniform_are_refused_by_name(kwargs, why):
    model, x = toy(**kwargs), sequence()
    state = ModelState(model, x)
    csgd = CSGD(model, x, 0.5, head_sparsity=0.5)
    state.assert_unchanged()  # the probe put every parameter object back
    assert csgd.head_groups == []
    (skipped,) = [s for s in csgd.skipped if s.name == "attn"]
    assert any(re.search(why, r) for r in skipped.reasons)
    with leaves_unchanged(model, x, match=f"attention heads exactly.*attn.*{why}"):
        CSGD(model, x, 0.5, head_sparsity=0.5, strict=True)


def test_unrecognised_attention_layout_is_listed():
    torch.manual_seed(0)
    model, x = UnknownNet().eval(), sequence()
    csgd = CSGD(model, x, 0.5, head_sparsity=0.5)
    assert any(s.name == "attn" and "does not recognise" in s.reasons[0] for s in csgd.skipped)
    with leaves_unchanged(model, x, match="GPT2LikeAttention 'attn'"):
        CSGD(model, x, 0.5, head_sparsity=0.5, strict=True)


def _looks_like_attention(m):
    counts = [getattr(m, a, None) for a in ("num_heads", "num_attention_heads", "n_head",
                                            "n_heads", "heads")]
    return "attention" in type(m).__name__.lower() or any(
        isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts)


def _unrecognised_reference(model, ignored=()):
    """unrecognised_attention as first written: three walks of the model (the head groups, the
    MultiheadAttention modules they leave out, the attention-like rest)."""
    known = [g.name for g in find_head_groups(model)]
    ignored = {id(m) for m in ignored}
    out = [(n, "nn.MultiheadAttention with separate key/value widths, bias_k/bias_v or "
               "add_zero_attn: its heads cannot be cut") for n in unsupported_attention(model)
           if id(model.get_submodule(n)) not in ignored]
    listed = {n for n, _ in out}
    for name, m in model.named_modules():
        kind = type(m).__name__
        if (not _looks_like_attention(m) or name in listed or id(m) in ignored
                or not any(True for _ in m.parameters())):
            continue
        if any(n == name or not n or n.startswith(f"{name}.") or not name
               or name.startswith(f"{n}.") for n in known):
            continue
        tables = [n for n, p in m.named_parameters(recurse=False)
                  if "bias" in n and p.dim() >= 1 and n not in ("bias", "in_proj_bias")]
        out.append((name, f"{kind} {name!r} has per-head position biases {tables}, which are "
                          "not cut with the heads" if tables else
                          f"{kind} {name!r} is an attention layout accelprune does not "
                          "recognise (separate q/k/v/o Linear layers with head_dim, BERT's "
                          "query/key/value, timm's fused qkv, nn.MultiheadAttention)"))
        listed.add(name)
    return out


class OuterAttention(nn.Module):
    """Attention by its class name, with parameters, around a recognised layout."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.gate = inner, nn.Linear(16, 16)


class MixedAttentionNet(nn.Module):
    """A MultiheadAttention that can be cut, two that cannot (bias_k/bias_v, separate key/value
    widths), an unknown layout, one around a recognised layout and one around an unknown one."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2)
        self.biased = nn.MultiheadAttention(16, 2, add_bias_kv=True)
        self.kdim = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)
        self.gpt = GPT2LikeAttention()
        self.outer = OuterAttention(ToyAttention())
        self.outer_gpt = OuterAttention(GPT2LikeAttention())


@pytest.mark.parametrize("build, ignore", [
    (MixedAttentionNet, ()), (MixedAttentionNet, ("biased", "outer.inner.q_proj")),
    (MixedAttentionNet, ("outer.inner", "mha.out_proj", "outer_gpt.inner")),
    (MixedAttentionNet, ("outer_gpt",)), (UnknownNet, ()), (UnknownNet, ("attn.c_attn",)),
    (toy, ()), (toy, ("attn.q_proj",)), (encoder, ()), (bert, ()),
    (bert, ("encoder.layer.0.attention.self",)), (timm_vit, ()), (tv_vit, ()), (llama, ()),
], ids=lambda v: ",".join(v) if isinstance(v, tuple) else getattr(v, "__name__", str(v)))
def test_unrecognised_attention_is_its_reference(build, ignore):
    model = build()
    ignored = [m for n in ignore for m in model.get_submodule(n).modules()]  # as ModelGraph's
    assert unrecognised_attention(model, ignored) == _unrecognised_reference(model, ignored)


def test_failed_fold_restores_model_heads_and_config(monkeypatch):
    model, x = llama(layers=1), tokens()
    csgd = CSGD(model, x, 0.5, head_sparsity=0.5)
    collapse_clusters(csgd)
    config = copy.deepcopy(model.config.to_dict())
    counts = [(g.num_heads, g.num_kv_heads) for g in csgd.head_groups]

    def broken(graph):
        raise RuntimeError("boom")

    monkeypatch.setattr(surgery, "check_forward", broken)
    # worded as a failure on the channel-only path is (tests/test_csgd.py)
    with leaves_unchanged(model, x, match=r"^folding channel group 'model\.layers\.0\.mlp\."
                          r"gate_proj' and 1 more \(the forward check after folding\) failed "
                          r"\(RuntimeError: boom\); the model was restored unchanged$"):
        csgd.prune()
    assert model.config.to_dict() == config and not csgd.pruned
    assert [(g.num_heads, g.num_kv_heads) for g in csgd.head_groups] == counts
    monkeypatch.undo()
    before = output(model, x)
    csgd.prune()  # a retry succeeds
    torch.testing.assert_close(output(model, x), before, atol=1e-5, rtol=1e-5)


def test_a_failing_head_fold_is_named_with_its_reason(monkeypatch):
    model, x = llama(layers=1), tokens()
    csgd = CSGD(model, x, 0.5, head_sparsity=0.5)
    collapse_clusters(csgd)

    def broken(group, keep_units):
        raise RuntimeError("boom")

    monkeypatch.setattr(csgd_heads, "cut_units", broken)
    with leaves_unchanged(model, x, raises=ValueError) as failure:
        csgd.prune()
    assert str(failure.value) == ("folding the heads of 'model.layers.0.self_attn' failed "
                                  "(RuntimeError: boom); the model was restored unchanged")


def test_bad_head_sparsity():
    model, x = toy(), sequence()
    for bad, exc in ((1.0, ValueError), (-0.1, ValueError), ("half", TypeError)):
        with pytest.raises(exc, match="head_sparsity"):
            CSGD(model, x, 0.5, head_sparsity=bad)


# ---------------------------------------------------------------------------------------------
# defaults unchanged, state


@pytest.mark.parametrize("head_sparsity", [None, 0.0])
def test_default_is_channel_groups_only(head_sparsity):
    model, x = llama(layers=1), tokens()
    base = CSGD(model, x, 0.5)
    off = CSGD(model, x, 0.5, head_sparsity=head_sparsity)
    for csgd in (base, off):
        assert csgd.head_groups == [] and csgd.head_clusters == []
        assert not any(t.head for t in csgd.transformed)
        assert not any(s.name.endswith("self_attn") for s in csgd.skipped)
    assert [t.name for t in off.transformed] == [t.name for t in base.transformed]
    assert all(np.array_equal(a.labels, b.labels)
               for a, b in zip(base.clusters, off.clusters, strict=True))
    on = CSGD(model, x, 0.5, head_sparsity=0.5)
    assert all(np.array_equal(a.labels, b.labels)  # heads do not change the channel clusters
               for a, b in zip(base.clusters, on.clusters, strict=True))


def _train(csgd, model, steps, first=0, optimizer_state=None):
    opt = torch.optim.SGD(csgd.param_groups(lr=0.02, momentum=0.9), lr=0.02)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    csgd.register_hook(opt)
    for step in range(first, first + steps):
        x = tokens(step)
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    return opt


def test_resumed_run_equals_the_uninterrupted_one():
    def make():
        return CSGD(llama(layers=1), tokens(), 0.5, head_sparsity=0.5, centripetal_strength=0.5,
                    seed=3)

    whole = make()
    _train(whole, whole.model, 4)

    first = make()
    opt = _train(first, first.model, 2)
    saved = {"model": copy.deepcopy(first.model.state_dict()), "csgd": first.state_dict(),
             "optimizer": copy.deepcopy(opt.state_dict())}
    assert saved["csgd"]["head_groups"] == ["model.layers.0.self_attn"]
    model = llama(layers=1)
    model.load_state_dict(saved["model"])
    with torch.no_grad():  # cluster the trained heads differently: the state must win
        model.model.layers[0].self_attn.q_proj.weight.mul_(-1)
        other = CSGD(model, tokens(), 0.5, head_sparsity=0.5, centripetal_strength=0.5, seed=3)
        model.model.layers[0].self_attn.q_proj.weight.mul_(-1)
    other.load_state_dict(saved["csgd"])
    _train(other, model, 2, first=2, optimizer_state=saved["optimizer"])
    assert [c.labels.tolist() for c in other.head_clusters] == \
        [c.labels.tolist() for c in whole.head_clusters]
    for (k, a), b in zip(whole.model.state_dict().items(), model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k


def test_head_state_is_checked():
    model, x = llama(layers=1), tokens()
    csgd = CSGD(model, x, 0.5, head_sparsity=0.5)
    state = csgd.state_dict()
    before = [c.labels.copy() for c in csgd.head_clusters]
    bad = {**state, "head_labels": [t + 1 for t in state["head_labels"]]}
    with pytest.raises(ValueError, match="head labels"):
        csgd.load_state_dict(bad)
    with pytest.raises(ValueError, match="head_sparsity"):
        CSGD(model, x, 0.5).load_state_dict(state)
    assert all((c.labels == b).all() for c, b in zip(csgd.head_clusters, before, strict=True))
    old = {k: v for k, v in CSGD(model, x, 0.5).state_dict().items()
           if not k.startswith("head_")}
    old["config"] = {k: v for k, v in old["config"].items() if k != "head_sparsity"}
    CSGD(model, x, 0.5).load_state_dict(old)  # states saved before heads existed still load


def test_ignored_attention_is_neither_clustered_nor_listed():
    model, x = toy(), sequence()
    csgd = CSGD(model, x, 0.5, head_sparsity=0.5, ignored_layers=["attn.q_proj"])
    assert csgd.head_groups == [] and not any(s.name == "attn" for s in csgd.skipped)


def test_prune_keeps_a_hugging_face_config_in_step_without_heads_too():
    model, x = llama(layers=1), tokens()
    csgd = CSGD(model, x, 0.5, ignored_layers=["model.layers.0.self_attn"])
    collapse_clusters(csgd)
    csgd.prune()
    assert model.config.intermediate_size == model.model.layers[0].mlp.down_proj.in_features == 64

"""accelprune.group_search: the same channel groups as Torch-Pruning's get_all_groups, where
that finishes, and sensible ones on a Hugging Face LLaMA, where it never does."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency import index_mapping as tp_index_mapping

from accelprune import group_search
from accelprune.group_search import (
    find_groups,
    find_groups_ref,
    overridden_mappings,
    pruning_group,
)
from accelprune.models import resnet20

X32 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _graph(model, example_inputs, forward_fn=None):
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TP's "unwrapped parameters" notices
        return tp.DependencyGraph().build_dependency(
            model, example_inputs, forward_fn=forward_fn, verbose=False
        )


def _name(DG, node):
    module = node.module
    if not isinstance(module, nn.Parameter) and module in DG._module2name:
        return DG._module2name[module]
    return node.name


def _handler(dep):
    return f"{type(dep.handler.__self__).__name__}.{dep.handler.__name__}"


def _members(DG, group):
    """The group as a set of (module name, handler, sorted idxs)."""
    return {(_name(DG, d.target), _handler(d), tuple(sorted(i))) for d, i in group}


def _root_pairs(DG, group):
    """The group as a set of (module name, handler, sorted (idx, root_idx) pairs)."""
    return {
        (
            _name(DG, it.dep.target),
            _handler(it.dep),
            tuple(sorted(zip(it.idxs, map(str, it.root_idxs), strict=True))),
        )
        for it in group
    }


def _order(DG, group):
    return [(_name(DG, d.target), _handler(d)) for d, _ in group]


def _vit_tv():
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )


def _encoder():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _timm(name, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


# (case, model factory, example inputs, root_idxs identical to TP's)
CASES = [
    ("resnet20", resnet20, X32, True),
    ("resnet18", lambda: torchvision.models.resnet18(num_classes=10), X32, True),
    ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(num_classes=10), X32, True),
    pytest.param(
        "densenet121", lambda: torchvision.models.densenet121(num_classes=10), X32, True,
        marks=pytest.mark.slow,
    ),
    ("vit_tv_small", _vit_tv, X32, True),
    ("transformer_encoder", _encoder, torch.randn(2, 5, 32), True),
    ("timm_convnext_atto", lambda: _timm("convnext_atto"), X32, True),
    ("timm_efficientnet_b0", lambda: _timm("efficientnet_b0"), X32, True),
    ("timm_mobilenetv3", lambda: _timm("mobilenetv3_small_100"), X32, True),
    # timm's fused qkv: a channel of q, k and v meet element-wise in SDPA, so an index there has
    # three root indices; TP keeps the one its depth-first walk happened to carry last
    ("timm_vit_tiny", lambda: _timm("vit_tiny_patch16_224", img_size=32, depth=2), X32, False),
]


@pytest.mark.parametrize(("case", "make", "x", "same_roots"), CASES)
def test_groups_equal_torch_pruning(case, make, x, same_roots):
    torch.manual_seed(0)
    DG = _graph(make(), x)
    mine = find_groups(DG)
    ref = find_groups_ref(DG)
    assert [_members(DG, g) for g in mine] == [_members(DG, g) for g in ref]
    assert [_order(DG, g) for g in mine] == [_order(DG, g) for g in ref]
    if same_roots:
        assert [_root_pairs(DG, g) for g in mine] == [_root_pairs(DG, g) for g in ref]
    for g in mine:
        assert isinstance(g, tp.dependency.Group) and g._DG is DG
        assert all(len(it.idxs) == len(it.root_idxs) for it in g)
    assert overridden_mappings(DG) == []


def test_ignored_layers_and_root_types_as_torch_pruning():
    model = torchvision.models.resnet18(num_classes=10)
    DG = _graph(model, X32)
    ignored = [model.layer1[0].conv1, model.fc]
    kept = list(ignored)
    for kw in (
        dict(ignored_layers=ignored),
        dict(root_module_types=(nn.Conv2d,)),
        dict(ignored_layers=ignored, root_module_types=[nn.Linear]),
    ):
        mine = find_groups(DG, **kw)
        ref = find_groups_ref(DG, **kw)
        assert [_members(DG, g) for g in mine] == [_members(DG, g) for g in ref]
    assert ignored == kept  # not modified


def test_pruning_group_equals_get_pruning_group_and_prunes_the_same():
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    twin = copy.deepcopy(model)
    DG, DG_twin = _graph(model, X32), _graph(twin, X32)
    for name, idxs in [
        ("features.2.conv.0.0", [0, 5, 7]),  # expansion conv (-> depthwise)
        ("features.2.conv.1.0", [3]),  # depthwise conv as root
        ("features.3.conv.2", [1, 2, 4]),  # residual-coupled projection
        ("classifier.1", 2),  # a single index, like TP
    ]:
        m, m_twin = model.get_submodule(name), twin.get_submodule(name)
        fn = DG.get_pruner_of_module(m).prune_out_channels
        mine = pruning_group(DG, m, fn, idxs)
        ref = DG.get_pruning_group(m, fn, idxs)
        assert _members(DG, mine) == _members(DG, ref)
        assert _root_pairs(DG, mine) == _root_pairs(DG, ref)
        mine.prune()
        DG_twin.get_pruning_group(m_twin, DG_twin.get_pruner_of_module(m_twin).prune_out_channels,
                                  idxs).prune()
    sd, sd_twin = model.state_dict(), twin.state_dict()
    assert sd.keys() == sd_twin.keys()
    assert all(torch.equal(sd[k], sd_twin[k]) for k in sd)
    assert model(X32).shape == (1, 9)  # one class pruned from the classifier


def test_groups_stay_valid_after_pruning():
    """After a cut, a new search agrees with TP's on the pruned graph (widths, concat offsets)."""
    model = torchvision.models.densenet121(num_classes=10).features[:5].eval()  # 1st dense block
    DG = _graph(model, X32)
    conv = model.denseblock1.denselayer2.conv2
    pruning_group(DG, conv, DG.get_pruner_of_module(conv).prune_out_channels, [0, 3, 9]).prune()
    mine, ref = find_groups(DG), find_groups_ref(DG)
    assert [_members(DG, g) for g in mine] == [_members(DG, g) for g in ref]
    model(X32)


# -- the index mappings, vectorised ----------------------------------------------------------


def _tp_mapped(mapping, idx, root):
    hybrid = [_helpers._HybridIndex(idx=i, root_idx=r) for i, r in zip(idx, root, strict=True)]
    out, seen = [], set()
    for h in mapping(hybrid):  # TP's merge keeps the first of each index
        if h.idx not in seen:
            seen.add(h.idx)
            out.append((h.idx, -1 if h.root_idx is None else h.root_idx))
    return out


MAPPINGS = [
    tp_index_mapping._ConcatIndexMapping([3, 9], reverse=False),
    tp_index_mapping._ConcatIndexMapping([3, 9], reverse=True),
    tp_index_mapping._SplitIndexMapping([4, 10], reverse=False),
    tp_index_mapping._SplitIndexMapping([4, 10], reverse=True),
    tp_index_mapping._SliceIndexMapping(dim=1, start=2, step=3, end=17, reverse=False),
    tp_index_mapping._SliceIndexMapping(dim=1, start=2, step=3, end=17, reverse=True),
    tp_index_mapping._FlattenIndexMapping(stride=4, reverse=False),
    tp_index_mapping._FlattenIndexMapping(stride=4, reverse=True),
    tp_index_mapping._GQAIndexMapping(repeat=2, head_dim=4, reverse=False),
    tp_index_mapping._GQAIndexMapping(repeat=2, head_dim=4, reverse=True),
]


@pytest.mark.parametrize("mapping", MAPPINGS, ids=lambda m: f"{type(m).__name__}-{m.reverse}")
def test_vectorised_mappings_match_torch_pruning(mapping):
    rng = np.random.default_rng(0)
    idx = rng.permutation(24)[:15]
    root = rng.integers(0, 100, 15)
    if isinstance(mapping, tp_index_mapping._FlattenIndexMapping) and mapping.reverse:
        # indices merged into one carry one root in real graphs; otherwise TP's pick is a set's
        root = idx // mapping._stride * 7 + 1
    got_idx, got_root = group_search._apply_mapping(mapping, idx, root)
    want = _tp_mapped(mapping, idx.tolist(), root.tolist())
    assert sorted(zip(got_idx.tolist(), got_root.tolist(), strict=True)) == sorted(want)
    if not isinstance(mapping, tp_index_mapping._FlattenIndexMapping):  # TP's order is a set's
        assert got_idx.tolist() == [i for i, _ in want]
    # any other mapping goes through TP's callable
    fb_idx, fb_root = group_search._apply_tp_mapping(mapping, idx, root)
    assert sorted(zip(fb_idx.tolist(), fb_root.tolist(), strict=True)) == sorted(want)


# -- Hugging Face LLaMA ----------------------------------------------------------------------


def _llama(layers):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, use_cache=False,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    return model, ids, _graph(model, ids, forward_fn=lambda m, x: m(x).logits)


def _out_members(DG, group):
    return {
        _name(DG, d.target): tuple(sorted(i))
        for d, i in group
        if DG.is_out_channel_pruning_fn(d.handler) and d.target.type != tp.ops.OPTYPE.ELEMENTWISE
        and isinstance(d.target.module, nn.Linear | nn.Embedding)
    }


def _in_members(DG, group):
    return {
        _name(DG, d.target): tuple(sorted(i))
        for d, i in group
        if isinstance(d.target.module, nn.Linear) and DG.is_in_channel_pruning_fn(d.handler)
    }


class _RotaryAttention(nn.Module):
    """LLaMA's attention in miniature: GQA (4 query / 2 KV heads of 4), rotate_half on q and k,
    SDPA. TP maps the keys' rotate_half concat as a channel concat with offsets [0, 8, 16]."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.o = nn.Linear(16, 16)
        self.register_buffer("cos", torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))

    def _rotary(self, x):
        half1, half2 = x[..., :2], x[..., 2:]
        return x * self.cos + torch.cat((-half2, half1), dim=-1) * self.cos

    def forward(self, x):  # x: (1, 4 tokens, 16)
        q = self._rotary(self.q(x).view(1, 4, 4, 4).transpose(1, 2))
        k = self._rotary(self.k(x).view(1, 4, 2, 4).transpose(1, 2))
        v = self.v(x).view(1, 4, 2, 4).transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(1, 4, 16))


def _tp_walk_diverges(DG, module, monkeypatch, max_adds=3000):
    """Run TP's get_pruning_group from ``module``'s outputs, stopped after ``max_adds`` items;
    returns the largest index it carried, or None if it finished."""
    largest, adds = [0], [0]
    real_add = tp.dependency.Group.add_dep

    def add_dep(self, dep, idxs):
        adds[0] += 1
        largest[0] = max([largest[0], *(i.idx for i in idxs)])
        if adds[0] > max_adds:
            raise RecursionError("still walking")
        return real_add(self, dep, idxs)

    monkeypatch.setattr(tp.dependency.Group, "add_dep", add_dep)
    fn = DG.get_pruner_of_module(module).prune_out_channels
    try:
        DG.get_pruning_group(module, fn, list(range(DG.get_out_channels(module))))
    except RecursionError:
        return largest[0]
    finally:
        monkeypatch.undo()
    return None


def test_rotary_attention_tp_diverges_and_we_do_not(monkeypatch):
    model = _RotaryAttention().eval()
    x = torch.randn(1, 4, 16)
    DG = _graph(model, x)
    # the root cause: from the keys, TP's walk never ends, its indices growing by 8 per turn
    assert _tp_walk_diverges(DG, model.k, monkeypatch) > 50 * 16  # 16: the widest layer
    groups = find_groups(DG)
    assert len(overridden_mappings(DG)) == 1
    assert overridden_mappings(DG)[0].startswith("_ConcatOp")
    out = [
        {_name(DG, d.target): sorted(i) for d, i in g
         if isinstance(d.target.module, nn.Linear) and DG.is_out_channel_pruning_fn(d.handler)}
        for g in groups
    ]
    assert {"o": list(range(16))} in out
    # channel i of q, k and v go together, as TP couples SDPA's inputs (element-wise)
    assert {"q": list(range(8)), "k": list(range(8)), "v": list(range(8))} in out
    # at pruning time too, and the cut model runs
    fn = DG.get_pruner_of_module(model.v).prune_out_channels
    cut = pruning_group(DG, model.v, fn, [1, 2])
    linears = {
        (_name(DG, d.target), d.handler.__name__): sorted(i)
        for d, i in cut if isinstance(d.target.module, nn.Linear)
    }
    assert linears == {
        ("v", "prune_out_channels"): [1, 2], ("k", "prune_out_channels"): [1, 2],
        ("q", "prune_out_channels"): [1, 2], ("o", "prune_in_channels"): [1, 2],
    }


def test_llama_tp_diverges(monkeypatch):
    model, _, DG = _llama(1)
    largest = _tp_walk_diverges(DG, model.model.layers[0].self_attn.k_proj, monkeypatch)
    assert largest is not None and largest > 10 * 256  # far beyond any width of the model


@pytest.mark.parametrize("layers", [2, pytest.param(32, marks=pytest.mark.slow)])
def test_llama_groups(layers):
    model, ids, DG = _llama(layers)
    groups = find_groups(DG, progress=layers > 2)
    # lm_head's outputs (vocabulary), the residual stream, then per layer MLP and attention
    assert len(groups) == 2 + 2 * layers
    full = lambda n: tuple(range(n))  # noqa: E731
    by_out = [_out_members(DG, g) for g in groups]
    by_in = [_in_members(DG, g) for g in groups]

    residual = [g for g, outs in zip(groups, by_out, strict=True) if "model.embed_tokens" in outs]
    assert len(residual) == 1
    outs, ins = _out_members(DG, residual[0]), _in_members(DG, residual[0])
    layer_names = [f"model.layers.{i}" for i in range(layers)]
    assert outs == {
        "model.embed_tokens": full(256),
        **{f"{n}.self_attn.o_proj": full(256) for n in layer_names},
        **{f"{n}.mlp.down_proj": full(256) for n in layer_names},
    }
    assert ins == {
        "lm_head": full(256),
        **{f"{n}.{p}": full(256) for n in layer_names
           for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                     "mlp.up_proj")},
    }
    norms = [it for it in residual[0] if it.dep.target.type == tp.ops.OPTYPE.PARAMETER]
    assert len(norms) == 2 * layers + 1 and all(sorted(it.idxs) == list(full(256)) for it in norms)

    for n in layer_names:
        mlp = [i for i, o in enumerate(by_out) if f"{n}.mlp.gate_proj" in o]
        assert len(mlp) == 1
        assert by_out[mlp[0]] == {f"{n}.mlp.gate_proj": full(512), f"{n}.mlp.up_proj": full(512)}
        assert by_in[mlp[0]] == {f"{n}.mlp.down_proj": full(512)}
        # attention as TP couples it: SDPA is element-wise to TP, so channel i of q, k and v go
        # together (for the 128 channels of k and v; q's last 128 are in no group)
        attn = [i for i, o in enumerate(by_out) if f"{n}.self_attn.k_proj" in o]
        assert len(attn) == 1
        assert by_out[attn[0]] == {
            f"{n}.self_attn.{p}_proj": full(128) for p in ("q", "k", "v")
        }
        assert by_in[attn[0]] == {f"{n}.self_attn.o_proj": full(128)}
    # the keys' rotate_half concat of every layer had a wrong mapping, switched off
    assert len(overridden_mappings(DG)) == layers
    assert all(name.startswith("_ConcatOp") for name in overridden_mappings(DG))

    if layers == 2:  # pruning through these groups gives a working model
        residual_root = residual[0][0].dep.target.module
        fn = residual[0][0].dep.handler
        pruning_group(DG, residual_root, fn, list(range(0, 256, 8))).prune()
        up = model.model.layers[1].mlp.up_proj
        pruning_group(DG, up, DG.get_pruner_of_module(up).prune_out_channels, [1, 2, 3]).prune()
        assert model.model.layers[1].mlp.down_proj.in_features == 509
        assert model.model.norm.weight.shape == (224,)
        with torch.no_grad():
            assert model(ids).logits.shape == (1, 8, 128)


# -- bad input --------------------------------------------------------------------------------


def test_bad_input():
    with pytest.raises(TypeError, match="DependencyGraph"):
        find_groups(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="build_dependency"):
        find_groups(tp.DependencyGraph())
    DG = _graph(resnet20(), X32)
    with pytest.raises(TypeError, match="root_module_types"):
        find_groups(DG, root_module_types=("Conv2d",))
    with pytest.raises(ValueError, match="not in the dependency graph"):
        pruning_group(DG, nn.Conv2d(3, 3, 1), tp.prune_conv_out_channels, [0])

"""accelprune.depth: finding removable blocks, scoring them, replacing them with identities."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from failsafe import leaves_unchanged
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import VisionTransformer
from toy_models import tiny_llama
from transformers import LlamaForCausalLM

from accelprune.depth import SkippedBlock, find_blocks, prune_layers


class Residual(nn.Module):
    def __init__(self, width, scale=1.0):
        super().__init__()
        self.fc = nn.Linear(width, width)
        with torch.no_grad():
            self.fc.weight.mul_(scale)
            self.fc.bias.mul_(scale)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Stack(nn.Module):
    """A stem, four residual blocks of known strength (block 2's branch is exactly zero) and a
    head; plus a shape-changing block that is never a candidate."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.Sequential(Residual(8, 1.0), Residual(8, 0.5), Residual(8, 0.0),
                                    Residual(8, 2.0))
        self.widen = nn.Sequential(nn.Sequential(nn.Linear(8, 12), nn.ReLU()))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.widen(self.blocks(self.stem(x))))


class TupleBlock(nn.Module):
    """Returns (hidden, extra) like an older Hugging Face decoder layer; takes keywords."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, hidden_states, attention_mask=None):
        return hidden_states + self.fc(hidden_states), None


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([TupleBlock() for _ in range(3)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(hidden_states=x, attention_mask=None)[0]
        return self.head(x)


class Peeks(Stack):
    """Its forward reads a block's weight directly: replacing that block breaks it."""

    def forward(self, x):
        _ = self.blocks[2].fc.weight
        return super().forward(x)


def _bottlenecks(model):
    return sum(isinstance(m, Bottleneck) for m in model.modules())


def test_resnet50_loses_four_bottlenecks():
    torch.manual_seed(0)
    model, x = torchvision.models.resnet50(weights=None), torch.randn(2, 3, 32, 32)
    candidates = find_blocks(model, x)
    assert len(candidates) == 12 and "layer1.0" not in candidates  # downsampling blocks stay
    result = prune_layers(model, x, 4)
    assert type(model) is torchvision.models.ResNet
    assert _bottlenecks(model) == 16 - 4
    assert len(result.removed) == 4 and set(result.removed) <= set(candidates)
    assert list(result.scores) == candidates
    lowest = sorted(candidates, key=lambda n: result.scores[n])[:4]
    assert sorted(result.removed) == sorted(lowest)
    for name in result.removed:
        assert isinstance(model.get_submodule(name), SkippedBlock)
        assert isinstance(result.modules[name], Bottleneck)
    assert all(p.grad is None for p in model.parameters())  # scoring left no gradients
    assert model(x).shape == (2, 1000)


@pytest.mark.parametrize("importance", ["taylor", "output", "cosine"])
def test_a_block_that_does_nothing_goes_first_and_losslessly(importance):
    model, x = Stack(), torch.randn(5, 6)
    assert find_blocks(model, x) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    with torch.no_grad():
        expected = model(x)
    result = prune_layers(model, x, 1, importance=importance)
    assert result.removed == ["blocks.2"]
    assert result.scores["blocks.2"] == pytest.approx(0, abs=1e-12)
    assert all(result.scores[f"blocks.{i}"] > 0 for i in (0, 1, 3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_output_scores_are_the_relative_output_change():
    model, x = Stack(), torch.randn(5, 6)
    result = prune_layers(copy.deepcopy(model), x, 1, importance="output")
    with torch.no_grad():
        ref = model(x)
        for i in range(4):
            m = copy.deepcopy(model)
            m.blocks[i] = nn.Identity()
            change = (m(x) - ref).norm() / ref.norm()
            assert result.scores[f"blocks.{i}"] == pytest.approx(float(change), rel=1e-5)


def test_taylor_with_labels_and_several_batches_is_deterministic():
    model = Stack()
    data = [(torch.randn(4, 6, generator=torch.Generator().manual_seed(i)),
             torch.tensor([0, 1, 2, 0])) for i in range(3)]
    results = [prune_layers(copy.deepcopy(model), data[0][0], 2, data=data,
                            loss_fn=F.cross_entropy) for _ in range(2)]
    assert results[0].scores == results[1].scores
    assert results[0].removed[0] == "blocks.2"


def test_frozen_model_keeps_its_flags():
    model, x = Stack(), torch.randn(3, 6)
    for p in model.parameters():
        p.requires_grad_(False)
    prune_layers(model, x, 1)
    assert not any(p.requires_grad for p in model.parameters())


def test_torchvision_vit():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # zero-initialised: every gradient would be 0
    x = torch.randn(2, 3, 32, 32)
    names = [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    assert find_blocks(model, x) == names
    result = prune_layers(model, x, 2)
    assert len(result.removed) == 2
    assert sum(isinstance(m, SkippedBlock) for m in model.encoder.layers) == 2
    assert model(x).shape == (2, 10)


def test_equal_scores_warn():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=10)
    with pytest.warns(RuntimeWarning, match="same"):
        result = prune_layers(model, torch.randn(2, 3, 32, 32), 1)
    assert result.removed == ["encoder.layers.encoder_layer_0"]


def test_timm_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=4, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    assert find_blocks(model, x) == [f"blocks.{i}" for i in range(4)]
    result = prune_layers(model, x, 2, importance="output")
    assert type(model).__name__ == "VisionTransformer"
    assert sum(isinstance(m, SkippedBlock) for m in model.blocks) == 2
    assert set(result.removed) <= {f"blocks.{i}" for i in range(4)}
    assert model(x).shape == (2, 10)


def test_hugging_face_llama_decoder_layers():
    model = tiny_llama(layers=4)
    ids = torch.randint(0, 64, (2, 10))
    assert find_blocks(model, {"input_ids": ids}) == [f"model.layers.{i}" for i in range(4)]
    # with labels the model's own language-modelling loss drives the Taylor scores
    result = prune_layers(model, {"input_ids": ids, "labels": ids}, 2)
    assert type(model) is LlamaForCausalLM and len(model.model.layers) == 4
    assert sum(isinstance(m, SkippedBlock) for m in model.model.layers) == 2
    assert model(input_ids=ids).logits.shape == (2, 10, 64)
    assert all(isinstance(result.modules[n], nn.Module) for n in result.removed)
    # the cache still lines up with layer indices: cached and uncached generation agree
    prompt = ids[:1, :4]
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_tuple_returning_blocks_called_by_keyword():
    torch.manual_seed(0)
    model, x = TupleModel(), torch.randn(3, 4)
    result = prune_layers(model, x, 1, importance="cosine")
    skipped = model.get_submodule(result.removed[0])
    out = skipped(hidden_states=x, attention_mask=None)
    assert isinstance(out, tuple) and len(out) == 2 and out[0] is x and out[1] is None
    assert model(x).shape == (3, 2)


def test_blocks_restricts_the_candidates():
    model, x = Stack(), torch.randn(3, 6)
    result = prune_layers(model, x, 1, blocks=["blocks.0", "blocks.3"], importance="output")
    assert list(result.scores) == ["blocks.0", "blocks.3"]
    assert isinstance(model.blocks[2], Residual)


@pytest.mark.parametrize("importance", ["taylor", "output"])  # fails when cut / when scored
def test_a_failed_replacement_leaves_the_model_as_it_was(importance):
    model, x = Peeks(), torch.randn(3, 6)
    blocks = list(model.blocks)
    with pytest.raises(ValueError, match="blocks.2.*unchanged"):
        prune_layers(model, x, 1, importance=importance, blocks=["blocks.2", "blocks.3"])
    assert all(a is b for a, b in zip(model.blocks, blocks, strict=True))


def test_zero_blocks_is_a_no_op():
    model, x = Stack(), torch.randn(3, 6)
    assert prune_layers(model, x, 0).removed == []
    assert all(isinstance(b, Residual) for b in model.blocks)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"n": 5}, ValueError, "4 removable blocks"),
    ({"n": -1}, ValueError, "n must be"),
    ({"n": 1.0}, TypeError, "n must be an integer"),
    ({"importance": "l1"}, ValueError, "unknown importance"),
    ({"importance": 2}, TypeError, "importance"),
    ({"data": torch.randn(3, 6)}, TypeError, "wrap a single batch"),
    ({"data": []}, ValueError, "data is empty"),
    ({"loss_fn": F.cross_entropy}, ValueError, "labelled data"),
    ({"loss_fn": 3}, TypeError, "loss_fn"),
    ({"data": [torch.randn(3, 6)], "loss_fn": F.cross_entropy}, ValueError, "pair"),
    ({"importance": "cosine", "loss_fn": F.cross_entropy}, ValueError, "only used"),
    ({"blocks": ["widen.0"]}, ValueError, "changes the shape"),
    ({"blocks": ["head"]}, ValueError, "not a non-leaf module"),
    ({"blocks": "blocks.0"}, TypeError, "iterable"),
    ({"data": [(torch.randn(3, 6), torch.tensor([0, 1, 2]))]}, ValueError, "needs loss_fn"),
    ({"data": [torch.randn(3, 5)], "importance": "cosine"}, ValueError, "data batch 0"),
])
def test_bad_input(kwargs, err, match):
    model, x = Stack(), torch.randn(3, 6)
    blocks = list(model.blocks)
    args = {"n": 1, **kwargs}
    with pytest.raises(err, match=match):
        prune_layers(model, x, args.pop("n"), **args)
    assert all(a is b for a, b in zip(model.blocks, blocks, strict=True))


def test_bad_model_and_inputs():
    with pytest.raises(TypeError, match="nn.Module"):
        prune_layers("resnet", torch.randn(1), 1)
    with pytest.raises(TypeError, match="example_inputs"):
        prune_layers(Stack(), None, 1)
    with pytest.raises(ValueError, match="forward on example_inputs failed"):
        prune_layers(Stack(), torch.randn(3, 5), 1)


def test_resnet18_basic_blocks():
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(weights=None), torch.randn(1, 3, 32, 32)
    prune_layers(model, x, 2, importance="cosine")
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 6


def test_a_depth_pruned_model_saves_and_loads_from_its_constructor(tmp_path):
    import accelprune

    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32)
    result = prune_layers(model, x, 2)
    path = tmp_path / "short.pt"
    accelprune.save(model, path, constructor="torchvision:resnet18")
    loaded = accelprune.load(path)
    assert [n for n, m in loaded.named_modules() if isinstance(m, SkippedBlock)] == sorted(
        result.removed)
    assert torch.equal(loaded.eval()(x), model(x))
    # into a fresh instance the caller built, and into one pruned the same way already
    fresh = accelprune.load(path, torchvision.models.resnet18(weights=None))
    assert torch.equal(fresh.eval()(x), model(x))
    assert torch.equal(accelprune.load(path, fresh).eval()(x), model(x))


def test_a_depth_pruned_llama_round_trips(tmp_path):
    import accelprune

    model = tiny_llama(layers=4)
    ids = torch.randint(0, 64, (1, 8))
    prune_layers(model, {"input_ids": ids}, 1, importance="output")
    path = tmp_path / "llama.pt"
    accelprune.save(model, path)
    loaded = accelprune.load(path).eval()
    assert sum(isinstance(m, SkippedBlock) for m in loaded.model.layers) == 1
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_loading_a_depth_pruned_file_into_the_wrong_model_changes_nothing(tmp_path):
    import accelprune

    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32)
    prune_layers(model, x, 1)
    path = tmp_path / "short.pt"
    accelprune.save(model, path)
    other = torchvision.models.resnet34(weights=None)  # has the block, differs elsewhere
    with leaves_unchanged(other, x, raises=ValueError, match="cannot load"):
        accelprune.load(path, other)
    assert not any(isinstance(m, SkippedBlock) for m in other.modules())
    with pytest.raises(ValueError, match="lacks"):  # a block the model does not have
        accelprune.load(path, Stack())


class _AttributeStage(nn.Module):
    """timm's RegNet stage in small: its blocks are attributes b1, b2, b3, run in order, not
    members of an nn.Sequential / nn.ModuleList."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        for i in (1, 2, 3):
            setattr(self, f"b{i}", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        for i in (1, 2, 3):
            x = x + getattr(self, f"b{i}")(x)
        return self.head(x.mean((2, 3)))


def test_blocks_kept_as_attributes_can_be_named():
    """Zoo sweep (timm RegNetX-002): find_blocks looks only in Sequential / ModuleList, so a
    RegNet had 0 removable blocks and naming them in blocks= was refused too; a named non-leaf
    module is now a candidate under the same checks, and the refusal says to name them."""
    from accelprune import prune_layers

    torch.manual_seed(0)
    model, x = _AttributeStage().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"0 removable blocks.*named in blocks="):
        prune_layers(model, x, 1)
    result = prune_layers(model, x, 1, blocks=["b2", "b3"], importance="output")
    assert result.removed[0] in ("b2", "b3") and set(result.scores) == {"b2", "b3"}
    assert model(x).shape == (1, 4)
    with pytest.raises(ValueError, match="'head' cannot be removed: it is not a non-leaf"):
        prune_layers(_AttributeStage(), x, 1, blocks=["head"])

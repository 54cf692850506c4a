"""accelprune.save / accelprune.load: weights-only files, nothing executed, corruption refused,
pruned widths restored onto a fresh instance, outputs identical."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from failsafe import leaves_unchanged
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import accelprune
from accelprune import models
from accelprune.serialization import _digest

ROOT = Path(__file__).resolve().parent.parent


class GroupedNet(nn.Module):
    """Grouped (4 groups) and depthwise convs between plain ones."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 12, 1)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.grouped(x)))
        x = torch.relu(self.bn2(self.pw(self.dw(x))))
        return self.fc(x.mean((2, 3)))


def _outputs_equal(a, b, x):
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _pruned_resnet20():
    torch.manual_seed(0)
    model = accelprune.prune(models.resnet20(), torch.randn(1, 3, 32, 32), 0.4, "l1")
    return model.eval(), torch.randn(2, 3, 32, 32)


# -- round trips ----------------------------------------------------------------------------------


def test_pruned_resnet20_round_trips_without_and_with_a_fresh_instance(tmp_path):
    model, x = _pruned_resnet20()
    path = tmp_path / "r20.pt"
    accelprune.save(model, path)
    rebuilt = accelprune.load(path)  # the file names accelprune:CifarResNet
    assert _states_equal(rebuilt, model) and _outputs_equal(rebuilt, model, x)
    fresh = models.resnet20()
    assert accelprune.load(path, fresh) is fresh
    assert _states_equal(fresh, model) and _outputs_equal(fresh, model, x)
    assert fresh.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels < 16
    assert fresh.layer1[0].bn1.num_features == model.layer1[0].bn1.num_features


def test_a_cifar_resnet_of_another_width_records_it(tmp_path):
    torch.manual_seed(0)
    model = accelprune.prune(models.CifarResNet(1, width=8), torch.randn(1, 3, 32, 32), 0.4,
                             "l1").eval()
    path = tmp_path / "r8.pt"
    accelprune.save(model, path)
    assert accelprune.serialization.constructor_of(path)["kwargs"]["width"] == 8
    x = torch.randn(2, 3, 32, 32)
    rebuilt = accelprune.load(path)
    assert _states_equal(rebuilt, model) and _outputs_equal(rebuilt, model, x)
    fresh = models.CifarResNet(1)  # another width: reshaped from the file, as any model
    assert accelprune.load(path, fresh) is fresh
    assert _states_equal(fresh, model) and _outputs_equal(fresh, model, x)


def test_torchvision_resnet18_round_trips_through_its_constructor(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    accelprune.prune(model, torch.randn(1, 3, 64, 64), 0.3, "l2")
    path = tmp_path / "r18.pt"
    accelprune.save(model, path, constructor="torchvision:resnet18",
                    constructor_kwargs={"num_classes": 5})
    x = torch.randn(2, 3, 64, 64)
    loaded = accelprune.load(path)
    assert _states_equal(loaded, model) and _outputs_equal(loaded, model, x)
    # the same file into a fresh instance, without the constructor
    fresh = torchvision.models.resnet18(weights=None, num_classes=5)
    assert _outputs_equal(accelprune.load(path, fresh), model, x)


def test_pruned_grouped_and_depthwise_convs_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GroupedNet()
    x = torch.randn(2, 3, 16, 16)
    accelprune.prune(model, x, 0.5, "l1")
    assert model.grouped.out_channels < 16 and model.grouped.groups == 4
    assert model.dw.groups == model.dw.out_channels < 16  # depthwise: groups follow the width
    path = tmp_path / "grouped.pt"
    accelprune.save(model, path)
    with pytest.raises(ValueError, match="names no constructor"):
        accelprune.load(path)
    fresh = accelprune.load(path, GroupedNet())
    assert fresh.dw.groups == model.dw.groups
    assert _states_equal(fresh, model) and _outputs_equal(fresh, model, x)


def test_mobilenet_and_dtypes_and_flags_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=4)
    accelprune.prune(model, torch.randn(1, 3, 32, 32), 0.3, "l2")
    model = model.to(torch.bfloat16).train()
    model.classifier[1].weight.requires_grad_(False)
    path = tmp_path / "mb.pt"
    accelprune.save(model, path, constructor="torchvision:mobilenet_v2",
                    constructor_kwargs={"num_classes": 4})
    loaded = accelprune.load(path)
    assert loaded.training and not loaded.classifier[1].weight.requires_grad
    assert loaded.features[0][0].weight.dtype == torch.bfloat16
    assert _states_equal(loaded, model)
    assert _outputs_equal(loaded, model, torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))


def test_timm_model_names_its_constructor(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    accelprune.prune(model, x[:1], 0.3, "l1")
    path = tmp_path / "timm.pt"
    accelprune.save(model, path)
    assert accelprune.serialization.constructor_of(path) == {
        "name": "timm:resnet18", "kwargs": {"num_classes": 4}}
    loaded = accelprune.load(path)
    assert _states_equal(loaded, model) and _outputs_equal(loaded, model, x)


def test_tied_weights_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

    model = Tied()
    path = tmp_path / "tied.pt"
    accelprune.save(model, path)
    fresh = accelprune.load(path, Tied())
    assert fresh.out.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, model.emb.weight)


def test_hugging_face_model_is_rebuilt_from_its_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=24)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    path = tmp_path / "bert.pt"
    accelprune.save(model, path)
    loaded = accelprune.load(path)
    assert type(loaded) is transformers.BertModel
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).last_hidden_state, model(ids).last_hidden_state)


def test_a_fresh_process_loads_what_was_saved(tmp_path):
    model, x = _pruned_resnet20()
    path, xs, out = tmp_path / "m.pt", tmp_path / "x.pt", tmp_path / "out.pt"
    accelprune.save(model, path)
    torch.save(x, xs)
    script = textwrap.dedent("""
        import sys, torch, accelprune
        model = accelprune.load(sys.argv[1]).eval()
        with torch.no_grad():
            torch.save(model(torch.load(sys.argv[2])), sys.argv[3])
    """)
    subprocess.run([sys.executable, "-c", script, str(path), str(xs), str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, timeout=300)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(out), model(x), rtol=1e-6, atol=1e-6)


def test_the_file_is_weights_only(tmp_path):
    model, _ = _pruned_resnet20()
    accelprune.save(model, tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # torch's own safe loader reads it
    assert raw["format"] == "accelprune.model" and raw["version"] == 2
    assert raw["meta"]["constructor"]["name"] == "accelprune:CifarResNet"


# -- nothing executed ----------------------------------------------------------------------------


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_a_command_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "accelprune.model", "version": 1, "model": _RunsCommand(marker)}, path)
    with pytest.raises(ValueError, match="pickled Python objects") as info:
        accelprune.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="pickled"):
        accelprune.load(path, models.resnet20())
    assert not marker.exists()


def test_an_accelprune_0_1_file_needs_allow_pickle(tmp_path):
    model, x = _pruned_resnet20()
    path = tmp_path / "old.pt"
    torch.save({"format": "accelprune.model", "version": 1, "model": model}, path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        accelprune.load(path)
    assert _outputs_equal(accelprune.load(path, allow_pickle=True), model, x)
    fresh = accelprune.load(path, models.resnet20(), allow_pickle=True)
    assert _states_equal(fresh, model)


# -- corruption ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7, 0.9])
def test_64_zeroed_bytes_are_refused(tmp_path, where):
    model, _ = _pruned_resnet20()
    path = tmp_path / "m.pt"
    accelprune.save(model, path)
    data = bytearray(path.read_bytes())
    start = int(len(data) * where)
    while not any(data[start:start + 64]):  # zeroing zeros would change nothing
        start += 64
    data[start:start + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted|truncated") as info:
        accelprune.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("cut", [0.0, 0.1, 0.5, 0.99])
def test_truncated_and_empty_files_are_refused_naming_the_path(tmp_path, cut):
    model, _ = _pruned_resnet20()
    path = tmp_path / "m.pt"
    accelprune.save(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match="empty|truncated|corrupted") as info:
        accelprune.load(path, models.resnet20())
    assert str(path) in str(info.value)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_any_damaged_byte_is_refused_or_harmless(tmp_path_factory, data):
    """A byte changed anywhere: load refuses with a ValueError naming the path, or (a byte the
    zip format does not read back, e.g. a timestamp) returns exactly the saved weights."""
    path = tmp_path_factory.mktemp("fuzz") / "m.pt"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))  # materialise the lazy layer
    accelprune.save(model, path)
    raw = bytearray(path.read_bytes())
    where = data.draw(st.integers(0, len(raw) - 1))
    raw[where] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))
    try:
        loaded = accelprune.load(path, fresh)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert _states_equal(loaded, model)


def test_edited_metadata_is_refused(tmp_path):
    model, _ = _pruned_resnet20()
    path = tmp_path / "m.pt"
    accelprune.save(model, path)
    raw = torch.load(path, weights_only=True)
    raw["meta"]["modules"]["fc"]["attrs"]["in_features"] = 3
    torch.save(raw, path)
    with pytest.raises(ValueError, match="digest does not match"):
        accelprune.load(path)


def test_other_files_are_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="junk.pt"):
        accelprune.load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="accelprune.save"):
        accelprune.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="directory"):
        accelprune.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        accelprune.load(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="path"):
        accelprune.load(3)
    with pytest.raises(TypeError, match="model"):
        accelprune.load(tmp_path / "other.pt", "resnet20")


def _forge(path, **meta_changes):
    """Rewrite a saved file with changed metadata and a matching digest (a crafted file)."""
    raw = torch.load(path, weights_only=True)
    raw["meta"].update(meta_changes)
    raw["sha256"] = _digest(raw)
    torch.save(raw, path)


@pytest.mark.parametrize("constructor, message", [
    ({"name": "os:system", "kwargs": {}}, "unknown constructor"),
    ({"name": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}}, "not allowed"),
    ({"name": "timm:resnet18", "kwargs": {"pretrained": True}}, "not allowed"),
    ({"name": "accelprune:BasicBlock", "kwargs": {}}, "no model"),
    ({"name": "transformers:AutoTokenizer", "kwargs": {"config": {}}}, "no model class"),
])
def test_crafted_constructors_are_refused(tmp_path, constructor, message):
    model, _ = _pruned_resnet20()
    path = tmp_path / "m.pt"
    accelprune.save(model, path)
    _forge(path, constructor=constructor)
    with pytest.raises(ValueError, match=message):
        accelprune.load(path)


@pytest.mark.parametrize("constructor, message", [
    ({"name": "accelprune:CifarResNet", "kwargs": {"blocks_per_stage": 10**6}}, "modules"),
    ({"name": "torchvision:resnet18", "kwargs": {"num_classes": 10**11}}, "GB|failed"),
    ({"name": "accelprune:resnet20", "kwargs": {"depth": 3}}, "failed"),
])
def test_constructors_with_huge_or_bad_arguments_are_stopped(tmp_path, constructor, message):
    model, _ = _pruned_resnet20()
    path = tmp_path / "m.pt"
    accelprune.save(model, path)
    _forge(path, constructor=constructor)
    with pytest.raises(ValueError, match=message) as info:
        accelprune.load(path)
    assert str(path) in str(info.value)


def test_a_model_of_another_architecture_is_refused_and_left_unchanged(tmp_path):
    model, x = _pruned_resnet20()
    path = tmp_path / "m.pt"
    accelprune.save(model, path)
    other = models.vgg_small()
    with leaves_unchanged(other, x, match="module"):
        accelprune.load(path, other)
    deeper = models.resnet56()
    with leaves_unchanged(deeper, x, match="module"):
        accelprune.load(path, deeper)
    wider_kernel = models.resnet20()
    wider_kernel.conv1.kernel_size = (5, 5)
    with leaves_unchanged(wider_kernel, match="kernel_size"):
        accelprune.load(path, wider_kernel)


def _fused_resnet18_file(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    accelprune.prune(model, torch.randn(1, 3, 64, 64), 0.3, "l2")
    fused = accelprune.fuse_conv_bn(model)
    path = tmp_path / "fused.pt"
    accelprune.save(fused, path, constructor="torchvision:resnet18",
                    constructor_kwargs={"num_classes": 5})
    return fused, path


def test_a_fused_model_loads_from_its_constructor_and_into_an_unfused_instance(tmp_path):
    fused, path = _fused_resnet18_file(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    fresh = torchvision.models.resnet18(weights=None, num_classes=5)
    for loaded in (accelprune.load(path), accelprune.load(path, fresh)):
        assert _states_equal(loaded, fused) and _outputs_equal(loaded, fused, x)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
        assert loaded.conv1.bias is not None


def test_a_fused_file_into_another_architecture_is_refused_and_left_unchanged(tmp_path):
    _, path = _fused_resnet18_file(tmp_path)
    other = torchvision.models.resnet34(weights=None, num_classes=5)  # the BatchNorms fold, then
    with leaves_unchanged(other, torch.randn(2, 3, 64, 64), match="module"):  # depth differs
        accelprune.load(path, other)
    assert isinstance(other.bn1, nn.BatchNorm2d) and other.conv1.bias is None


def test_a_batchnorm_the_file_lacks_outside_a_fused_pair_is_refused_by_name(tmp_path):
    """Only BatchNorms that fuse_conv_bn would fold are folded on load: one after a ReLU was not
    fused, so its absence from the file is an architecture difference."""
    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))

    saved = build()
    saved[2] = nn.Identity()
    path = tmp_path / "no_bn.pt"
    accelprune.save(saved, path)
    target = build()
    message = ("module '2' is torch.nn.modules.batchnorm.BatchNorm2d in the model but "
               "torch.nn.modules.linear.Identity in the file")
    with leaves_unchanged(target, torch.randn(2, 3, 8, 8), match=message):
        accelprune.load(path, target)


def test_save_refuses_bad_input_and_leaves_no_file(tmp_path):
    with pytest.raises(TypeError, match="model"):
        accelprune.save({"not": "a module"}, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="path"):
        accelprune.save(models.resnet20(), 3)
    with pytest.raises(ValueError, match="unknown constructor"):
        accelprune.save(models.resnet20(), tmp_path / "x.pt", constructor="pickle:loads")
    with pytest.raises(ValueError, match="not allowed"):
        accelprune.save(models.resnet20(), tmp_path / "x.pt", constructor="torchvision:resnet18",
                        constructor_kwargs={"weights": "DEFAULT"})
    with pytest.raises(TypeError, match="plain data"):
        accelprune.save(models.resnet20(), tmp_path / "x.pt", constructor="accelprune:resnet20",
                        constructor_kwargs={"num_classes": torch.tensor(3)})
    masked = models.resnet20()
    accelprune.magnitude_prune(masked, 0.5)
    with pytest.raises(ValueError, match="make_permanent"):
        accelprune.save(masked, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


# -- checkpoint and resume -----------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.c3, self.b3 = nn.Conv2d(12, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.2)  # draws from torch's RNG: the recipe must restore it
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(self.drop(x.mean((2, 3))))


_DATA = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
_LABELS = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
_EPOCHS = 5


def _train_epoch(model, optimizer):
    # Numba's OpenMP layer, started by the first max-coverage call in a process, resets the
    # OpenMP thread count that torch shares (1 -> cores), which changes float summation order;
    # pin it, as a run that wants bit-for-bit resumption must (reported with coverage.py).
    torch.set_num_threads(1)
    model.train()
    order = torch.randperm(16)  # torch's global RNG, like a shuffling DataLoader
    for batch in order.split(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(_DATA[batch]), _LABELS[batch]).backward()
        optimizer.step()


def _reprune(model):
    return accelprune.REPrune(model, _DATA[:2], 0.5, schedule="linear", delta_t=1, t_prune=3,
                              seed=3)


def _reprune_run(tmp_path, stop_after=None, resume=False):
    """Epochs 0.._EPOCHS-1 of train + REPrune.step; optionally checkpoint after ``stop_after``
    and return, or resume from the checkpoint."""
    model_path, state_path = tmp_path / "model.pt", tmp_path / "state.pt"
    if resume:
        model = accelprune.load(model_path, SmallNet())
        state = torch.load(state_path, weights_only=True)
        pruner = _reprune(model)
        pruner.load_state_dict(state["pruner"])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        first = state["epoch"] + 1
    else:
        torch.manual_seed(0)
        model = SmallNet()
        pruner = _reprune(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        first = 0
    for epoch in range(first, _EPOCHS):
        _train_epoch(model, optimizer)
        optimizer = pruner.step(epoch, optimizer)
        if epoch == stop_after:
            accelprune.save(model, model_path)
            torch.save({"pruner": pruner.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(), "epoch": epoch}, state_path)
            return None
    return model, pruner


@pytest.mark.parametrize("stop_after", range(_EPOCHS - 1))
def test_reprune_resumed_after_any_epoch_equals_the_uninterrupted_run(tmp_path, stop_after):
    model, pruner = _reprune_run(tmp_path)
    _reprune_run(tmp_path, stop_after=stop_after)
    resumed, resumed_pruner = _reprune_run(tmp_path, resume=True)
    assert [g.n_channels for g in resumed_pruner.groups] == [g.n_channels for g in pruner.groups]
    assert resumed_pruner.original_widths == pruner.original_widths == [12, 6]
    assert [e.layers for e in resumed_pruner.events] == [e.layers for e in pruner.events]
    assert _states_equal(resumed, model)  # bit for bit


def test_reprune_state_is_checked(tmp_path):
    torch.manual_seed(0)
    model = SmallNet()
    pruner = _reprune(model)
    pruner.step(1)
    state = pruner.state_dict()
    path = tmp_path / "s.pt"
    torch.save(state, path)
    assert torch.load(path, weights_only=True) == state  # plain data
    with pytest.raises(ValueError, match="sparsity"):
        accelprune.REPrune(SmallNet(), _DATA[:2], 0.4, schedule="linear", delta_t=1, t_prune=3,
                           seed=3).load_state_dict(state)
    fresh = _reprune(SmallNet())  # an unpruned model: not the one saved with the state
    with pytest.raises(ValueError, match="widths"):
        fresh.load_state_dict(state)
    assert fresh.events == [] and fresh.original_widths == [12, 6]


def _csgd(model):
    return accelprune.CSGD(model, _DATA[:2], 0.5, centripetal_strength=0.05, seed=4)


def _csgd_run(tmp_path, stop_after=None, resume=False):
    model_path, state_path = tmp_path / "model.pt", tmp_path / "state.pt"
    if resume:
        model = accelprune.load(model_path, SmallNet())
        state = torch.load(state_path, weights_only=True)
        csgd = _csgd(model)
        csgd.load_state_dict(state["csgd"])
        first = state["epoch"] + 1
    else:
        torch.manual_seed(0)
        model = SmallNet()
        csgd = _csgd(model)
        first = 0
    optimizer = torch.optim.SGD(csgd.param_groups(lr=0.05, momentum=0.9), lr=0.05)
    if resume:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    csgd.register_hook(optimizer)
    for epoch in range(first, _EPOCHS):
        _train_epoch(model, optimizer)
        if epoch == stop_after:
            accelprune.save(model, model_path)
            torch.save({"csgd": csgd.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(), "epoch": epoch}, state_path)
            return None
    labels = [c.labels.copy() for c in csgd.clusters]
    csgd.prune()
    return model, labels


@pytest.mark.parametrize("stop_after", [0, 2])
def test_csgd_resumed_equals_the_uninterrupted_run(tmp_path, stop_after):
    model, labels = _csgd_run(tmp_path)
    _csgd_run(tmp_path, stop_after=stop_after)
    resumed, resumed_labels = _csgd_run(tmp_path, resume=True)
    assert all(a.tolist() == b.tolist() for a, b in zip(labels, resumed_labels, strict=True))
    assert _states_equal(resumed, model)  # bit for bit, pruned the same way


def test_csgd_state_is_checked():
    torch.manual_seed(0)
    csgd = _csgd(SmallNet())
    state = csgd.state_dict()
    other = accelprune.CSGD(SmallNet(), _DATA[:2], 0.5, centripetal_strength=0.05, seed=5)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    bad = {**state, "labels": [t + 1 for t in state["labels"]]}
    before = [c.labels.copy() for c in csgd.clusters]
    with pytest.raises(ValueError, match="labels"):
        csgd.load_state_dict(bad)
    assert all((c.labels == b).all() for c, b in zip(csgd.clusters, before, strict=True))

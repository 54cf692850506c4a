"""accelprune.models (CIFAR ResNet-20/56, small VGG) and accelprune.save / accelprune.load."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import accelprune
from accelprune import models

ROOT = Path(__file__).resolve().parents[1]


def _convs(model, k):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (k, k)]


@pytest.mark.parametrize("build,n", [(models.resnet20, 3), (models.resnet56, 9)])
def test_cifar_resnet_structure(build, n):
    torch.manual_seed(0)
    model = build(num_classes=7)
    # depth 6n+2: stem + 2 convs per block + fc; option-B projections only where stages change
    assert len(_convs(model, 3)) == 6 * n + 1
    assert len(_convs(model, 1)) == 2
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [n, n, n]
    assert [s[0].conv2.out_channels for s in (model.layer1, model.layer2, model.layer3)] == [
        16,
        32,
        64,
    ]
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer2[0].shortcut[0], nn.Conv2d) and model.layer2[0].shortcut[
        0
    ].stride == (2, 2)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_parameter_counts_match_the_papers_scale():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # He et al.: ResNet-20 0.27 M, ResNet-56 0.85 M (option A); option B adds two small projections
    assert 0.27e6 <= count(models.resnet20()) <= 0.28e6
    assert 0.85e6 <= count(models.resnet56()) <= 0.87e6


def test_vgg_small_forward_and_flatten_linear():
    model = models.vgg_small(num_classes=10)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert model.classifier[0].in_features == 256 * 2 * 2


@pytest.mark.parametrize("build", [models.resnet20, models.resnet56, models.vgg_small])
def test_bad_num_classes(build):
    with pytest.raises(ValueError, match="num_classes"):
        build(num_classes=0)
    with pytest.raises(TypeError, match="num_classes"):
        build(num_classes=2.5)


# -- save / load --------------------------------------------------------------------------------

_LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch, accelprune
    model = accelprune.load(sys.argv[1])
    x = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save({"out": model.eval()(x), "state": model.state_dict()}, sys.argv[3])
""")


def _env():
    # the parent's settings (thread counts change float summation order), plus the checkout
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _pruned_resnet20():
    torch.manual_seed(0)
    model = models.resnet20()
    return accelprune.prune(model, torch.randn(1, 3, 32, 32), 0.4, "l1"), torch.randn(2, 3, 32, 32)


def _pruned_mobilenet():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=5)
    return accelprune.prune(model, torch.randn(1, 3, 64, 64), 0.3, "l2"), torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize(
    "build", [_pruned_resnet20, _pruned_mobilenet], ids=["resnet20", "mobilenet_v2"]
)
def test_save_load_in_a_fresh_process_gives_identical_outputs(tmp_path, build):
    model, x = build()
    with torch.no_grad():
        expected = model.eval()(x)
    path, xs, out = tmp_path / "model.pt", tmp_path / "x.pt", tmp_path / "out.pt"
    accelprune.save(model, path)
    torch.save(x, xs)
    subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(path), str(xs), str(out)],
        check=True,
        env=_env(),
        cwd=tmp_path,
        timeout=300,
    )
    result = torch.load(out)
    assert result["state"].keys() == model.state_dict().keys()
    assert all(
        torch.equal(v, model.state_dict()[k]) for k, v in result["state"].items()
    )  # bit for bit
    torch.testing.assert_close(result["out"], expected, rtol=1e-6, atol=1e-6)


def test_load_restores_pruned_shapes_in_process(tmp_path):
    model, x = _pruned_resnet20()
    accelprune.save(model, tmp_path / "m.pt")
    loaded = accelprune.load(tmp_path / "m.pt")
    assert loaded is not model
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_save_load_bad_input(tmp_path):
    with pytest.raises(TypeError, match="model"):
        accelprune.save({"not": "a module"}, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="path"):
        accelprune.save(models.resnet20(), 3)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="accelprune.save"):
        accelprune.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        accelprune.load(tmp_path / "missing.pt")


def test_load_explains_an_unimportable_class(tmp_path):
    script = textwrap.dedent("""
        import sys, torch, accelprune
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(2, 2)
        accelprune.save(Net(), sys.argv[1])
    """)
    path = tmp_path / "main.pt"
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=_env(), timeout=300)
    with pytest.raises(ValueError, match="not importable"):
        accelprune.load(path)

"""backend="reference" is accepted everywhere a fast path exists and gives the same answer."""

import copy

import pytest
import torch
from test_csgd import randomize_norms

import accelprune
from accelprune.models import resnet20


def model_and_input():
    torch.manual_seed(0)
    return randomize_norms(resnet20()), torch.randn(2, 3, 16, 16)


def widths(model):
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("importance", [accelprune.L1Importance, accelprune.L2Importance,
                                        accelprune.BNScaleImportance])
def test_criteria(importance):
    model, x = model_and_input()
    fast, ref = copy.deepcopy(model), copy.deepcopy(model)
    accelprune.prune(fast, x, 0.5, importance(backend="auto"))
    accelprune.prune(ref, x, 0.5, importance(backend="reference"))
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(),
                                                 ref.state_dict().values(), strict=True))


def test_reprune_selects_the_same_filters():
    model, x = model_and_input()
    fast, ref = copy.deepcopy(model), copy.deepcopy(model)
    accelprune.REPrune(fast, x, 0.5, backend="native").prune()
    accelprune.REPrune(ref, x, 0.5, backend="reference").prune()
    assert widths(fast) == widths(ref)
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(),
                                                 ref.state_dict().values(), strict=True))


def test_csgd_transform_matches():
    model, x = model_and_input()
    runs = []
    for backend in ("auto", "reference"):
        m = copy.deepcopy(model)
        csgd = accelprune.CSGD(m, x, 0.5, clustering="even", backend=backend)
        torch.nn.functional.cross_entropy(m(x), torch.tensor([1, 2])).backward()
        csgd.apply_gradients()
        runs.append([t.param.grad.clone() for t in csgd.transformed])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda m, x: accelprune.REPrune(m, x, 0.5, backend="torch"),
    lambda m, x: accelprune.CSGD(m, x, 0.5, backend="torch"),
    lambda m, x: accelprune.L1Importance(backend="torch"),
    lambda m, x: accelprune.REPruneImportance(0.5, backend="torch"),
])
def test_unknown_backend_is_refused_at_construction(make):
    model, x = model_and_input()
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        make(model, x)

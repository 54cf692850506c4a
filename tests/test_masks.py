import copy

import pytest
import torch
from torch import nn

from accelprune.masks import (
    get_masks,
    gradient_magnitude_prune,
    layer_sparsity,
    magnitude_prune,
    make_permanent,
    prunable_parameters,
    weight_sparsity,
)


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)


def n_masked(model):
    return sum(int((m == 0).sum()) for m in get_masks(model).values())


def test_global_sparsity_is_exact_and_keeps_largest_magnitudes():
    model = tiny()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = [dense[n] for n in ("0.weight", "3.weight", "6.weight")]
    total = sum(w.numel() for w in weights)
    magnitude_prune(model, 0.6)
    assert n_masked(model) == round(0.6 * total)
    # one global threshold: every kept |w| >= every pruned |w|
    masks = get_masks(model)
    kept = torch.cat([dense[k][masks[k] == 1].abs() for k in masks])
    pruned = torch.cat([dense[k][masks[k] == 0].abs() for k in masks])
    assert kept.min() >= pruned.max()
    # the per-layer sparsities differ (it is a global threshold), their weighted mean does not
    per = layer_sparsity(model)
    assert len(set(round(v, 6) for v in per.values())) > 1
    assert weight_sparsity(model) == pytest.approx(round(0.6 * total) / total)


def test_layer_scope_reaches_target_in_every_tensor():
    model = tiny()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    magnitude_prune(model, 0.3, scope="layer")
    for name, mask in get_masks(model).items():
        assert int((mask == 0).sum()) == round(0.3 * mask.numel())
        w = dense[name].abs()
        assert w[mask == 1].min() >= w[mask == 0].max()


def test_sparsity_is_a_total_target_and_masks_only_grow():
    model = tiny()
    total = sum(p.numel() for m, _ in prunable_parameters(model) for p in [m.weight])
    magnitude_prune(model, 0.5)
    first = get_masks(model)
    magnitude_prune(model, 0.8)
    assert n_masked(model) == round(0.8 * total)
    second = get_masks(model)
    for k in first:  # previously pruned entries stay pruned
        assert torch.all(second[k][first[k] == 0] == 0)
    magnitude_prune(model, 0.2)  # lower target: nothing is unpruned
    assert n_masked(model) == round(0.8 * total)


def test_masked_weights_stay_zero_through_sgd_with_momentum_and_weight_decay():
    model = tiny()
    magnitude_prune(model, 0.7)
    masks = get_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model(x)  # the forward pre-hook recomputes weight = weight_orig * mask
    modules = dict(model.named_modules())
    for key, mask in masks.items():
        mod_name, pname = key.rsplit(".", 1)
        w = getattr(modules[mod_name], pname)
        assert torch.all(w[mask == 0] == 0)
        assert torch.any(w[mask == 1] != 0)
    # the optimizer really moved the kept weights
    assert not torch.equal(model[0].weight_orig, tiny()[0].weight)


def test_make_permanent_removes_reparametrisation_and_keeps_zeros():
    model = tiny()
    magnitude_prune(model, 0.5)
    x, _ = batch()
    expected = model(x)
    masks = get_masks(model)
    assert make_permanent(model) is model
    names = dict(model.named_parameters())
    assert "0.weight" in names and not any(n.endswith("_orig") for n in names)
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert torch.all(model[0].weight[masks["0.weight"] == 0] == 0)
    torch.testing.assert_close(model(x), expected)
    assert set(tiny().state_dict()) == set(model.state_dict())


def test_gradient_magnitude_prune_uses_gradients_not_weights():
    model = tiny()
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.detach().abs().clone() for n, p in model.named_parameters()}
    gradient_magnitude_prune(model, 0.4, scope="layer")
    for name, mask in get_masks(model).items():
        g = grads[name]
        assert int((mask == 0).sum()) == round(0.4 * mask.numel())
        assert g[mask == 1].min() >= g[mask == 0].max()
    # second round on the reparametrised model reads weight_orig.grad
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    gradient_magnitude_prune(model, 0.6)
    total = sum(m.numel() for m in get_masks(model).values())
    assert n_masked(model) == round(0.6 * total)


def test_gradient_prune_without_backward_raises():
    with pytest.raises(ValueError, match="no gradient"):
        gradient_magnitude_prune(tiny(), 0.5)


def test_parameters_selection_by_name_module_and_pair():
    model = tiny()
    magnitude_prune(model, 0.5, parameters=["0", model[3], (model[6], "weight")], scope="layer")
    assert set(get_masks(model)) == {"0.weight", "3.weight", "6.weight"}
    model = tiny()
    magnitude_prune(model, 0.5, parameters=["6"])
    assert set(get_masks(model)) == {"6.weight"}
    assert not hasattr(model[0], "weight_mask")


def test_zero_sparsity_masks_nothing():
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    magnitude_prune(model, 0.0)
    assert n_masked(model) == 0
    torch.testing.assert_close(model[0].weight_orig, before["0.weight"])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(sparsity=1.0), ValueError, "sparsity"),
    (dict(sparsity=-0.1), ValueError, "sparsity"),
    (dict(sparsity=float("nan")), ValueError, "sparsity"),
    (dict(sparsity="0.5"), TypeError, "sparsity"),
    (dict(scope="row"), ValueError, "scope"),
    (dict(parameters=["nope"]), ValueError, "no module named"),
    (dict(parameters=[("0", "weight")]), TypeError, "cannot prune"),
    (dict(parameters=[(nn.Linear(2, 2), "weight")]), ValueError, "not part of the model"),
    (dict(parameters=[]), ValueError, "nothing to prune"),
    (dict(parameters=["2"]), ValueError, "no parameter 'weight'"),
    (dict(parameters=["0", "0"]), ValueError, "twice"),
    (dict(parameters="0"), TypeError, "iterable"),
])
def test_bad_input(kwargs, exc, match):
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    kw = dict(sparsity=0.5)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        magnitude_prune(model, **kw)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_non_finite_weights_are_rejected_untouched():
    model = tiny()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        magnitude_prune(model, 0.5)
    assert not hasattr(model[0], "weight_mask")


def test_non_module_rejected():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        magnitude_prune({"w": torch.ones(3)}, 0.5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        make_permanent(None)
    with pytest.raises(ValueError, match="nothing to prune"):
        magnitude_prune(nn.ReLU(), 0.5)

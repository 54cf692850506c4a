import copy

import pytest
import torch
from torch import nn

from accelprune.lottery import LotteryTicket, iterative_magnitude_pruning
from accelprune.masks import get_masks


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 5))


def make_train(steps=4):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)

    def train(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return nn.functional.cross_entropy(model(x), y).item()

    return train


def assert_state_equal(model, state):
    """Every parameter/buffer of a (possibly masked) model equals the plain state dict's."""
    for key, value in model.state_dict().items():
        if key.endswith("_mask"):
            continue
        plain = key[:-5] if key.endswith("_orig") else key
        assert torch.equal(value, state[plain]), key


def test_rewind_restores_initial_values_and_keeps_masks():
    model = tiny()
    init = copy.deepcopy(model.state_dict())
    ticket = LotteryTicket(model)
    make_train()(model)
    trained = {k: model.get_parameter(k).detach().clone() for k in ("0.weight", "4.weight")}
    ticket.prune(0.5)
    masks = get_masks(model)
    # masks come from the trained magnitudes (one global threshold), not the initial ones
    kept = torch.cat([trained[k][masks[k] == 1].abs() for k in masks])
    pruned = torch.cat([trained[k][masks[k] == 0].abs() for k in masks])
    assert kept.min() >= pruned.max()
    ticket.rewind()
    assert_state_equal(model, init)  # weights, biases and BN running stats
    for key, mask in get_masks(model).items():
        assert torch.equal(mask, masks[key])
    # module.weight is refreshed at once: unpruned entries hold their initial values
    m0 = masks["0.weight"]
    assert torch.equal(model[0].weight[m0 == 1], init["0.weight"][m0 == 1])
    assert torch.all(model[0].weight[m0 == 0] == 0)


def test_prune_takes_a_fraction_of_the_remaining_weights():
    model = tiny()
    ticket = LotteryTicket(model)
    total = sum(m.numel() for m in (model[0].weight, model[4].weight))
    expected = 0
    for _ in range(3):
        expected += round(0.4 * (total - expected))
        ticket.prune(0.4)
        assert sum(int((m == 0).sum()) for m in get_masks(model).values()) == expected
    assert ticket.sparsity == pytest.approx(1 - 0.6 ** 3, abs=1 / total)


def test_layer_scope_prunes_each_tensor_by_the_fraction():
    model = tiny()
    ticket = LotteryTicket(model, scope="layer")
    ticket.prune(0.5)
    ticket.prune(0.5)
    for mask in get_masks(model).values():
        assert int((mask == 0).sum()) == pytest.approx(0.75 * mask.numel(), abs=1)


def test_iterative_magnitude_pruning_end_to_end():
    model = tiny()
    init = copy.deepcopy(model.state_dict())
    results = []
    train = make_train()

    def train_fn(m):
        assert m is model
        results.append(train(m))
        return results[-1]

    ticket = iterative_magnitude_pruning(model, train_fn, rounds=3, fraction_per_round=0.5)
    assert [h["round"] for h in ticket.history] == [0, 1, 2]
    assert [h["train_result"] for h in ticket.history] == results
    sparsities = [h["sparsity"] for h in ticket.history]
    assert sparsities == sorted(sparsities)
    assert sparsities[-1] == pytest.approx(0.875, abs=2e-3)
    assert_state_equal(model, init)  # left rewound: the ticket, untrained
    # the ticket trains with masks intact
    train(model)
    model(torch.zeros(1, 3, 8, 8))
    masks = get_masks(model)
    assert torch.all(model[4].weight[masks["4.weight"] == 0] == 0)


def test_late_rewinding_to_an_early_state():
    model = tiny()
    train = make_train(steps=2)
    train(model)  # "early" training
    early = copy.deepcopy(model.state_dict())
    ticket = iterative_magnitude_pruning(model, train, rounds=1, fraction_per_round=0.3,
                                         rewind_to=early)
    assert_state_equal(model, early)
    assert ticket.sparsity == pytest.approx(0.3, abs=2e-3)


def test_rewind_state_from_a_masked_model_is_accepted():
    model = tiny()
    ticket = LotteryTicket(model)
    ticket.prune(0.2)
    masked_state = copy.deepcopy(model.state_dict())  # has weight_orig / weight_mask keys
    ticket2 = LotteryTicket(model, rewind_state=masked_state)
    make_train()(model)
    ticket2.rewind()
    assert torch.equal(model[0].weight_orig, masked_state["0.weight_orig"])


@pytest.mark.parametrize("fraction, exc",
                         [(1.0, ValueError), (-0.2, ValueError), (None, TypeError)])
def test_bad_fraction(fraction, exc):
    with pytest.raises(exc, match="fraction"):
        LotteryTicket(tiny()).prune(fraction)


def test_bad_driver_arguments():
    train = make_train(1)
    with pytest.raises(TypeError, match="train_fn"):
        iterative_magnitude_pruning(tiny(), "train", 2, 0.5)
    with pytest.raises(ValueError, match="rounds"):
        iterative_magnitude_pruning(tiny(), train, 0, 0.5)
    with pytest.raises(ValueError, match="fraction_per_round"):
        iterative_magnitude_pruning(tiny(), train, 2, 0.0)
    with pytest.raises(ValueError, match="scope"):
        iterative_magnitude_pruning(tiny(), train, 2, 0.5, scope="channel")


def test_bad_rewind_state():
    model = tiny()
    with pytest.raises(TypeError, match="rewind_state"):
        LotteryTicket(model, rewind_state=[1, 2])
    state = model.state_dict()
    with pytest.raises(ValueError, match="lacks"):
        LotteryTicket(model, rewind_state={k: v for k, v in state.items() if k != "4.bias"})
    with pytest.raises(ValueError, match="shape"):
        LotteryTicket(model, rewind_state=dict(state, **{"4.bias": torch.zeros(7)}))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        LotteryTicket(state)

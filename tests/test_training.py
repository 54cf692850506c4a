"""recalibrate_bn: BatchNorm statistics re-estimated on a few batches, nothing else touched."""
import copy

import pytest
import torch
from torch import nn

from accelprune.training import recalibrate_bn


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5),
    )


def _batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 6, 6, generator=g) * 2 + 1 for _ in range(n)]


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k}


def test_cumulative_average_matches_torch_update_bn():
    ours, ref = _net(), _net()
    batches = _batches()
    recalibrate_bn(ours, batches)
    torch.optim.swa_utils.update_bn(batches, ref)  # torch's reference: cumulative average
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_statistics_are_the_mean_over_batches_of_the_batch_statistics():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn)
    batches = _batches(4)
    recalibrate_bn(model, batches)
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
    variances = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1) for b in batches])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert int(bn.num_batches_tracked) == 4


def test_parameters_modes_momentum_and_grad_state_are_left_alone():
    model = _net()
    model.train()
    model[1].eval()  # mixed flags must come back exactly
    model[4].momentum = 0.3
    params = copy.deepcopy(list(model.parameters()))
    flags = [m.training for m in model.modules()]
    recalibrate_bn(model, _batches())
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
        assert p.grad is None
    assert [m.training for m in model.modules()] == flags
    assert model[4].momentum == 0.3 and model[1].momentum == 0.1


def test_dropout_is_off_during_the_passes():
    torch.manual_seed(0)
    with_dropout = nn.Sequential(nn.Dropout(0.9), nn.BatchNorm1d(4))
    plain = nn.Sequential(nn.Identity(), nn.BatchNorm1d(4))
    x = [torch.randn(16, 4) + 3]
    recalibrate_bn(with_dropout.train(), x)
    recalibrate_bn(plain, x)
    torch.testing.assert_close(with_dropout[1].running_mean, plain[1].running_mean)


def test_numeric_momentum_is_an_exponential_average_from_the_current_statistics():
    bn = nn.BatchNorm1d(2)
    bn.running_mean.fill_(10.0)
    batch = torch.tensor([[0.0, 2.0], [2.0, 4.0]])
    recalibrate_bn(nn.Sequential(bn), [batch], momentum=0.5)
    torch.testing.assert_close(bn.running_mean, torch.tensor([5.5, 6.5]))
    assert bn.momentum == 0.1


def test_batch_forms_tuple_dict_and_max_batches():
    batches = _batches(5)
    expected = recalibrate_bn(_net(), batches[:2])

    class Keyword(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *, x):
            return self.inner(x)

    pairs = recalibrate_bn(_net(), [(b, torch.zeros(8)) for b in batches], max_batches=2)
    keyword = recalibrate_bn(Keyword(_net()), iter([{"x": b} for b in batches]), max_batches=2)
    for model in (pairs, keyword.inner):
        for a, b in zip(model.state_dict().values(), expected.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b)


def test_recalibration_undoes_stale_statistics():
    """The point of it: statistics of another distribution make eval outputs wrong; a
    recalibration on the right data brings eval outputs back to the train-mode ones."""
    model = _net()
    data = torch.randn(400, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    recalibrate_bn(model, [torch.randn(8, 3, 6, 6) * 10 - 5])  # stale: another distribution
    model.eval()
    stale = model(data)
    recalibrate_bn(model, [data])
    fresh = model(data)
    reference = model.train()(data)
    # (running_var is the unbiased variance, train mode divides by n: 400 samples, ~0.1% apart)
    assert (fresh - reference).abs().max() < 1e-2 < 0.5 < (stale - reference).abs().max()


def test_empty_and_bad_batches_leave_the_statistics_unchanged():
    model = _net()
    recalibrate_bn(model, _batches(1))
    before = _bn_buffers(model)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_bn(model, [])
    with pytest.raises(TypeError, match="each batch"):
        recalibrate_bn(model, [_batches(1)[0], "not a batch"])
    after = _bn_buffers(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("kwargs, error", [
    ({"momentum": 0.0}, ValueError), ({"momentum": 1.5}, ValueError),
    ({"momentum": "0.1"}, TypeError), ({"max_batches": 0}, ValueError),
    ({"max_batches": 1.0}, TypeError),
])
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        recalibrate_bn(_net(), _batches(1), **kwargs)
    with pytest.raises(TypeError, match="model"):
        recalibrate_bn("model", _batches(1))


def test_model_without_batchnorm_is_returned_unchanged():
    model = nn.Sequential(nn.Linear(3, 2))
    state = copy.deepcopy(model.state_dict())
    assert recalibrate_bn(model, []) is model  # nothing to recalibrate, nothing to consume
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values(),
                                                   strict=True))

"""MACs are counted on a meta-device twin (no second copy of the weights) and agree with
Torch-Pruning's counter on the real model; models that cannot run on meta tensors fall back."""

import torch
import torch_pruning as tp
import torchvision
from torch import nn

from accelprune import model_stats
from accelprune.models import resnet20


def test_meta_count_equals_the_real_count():
    for model, x in ((resnet20(), torch.randn(2, 3, 32, 32)),
                     (torchvision.models.mobilenet_v2(), torch.randn(1, 3, 64, 64))):
        macs, params = tp.utils.count_ops_and_params(model.eval(), x[:1])
        stats = model_stats(model, x)
        assert stats["macs"] == round(macs) and stats["params"] == params


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        n = int(x.abs().sum().item() > 0) + 1  # .item(): impossible on meta tensors
        return self.fc(x) * n


def test_data_dependent_forward_falls_back_to_a_real_copy():
    model = DataDependent()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = model_stats(model, torch.randn(3, 4))
    assert stats["macs"] == 16 + 4 and stats["params"] == 20
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

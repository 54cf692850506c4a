"""MACs are counted on a meta-device twin (no second copy of the weights) and agree with
Torch-Pruning's counter on the real model; models that cannot run on meta tensors fall back."""

import copy

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


class ReadsAWeight(nn.Module):
    """A forward that needs a value from the model's own tensors (as a Hugging Face model reads
    its attention mask with ``.item()``): impossible on meta tensors."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 8)

    def forward(self, x):
        scale = 1.0 + float(self.fc1.bias.abs().sum().item() >= 0)
        return self.fc2(torch.relu(self.fc1(x))) * scale


def test_a_meta_model_that_cannot_run_on_meta_is_counted_on_zeros_of_its_shapes():
    """REPrune counts the model as it was before pruning on its meta copy; when that forward
    needs values it runs on one-element zeros expanded to each shape: the same MACs as the real
    model, and no storage of the model's size (not even in Torch-Pruning's deep copy)."""
    from accelprune.reporting import _zeros_of_its_shapes, meta_copy, size_stats

    real, x = ReadsAWeight(), torch.randn(2, 64)
    on_meta = meta_copy(real)
    counted = size_stats(on_meta, x)
    assert counted == size_stats(real, x) and counted["params"] == 64 * 256 + 256 + 256 * 8 + 8
    zeros = _zeros_of_its_shapes(on_meta, x)
    tensors = [*zeros.parameters(), *zeros.buffers()]
    assert all(t.untyped_storage().nbytes() == t.element_size() for t in tensors)
    assert all(t.untyped_storage().nbytes() == t.element_size()
               for t in copy.deepcopy(zeros).parameters())
    assert all(p.is_meta for p in on_meta.parameters())  # the record itself is unchanged


def test_a_real_model_that_cannot_run_on_meta_is_counted_without_a_copy(monkeypatch):
    """The same fallback for a model with real weights: Torch-Pruning's counter deep-copies what
    it counts, which for the model itself was a second full copy of a large model."""
    from accelprune import reporting

    counted, count = [], reporting._count_macs
    monkeypatch.setattr(reporting, "_count_macs",
                        lambda model, inputs: counted.append(model) or count(model, inputs))
    real = ReadsAWeight()
    stats = reporting.size_stats(real, torch.randn(2, 64))
    assert stats == reporting.size_stats(reporting.meta_copy(real), torch.randn(2, 64))
    assert len(counted) >= 2 and counted[1] is not real  # [0]: the failed meta count
    assert all(t.untyped_storage().nbytes() == t.element_size()
               for t in [*counted[1].parameters(), *counted[1].buffers()])

"""Running models whose inputs are keyword dicts and whose outputs hold non-tensors."""

import dataclasses

import pytest
import torch
from torch import nn

import accelprune
from accelprune.tracing import call_model, eval_mode, first_sample, output_tensors


class Cache:  # stands in for a Hugging Face DynamicCache: not a tensor, not a container
    pass


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    cache: Cache
    hidden: tuple


class KeywordModel(nn.Module):
    """Takes input_ids and attention_mask by keyword, returns a dataclass with a cache."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        h = self.fc2(torch.relu(self.fc1(h)))
        return Output(self.head(h), Cache(), (None, 3))


def inputs():
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones(2, 6)}


def test_output_tensors_skip_non_tensors():
    out = {"a": torch.zeros(1), "b": [None, 3, (torch.ones(2), Cache())], "c": "text"}
    assert [tuple(t.shape) for t in output_tensors(out)] == [(1,), (2,)]
    assert [t.shape for t in output_tensors(out, lambda o: o["b"][2][0])] == [(2,)]


def test_keyword_inputs_and_dataclass_outputs_are_pruned():
    model, x = KeywordModel(), inputs()
    accelprune.prune(model, x, 0.5, "l1")
    assert model.fc1.out_features == 8
    assert call_model(model, x).logits.shape == (2, 6, 5)


def test_output_transform_picks_the_output():
    model, x = KeywordModel(), inputs()
    graph = accelprune.ModelGraph(model, x, output_transform=lambda out: out.logits)
    assert graph.reference_shapes == [(2, 6, 5)]
    with pytest.raises(TypeError, match="output_transform"):
        accelprune.ModelGraph(model, x, output_transform=3)


def test_eval_mode_restores_every_flag_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model[1].eval()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training
        raise RuntimeError
    assert model.training and model[0].training and not model[1].training


def test_first_sample():
    assert first_sample(torch.zeros(4, 3)).shape == (1, 3)
    assert first_sample({"a": torch.zeros(4, 3), "n": 3})["a"].shape == (1, 3)


def test_failed_trace_leaves_no_hooks():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).reshape(3, -1)  # fails

    model = Broken()
    with pytest.raises(ValueError, match="module ''|forward on example_inputs failed"):
        accelprune.ModelGraph(model, torch.randn(2, 4))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks

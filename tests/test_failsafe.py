"""Every public call is all or nothing: a failure leaves the model exactly as it was (weights,
widths, hooks, flags, forward output, deepcopy), checked by tests/failsafe.py."""
import copy
import warnings

import pytest
import torch
from failsafe import leaves_unchanged
from torch import nn
from torch.nn.utils import prune as torch_prune

import accelprune
from accelprune import fusion, surgery


class Boom(nn.Module):
    """Fails whenever autograd is on (tracing), works under no_grad (the check's forward)."""

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("boom")
        return x


class Net(nn.Module):
    """conv-BN-ReLU ×3, pool, fc; ``middle`` sits between the first two blocks."""

    def __init__(self, middle: nn.Module | None = None):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.middle = middle if middle is not None else nn.Identity()
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():  # distinct BN scales: every method prunes something
            for bn in (self.b1, self.b2, self.b3):
                bn.weight.copy_(torch.linspace(0.1, 1.0, bn.num_features))

    def forward(self, x):
        x = self.middle(torch.relu(self.b1(self.c1(x))))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


def _scripted_net():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        return Net(torch.jit.script(nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())))


def _inputs():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


CALLS = {
    "ModelGraph": lambda m, x: accelprune.ModelGraph(m, x),
    "prune": lambda m, x: accelprune.prune(m, x, 0.5, "l1"),
    "prune_global": lambda m, x: accelprune.prune(m, x, 0.5, "l2", global_ranking=True),
    "prune_with_reprune": lambda m, x: accelprune.prune_with(m, x, 0.5, "reprune"),
    "prune_with_csgd": lambda m, x: accelprune.prune_with(m, x, 0.5, "csgd"),
    "REPrune": lambda m, x: accelprune.REPrune(m, x, 0.5),
    "CSGD": lambda m, x: accelprune.CSGD(m, x, 0.5),
    "prune_to_macs": lambda m, x: accelprune.prune_to_macs(m, x, "l1", 0.3, max_iterations=2),
}


@pytest.mark.parametrize("call", CALLS)
def test_a_forward_error_while_tracing_leaves_nothing_behind(call):
    model, x = Net(Boom()), _inputs()
    # (no backward check: Boom fails whenever autograd is on)
    with leaves_unchanged(model, x, backward=False,
                          match="forward on example_inputs failed in module 'middle'"):
        CALLS[call](model, x)


@pytest.mark.parametrize("call", CALLS)
def test_a_scripted_submodule_leaves_nothing_behind(call):
    model, x = _scripted_net(), _inputs()
    with leaves_unchanged(model, x, match="scripted"):
        CALLS[call](model, x)
    with torch.no_grad():
        model(x)
    copy.deepcopy(model)


def _fail_on_call(monkeypatch, owner, name: str, n: int):
    """Make ``owner.name`` raise on its n-th call (1-based), after the earlier calls ran."""
    real = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError(f"injected failure in call {n} of {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.mark.parametrize("call", ["prune", "prune_global", "prune_with_reprune",
                                  "prune_with_csgd"])
def test_surgery_failing_on_a_later_group_restores_everything(call, monkeypatch):
    model, x = Net(), _inputs()
    calls = _fail_on_call(monkeypatch, surgery, "cut_group", 2)
    with leaves_unchanged(model, x, match="restored unchanged"):
        CALLS[call](model, x)
    assert len(calls) >= 2


def test_model_graph_prune_groups_is_all_or_nothing(monkeypatch):
    model, x = Net(), _inputs()
    graph = accelprune.ModelGraph(model, x)
    widths = [g.n_channels for g in graph.groups]
    plan = [(g, [0, 1]) for g in graph.groups]
    assert len(plan) >= 2
    _fail_on_call(monkeypatch, surgery, "cut_group", 2)
    with leaves_unchanged(model, x, match="restored unchanged"):
        graph.prune_groups(plan)
    assert [g.n_channels for g in graph.groups] == widths


def test_reprune_step_failure_leaves_model_optimizer_and_pruner_as_they_were(monkeypatch):
    model, x = Net(), _inputs()
    pruner = accelprune.REPrune(model, x, 0.5, schedule="linear", delta_t=1, t_prune=2)
    widths = [g.n_channels for g in pruner.groups]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    optimizer.step()
    params_before = [p for g in optimizer.param_groups for p in g["params"]]
    momentum = {id(p): optimizer.state[p]["momentum_buffer"].clone() for p in params_before}
    _fail_on_call(monkeypatch, surgery, "cut_group", 2)
    with leaves_unchanged(model, x, match="restored unchanged"):
        pruner.step(1, optimizer)
    assert [p for g in optimizer.param_groups for p in g["params"]] == params_before
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], momentum[id(p)])
               for p in params_before)
    assert pruner.events == [] and [g.n_channels for g in pruner.groups] == widths
    monkeypatch.undo()
    pruner.step(1, optimizer)  # and it still works afterwards
    assert len(pruner.events) == 1


def test_csgd_prune_failing_on_a_later_group_restores_everything(monkeypatch):
    model, x = Net(), _inputs()
    csgd = accelprune.CSGD(model, x, 0.5)
    _fail_on_call(monkeypatch, surgery, "cut_group", 2)
    with leaves_unchanged(model, x, match="restored unchanged"):
        csgd.prune()
    assert not csgd.pruned
    monkeypatch.undo()
    csgd.prune()
    assert csgd.pruned and model.c2.out_channels == 4


def test_fold_and_prune_failure_restores_the_group(monkeypatch):
    model, x = Net(), _inputs()
    graph = accelprune.ModelGraph(model, x)
    _fail_on_call(monkeypatch, surgery, "cut_group", 1)
    with leaves_unchanged(model, x, match="restored unchanged"):
        accelprune.fold_and_prune(graph.groups[0], [0, 0, 1, 1, 2, 2, 3, 3])


def test_construction_refusals_leave_the_model_alone():
    class NoBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))

    model, x = NoBN(), _inputs()
    with leaves_unchanged(model, x, match="unknown budget"):
        accelprune.REPrune(model, x, 0.5, prune_stem=True, budget="gamma-only")
    with leaves_unchanged(model, x, match="backend"):
        accelprune.CSGD(model, x, 0.5, backend="cuda-magic")
    with leaves_unchanged(model, x, match="no module named"):
        accelprune.prune(model, x, 0.5, ignored_layers=["nope"])


@pytest.mark.parametrize("inplace", [True, False])
def test_fuse_conv_bn_failing_on_a_later_pair_leaves_the_model_as_it_was(inplace, monkeypatch):
    model, x = Net().train(), _inputs()
    _fail_on_call(monkeypatch, fusion, "fuse_conv_bn_eval", 2)
    with leaves_unchanged(model, x, match="injected"):
        accelprune.fuse_conv_bn(model, inplace=inplace)


@pytest.mark.parametrize("scope, target", [("layer", "l1_unstructured"),
                                           ("global", "custom_from_mask")])
def test_magnitude_prune_failing_on_a_later_tensor_leaves_no_mask(scope, target, monkeypatch):
    model, x = Net(), _inputs()
    _fail_on_call(monkeypatch, torch_prune, target, 2)
    with leaves_unchanged(model, x, match="injected"):
        accelprune.magnitude_prune(model, 0.5, scope=scope)
    assert not any(torch_prune.is_pruned(m) for m in model.modules())


@pytest.mark.parametrize("earlier", [1, 2])
def test_magnitude_prune_failure_keeps_existing_masks(monkeypatch, earlier):
    model, x = Net(), _inputs()
    for step in range(earlier):  # two earlier calls: the hooks are PruningContainers
        accelprune.magnitude_prune(model, 0.2 * (step + 1), scope="layer")
    methods = {id(h): h._pruning_methods for m in model.modules()
               for h in m._forward_pre_hooks.values()
               if isinstance(h, torch_prune.PruningContainer)}
    _fail_on_call(monkeypatch, torch_prune, "l1_unstructured", 3)
    with leaves_unchanged(model, x, match="injected"):
        accelprune.magnitude_prune(model, 0.7, scope="layer")
    assert methods == {id(h): h._pruning_methods for m in model.modules()
                       for h in m._forward_pre_hooks.values()
                       if isinstance(h, torch_prune.PruningContainer)}


@pytest.mark.parametrize("call", ["ModelGraph", "prune", "prune_with_reprune", "REPrune",
                                  "CSGD"])
def test_meta_device_models_are_refused_clearly(call):
    with torch.device("meta"):
        model = Net()
    with pytest.raises(ValueError, match="meta tensors"):
        CALLS[call](model, _inputs())
    with pytest.raises(ValueError, match="meta tensors"):
        CALLS[call](Net(), torch.empty(2, 3, 8, 8, device="meta"))


@pytest.mark.parametrize("training", [False, True])
def test_module_snapshot_puts_back_attributes_and_mode(training):
    from accelprune.surgery import ModuleSnapshot

    layer = nn.Linear(4, 3).train(training)
    weight = layer.weight
    snapshot = ModuleSnapshot([layer])
    layer.weight = nn.Parameter(torch.zeros(2, 4))
    layer.out_features, layer.added = 2, 7
    layer.train(not training)
    snapshot.restore()
    assert layer.weight is weight and layer.out_features == 3
    assert not hasattr(layer, "added") and layer.training is training
    assert layer(torch.randn(1, 4)).shape == (1, 3)


def test_a_failed_checked_change_puts_back_members_and_other_modules():
    """apply_checked's snapshot (ModelSnapshot: a ModuleSnapshot of the group's members, the
    other modules' parameters, the graph's maps, the widths): after a change that cut the group,
    added an attribute to a member, rebound a non-member's parameter and switched a mode, then
    failed, every object is back and the graph prunes as before."""
    model, x = Net(), _inputs()
    graph = accelprune.ModelGraph(model, x)
    group = next(g for g in graph.groups if g.name == "c1")
    widths = [g.n_channels for g in graph.all_groups]

    def change():
        surgery.cut_group(graph, group, [0, 2, 4])
        model.c2.scratch = 1  # c2 is a member (a consumer of c1's channels)
        model.fc.weight = nn.Parameter(torch.zeros(3, 6))  # fc is not
        model.b1.train(not model.b1.training)
        raise RuntimeError("injected")

    with leaves_unchanged(model, x, match="injected"):
        surgery.apply_checked(graph, [group], change)
    assert not hasattr(model.c2, "scratch")
    assert [g.n_channels for g in graph.all_groups] == widths
    graph.prune_channels(group, [1, 3])
    assert model.c1.out_channels == model.c2.in_channels == 2
    assert model(x).shape == (2, 3)

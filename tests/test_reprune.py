"""REPrune: per-layer selection, the global BN threshold, optimizer-state carry-over, the
Torch-Pruning adapter, and the pipeline on real models (ALGORITHMS.md section 3)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.cluster.hierarchy as sch
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from accelprune import REPruneImportance, layer_keep_counts, reprune_select
from accelprune import csgd as csgd_mod
from accelprune.csgd import feeds_attention
from accelprune.graph import ModelGraph
from accelprune.optim_state import track_parameters


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Rows of a and b group the same points together (numbering may differ)."""
    return all(np.array_equal(x[:, None] == x[None, :], y[:, None] == y[None, :])
               for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def resnet18_convs():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d)}


# ---------------------------------------------------------------------------------------------
# reprune_select


@pytest.mark.parametrize("layer,k", [("layer1.0.conv1", 32), ("layer2.0.conv2", 77),
                                     ("layer2.0.downsample.0", 100), ("layer1.1.conv2", 1)])
def test_native_and_reference_select_the_same_filters(resnet18_convs, layer, k):
    w = resnet18_convs[layer]
    fast = reprune_select(w, k, seed=1, return_details=True)
    ref = reprune_select(w, k, seed=1, backend="reference", return_details=True)
    np.testing.assert_array_equal(fast.kept, ref.kept)
    assert fast.height == pytest.approx(ref.height, rel=1e-12)
    assert _same_partition(fast.labels, ref.labels)
    assert fast.covered == ref.covered


def test_parity_with_tied_kernels():
    # integer kernels: many equal merge heights, where merge order may legitimately differ
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-2, 3, (40, 6, 3, 3), generator=gen).float()
    for k in (5, 20, 39):
        for tie_break in ("random", "index"):
            fast = reprune_select(w, k, tie_break=tie_break, return_details=True)
            ref = reprune_select(w, k, tie_break=tie_break, backend="reference",
                                 return_details=True)
            np.testing.assert_array_equal(fast.kept, ref.kept)
            assert _same_partition(fast.labels, ref.labels)


def test_selection_follows_the_spec(resnet18_convs):
    """h_l, the cut and the greedy, recomputed independently with scipy."""
    w = resnet18_convs["layer1.0.conv2"][:24, :10]  # (24, 10, 3, 3)
    n, k = 24, 9
    sel = reprune_select(w, k, tie_break="index", backend="reference", return_details=True)
    problems = w.reshape(n, 10, 9).permute(1, 0, 2).double().numpy()
    Zs = [sch.linkage(p, "ward") for p in problems]
    h = max(Z[n - k - 1, 2] for Z in Zs)
    assert sel.height == h
    expected = np.stack([sch.fcluster(Z, h, "distance") for Z in Zs])
    assert _same_partition(sel.labels, expected)
    assert all(len(np.unique(row)) <= k for row in sel.labels)
    # greedy with index ties, spelled out
    covered, chosen = set(), []
    for _ in range(k):
        gain = {i: len({(j, expected[j, i]) for j in range(10)} - covered)
                for i in range(n) if i not in chosen}
        best = max(gain, key=lambda i: (gain[i], -i))
        chosen.append(best)
        covered |= {(j, expected[j, best]) for j in range(10)}
    assert sel.kept.tolist() == chosen
    assert sel.covered == len(covered)


def test_select_output_and_input_untouched(resnet18_convs):
    w = resnet18_convs["layer1.0.conv1"]
    before = w.clone()
    kept = reprune_select(w, 20, seed=5)
    assert torch.equal(w, before)
    assert kept.dtype == np.int64 and kept.shape == (20,)
    assert len(set(kept.tolist())) == 20 and kept.min() >= 0 and kept.max() < 64
    np.testing.assert_array_equal(kept, reprune_select(w.numpy(), 20, seed=5))  # numpy in, same out


def test_k_equal_n_keeps_all_and_linear_weights_work():
    w = torch.randn(12, 7)
    np.testing.assert_array_equal(reprune_select(w, 12), np.arange(12))
    kept = reprune_select(w, 4, return_details=True)
    assert len(kept.kept) == 4 and kept.labels.shape == (7, 12)


def test_coupled_weights_share_one_selection():
    torch.manual_seed(0)
    a, b = torch.randn(16, 8, 3, 3), torch.randn(16, 4, 1, 1)
    sel = reprune_select([a, b], 6, return_details=True)
    assert sel.labels.shape == (12, 16)
    ref = reprune_select([a, b], 6, backend="reference", return_details=True)
    np.testing.assert_array_equal(sel.kept, ref.kept)


@pytest.mark.parametrize("k", [0, -1, 13])
def test_select_rejects_k_out_of_range(k):
    with pytest.raises(ValueError, match="k must be in"):
        reprune_select(torch.randn(12, 3, 3, 3), k)


def test_select_rejects_bad_input():
    w = torch.randn(8, 3, 3, 3)
    with pytest.raises(TypeError, match="k must be an integer"):
        reprune_select(w, 2.0)
    bad = w.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        reprune_select(bad, 2)
    with pytest.raises(ValueError, match="backend"):
        reprune_select(w, 2, backend="numba")
    with pytest.raises(ValueError, match="number of filters"):
        reprune_select([w, torch.randn(9, 3, 3, 3)], 2)
    with pytest.raises(ValueError, match="at least one filter"):
        reprune_select(torch.randn(8, 0, 3, 3), 2)
    with pytest.raises(ValueError, match="must be"):
        reprune_select(torch.randn(8), 2)


# ---------------------------------------------------------------------------------------------
# the global BN threshold


def test_keep_counts_reach_the_target_exactly_when_floors_allow():
    rng = np.random.default_rng(0)
    widths = [16, 32, 64, 8]
    scores = [rng.random(n) for n in widths]
    for target in (120, 60, 30, 20):
        k, gamma = layer_keep_counts(scores, widths, target, min_keep_ratio=0.05)
        assert sum(k) == target
        # the threshold rule: below γ* pruned, above kept (unless the floor holds the layer)
        for s, n, kl in zip(scores, widths, k, strict=True):
            floor = max(1, int(np.ceil(0.05 * n)))
            assert kl == max(floor, n - int((s <= gamma).sum()))


def test_keep_counts_never_go_below_target_and_keep_floors():
    widths = [10, 20]
    scores = [np.full(10, 1e-3), np.linspace(0.5, 1.0, 20)]  # layer 0: every γ below any threshold
    k, _ = layer_keep_counts(scores, widths, 8, min_keep_ratio=0.2)
    assert k[0] == 2  # its floor: ceil(0.2 * 10)
    assert k == [2, 6]
    k, _ = layer_keep_counts(scores, widths, 1, min_keep_ratio=0.2)  # floors stop it: 2 + 4 > 1
    assert k == [2, 4]


def test_keep_counts_spread_equal_scores_in_proportion():
    widths = [16, 32, 64]
    k, _ = layer_keep_counts([np.ones(n) for n in widths], widths, 56, min_keep_ratio=0.05)
    assert k == [8, 16, 32]


def test_keep_counts_measure_against_original_widths():
    # a layer already pruned from 40 to 30: floor is a share of 40, nothing to do at its target
    k, gamma = layer_keep_counts([np.ones(30)], [40], 30, min_keep_ratio=0.5)
    assert k == [30] and gamma == -np.inf
    k, _ = layer_keep_counts([np.ones(30)], [40], 10, min_keep_ratio=0.5)
    assert k == [20]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.data())
def test_keep_counts_properties(widths, data):
    """Floors hold, never below target, exactly the target when floors allow, and a layer's
    kept channels are its highest scores (the threshold rule)."""
    ratio = data.draw(st.sampled_from([0.0, 0.05, 0.3]))
    scores = [np.array(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), float)
              for n in widths]  # small integers: many ties
    target = data.draw(st.integers(0, sum(widths)))
    k, gamma = layer_keep_counts(scores, widths, target, min_keep_ratio=ratio)
    floors = [max(1, int(np.ceil(ratio * n - 1e-9))) for n in widths]
    assert all(f <= kl <= n for f, kl, n in zip(floors, k, widths, strict=True))
    assert sum(k) == max(target, sum(floors))
    for s, kl, n, floor in zip(scores, k, widths, floors, strict=True):
        if kl < n:  # as many channels went as there are scores at or below γ* (ties may stay)
            assert np.sort(s)[n - kl - 1] <= gamma
        if kl > floor:  # unless the floor held the layer, every score below γ* went
            assert (s < gamma).sum() <= n - kl


def test_keep_counts_reject_bad_input():
    with pytest.raises(ValueError, match="target"):
        layer_keep_counts([np.ones(4)], [4], -1)
    with pytest.raises(ValueError, match="widths"):
        layer_keep_counts([np.ones(4)], [4, 4], 2)
    with pytest.raises(ValueError, match="NaN"):
        layer_keep_counts([np.array([1.0, np.nan])], [2], 1)
    with pytest.raises(ValueError, match="original width"):
        layer_keep_counts([np.ones(5)], [4], 2)


# ---------------------------------------------------------------------------------------------
# optimizer state through Torch-Pruning surgery


class _Tiny(nn.Module):
    """conv-bn-relu twice, then a classifier: small enough to be instant."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _small_net():
    torch.manual_seed(0)
    return _Tiny()


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_optimizer_state_of_kept_channels_is_carried_exactly(opt_cls):
    model, x = _small_net(), torch.randn(2, 3, 8, 8)
    kwargs = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
    opt = opt_cls(model.parameters(), lr=0.01, **kwargs)
    model(x).sum().backward()
    opt.step()
    conv1, conv2 = model.conv1, model.conv2
    old_state = {name: {k: v.clone() for k, v in opt.state[p].items()}
                 for name, p in [("c1", conv1.weight), ("c2", conv2.weight),
                                 ("fc", model.fc.weight)]}
    old_grad = conv1.weight.grad.clone()
    fc_weight = model.fc.weight
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    pruned = [1, 5, 7, 63]
    keep = [i for i in range(64) if i not in pruned]
    with track_parameters(model) as tracker:
        graph.get_pruning_group(conv1, tp.prune_conv_out_channels, idxs=pruned).prune()
    assert tracker.remap(opt) is opt
    new1, new2 = model.conv1.weight, model.conv2.weight
    for key, value in old_state["c1"].items():
        expected = value[keep] if value.dim() else value
        assert torch.equal(opt.state[new1][key], expected), key
    for key, value in old_state["c2"].items():
        expected = value[:, keep] if value.dim() else value
        assert torch.equal(opt.state[new2][key], expected), key
    assert torch.equal(new1.grad, old_grad[keep])  # real gradients travel too
    assert model.fc.weight is fc_weight  # untouched parameters keep their state
    assert all(torch.equal(opt.state[fc_weight][key], value)
               for key, value in old_state["fc"].items())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()  # a training step on the new parameters works


def test_tracker_restores_gradients_when_surgery_fails():
    model, x = _small_net(), torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with track_parameters(model):
            raise RuntimeError("boom")
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# Torch-Pruning adapter


def _rows_kept(old: torch.Tensor, new: torch.Tensor) -> list[int]:
    """Which rows of old survive in new (weights are random: rows are unique)."""
    return sorted(int((old - row).abs().flatten(1).sum(1).argmin()) for row in new)


@pytest.mark.parametrize("ratio", [0.4, 0.75])
def test_metapruner_with_reprune_importance_keeps_the_reprune_selection(ratio):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
                        nn.Conv2d(20, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))
    w0, w3 = net[0].weight.detach().clone(), net[3].weight.detach().clone()
    x = torch.randn(1, 3, 16, 16)
    pruner = tp.pruner.MetaPruner(net, x, importance=REPruneImportance(ratio, seed=3),
                                  pruning_ratio=ratio, ignored_layers=[net[8]])
    pruner.step()
    k0, k3 = int(20 * (1 - ratio)), int(24 * (1 - ratio))
    kept0 = _rows_kept(w0, net[0].weight.detach())
    assert kept0 == sorted(reprune_select(w0, k0, seed=3).tolist())
    # conv 3's importance was computed before anything was pruned: on its original weights
    kept3 = _rows_kept(w3[:, kept0], net[3].weight.detach())
    assert kept3 == sorted(reprune_select(w3, k3, seed=3).tolist())


# ---------------------------------------------------------------------------------------------
# the pipeline on real models


def _n_kept(pruner) -> int:
    return sum(g.n_channels for g in pruner.groups)


def _out_channels(model) -> dict[str, int]:
    return {n: m.weight.shape[0] for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def _resnet56():
    from accelprune.models import resnet56

    torch.manual_seed(0)
    return resnet56(), torch.randn(2, 3, 32, 32)


def _resnet50():
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None), torch.randn(1, 3, 64, 64)


def _randomise_gamma(model, seed=0):
    """Trained-like, distinct BN scales (random init has all γ = 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.9 + 0.1)


def _residual_outputs(model) -> list[str]:
    """Convs whose outputs feed a residual add in torchvision-style / CIFAR ResNets."""
    names = []
    for n, m in model.named_modules():
        last = "conv3" if hasattr(m, "conv3") else "conv2" if hasattr(m, "conv2") else None
        if last and hasattr(m, "conv1"):
            names.append(f"{n}.{last}")
            for sub_name, sub in m.named_modules():
                if isinstance(sub, nn.Conv2d) and sub_name not in ("conv1", "conv2", "conv3"):
                    names.append(f"{n}.{sub_name}")  # the shortcut's projection
    return names


@pytest.mark.parametrize("build,gamma",
                         [(_resnet56, "init"), (_resnet56, "random"), (_resnet50, "random")],
                         ids=["resnet56-init", "resnet56-random", "resnet50-random"])
def test_one_event_reaches_the_global_target(build, gamma):
    from accelprune import REPrune

    model, x = build()
    if gamma == "random":
        _randomise_gamma(model)
    with torch.no_grad():
        out_before = model.eval()(x).shape
    widths_before = _out_channels(model)
    pruner = REPrune(model, x, 0.5)
    assert all(not g.coupled for g in pruner.groups)
    # a CNN: no group is searched for attention, and none would have been found
    assert pruner.graph.attention_free
    assert not any(feeds_attention(g) for g in pruner.graph.groups)
    original = pruner.original_channels
    pruner.prune()
    assert _n_kept(pruner) == round(0.5 * original)
    widths_after = _out_channels(model)
    untouched = _residual_outputs(model) + ["conv1", "fc"]
    assert all(widths_after[n] == widths_before[n] for n in untouched)
    # the classifier's input too
    assert model.fc.in_features == widths_before[_residual_outputs(model)[-2]]
    pruned = [n for n in widths_before if widths_after[n] < widths_before[n]]
    assert pruned and all(n not in untouched for n in pruned)
    with torch.no_grad():
        assert model.eval()(x).shape == out_before


def test_native_and_reference_pipelines_prune_alike():
    from accelprune import REPrune
    from accelprune.models import resnet20

    kept = {}
    for backend in ("auto", "reference"):
        torch.manual_seed(0)
        model = resnet20()
        _randomise_gamma(model)
        pruner = REPrune(model, torch.randn(2, 3, 32, 32), 0.4, backend=backend, seed=7)
        pruner.prune()
        kept[backend] = [(r.name, r.kept_indices) for r in pruner.events[-1].layers]
    assert kept["auto"] == kept["reference"]


def _count_group_searches(monkeypatch) -> list[str]:
    """The names of the groups feeds_attention searches one by one from now on."""
    searched = []
    search = csgd_mod._group_feeds_attention

    def counted(group):
        searched.append(group.name)
        return search(group)

    monkeypatch.setattr(csgd_mod, "_group_feeds_attention", counted)
    return searched


def test_feeds_attention_searches_no_group_of_a_cnn(monkeypatch):
    from accelprune.models import resnet20

    torch.manual_seed(0)
    graph = ModelGraph(resnet20(), torch.randn(2, 3, 16, 16), prune_coupled=True)
    searched = _count_group_searches(monkeypatch)
    with graph.unchanged():
        assert not any(feeds_attention(g) for g in graph.groups)
        assert searched == []  # the graph-wide answer stands for every group
        assert not any(csgd_mod._group_feeds_attention(g) for g in graph.groups)  # as searched
    assert len(searched) == len(graph.groups) > 0


def test_feeds_attention_on_a_llama_searches_every_group_as_before(monkeypatch):
    pytest.importorskip("transformers")
    from toy_models import tiny_llama

    model = tiny_llama(layers=2)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    graph = ModelGraph(model, tokens, prune_coupled=True)
    searched = _count_group_searches(monkeypatch)
    with graph.unchanged():  # all_groups: the heads' q/k (kept out of groups) feed attention
        answers = {g.name: feeds_attention(g) for g in graph.all_groups}
    assert searched == [g.name for g in graph.all_groups]
    assert {n for n, a in answers.items() if a} == {f"model.layers.{i}.self_attn.q_proj"
                                                    for i in range(2)}
    assert not answers["model.layers.0.self_attn.o_proj"]  # the residual stream


def test_attention_free_is_worked_out_once_per_graph():
    from accelprune.models import resnet20

    torch.manual_seed(0)
    graph = ModelGraph(resnet20(), torch.randn(2, 3, 16, 16))
    assert "attention_free" not in vars(graph)  # not at construction: only when asked
    assert graph.attention_free
    assert vars(graph)["attention_free"] is True  # remembered on the graph
    graph.prune_channels(graph.groups[0], [0, 1])
    del graph.attention_free
    assert graph.attention_free  # looked at anew after surgery: the same answer


def test_schedule_never_prunes_past_its_target_nor_compounds():
    from accelprune import REPrune
    from accelprune.models import resnet20

    torch.manual_seed(0)
    model = resnet20()
    _randomise_gamma(model)
    x = torch.randn(2, 3, 32, 32)
    pruner = REPrune(model, x, 0.6, schedule="linear", delta_t=2, t_prune=7)
    original, history = pruner.original_channels, []
    for epoch in range(10):
        pruner.step(epoch)
        target = round((1 - pruner.target_at(epoch)) * original)
        history.append(_n_kept(pruner))
        assert history[-1] >= target
        if pruner.due(epoch):
            assert history[-1] == target  # measured against the original widths: no compounding
    assert history == sorted(history, reverse=True)
    assert [e.epoch for e in pruner.events] == [2, 4, 6]  # epoch 0: s = 0; no events after t_prune
    assert history[-1] == round(0.4 * original)


def test_a_layer_with_all_gamma_below_the_threshold_keeps_its_floor():
    from accelprune import REPrune
    from accelprune.models import resnet20

    torch.manual_seed(0)
    model = resnet20()
    _randomise_gamma(model)
    with torch.no_grad():
        model.layer1[0].bn1.weight.fill_(1e-4)
    pruner = REPrune(model, torch.randn(2, 3, 32, 32), 0.5, min_keep_ratio=0.25)
    pruner.prune()
    assert model.layer1[0].conv1.out_channels == 4  # ceil(0.25 * 16)
    assert _n_kept(pruner) == round(0.5 * pruner.original_channels)


def test_event_carries_momentum_of_kept_channels_and_training_continues():
    from accelprune import REPrune
    from accelprune.models import resnet20

    torch.manual_seed(0)
    model = resnet20()
    _randomise_gamma(model)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    conv1, conv2 = model.layer2[1].conv1, model.layer2[1].conv2
    m1, m2 = (opt.state[c.weight]["momentum_buffer"].clone() for c in (conv1, conv2))
    pruner = REPrune(model, x, 0.5)
    assert pruner.step(0, opt) is opt
    record = next(r for r in pruner.events[-1].layers if r.name == "layer2.1.conv1")
    keep = sorted(record.kept_indices)
    assert 0 < len(keep) < 32
    new1, new2 = model.layer2[1].conv1.weight, model.layer2[1].conv2.weight
    assert torch.equal(opt.state[new1]["momentum_buffer"], m1[keep])
    assert torch.equal(opt.state[new2]["momentum_buffer"], m2[:, keep])
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_report_describes_the_event(capsys):
    from accelprune import REPrune
    from accelprune.models import resnet20

    torch.manual_seed(0)
    model = resnet20()
    _randomise_gamma(model)
    pruner = REPrune(model, torch.randn(2, 3, 32, 32), 0.5, progress=True)
    pruner.prune()
    assert "REPrune" in capsys.readouterr().err  # the tqdm bar
    rep = pruner.report()
    assert rep.params_after < rep.params_before and rep.macs_after < rep.macs_before
    assert rep.kept_channels == _n_kept(pruner) and rep.sparsity == pytest.approx(0.5, abs=0.01)
    for r in rep.layers:
        assert r.kept == dict(model.named_modules())[r.name].out_channels
        if r.height is not None:
            assert r.height > 0
            assert 1 <= r.clusters_min <= r.clusters_mean <= r.clusters_max <= r.kept
            assert 0 < r.coverage <= 1
    text = str(rep)
    assert "layer1.0.conv1" in text and "sparsity" in text
    assert rep.to_dict()["kept_channels"] == rep.kept_channels


def test_training_with_scheduled_events_reaches_target_and_learns():
    """sklearn's digits, resized to 3x32x32; events at epochs 1, 2, 3 (cubic ramp), Adam state
    carried through each; the last conv feeds a Linear through flatten."""
    from sklearn.datasets import load_digits

    from accelprune import REPrune

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float()[:512, None]
    images = nn.functional.interpolate(images, size=(32, 32), mode="bilinear").expand(-1, 3, -1, -1)
    images = ((images - images.mean()) / images.std()).contiguous()
    labels = torch.from_numpy(digits.target)[:512]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    pruner = REPrune(model, images[:2], 0.5, schedule="cubic", delta_t=1, t_prune=3)
    losses = []
    for epoch in range(6):
        model.train()
        total = 0.0
        for i in range(0, len(images), 64):
            loss = nn.functional.cross_entropy(model(images[i:i + 64]), labels[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total)
        opt = pruner.step(epoch, opt)
    assert [e.epoch for e in pruner.events] == [1, 2, 3]  # epoch 0: the ramp is still at 0
    assert _n_kept(pruner) == round(0.5 * pruner.original_channels)
    assert model[10].in_features == model[6].out_channels * 16 < 32 * 16
    assert losses[-1] < 0.2 * losses[0] and losses[-1] < losses[3]  # learns, also after the events


def test_pipeline_rejects_bad_input():
    from accelprune import REPrune

    model, x = _Tiny(), torch.randn(2, 3, 8, 8)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            REPrune(model, x, bad)
    with pytest.raises(ValueError, match="schedule"):
        REPrune(model, x, 0.5, schedule="quadratic")
    with pytest.raises(ValueError, match="t_prune"):
        REPrune(model, x, 0.5, schedule="linear")
    no_bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2))
    # without BatchNorm the budget ranks filter norms (issue 12): no longer refused
    no_bn_pruner = REPrune(no_bn, torch.randn(2, 3, 16, 16), 0.5)
    no_bn_pruner.prune()
    assert {r.score for r in no_bn_pruner.report().layers} == {"filter"}
    with pytest.raises(TypeError, match="Module"):
        REPrune("resnet", x, 0.5)


class _DenseConcat(nn.Module):
    """DenseNet's pattern: a conv's outputs are concatenated with its input and one BatchNorm
    normalises the concat, so that BatchNorm is wider than the conv's channel group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(14)
        self.head = nn.Conv2d(14, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.bn(torch.cat([x, self.conv(x)], 1)))).mean((2, 3))


def test_batchnorm_after_a_concat_scores_the_group_by_its_slice():
    """Regression (zoo sweep, DenseNet-121): REPrune stacked the |γ| of BatchNorms of different
    widths and crashed; a BatchNorm over a concat scores a group by the group's slice of it."""
    from accelprune import REPrune

    torch.manual_seed(0)
    model, x = _DenseConcat().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model.bn.weight.copy_(torch.arange(1.0, 15.0))
    pruner = REPrune(model, x, 0.3, prune_stem=True)
    scores = {g.name: pruner._score(g) for g in pruner.groups}
    assert scores["conv"][0] == "bn"
    np.testing.assert_array_equal(scores["conv"][1], np.arange(9.0, 15.0))  # channels 8..13
    np.testing.assert_array_equal(scores["stem"][1], np.arange(1.0, 9.0))   # channels 0..7
    pruner.prune()
    assert model.conv.out_channels + model.stem.out_channels == model.bn.num_features < 14
    assert model(x).shape == (1, 4)


class _EvalCache(nn.Module):
    """timm LeViT's habit: in eval mode the forward caches a tensor computed from a parameter
    in a plain dict attribute; under a traced forward (gradients on) it has autograd history."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.bias = nn.Parameter(torch.zeros(8))
        self.cache = {}

    def forward(self, x):
        if self.training:
            b = self.bias * 2
        else:
            b = self.cache.setdefault("b", self.bias * 2)
        x = torch.relu(self.bn1(self.conv1(x)))
        return (torch.relu(self.bn2(self.conv2(x))) + b[:, None, None]).mean((2, 3))


def test_a_module_caching_graph_tensors_can_be_copied_and_pruned():
    """Regression (zoo sweep, timm LeViT): REPrune's meta copy (and prune_to_macs' trial
    copies) deep-copied a cache holding tensors with autograd history and crashed."""
    from accelprune import REPrune, prune_to_macs
    from accelprune.reporting import meta_copy

    torch.manual_seed(0)
    model, x = _EvalCache().eval(), torch.randn(1, 3, 8, 8)
    model(x)  # the cache now holds a tensor with a grad_fn
    assert meta_copy(model).cache["b"].is_meta
    REPrune(model, x, 0.3, prune_stem=True).prune()
    assert model.conv1.out_channels < 8
    twin = _EvalCache().eval()
    twin(x)
    prune_to_macs(twin, x, "l1", 0.2, max_iterations=3, tolerance=0.2)
    assert twin.conv1.out_channels < 8


def test_a_producer_over_a_concat_is_skipped_by_name():
    """Regression (zoo sweep, timm GhostNet): a group whose producers make different numbers of
    channels (SE's expand conv over the ghost concat) stopped REPrune with 'weights disagree on
    the number of filters: [18, 36]'; it is now skipped, with the producer named."""
    from toy_models import GhostSE

    from accelprune import REPrune

    torch.manual_seed(0)
    model, x = GhostSE().eval(), torch.randn(1, 3, 8, 8)
    pruner = REPrune(model, x, 0.3, prune_stem=True)
    assert "expand" in pruner.skipped["primary"]
    pruner.prune()
    assert model.primary.out_channels == 4 and model(x).shape == (1, 5)

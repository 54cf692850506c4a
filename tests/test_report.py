import json

import pytest
import torch
from torch import nn

import accelprune
from accelprune.masks import magnitude_prune
from accelprune.reporting import (
    Report,
    layer_widths,
    measure_latency,
    meta_copy,
    model_stats,
    plot_importance,
    plot_layer_widths,
    report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(width=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(), nn.Flatten(), nn.Linear(width * 8 * 8, 10))


def hand_counted(width):
    """Params and per-sample MACs of tiny(width) on 3x8x8, in Torch-Pruning's convention."""
    hw = 8 * 8
    params = 3 * width * 9 + 2 * width + (width * hw) * 10 + 10
    macs = (9 * 3 * width * hw          # conv, no bias
            + 2 * width * hw            # affine BN
            + width * hw                # ReLU
            + width * hw * 10 + 10)     # Linear + bias
    return params, macs


X = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("width", [4, 2])
def test_model_stats_match_hand_count(width):
    params, macs = hand_counted(width)
    stats = model_stats(tiny(width), X)
    assert stats["params"] == params
    assert stats["macs"] == macs  # per sample, although X holds 3
    assert stats["macs"] == model_stats(tiny(width), X[:1])["macs"]


def test_meta_copy_shares_no_container_or_tensor_with_the_model():
    model = tiny()
    copy = meta_copy(model)
    assert all(p.is_meta for p in copy.parameters()) and all(b.is_meta for b in copy.buffers())
    containers = {id(v) for m in model.modules() for v in vars(m).values()
                  if isinstance(v, (dict, set))}
    assert not any(id(v) in containers for m in copy.modules() for v in vars(m).values()
                   if isinstance(v, (dict, set)))
    copy[0].register_forward_hook(lambda *args: None)  # a hook on the copy stays there
    assert not model[0]._forward_hooks
    assert [tuple(p.shape) for p in copy.parameters()] == [tuple(p.shape)
                                                            for p in model.parameters()]


def test_model_stats_counts_masked_zeros_and_leaves_model_alone():
    model = tiny()
    model.train()
    stats = model_stats(model, X)
    assert stats["nonzero_params"] == stats["params"] - 4  # BN biases start at exactly 0
    magnitude_prune(model, 0.5, parameters=["4"])
    masked = model_stats(model, X)
    assert masked["params"] == stats["params"]  # dense weight_orig is still stored
    assert masked["nonzero_params"] == stats["nonzero_params"] - round(0.5 * 256 * 10)
    assert model.training and all(m.training for m in model.modules())
    assert hasattr(model[4], "weight_mask")


def test_report_numbers_and_forms(tmp_path):
    before, after = tiny(4), tiny(2)
    rep = accelprune.report(before, after, X, repeats=3, warmup=1, accuracy=(0.91, 0.9))
    assert isinstance(rep, Report)
    (pb, mb), (pa, ma) = hand_counted(4), hand_counted(2)
    assert (rep.before["params"], rep.after["params"]) == (pb, pa)
    assert (rep.before["macs"], rep.after["macs"]) == (mb, ma)
    assert rep.compression == pytest.approx(pb / pa)
    assert rep.mac_reduction == pytest.approx(mb / ma)
    assert rep.latency_before > 0 and rep.latency_after > 0
    assert rep.speedup == pytest.approx(rep.latency_before / rep.latency_after)
    rows = {r.name: r for r in rep.layers}
    conv = rows["0"]
    assert (conv.in_before, conv.out_before, conv.in_after, conv.out_after) == (3, 4, 3, 2)
    assert rows["0"].kept_out == 0.5
    assert (rows["4"].in_before, rows["4"].in_after) == (256, 128)

    d = rep.to_dict()
    assert d["before"]["params"] == pb and d["after"]["macs"] == ma
    assert d["after"]["accuracy"] == 0.9
    assert d["layers"][0]["name"] == "0"
    path = tmp_path / "rep.json"
    text = rep.to_json(path)
    assert json.loads(text) == d == json.loads(path.read_text())

    table = str(rep)
    assert f"{pb / pa:.2f}x" in table and f"{mb / ma:.2f}x" in table
    assert "3->4" in table and "3->2" in table and "50.0%" in table and "0.91" in table


def test_report_without_latency_and_with_evaluate():
    calls = []

    def evaluate(model):
        calls.append(model)
        return 0.5 + len(calls) / 10

    before, after = tiny(4), tiny(2)
    rep = report(before, after, X, latency=False, evaluate=evaluate)
    assert calls == [before, after]
    assert (rep.accuracy_before, rep.accuracy_after) == (0.6, 0.7)
    assert rep.latency_before is None and rep.speedup is None
    assert "latency" in str(rep)


def test_layers_matched_by_name_when_one_side_lacks_a_layer():
    before = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1))
    after = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Identity(), nn.Conv2d(4, 2, 1))
    rows = {r.name: r for r in report(before, after, torch.zeros(1, 3, 2, 2), latency=False).layers}
    assert rows["1"].out_after is None and rows["1"].kept_out is None
    assert rows["2"].out_before is None and rows["2"].out_after == 2


def test_layer_widths():
    widths = layer_widths(tiny(3))
    assert widths == {"0": ("Conv2d", 3, 3), "4": ("Linear", 192, 10)}


def test_measure_latency_restores_mode_and_accepts_input_forms():
    model = tiny()
    model.train()
    assert measure_latency(model, X, repeats=2, warmup=0) > 0
    assert model.training

    class TwoInputs(nn.Module):
        def forward(self, a, b):
            return a + b

    assert measure_latency(TwoInputs(), (X, X), repeats=1) > 0
    assert measure_latency(TwoInputs(), {"a": X, "b": X}, repeats=1) > 0


def test_plots_write_png(tmp_path):
    rep = report(tiny(4), tiny(2), X, latency=False)
    widths_png = tmp_path / "widths.png"
    assert rep.plot_widths(widths_png) == str(widths_png)
    assert widths_png.read_bytes()[:8] == PNG_MAGIC
    assert plot_layer_widths(rep, tmp_path / "w2.png")

    conv = nn.Conv2d(16, 32, 3)
    imp_png = tmp_path / "importance.png"
    plot_importance(conv, imp_png, sparsity=0.5, title="conv")
    assert imp_png.read_bytes()[:8] == PNG_MAGIC
    scores_png = tmp_path / "scores.png"
    plot_importance(torch.rand(20), scores_png, threshold=0.3)
    assert scores_png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(scores=torch.rand(0)), ValueError, "empty"),
    (dict(scores=torch.rand(3, 3)), ValueError, "1-D"),
    (dict(scores=torch.tensor([1.0, float("nan")])), ValueError, "NaN"),
    (dict(scores=nn.ReLU()), TypeError, "Conv/Linear"),
    (dict(threshold=0.1, sparsity=0.5), ValueError, "not both"),
    (dict(sparsity=1.0), ValueError, "sparsity"),
    (dict(threshold=float("inf")), ValueError, "threshold"),
    (dict(bins=0), ValueError, "bins"),
])
def test_plot_importance_bad_input(tmp_path, kwargs, exc, match):
    kw = dict(scores=torch.rand(5))
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        plot_importance(path=tmp_path / "x.png", **kw)
    assert not (tmp_path / "x.png").exists()


def test_bad_input():
    m = tiny()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        model_stats("resnet", X)
    with pytest.raises(TypeError, match="example_inputs"):
        model_stats(m, None)
    with pytest.raises(TypeError, match="example_inputs"):
        model_stats(m, ())
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(m, X, repeats=0)
    with pytest.raises(TypeError, match="after"):
        report(m, None, X)
    with pytest.raises(ValueError, match="not both"):
        report(m, m, X, latency=False, accuracy=(1, 1), evaluate=lambda _: 1.0)
    with pytest.raises(TypeError, match="accuracy"):
        report(m, m, X, latency=False, accuracy=0.9)
    with pytest.raises(ValueError, match="accuracy"):
        report(m, m, X, latency=False, accuracy=(0.9, float("nan")))
    with pytest.raises(TypeError, match="Report"):
        plot_layer_widths({"layers": []}, "x.png")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stats_and_latency_on_cuda():
    model, x = tiny(4).cuda(), X.cuda()
    magnitude_prune(model, 0.5, parameters=["4"])
    stats = model_stats(model, x)
    assert (stats["params"], stats["macs"]) == hand_counted(4)
    assert measure_latency(model, x, repeats=3) > 0


def test_importance_figure_has_bars_sorted_curve_and_histogram(tmp_path):
    import matplotlib.image

    from accelprune.reporting import _importance_figure, _importance_inputs

    scores = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.7, 0.3], dtype=torch.float64)
    path = tmp_path / "imp.png"
    assert plot_importance(scores, path, sparsity=0.5) == str(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)  # decodes: a valid PNG, three panels wide
    assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0]

    values, pruned, threshold = _importance_inputs(scores, None, 0.5)
    assert pruned.tolist() == [False, True, False, True, False, True] and threshold == 0.3
    fig = _importance_figure(values, pruned, threshold, 30, "layer", ("bars", "sorted", "hist"))
    bars_ax, sorted_ax, hist_ax = fig.axes
    bars = bars_ax.patches
    assert len(bars) == 6 and [b.get_height() for b in bars] == pytest.approx(scores.tolist())
    red = [b.get_facecolor() for b in bars]
    assert red[1] == red[3] == red[5] != red[0]  # pruned channels stand out
    (curve, hline, vline) = sorted_ax.lines
    assert curve.get_ydata().tolist() == pytest.approx(sorted(scores.tolist()))
    assert hline.get_ydata()[0] == pytest.approx(0.3) and vline.get_xdata()[0] == 2.5
    assert any(line.get_ydata()[0] == pytest.approx(0.3) for line in bars_ax.lines)
    assert len(hist_ax.patches) == 30
    assert hist_ax.lines[0].get_xdata()[0] == pytest.approx(0.3)  # a value on the x axis
    assert [ax.get_title() for ax in fig.axes] == [
        "Importance per channel", "Sorted importance", "Importance distribution"]


def test_importance_figure_panels_and_threshold(tmp_path):
    from accelprune.reporting import _importance_inputs

    _, pruned, threshold = _importance_inputs(torch.tensor([1.0, 2.0, 2.0, 3.0]), 2.0, None)
    assert pruned.tolist() == [True, True, True, False] and threshold == 2.0
    _, pruned, threshold = _importance_inputs(torch.tensor([1.0, 2.0]), None, 0.0)
    assert not pruned.any() and threshold is None
    for panels in ("sorted", ["hist", "bars"]):
        path = tmp_path / f"{len(panels)}.png"
        plot_importance(nn.Linear(8, 16), path, sparsity=0.25, panels=panels)
        assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("panels, exc, match", [
    ((), ValueError, "empty"),
    (("bars", "pie"), ValueError, "unknown panel"),
    (("bars", "bars"), ValueError, "repeats"),
    (3, TypeError, "panels"),
])
def test_plot_importance_bad_panels(tmp_path, panels, exc, match):
    with pytest.raises(exc, match=match):
        plot_importance(torch.rand(5), tmp_path / "x.png", panels=panels)
    assert not (tmp_path / "x.png").exists()

"""What pruning bought: parameters, MACs, measured latency, per-layer widths, plots.

``accelprune.report(before, after, example_inputs)`` compares two models (keep a
``copy.deepcopy`` of the model before pruning it) and returns a :class:`Report`: ``print`` it for
a table, ``.to_dict()`` / ``.to_json()`` for machines, ``.plot_widths(path)`` for a figure.

This module is ``reporting`` rather than ``report`` so that the function ``accelprune.report``
does not collide with a submodule of the same name (importing a submodule rebinds the package
attribute, which would silently replace the function).

MACs come from Torch-Pruning's counter (:func:`torch_pruning.utils.count_ops_and_params`), so
numbers agree with what Torch-Pruning users quote. Its convention, per input sample: a conv
counts k_h·k_w·(c_in/groups)·c_out·H_out·W_out (+ c_out·H_out·W_out for a bias), a Linear
in·out (+ out for a bias), a BatchNorm 2·numel (affine), a ReLU / pooling numel of its
output / input. Parameters are ``sum(p.numel() for p in model.parameters())``; under
``torch.nn.utils.prune`` masks that counts the dense ``weight_orig``, so ``nonzero_params`` is
reported beside it.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from accelprune._validation import check_int
from accelprune.tables import format_table
from accelprune.tracing import (
    call_model,
    check_example_inputs,
    eval_mode,
    first_sample,
    output_tensors,
)

__all__ = [
    "LayerWidth",
    "Report",
    "layer_widths",
    "measure_latency",
    "model_stats",
    "plot_importance",
    "plot_layer_widths",
    "report",
]

_WIDTH_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d, nn.Linear)


# -- helpers -------------------------------------------------------------------------------------

def _check_model(model, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


# -- numbers -------------------------------------------------------------------------------------

def model_stats(model: nn.Module, example_inputs) -> dict:
    """``{"params": int, "macs": int, "nonzero_params": int}`` of ``model`` for one sample.

    MACs are per input sample (counted on the first sample of ``example_inputs``) by
    Torch-Pruning's op counter (see the module docstring for its convention). The model is not
    modified and its train/eval flags are kept. The counter runs on a twin of the model whose
    tensors live on the ``meta`` device (shapes only, no memory), so counting a large model
    never needs a second copy of its weights; a model whose forward cannot run on meta tensors
    (control flow on values, ``.item()``) is counted on real zeros of its shapes instead (one
    element each: :func:`_zeros_of_its_shapes`), so still without a copy; a forward whose work
    depends on the weights' values (routing) is then counted as zero weights route it.
    """
    stats = size_stats(model, example_inputs)
    nonzero = sum(int(torch.count_nonzero(p.detach() * m)) for p, m in _effective_weights(model))
    return {**stats, "nonzero_params": nonzero}


def size_stats(model: nn.Module, example_inputs) -> dict:
    """``{"params": int, "macs": int}`` as :func:`model_stats` counts them; also works on a model
    whose tensors are on the meta device (see :func:`meta_copy`), even one whose forward cannot
    run on meta tensors (it is then counted on :func:`_zeros_of_its_shapes`)."""
    _check_model(model)
    inputs = first_sample(check_example_inputs(example_inputs))
    with torch.no_grad(), eval_mode(model):
        try:
            macs = _count_macs(meta_copy(model), _to_meta(inputs))
        except Exception:  # any failure on meta tensors: count on real ones, without a copy
            macs = _count_macs(_zeros_of_its_shapes(model, inputs), inputs)
    params = sum(p.numel() for p in model.parameters())
    return {"params": int(params), "macs": int(round(macs))}


def _zeros_of_its_shapes(model: nn.Module, inputs) -> nn.Module:
    """A copy of ``model`` (real or on the meta device, as REPrune's record of the model before
    pruning) whose parameters and buffers are real zeros on the inputs' device, each one element
    expanded to its shape: a forward that needs values (a Hugging Face model reading its
    attention mask with ``.item()``) can run, and MACs depend only on shapes, without allocating
    the model's size. They are kept as plain tensors, whose deep copies (Torch-Pruning's counter
    makes one) stay one element; a Parameter's would be materialised."""
    found = output_tensors(inputs)
    device = found[0].device if found else torch.device("cpu")
    zeros = meta_copy(model)
    for module in zeros.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    table[name] = torch.zeros((), dtype=t.dtype, device=device).expand(t.shape)
    return zeros


def _count_macs(model: nn.Module, inputs) -> float:
    import torch_pruning as tp

    return tp.utils.count_ops_and_params(model, inputs)[0]  # works on its own deep copy


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors: the architecture
    and every shape, no storage (e.g. to count the MACs of a model as it was before pruning)."""
    memo = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
        for b in module._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = b.to("meta")
        # the empty hook dicts and sets every module holds, copied ahead: deepcopy's generic
        # route for them was half of the copy's time
        for v in vars(module).values():
            if type(v) in _EMPTY_COPIES and not v:
                memo[id(v)] = type(v)()
    memo.update(non_leaf_memo(model, lambda t: t.detach().to("meta")))
    return copy.deepcopy(model, memo)


def non_leaf_memo(model: nn.Module, convert) -> dict:
    """``copy.deepcopy`` memo entries for the tensors with autograd history that modules keep
    in plain attributes (or dicts, lists and tuples of them): deepcopy refuses such tensors.
    timm's LeViT caches its attention biases in eval mode, and a forward pass with gradients
    on (the trace of every pruner) leaves the cache holding graph tensors."""
    memo = {}

    def visit(v):
        if isinstance(v, torch.Tensor):
            if v.grad_fn is not None and id(v) not in memo:
                memo[id(v)] = convert(v)
        elif isinstance(v, dict):
            for w in v.values():
                visit(w)
        elif isinstance(v, (list, tuple)):
            for w in v:
                visit(w)

    for module in model.modules():
        for k, v in vars(module).items():
            if k not in ("_parameters", "_buffers", "_modules"):
                visit(v)
    return memo


_EMPTY_COPIES = (dict, collections.OrderedDict, set)


def _to_meta(inputs):
    if isinstance(inputs, torch.Tensor):
        return inputs.to("meta")
    if isinstance(inputs, dict):
        return {k: _to_meta(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_meta(v) for v in inputs)
    return inputs


def _effective_weights(model: nn.Module):
    """(parameter, mask) pairs covering every parameter once; mask is 1 unless the parameter is
    the ``*_orig`` of a ``torch.nn.utils.prune`` reparametrisation."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            mask = getattr(module, name[:-5] + "_mask", None) if name.endswith("_orig") else None
            yield p, (mask if isinstance(mask, torch.Tensor) else 1)


def measure_latency(model: nn.Module, example_inputs, *, repeats: int = 20,
                    warmup: int = 3) -> float:
    """Median wall-clock seconds of one forward pass (eval mode, ``torch.no_grad``).

    Medians of repeats are used because the machine may be shared and noisy. CUDA work is
    synchronised before each clock read. The model's train/eval flags are restored.
    """
    _check_model(model)
    inputs = check_example_inputs(example_inputs)
    repeats = check_int(repeats, "repeats", low=1)
    warmup = check_int(warmup, "warmup", low=0)
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else list(
        inputs.values() if isinstance(inputs, dict) else inputs)
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times = []
    # no_grad rather than inference_mode: under torch.nn.utils.prune masks the forward pre-hook
    # stores module.weight, which must stay usable by autograd afterwards.
    with torch.no_grad(), eval_mode(model):
        for _ in range(warmup):
            call_model(model, inputs)
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            call_model(model, inputs)
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclasses.dataclass
class LayerWidth:
    """One Conv/Linear layer's input and output width before and after (None: layer absent)."""
    name: str
    kind: str
    in_before: int | None
    out_before: int | None
    in_after: int | None
    out_after: int | None

    @property
    def kept_out(self) -> float | None:
        """Fraction of output channels kept."""
        if not self.out_before or self.out_after is None:
            return None
        return self.out_after / self.out_before


def layer_widths(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """``{module name: (type name, input width, output width)}`` of every Conv / Linear layer."""
    _check_model(model)
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            widths[name] = (type(m).__name__, m.in_features, m.out_features)
        elif isinstance(m, _WIDTH_LAYERS):
            widths[name] = (type(m).__name__, m.in_channels, m.out_channels)
    return widths


def _match_layers(before: nn.Module, after: nn.Module) -> list[LayerWidth]:
    """Layers matched by module name (surgery keeps names), in the order of ``before`` and then
    any layers only ``after`` has."""
    wb, wa = layer_widths(before), layer_widths(after)
    rows = []
    for name in list(wb) + [n for n in wa if n not in wb]:
        kb, ib, ob = wb.get(name, (None, None, None))
        ka, ia, oa = wa.get(name, (None, None, None))
        rows.append(LayerWidth(name, kb or ka, ib, ob, ia, oa))
    return rows


# -- the report ----------------------------------------------------------------------------------

def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


@dataclasses.dataclass
class Report:
    """Before/after comparison; see :func:`report`. Ratios are before / after (> 1 is better)."""
    before: dict
    after: dict
    latency_before: float | None
    latency_after: float | None
    layers: list[LayerWidth]
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    @property
    def compression(self) -> float | None:
        """Parameter compression ratio, params_before / params_after."""
        return _ratio(self.before["params"], self.after["params"])

    @property
    def mac_reduction(self) -> float | None:
        """Theoretical speed-up, MACs_before / MACs_after."""
        return _ratio(self.before["macs"], self.after["macs"])

    @property
    def speedup(self) -> float | None:
        """Measured speed-up, latency_before / latency_after (None when latency was skipped)."""
        return _ratio(self.latency_before, self.latency_after)

    def to_dict(self) -> dict:
        return {
            "before": dict(self.before, latency_s=self.latency_before,
                           accuracy=self.accuracy_before),
            "after": dict(self.after, latency_s=self.latency_after, accuracy=self.accuracy_after),
            "compression": self.compression,
            "mac_reduction": self.mac_reduction,
            "speedup": self.speedup,
            "layers": [dataclasses.asdict(row) for row in self.layers],
        }

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int = 2) -> str:
        """The :meth:`to_dict` form as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    def plot_widths(self, path: str | os.PathLike) -> str:
        """Bars of output channels per layer, before vs after (:func:`plot_layer_widths`)."""
        return plot_layer_widths(self, path)

    def __str__(self) -> str:
        def fmt_ratio(r):
            return "-" if r is None else f"{r:.2f}x"

        def fmt_ms(s):
            return "-" if s is None else f"{s * 1e3:.3f} ms"

        def fmt_acc(a):
            return "-" if a is None else f"{a:.4g}"

        b, a = self.before, self.after
        summary = [
            ("params", _human(b["params"]), _human(a["params"]), fmt_ratio(self.compression)),
            ("nonzero params", _human(b["nonzero_params"]), _human(a["nonzero_params"]),
             fmt_ratio(_ratio(b["nonzero_params"], a["nonzero_params"]))),
            ("MACs", _human(b["macs"]), _human(a["macs"]), fmt_ratio(self.mac_reduction)),
            ("latency (median)", fmt_ms(self.latency_before), fmt_ms(self.latency_after),
             fmt_ratio(self.speedup)),
        ]
        if self.accuracy_before is not None or self.accuracy_after is not None:
            summary.append(("accuracy", fmt_acc(self.accuracy_before),
                            fmt_acc(self.accuracy_after), ""))
        lines = [format_table(("", "before", "after", "before/after"), summary)]
        layer_rows = []
        for row in self.layers:
            kept = row.kept_out
            layer_rows.append((row.name, row.kind or "-", _width(row.in_before, row.out_before),
                               _width(row.in_after, row.out_after),
                               "-" if kept is None else f"{100 * kept:.1f}%"))
        if layer_rows:
            lines += ["", format_table(("layer", "type", "in->out before", "in->out after",
                                        "kept out"), layer_rows)]
        return "\n".join(lines)


def _human(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)


def _width(i, o) -> str:
    return "-" if i is None else f"{i}->{o}"


def report(before: nn.Module, after: nn.Module, example_inputs, *, latency: bool = True,
           repeats: int = 20, warmup: int = 3, evaluate: Callable[[nn.Module], float] | None = None,
           accuracy: tuple[float, float] | None = None) -> Report:
    """Compare a model ``before`` and ``after`` pruning on the same ``example_inputs``.

    latency: measure CPU/GPU latency (median of ``repeats`` after ``warmup``); False skips it.
    evaluate: optional ``fn(model) -> accuracy``, called on both models; or give
        ``accuracy=(before, after)`` when the numbers are already known (not both).
    Neither model is modified. Layers are matched by module name.
    """
    _check_model(before, "before")
    _check_model(after, "after")
    if not isinstance(latency, bool):
        raise TypeError(f"latency must be a bool, got {type(latency).__name__}")
    if evaluate is not None and accuracy is not None:
        raise ValueError("give either evaluate or accuracy, not both")
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"evaluate must be callable, got {type(evaluate).__name__}")
    acc = (None, None)
    if accuracy is not None:
        if not (isinstance(accuracy, (tuple, list)) and len(accuracy) == 2):
            raise TypeError("accuracy must be a pair (before, after)")
        acc = tuple(_finite(a, "accuracy") for a in accuracy)
    elif evaluate is not None:
        acc = (_finite(evaluate(before), "evaluate(before)"),
               _finite(evaluate(after), "evaluate(after)"))
    stats_b, stats_a = model_stats(before, example_inputs), model_stats(after, example_inputs)
    lat_b = lat_a = None
    if latency:
        lat_b = measure_latency(before, example_inputs, repeats=repeats, warmup=warmup)
        lat_a = measure_latency(after, example_inputs, repeats=repeats, warmup=warmup)
    return Report(stats_b, stats_a, lat_b, lat_a, _match_layers(before, after), *acc)


def _finite(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


# -- plots ---------------------------------------------------------------------------------------

def new_figure(figsize):
    """A bare Figure and its axes, on the Agg canvas."""
    # A bare Figure with the Agg canvas, not pyplot: no global backend switch, no window, no
    # figure left open in pyplot's registry; works headless.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot_layer_widths(rep: Report, path: str | os.PathLike) -> str:
    """Grouped bars of output channels per Conv/Linear layer, before vs after; saved to ``path``
    (format from its suffix, e.g. ``.png``). Returns the path as a string."""
    if not isinstance(rep, Report):
        raise TypeError(f"expected a Report from accelprune.report(), got {type(rep).__name__}")
    rows = rep.layers
    x = range(len(rows))
    fig, ax = new_figure((max(6.0, 0.35 * len(rows) + 2), 4))
    ax.bar([i - 0.2 for i in x], [r.out_before or 0 for r in rows], width=0.4, label="before")
    ax.bar([i + 0.2 for i in x], [r.out_after or 0 for r in rows], width=0.4, label="after")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r.name for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title("Kept channels per layer")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


IMPORTANCE_PANELS = ("bars", "sorted", "hist")


def plot_importance(scores, path: str | os.PathLike, *, threshold: float | None = None,
                    sparsity: float | None = None, bins: int = 30,
                    title: str | None = None, panels=IMPORTANCE_PANELS) -> str:
    """Seed 001's importance figure for one layer, saved to ``path`` (format from the suffix).

    Panels, left to right (``panels`` picks and orders them):

    * ``"bars"``: one bar per channel, in channel order; the channels that would be pruned in
      red, the threshold as a dashed line;
    * ``"sorted"``: the scores sorted ascending (rank on x), the threshold as a dashed
      horizontal line and the cut (how many go) as a dotted vertical one;
    * ``"hist"``: the histogram of the scores (``bins``), the threshold as a vertical line.

    scores: 1-D scores, or a Conv/Linear module (then its filters' L1 norms, Σ|W_i|).
    threshold: channels scoring at or below it are pruned; or ``sparsity`` in [0, 1): the
        ``round(sparsity · n)`` lowest-scored channels are pruned (ties: the earlier
        channel first, as :func:`accelprune.prune` does), the threshold is the highest of
        their scores. Neither: no line is drawn, nothing is red.
    Returns the path as a string.
    """
    values, pruned, threshold = _importance_inputs(scores, threshold, sparsity)
    bins = check_int(bins, "bins", low=1)
    panels = _check_panels(panels)
    fig = _importance_figure(values, pruned, threshold, bins, title, panels)
    fig.savefig(path)
    return str(path)


def _importance_inputs(scores, threshold, sparsity):
    """(scores as float64, bool mask of pruned channels, threshold or None), checked."""
    from accelprune._validation import as_float64_array, check_fraction

    if isinstance(scores, nn.Module):
        if not isinstance(scores, _WIDTH_LAYERS):
            raise TypeError("plot_importance takes a Conv/Linear module or 1-D scores, got "
                            f"{type(scores).__name__}")
        w = scores.weight.detach()
        if isinstance(scores, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            w = w.transpose(0, 1)  # transposed convs store (in, out, ...)
        scores = w.flatten(1).abs().sum(1)
    values = as_float64_array(scores, "scores", ndim=1)
    if values.size == 0:
        raise ValueError("scores is empty")
    if threshold is not None and sparsity is not None:
        raise ValueError("give either threshold or sparsity, not both")
    pruned = np.zeros(values.size, dtype=bool)
    if sparsity is not None:
        ratio = check_fraction(sparsity, "sparsity")
        k = int(round(ratio * values.size))
        order = np.argsort(values, kind="stable")
        pruned[order[:k]] = True
        threshold = float(values[order[k - 1]]) if k > 0 else None
    elif threshold is not None:
        threshold = _finite(threshold, "threshold")
        pruned = values <= threshold
    return values, pruned, threshold


def _check_panels(panels) -> tuple[str, ...]:
    if isinstance(panels, str):
        panels = (panels,)
    try:
        panels = tuple(panels)
    except TypeError:
        raise TypeError(f"panels must be a sequence of names from {IMPORTANCE_PANELS}, got "
                        f"{type(panels).__name__}") from None
    if not panels:
        raise ValueError("panels is empty")
    for p in panels:
        if p not in IMPORTANCE_PANELS:
            raise ValueError(f"unknown panel {p!r}; expected some of {IMPORTANCE_PANELS}")
    if len(set(panels)) != len(panels):
        raise ValueError(f"panels repeats a panel: {panels}")
    return panels


_PANEL_TEXT = {  # x label, y label, title
    "bars": ("channel index", "importance", "Importance per channel"),
    "sorted": ("rank", "importance", "Sorted importance"),
    "hist": ("filter importance", "filters", "Importance distribution"),
}


def _importance_figure(values, pruned, threshold, bins, title, panels):
    """The figure of :func:`plot_importance` (returned, for tests to look inside)."""
    n = values.size
    fig, first = new_figure((5.0 * len(panels), 4))
    fig.delaxes(first)  # new_figure makes one axes; this figure has a row of them
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    count = f" ({int(pruned.sum())}/{n} pruned)" if threshold is not None else ""
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "bars":
            colors = np.where(pruned, "tab:red", "tab:blue")
            ax.bar(np.arange(n), values, color=list(colors), width=0.8)
        elif panel == "sorted":
            ax.plot(np.arange(n), np.sort(values), "b-", marker="." if n <= 64 else None)
        else:
            ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
        if threshold is not None:
            # The threshold is a value: a horizontal line where values are heights, a vertical
            # one on the histogram's value axis; the sorted panel also marks the pruned count.
            line = ax.axvline if panel == "hist" else ax.axhline
            line(threshold, color="r", linestyle="--", label=f"threshold {threshold:.4g}{count}")
            if panel == "sorted":
                ax.axvline(int(pruned.sum()) - 0.5, color="r", linestyle=":")
            ax.legend()
        xlabel, ylabel, heading = _PANEL_TEXT[panel]
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(heading)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig

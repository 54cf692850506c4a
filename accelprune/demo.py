"""The built-in demo: train ResNet-20 on real digits, prune it four ways to one MACs budget.

1. Train the CIFAR-style ResNet-20 on scikit-learn's handwritten digits (shipped with
   scikit-learn, upsampled to 3x32x32) on the CPU, with a fixed seed.
2. For each method (L1, BN scale, REPrune, C-SGD), find the pruning amount that brings a copy of
   the trained model to the same MACs budget (default -50%), prune, re-estimate the BatchNorm
   statistics (:func:`accelprune.training.recalibrate_bn`) and fine-tune briefly.
   Every method gets the same training after the base model (``finetune_epochs``): C-SGD spends
   ``csgd_epochs`` of them in centripetal training before it prunes (what makes its folding
   lossless) and fine-tunes for the rest; the others prune the trained model directly.
3. Print one table (params, MACs, accuracy one-shot, after BN recalibration and after
   fine-tuning, CPU latency, prune time), and write it as JSON plus two plots (per-layer widths;
   accuracy vs MACs) to ``out_dir``.

A seeded, multi-budget comparison of more methods is ``benchmarks/bench_quality.py``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from accelprune.datasets import digits
from accelprune.reporting import new_figure
from accelprune.tables import format_table
from accelprune.training import evaluate, loader, recalibrate_bn, train_epoch

METHODS = ("l1", "bn", "reprune", "csgd")
METHOD_TITLES = {"l1": "L1 norm", "bn": "BN scale", "reprune": "REPrune", "csgd": "C-SGD"}
METHOD_MARKERS = {"l1": "o", "bn": "s", "reprune": "^", "csgd": "D"}  # methods can coincide


@dataclasses.dataclass
class DemoConfig:
    budget: float = 0.5           # fraction of MACs to remove
    epochs: int = 8               # training of the base model
    # training after the base model, the same for every method (the fair budget)...
    finetune_epochs: int = 3
    # ...of which C-SGD spends this many (at most finetune_epochs) in centripetal training
    csgd_epochs: int = 2
    # The paper's ε = 3e-3 needs hundreds of epochs to pull clusters together; the demo's two
    # epochs need a strong pull so that C-SGD's folding is (nearly) lossless.
    centripetal_strength: float = 1.0
    recal_batches: int = 8        # training batches that re-estimate BN statistics
    batch_size: int = 64
    lr: float = 0.1
    image_size: int = 32
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    out_dir: str = "demo_out"
    progress: bool = True

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """Tiny settings for tests and a first look: 16x16 images, few epochs (~15 s)."""
        tiny = cls(epochs=3, finetune_epochs=2, csgd_epochs=1, image_size=16, recal_batches=4)
        return dataclasses.replace(tiny, **overrides)


@dataclasses.dataclass
class MethodResult:
    method: str
    amount: float                 # the pruning amount found for the budget
    params: int
    macs: int
    macs_reduction: float
    acc_pruned: float             # one-shot: right after pruning (C-SGD: after its folding)
    acc_recalibrated: float       # the same model after BN recalibration
    acc_finetuned: float          # fine-tuned from the recalibrated model
    finetune_epochs: int          # C-SGD: what its centripetal epochs left
    latency_ms: float
    prune_seconds: float
    widths: list[int]


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def _optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)


def _fit(model, data, epochs, lr, *, desc, progress, optimizer=None, after_backward=None,
         cosine=True):
    """``epochs`` of SGD (cosine learning-rate decay unless ``cosine=False``), one progress bar."""
    optimizer = optimizer or _optimizer(model.parameters(), lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    with tqdm(total=epochs * len(data), desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            train_epoch(model, data, optimizer, after_backward=after_backward, progress=bar)
            if cosine:
                schedule.step()
    return model


def run_demo(config: DemoConfig | None = None) -> dict:
    """Run the whole demo; returns the JSON document that it also writes to ``out_dir``."""
    from accelprune.csgd import CSGD
    from accelprune.models import resnet20
    from accelprune.pruning import prune_with, sparsity_for_macs
    from accelprune.reporting import measure_latency, model_stats

    config = config or DemoConfig()
    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
    if not 0 < config.budget < 1:
        raise ValueError(f"budget must be in (0, 1), got {config.budget}")
    torch.manual_seed(config.seed)
    train_set, test_set = digits(config.image_size, seed=config.seed)
    train = loader(train_set, batch_size=config.batch_size, seed=config.seed)
    test = loader(test_set, batch_size=256, shuffle=False)
    example_inputs = train_set[0][0][None]

    started = time.perf_counter()
    base = _fit(resnet20(num_classes=10), train, config.epochs, config.lr, desc="train ResNet-20",
                progress=config.progress)
    base.eval()
    base_stats = model_stats(base, example_inputs)
    base_row = {
        "method": "unpruned", "params": base_stats["params"], "macs": base_stats["macs"],
        "acc": evaluate(base, test), "latency_ms": measure_latency(base, example_inputs) * 1e3,
        "widths": _widths(base),
    }

    results = []
    for method in tqdm(config.methods, desc="methods", disable=not config.progress, leave=False):
        torch.manual_seed(config.seed)
        amount = sparsity_for_macs(base, example_inputs, method, config.budget)
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        finetune_epochs = config.finetune_epochs
        if method == "csgd":
            # Centripetal training pulls each cluster of filters together; prune() then folds them.
            csgd = CSGD(model, example_inputs, amount, seed=config.seed,
                        centripetal_strength=config.centripetal_strength)
            optimizer = _optimizer(csgd.param_groups(), config.lr / 10)
            t_train = time.perf_counter()
            csgd_epochs = min(config.csgd_epochs, config.finetune_epochs)
            finetune_epochs -= csgd_epochs
            _fit(model, train, csgd_epochs, config.lr / 10,
                 desc="C-SGD centripetal training", progress=config.progress, optimizer=optimizer,
                 after_backward=csgd.apply_gradients,
                 cosine=False)  # a decaying rate would slow the clusters' convergence
            t0 += time.perf_counter() - t_train  # prune time excludes the training itself
            csgd.prune()
        else:
            prune_with(model, example_inputs, amount, method, seed=0)
        prune_seconds = time.perf_counter() - t0
        acc_pruned = evaluate(model, test)
        recalibrate_bn(model, train, max_batches=config.recal_batches)
        acc_recalibrated = evaluate(model, test)
        _fit(model, train, finetune_epochs, config.lr / 10, desc=f"fine-tune {method}",
             progress=config.progress)
        stats = model_stats(model, example_inputs)
        results.append(MethodResult(
            method=method, amount=amount, params=stats["params"], macs=stats["macs"],
            macs_reduction=1 - stats["macs"] / base_stats["macs"], acc_pruned=acc_pruned,
            acc_recalibrated=acc_recalibrated, acc_finetuned=evaluate(model, test),
            finetune_epochs=finetune_epochs,
            latency_ms=measure_latency(model.eval(), example_inputs) * 1e3,
            prune_seconds=prune_seconds, widths=_widths(model),
        ))

    doc = {
        "config": dataclasses.asdict(config),
        "base": base_row,
        "methods": [dataclasses.asdict(r) for r in results],
        "seconds": time.perf_counter() - started,
    }
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(doc, indent=2) + "\n")
    _plot(doc, out)
    return doc


def results_table(doc: dict) -> str:
    """The demo's result table, as printed."""
    base = doc["base"]
    header = ("method", "params", "MACs", "MACs cut", "acc one-shot", "+ BN recal",
              "fine-tuned", "latency", "prune time")
    rows = [("unpruned", f"{base['params']:,}", f"{base['macs'] / 1e6:.1f} M", "-", "-", "-",
             f"{base['acc']:.1%}", f"{base['latency_ms']:.2f} ms", "-")]
    for r in doc["methods"]:
        rows.append((METHOD_TITLES[r["method"]], f"{r['params']:,}", f"{r['macs'] / 1e6:.1f} M",
                     f"{r['macs_reduction']:.1%}", f"{r['acc_pruned']:.1%}",
                     f"{r['acc_recalibrated']:.1%}", f"{r['acc_finetuned']:.1%}",
                     f"{r['latency_ms']:.2f} ms", f"{r['prune_seconds']:.2f} s"))
    return format_table(header, rows)


def _plot(doc: dict, out: Path) -> None:
    fig, ax = new_figure((9, 4))
    ax.plot(doc["base"]["widths"], "k--", label="unpruned")
    for r in doc["methods"]:
        ax.plot(r["widths"], marker=METHOD_MARKERS[r["method"]], fillstyle="none", alpha=0.8,
                label=METHOD_TITLES[r["method"]])
    ax.set(xlabel="conv layer (model order)", ylabel="output channels", title="Per-layer widths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "widths.png", dpi=120)

    fig, ax = new_figure((5, 4))
    ax.scatter(doc["base"]["macs"] / 1e6, doc["base"]["acc"] * 100, c="k", label="unpruned")
    for r in doc["methods"]:
        ax.scatter(r["macs"] / 1e6, r["acc_finetuned"] * 100, marker=METHOD_MARKERS[r["method"]],
                   facecolors="none", edgecolors=f"C{len(ax.collections) - 1}",
                   label=METHOD_TITLES[r["method"]])
    ax.set(xlabel="MACs (M)", ylabel="test accuracy after fine-tuning (%)",
           title="Accuracy vs MACs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_macs.png", dpi=120)

"""Pruning quality you can trust: every method, several MACs budgets, several seeds, one budget.

Task (why this one: see the README section): scikit-learn's handwritten digits at 12x12, made
harder with :func:`accelprune.datasets.distorted_digits` (rotation, scale, shift and noise: fresh
augmentation for training, a fixed distorted test set), and a narrow ResNet-20 (stages of 8/16/32
channels, ~69 k parameters, 1.5 M MACs at 12x12). Nothing is downloaded. Plain digits at 32x32
on the full ResNet-20 saturate at ~99% for every method at -50% MACs; this task does not.

Protocol, per seed (the seed sets the data split, the test distortion, the augmentation stream,
the initialisation and the random criteria):

1. One base model, trained ``base_epochs`` (SGD, cosine), shared by every method.
2. For every budget (-30/-50/-70/-80% MACs) and method, the sparsity that reaches the budget is
   found with :func:`accelprune.sparsity_for_macs`; every method then gets the same
   ``finetune_epochs`` of training after the base model:
   * L1, BN scale, Taylor (gradients accumulated over a few training batches), random, REPrune:
     prune the base model one-shot, then fine-tune ``finetune_epochs``;
   * C-SGD: ``csgd_epochs`` of centripetal training from the base model, fold, then fine-tune
     the remaining ``finetune_epochs - csgd_epochs`` (its "one-shot" accuracy is after folding).
3. Accuracy one-shot (right after pruning), after :func:`accelprune.training.recalibrate_bn`
   on a few training batches, and after fine-tuning (which starts from the recalibrated model).

Diagnostics of REPrune (``--no-ablations`` skips them):

* **swap**: REPrune's selection with L1's per-layer widths, and L1's selection with REPrune's
  widths (same fine-tuning), at the ablation budgets: which of REPrune's two parts costs accuracy;
* **budget inputs**: the BN |γ| REPrune's global threshold reads, per layer (mean, spread, rank
  correlation with the filters' L1 norms), and the widths it gives against L1's uniform ones;
* **schedule**: REPrune as the paper runs it, pruning events during training from scratch (a
  linear ramp, an event every ``delta_t`` epochs up to ``base_epochs``, the last one sized by
  bisection so that it lands on the budget), with the same total epochs (``base_epochs +
  finetune_epochs``) as everyone else.

Run: ``python -m benchmarks.bench_quality [--quick] [--seeds 0 1 2] [--budgets 0.5 0.8]``. On a
busy machine set ``NUMBA_NUM_THREADS=1``: numba's pool thread, started by REPrune's coverage step,
was seen using as much CPU as the training thread for the rest of the process. Seeds can run side
by side (``--seeds 1 --name quality_seed1``) and be joined with ``--merge a.json b.json ...``.
Writes ``benchmarks/results/quality.json`` (``quality_quick.json`` with ``--quick``) and a plot of
accuracy against MACs with error bars (mean ± std over seeds) beside it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import itertools
import json
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from tqdm.auto import tqdm

from accelprune.csgd import CSGD
from accelprune.datasets import distorted_digits
from accelprune.graph import ModelGraph
from accelprune.models import CifarResNet
from accelprune.pruning import prune_with, sparsity_for_macs
from accelprune.reporting import model_stats, new_figure
from accelprune.reprune import REPrune
from accelprune.selection import layer_keep_counts, reprune_select
from accelprune.tables import format_table
from accelprune.training import evaluate, loader, recalibrate_bn, train_epoch
from benchmarks.harness import RESULTS_DIR, machine_info

METHODS = ("l1", "bn", "taylor", "random", "reprune", "csgd")
TITLES = {"l1": "L1", "bn": "BN scale", "taylor": "Taylor", "random": "random",
          "reprune": "REPrune", "csgd": "C-SGD",
          "reprune_sel@l1_widths": "REPrune sel. @ L1 widths",
          "l1_sel@reprune_widths": "L1 sel. @ REPrune widths",
          "reprune_schedule": "REPrune during training",
          "reprune@l1_macs": "REPrune @ L1's MACs", "csgd@l1_macs": "C-SGD @ L1's MACs"}


@dataclasses.dataclass
class Config:
    budgets: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    # Sized for a shared 2-core machine (the whole run: ~15 CPU-minutes); more epochs and 16x16
    # images separate the methods more cleanly where the CPU time is there.
    width: int = 8                 # channels of the first stage (ResNet-20 has 16)
    image_size: int = 12
    base_epochs: int = 6
    finetune_epochs: int = 2       # after the base model, for every method
    csgd_epochs: int = 1           # of those, C-SGD's centripetal training
    centripetal_strength: float = 1.0  # strong: a few epochs must pull the clusters together
    lr: float = 0.1                # base training
    finetune_lr: float = 0.01      # fine-tuning and centripetal training
    batch_size: int = 64
    recal_batches: int = 8
    taylor_batches: int = 4
    ablations: bool = True
    ablation_budgets: tuple[float, ...] = (0.8,)
    delta_t: int = 2               # REPrune during training: an event every delta_t epochs

    @classmethod
    def quick(cls, **overrides) -> Config:
        """A smoke run: 1 seed, 2 budgets, 2 + 1 epochs (a few minutes)."""
        small = cls(budgets=(0.5, 0.8), seeds=(0,), base_epochs=2, finetune_epochs=1,
                    csgd_epochs=1, recal_batches=4, taylor_batches=2, delta_t=1)
        return dataclasses.replace(small, **overrides)


# ---------------------------------------------------------------------------------------------
# model, data, training


def narrow_resnet(width: int = 8) -> CifarResNet:
    """CIFAR ResNet-20 with stages of width, 2·width, 4·width channels (ResNet-20: width 16)."""
    return CifarResNet(3, 10, width=width)


def make_data(cfg: Config, seed: int):
    """Fresh loaders: every run of a seed sees the same augmentation stream from its start."""
    train_set, test_set = distorted_digits(cfg.image_size, seed=seed)
    return (loader(train_set, batch_size=cfg.batch_size, seed=seed),
            loader(test_set, batch_size=256, shuffle=False))


def sgd(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)


def fit(model, train, epochs, lr, *, bar, optimizer=None, after_backward=None, cosine=True):
    optimizer = optimizer or sgd(model.parameters(), lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    for _ in range(epochs):
        train_epoch(model, train, optimizer, after_backward=after_backward)
        bar.update(1)
        if cosine:
            schedule.step()
    return model


def accumulate_gradients(model, train, n_batches: int) -> None:
    """Gradients of the loss summed over ``n_batches`` batches (Taylor reads ``weight.grad``);
    eval mode: the BN statistics are not touched."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for inputs, targets in itertools.islice(train, n_batches):
        nn.functional.cross_entropy(model(inputs), targets).backward()


def conv_widths(model) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# ---------------------------------------------------------------------------------------------
# one run: prune (or C-SGD-train and fold), recalibrate, fine-tune


def finish(cfg, model, train, test, example, *, bar, finetune_epochs, base_macs, **record):
    """Evaluate one-shot, recalibrate BN, evaluate, fine-tune, evaluate; the run's record."""
    acc_oneshot = evaluate(model, test)
    recalibrate_bn(model, train, max_batches=cfg.recal_batches)
    acc_recal = evaluate(model, test)
    fit(model, train, finetune_epochs, cfg.finetune_lr, bar=bar)
    stats = model_stats(model, example)
    return {**record, "macs": stats["macs"], "params": stats["params"],
            "macs_reduction": 1 - stats["macs"] / base_macs, "acc_oneshot": acc_oneshot,
            "acc_recal": acc_recal, "acc_finetuned": evaluate(model, test),
            "widths": conv_widths(model)}


PER_LAYER = ("l1", "bn", "taylor", "random")
_SPARSITY_CACHE: dict = {}


def find_sparsity(base, example, method, budget, seed) -> float:
    """:func:`accelprune.sparsity_for_macs` for ``method``. The per-layer criteria (L1, BN,
    Taylor, random) give widths that depend on the sparsity alone, so they share L1's (which also
    spares Taylor: sparsity_for_macs prunes deep copies, and deepcopy drops ``.grad``)."""
    key = (id(base), "l1" if method in PER_LAYER else method, budget, seed)
    if key not in _SPARSITY_CACHE:
        _SPARSITY_CACHE[key] = sparsity_for_macs(base, example, key[1], budget, tolerance=0.02,
                                                 max_iterations=8, seed=seed)
    return _SPARSITY_CACHE[key]


def run_method(cfg, base, method, budget, seed, example, base_macs, *, bar) -> dict:
    torch.manual_seed(seed)
    train, test = make_data(cfg, seed)
    model = copy.deepcopy(base)
    if method == "taylor":
        accumulate_gradients(model, train, cfg.taylor_batches)
    sparsity = find_sparsity(base, example, method, budget, seed)
    t0 = time.perf_counter()
    finetune = cfg.finetune_epochs
    if method == "csgd":
        csgd = CSGD(model, example, sparsity, centripetal_strength=cfg.centripetal_strength,
                    seed=seed)
        optimizer = sgd(csgd.param_groups(), cfg.finetune_lr)
        fit(model, train, cfg.csgd_epochs, cfg.finetune_lr, bar=bar, optimizer=optimizer,
            after_backward=csgd.apply_gradients, cosine=False)
        csgd.prune()
        finetune -= cfg.csgd_epochs
    else:
        prune_with(model, example, sparsity, method, seed=seed)
    model.zero_grad(set_to_none=True)
    return finish(cfg, model, train, test, example, bar=bar, finetune_epochs=finetune,
                  base_macs=base_macs, seed=seed, budget=budget, method=method,
                  sparsity=sparsity, seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# REPrune diagnostics


def pruned_widths(base, example, method, sparsity, seed) -> dict[str, int]:
    return conv_widths(prune_with(copy.deepcopy(base), example, sparsity, method, seed=seed))


def run_swap(cfg, base, selection, widths, budget, seed, example, base_macs, *, bar) -> dict:
    """Prune each of REPrune's layers to ``widths[layer]`` choosing filters by ``selection``
    ("reprune": Ward clustering + max coverage, "l1": largest L1 norms)."""
    torch.manual_seed(seed)
    train, test = make_data(cfg, seed)
    model = copy.deepcopy(base)
    layers = REPrune(model, example, 0.5).groups  # REPrune's prunable layers, in its order
    graph = ModelGraph(model, example)
    by_name = {g.name: g for g in graph.groups}
    plan = []
    for i, g in enumerate(layers):
        weight = graph.module(g.name).weight.detach()
        k, n = widths[g.name], weight.shape[0]
        if k >= n:
            continue
        if selection == "reprune":
            keep = reprune_select(weight, k, seed=seed + i)  # REPrune's own seeding per layer
        else:
            keep = torch.argsort(weight.abs().flatten(1).sum(1), descending=True)[:k].numpy()
        plan.append((by_name[g.name], np.sort(keep)))
    graph.prune_groups(plan)
    other = "l1" if selection == "reprune" else "reprune"
    return finish(cfg, model, train, test, example, bar=bar, finetune_epochs=cfg.finetune_epochs,
                  base_macs=base_macs, seed=seed, budget=budget,
                  method=f"{selection}_sel@{other}_widths")


def gamma_stats(base, example, l1_widths, reprune_widths) -> list[dict]:
    """Per REPrune layer: what its global |γ| threshold reads, and the widths it chose."""
    out = []
    for g in REPrune(copy.deepcopy(base), example, 0.5).groups:
        bn = dict(base.named_modules())[g.bns[0]]
        conv = dict(base.named_modules())[g.name]
        gamma = bn.weight.detach().abs().double().numpy()
        l1 = conv.weight.detach().abs().flatten(1).sum(1).double().numpy()
        out.append({"layer": g.name, "channels": len(gamma), "gamma_mean": float(gamma.mean()),
                    "gamma_cv": float(gamma.std() / gamma.mean()),
                    "gamma_min": float(gamma.min()), "gamma_max": float(gamma.max()),
                    "spearman_gamma_l1": float(spearmanr(gamma, l1).statistic),
                    "l1_width": l1_widths[g.name], "reprune_width": reprune_widths[g.name]})
    return out


def land_on_budget(rp: REPrune, example, target_macs: float) -> float:
    """The final sparsity that makes REPrune's next event land closest to ``target_macs``.

    Bisection: the widths are REPrune's own rule (:func:`layer_keep_counts` on the γ the model
    has by now); the MACs are measured on a copy cut to those widths (which filters go does not
    change the MACs)."""
    gammas = [np.mean([rp.graph.module(b).weight.detach().abs().double().numpy() for b in g.bns],
                      axis=0) for g in rp.groups]

    def macs_at(sparsity: float) -> int:
        target = round((1 - sparsity) * rp.original_channels)
        keep, _ = layer_keep_counts(gammas, rp.original_widths, target,
                                    min_keep_ratio=rp.min_keep_ratio)
        trial = copy.deepcopy(rp.model)
        graph = ModelGraph(trial, example)
        by_name = {g.name: g for g in graph.groups}
        graph.prune_groups([(by_name[g.name], np.arange(k))
                            for g, k in zip(rp.groups, keep, strict=True) if k < g.n_channels])
        return model_stats(trial, example)["macs"]

    low, high, best, best_gap = 0.0, 0.99, rp.sparsity, float("inf")
    for _ in range(10):
        mid = (low + high) / 2
        macs = macs_at(mid)
        gap = abs(macs - target_macs) / target_macs
        if gap < best_gap:
            best, best_gap = mid, gap
        if gap <= 0.015:
            break
        low, high = (mid, high) if macs > target_macs else (low, mid)
    return best


def run_schedule(cfg, budget, sparsity0, seed, example, base_macs, *, bar) -> dict:
    """REPrune during training from scratch: linear ramp to the budget over the base epochs,
    then the remaining epochs on the pruned model; base_epochs + finetune_epochs in all."""
    torch.manual_seed(seed)
    train, test = make_data(cfg, seed)
    model = narrow_resnet(cfg.width)
    epochs = cfg.base_epochs + cfg.finetune_epochs
    optimizer = sgd(model.parameters(), cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    rp = REPrune(model, example, sparsity0, schedule="linear", delta_t=cfg.delta_t,
                 t_prune=cfg.base_epochs, seed=seed)
    last_event = max(e for e in range(cfg.base_epochs + 1) if rp.due(e))
    for epoch in range(epochs):
        train_epoch(model, train, optimizer)
        bar.update(1)
        if epoch == last_event:
            rp.sparsity = land_on_budget(rp, example, (1 - budget) * base_macs)
        optimizer = rp.step(epoch, optimizer)
        schedule.step()
    stats = model_stats(model, example)
    return {"seed": seed, "budget": budget, "method": "reprune_schedule",
            "sparsity": rp.sparsity, "macs": stats["macs"], "params": stats["params"],
            "macs_reduction": 1 - stats["macs"] / base_macs, "acc_finetuned": evaluate(model, test),
            "events": [(e.epoch, round(e.target_sparsity, 4), e.kept_channels) for e in rp.events],
            "widths": conv_widths(model)}


# ---------------------------------------------------------------------------------------------
# the whole benchmark


def run(cfg: Config, *, progress: bool = True, checkpoint=None) -> dict:
    """The benchmark's JSON document; ``checkpoint(doc)`` gets the partial document after every
    run (a long run interrupted keeps what it finished)."""
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
    if not 0 <= cfg.csgd_epochs <= cfg.finetune_epochs:
        raise ValueError("csgd_epochs must be within finetune_epochs (the same total budget)")
    torch.set_num_threads(1)  # a shared 2-core machine; also: results independent of threads
    ablation_budgets = [b for b in cfg.ablation_budgets if cfg.ablations]
    epochs = len(cfg.seeds) * (cfg.base_epochs + cfg.finetune_epochs * (
        len(cfg.budgets) * len(cfg.methods) + 2 * len(ablation_budgets))
        + len(ablation_budgets) * (cfg.base_epochs + cfg.finetune_epochs))
    bar = tqdm(total=epochs, desc="quality (epochs)", disable=not progress, smoothing=0)
    started = time.perf_counter()
    base_rows, runs, swaps, schedules, gammas = [], [], [], [], []

    def save():  # after every run: an interrupted benchmark keeps what it finished
        if checkpoint is not None:
            checkpoint(_document(cfg, started, base_rows, runs, swaps, schedules, gammas))

    for seed in cfg.seeds:
        torch.manual_seed(seed)
        train, test = make_data(cfg, seed)
        example = next(iter(train))[0][:1]
        bar.set_description(f"seed {seed}: base model")
        base = fit(narrow_resnet(cfg.width), train, cfg.base_epochs, cfg.lr, bar=bar).eval()
        stats = model_stats(base, example)
        base_rows.append({"seed": seed, "acc": evaluate(base, test), **stats,
                          "widths": conv_widths(base)})
        save()
        for budget in cfg.budgets:
            for method in cfg.methods:
                bar.set_description(f"seed {seed}: {method} -{budget:.0%}")
                runs.append(run_method(cfg, base, method, budget, seed, example, stats["macs"],
                                       bar=bar))
                save()
            if budget not in ablation_budgets:
                continue
            sparsity = {m: find_sparsity(base, example, m, budget, seed)
                        for m in ("l1", "reprune")}
            l1_w = pruned_widths(base, example, "l1", sparsity["l1"], seed)
            rep_w = pruned_widths(base, example, "reprune", sparsity["reprune"], seed)
            gammas.append({"seed": seed, "budget": budget,
                           "layers": gamma_stats(base, example, l1_w, rep_w)})
            bar.set_description(f"seed {seed}: swaps -{budget:.0%}")
            swaps.append(run_swap(cfg, base, "reprune", l1_w, budget, seed, example,
                                  stats["macs"], bar=bar))
            swaps.append(run_swap(cfg, base, "l1", rep_w, budget, seed, example, stats["macs"],
                                  bar=bar))
            save()
        for budget in ablation_budgets:  # the costliest runs last
            bar.set_description(f"seed {seed}: REPrune during training -{budget:.0%}")
            schedules.append(run_schedule(cfg, budget, find_sparsity(base, example, "reprune",
                                                                     budget, seed),
                                          seed, example, stats["macs"], bar=bar))
            save()
    bar.close()
    return _document(cfg, started, base_rows, runs, swaps, schedules, gammas)


def _document(cfg, started, base_rows, runs, swaps, schedules, gammas) -> dict:
    doc = {
        "benchmark": "quality",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": dataclasses.asdict(cfg),
        "task": f"distorted_digits({cfg.image_size}x{cfg.image_size}, rotation 20, scale 0.15, "
                "shift 0.12, noise 0.25), "
                f"NarrowResNet(width={cfg.width}) (ResNet-20 with stages "
                f"{cfg.width}/{2 * cfg.width}/{4 * cfg.width})",
        "seconds": time.perf_counter() - started,
        "base": base_rows,
        "runs": runs,
        "swaps": swaps,
        "schedule": schedules,
        "gamma": gammas,
    }
    doc["summary"] = summarize(doc)
    return doc


def _mean_std(values) -> list[float]:
    values = np.asarray(values, dtype=float)
    return [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0]


METRICS = ("acc_oneshot", "acc_recal", "acc_finetuned", "macs_reduction", "params")


def summarize(doc: dict) -> dict:
    """{method: {budget: {metric: [mean, std over seeds]}}} for every kind of run."""
    out: dict = {"unpruned": {m: _mean_std([b[m] for b in doc["base"]])
                              for m in ("acc", "macs", "params")}}
    for r in doc["runs"] + doc["swaps"] + doc["schedule"] + doc.get("matched", []):
        out.setdefault(r["method"], {}).setdefault(str(r["budget"]), []).append(r)
    for method, by_budget in out.items():
        if method == "unpruned":
            continue
        for budget, rows in by_budget.items():
            by_budget[budget] = {m: _mean_std([r[m] for r in rows]) for m in (*METRICS, "macs")
                                 if m in rows[0]}
    return out


def _pm(pair, scale=100.0, digits=1) -> str:
    return f"{pair[0] * scale:.{digits}f} ± {pair[1] * scale:.{digits}f}"


def tables(doc: dict) -> str:
    s = doc["summary"]
    lines = [f"unpruned: {_pm(s['unpruned']['acc'])}%  ({s['unpruned']['params'][0]:,.0f} params, "
             f"{s['unpruned']['macs'][0] / 1e6:.2f} M MACs)"]
    budgets = sorted({r["budget"] for r in doc["runs"]})
    for metric, title in (("acc_finetuned", "fine-tuned"), ("acc_recal", "one-shot + BN recal"),
                          ("acc_oneshot", "one-shot")):
        rows = []
        for method in [m for m in s if m != "unpruned"]:
            cells = [_pm(s[method][str(b)][metric]) if str(b) in s[method]
                     and metric in s[method][str(b)] else "" for b in budgets]
            if any(cells):
                rows.append((TITLES.get(method, method), *cells))
        lines.append(f"\naccuracy (%), {title}, mean ± std over seeds {doc['config']['seeds']}")
        lines.append(format_table(("method", *(f"-{b:.0%} MACs" for b in budgets)), rows))
    return "\n".join(lines)


def plot(doc: dict, path) -> None:
    s = doc["summary"]
    fig, axes = new_figure((11, 4.5))
    fig.clear()
    axes = fig.subplots(1, 2, sharey=True)
    base = s["unpruned"]
    markers = dict(zip([*METHODS, "reprune_sel@l1_widths", "l1_sel@reprune_widths",
                        "reprune_schedule"], "osv^DPXdh*", strict=False))
    for ax, metric, title in ((axes[0], "acc_finetuned", "fine-tuned (same total epochs)"),
                              (axes[1], "acc_recal", "one-shot + BN recalibration")):
        ax.errorbar(base["macs"][0] / 1e6, base["acc"][0] * 100, yerr=base["acc"][1] * 100,
                    fmt="k*", markersize=10, capsize=3, label="unpruned")
        for method, by_budget in s.items():
            if method == "unpruned":
                continue
            pts = sorted((v["macs"][0], v[metric]) for v in by_budget.values() if metric in v)
            if not pts:
                continue
            x = [p[0] / 1e6 for p in pts]
            y = [p[1][0] * 100 for p in pts]
            err = [p[1][1] * 100 for p in pts]
            dashed = method not in METHODS
            ax.errorbar(x, y, yerr=err, marker=markers.get(method, "o"), capsize=3,
                        linestyle="--" if dashed else "-", alpha=0.85,
                        label=TITLES.get(method, method))
        ax.set(xlabel="MACs (M)", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%), mean ± std over seeds")
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(docs: list[dict]) -> dict:
    """One document from runs of the same configuration on different seeds or budgets (run side
    by side: ``--seeds 1 --name quality_seed1``, ...), with the summary over all of them."""
    first = docs[0]
    keys = ("width", "image_size", "base_epochs", "finetune_epochs", "csgd_epochs", "lr",
            "finetune_lr", "centripetal_strength")
    for d in docs[1:]:
        differ = [k for k in keys if d["config"][k] != first["config"][k]]
        if differ:
            raise ValueError(f"cannot merge runs whose configurations differ in {differ}")
    union = {k: sorted({v for d in docs for v in d["config"][k]})
             for k in ("seeds", "budgets", "methods")}
    out = {**first, "config": {**first["config"], **union},
           "seconds": sum(d["seconds"] for d in docs),
           "merged_from": [d["date"] for d in docs]}
    for key in ("base", "runs", "swaps", "schedule", "gamma"):
        out[key] = [row for d in docs for row in d[key]]
    out["base"] = list({b["seed"]: b for b in out["base"]}.values())  # one per seed
    out["summary"] = summarize(out)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 2 budgets")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--budgets", type=float, nargs="+")
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--base-epochs", type=int)
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument("--csgd-epochs", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--ablation-budgets", type=float, nargs="+")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--name", help="results file stem (default: quality / quality_quick)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="merge these results (one per seed) into --name, run nothing")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {
        "seeds": tuple(args.seeds) if args.seeds else None,
        "budgets": tuple(args.budgets) if args.budgets else None,
        "methods": tuple(args.methods) if args.methods else None,
        "base_epochs": args.base_epochs, "finetune_epochs": args.finetune_epochs,
        "csgd_epochs": args.csgd_epochs, "image_size": args.image_size,
        "ablation_budgets": tuple(args.ablation_budgets) if args.ablation_budgets else None,
        "ablations": False if args.no_ablations else None}.items() if v is not None}
    cfg = Config.quick(**overrides) if args.quick else Config(**overrides)
    name = args.name or ("quality_quick" if args.quick else "quality")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)

    def save(doc):
        (RESULTS_DIR / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        plot(doc, RESULTS_DIR / f"{name}.png")

    if args.merge:
        doc = merge([json.loads(open(path).read()) for path in args.merge])
    else:
        doc = run(cfg, progress=not args.no_progress, checkpoint=save)
    save(doc)
    print(tables(doc))
    print(f"(saved benchmarks/results/{name}.json and .png; {doc['seconds']:.0f} s)")
    return doc


if __name__ == "__main__":
    main()

"""One REPrune pruning event on ResNet-50 (random init, weights=None) at 50% channel sparsity.

Rows: the whole event (threshold + clustering + coverage + surgery, graph building excluded) and
its parts, native (C++ Ward + Numba coverage) against the reference (scipy + Python greedy), and
Torch-Pruning's plain L1 prune of the same model (MetaPruner.step, all groups, 50%); then both
from scratch (REPrune's construction and event; MetaPruner's construction and step, taking
turns, median of 2 x repeats + 1), the comparison issue 14 sets a target for (REPrune <= 3x
Torch-Pruning's L1). The breakdown times
clustering and coverage layer by layer on the same k_l the event used: the clustering as the event
runs it (``ward_cut_layer``: no linkage matrices) and, in the ``z_route`` column, the route it
replaced (native linkage matrices, then ``cut_linkage``).

    python -m benchmarks.bench_reprune           # ResNet-50, 1x3x128x128 (reference: minutes)
    python -m benchmarks.bench_reprune --quick   # CIFAR ResNet-56: a smoke check

The BN scales γ are drawn uniformly from [0.1, 1] (at initialisation they are all 1, and the
budget rule would spread sparsity evenly); clustering and coverage cost the same as on trained
weights of the same shapes.
"""
from __future__ import annotations

import argparse
import copy
import gc
import time

import torch
import torch_pruning as tp

from accelprune import REPrune
from accelprune.cluster import cut_linkage, ward_cut_layer, ward_linkage_batched
from accelprune.coverage import max_coverage
from accelprune.selection import ward_problems
from benchmarks.harness import Row, measure, measure_alternating, report

SPARSITY = 0.5


def _models(quick: bool):
    torch.manual_seed(0)
    if quick:
        from accelprune.models import resnet56

        return "resnet56 (CIFAR, random init)", resnet56(), torch.randn(1, 3, 32, 32)
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    with torch.no_grad():  # random BN scales: REPrune's budget rule has something to rank
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.1, 1.0)
    return "resnet50 (random init, random BN scales)", model, torch.randn(1, 3, 128, 128)


def _timed_pops(objects: list, call, *, repeats: int, warmup: int):
    """Median time of ``call(obj)`` over fresh objects. Finished objects stay referenced, and
    garbage is collected before timing, so that freeing one model's dependency graph is not
    timed inside the next call."""
    done = []

    def run():
        obj = objects.pop()
        call(obj)
        done.append(obj)

    gc.collect()
    return measure(run, warmup=warmup, repeats=repeats).median_s, done[-1]


def _event_time(model, x, backend: str, repeats: int, warmup: int) -> tuple[float, REPrune]:
    """Median time of ``prune()`` on fresh copies (graph building and stats are not timed)."""
    pruners = [REPrune(copy.deepcopy(model), x, SPARSITY, backend=backend)
               for _ in range(repeats + warmup)]
    return _timed_pops(pruners, REPrune.prune, repeats=repeats, warmup=warmup)


def _parts(pruner: REPrune, original, x, backend: str) -> dict[str, float]:
    """Clustering (Ward + cut) and coverage, layer by layer, for the k_l the event chose: the
    layer cut as reprune_select runs it (``ward_cut_layer``), and for the native backend also the
    route it replaced (linkage matrices, then ``cut_linkage``: ``clustering_z_route``)."""
    event = pruner.events[-1]
    unpruned = REPrune(copy.deepcopy(original), x, SPARSITY, backend=backend)  # its filters
    clustering = z_route = selection = 0.0
    for g, rec in zip(unpruned.groups, event.layers, strict=True):
        if rec.kept == rec.before:
            continue
        problems = [ward_problems(w) for w in unpruned.filters_of(g)]
        merges = problems[0].shape[1] - rec.kept // g.blocks
        t0 = time.perf_counter()
        labels, height = ward_cut_layer(problems, merges, backend=backend)
        t1 = time.perf_counter()
        max_coverage(labels, rec.kept // g.blocks, seed=pruner.seed, backend=backend)
        t2 = time.perf_counter()
        assert height == rec.height, "the layer cut disagrees with the event"
        if backend != "reference":
            linkages = [ward_linkage_batched(p, backend=backend) for p in problems]
            z_height = max(Z[:, merges - 1, 2].max() for Z in linkages)
            [cut_linkage(Z, height=z_height, backend=backend) for Z in linkages]
            z_route += time.perf_counter() - t2
        clustering += t1 - t0
        selection += t2 - t1
    parts = {"clustering": clustering, "coverage": selection}
    if backend != "reference":
        parts["clustering_z_route"] = z_route
    return parts


def _tp_pruner(m, x):
    return tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                pruning_ratio=SPARSITY, ignored_layers=[_classifier(m)])


def _tp_l1_time(model, x, repeats: int) -> float:
    pruners = [_tp_pruner(copy.deepcopy(model), x) for _ in range(repeats + 1)]
    return _timed_pops(pruners, lambda p: p.step(), repeats=repeats, warmup=1)[0]


def _from_scratch(model, x, repeats: int) -> dict[str, float]:
    """Both methods from scratch on fresh copies (the copies are made before timing): REPrune's
    construction (graph, Numba cache) and event, and Torch-Pruning's MetaPruner build and step,
    taking turns (the target is their ratio), median of ``repeats``."""
    def reprune(m):
        REPrune(m, x, SPARSITY).prune()

    def tp_l1(m):
        _tp_pruner(m, x).step()

    done = []  # finished models stay referenced: freeing one is not timed inside the next call

    def on_a_copy(call, copies):
        def run():
            m = copies.pop()
            call(m)
            done.append(m)
        return run

    calls = {"native": reprune, "tp_l1": tp_l1}
    runs = {name: on_a_copy(call, [copy.deepcopy(model) for _ in range(repeats + 1)])
            for name, call in calls.items()}
    timings = measure_alternating(runs, warmup=1, repeats=repeats, between=gc.collect)
    return {name: t.median_s for name, t in timings.items()}


def _classifier(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, for a smoke check")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    label, model, x = _models(args.quick)

    t0 = time.perf_counter()
    REPrune(copy.deepcopy(model), x, SPARSITY)
    setup = time.perf_counter() - t0

    native, pruner = _event_time(model, x, "auto", repeats, warmup=1)
    reference, ref_pruner = _event_time(model, x, "reference", 1, warmup=0)  # minutes: once
    assert [r.kept_indices for r in pruner.events[-1].layers] == \
        [r.kept_indices for r in ref_pruner.events[-1].layers], "native and reference disagree"
    parts_native = _parts(pruner, model, x, "auto")
    parts_ref = _parts(ref_pruner, model, x, "reference")
    surgery = {"native": pruner.events[-1].seconds["surgery"]}  # same code on both paths
    tp_l1 = _tp_l1_time(model, x, repeats)
    scratch = _from_scratch(model, x, 2 * repeats + 1)  # the target's row: more repeats

    rep = pruner.report()
    rows = [
        Row("clustering (Ward + cut)",
            {"native": parts_native["clustering"], "reference": parts_ref["clustering"],
             "z_route": parts_native["clustering_z_route"]}),
        Row("selection (max coverage)",
            {"native": parts_native["coverage"], "reference": parts_ref["coverage"]}),
        Row("surgery", surgery),
        Row("whole event", {"native": native, "reference": reference, "tp_l1": tp_l1},
            {"kept": f"{rep.kept_channels}/{rep.original_channels}",
             "macs": f"{rep.macs_before / 1e6:.0f}M->{rep.macs_after / 1e6:.0f}M"}),
        Row("from scratch (graph + event)", scratch),
    ]
    notes = {"model": label, "input": list(x.shape), "sparsity": SPARSITY,
             "setup_s (graph + stats, untimed in events)": setup,
             "tp_l1": "torch_pruning MetaPruner.step with L1 MagnitudeImportance, all groups",
             "threads": torch.get_num_threads()}
    print(f"model: {label}; REPrune setup (graph, stats) {setup:.2f} s, not part of the event")
    return report("reprune" + ("_quick" if args.quick else ""), rows, fast="native",
                  references=["reference", "tp_l1", "z_route"], notes=notes)


if __name__ == "__main__":
    main()

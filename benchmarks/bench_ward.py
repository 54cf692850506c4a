"""Ward clustering throughput and memory: REPrune's problems, per-thread kernels, big n.

Cases (each row's ``native`` is accelprune with the row's ``threads``):

* ``d>1 per thread``: 64 problems of 512 points in 9-D, one thread each: accelprune (auto: the
  centroid chain) against ``fastcluster.linkage_vector`` (the issue-14 target: >= 4x), scipy, and
  accelprune's stored-matrix path (``matrix_1t``);
* ``one 512x512x3x3 layer``: the 512 problems of one 3x3 conv with 512 filters, 2 threads;
* ``1-D``: a 2048-filter 1x1 layer's problems (sort + chain);
* ``layer cut``: REPrune's layer-wide cut (ALGORITHMS.md 3.2, k = n/2) as the REPrune event runs
  it, :func:`accelprune.cluster.ward_cut_layer` (merges in the order made, selection of the layer
  height, a backward pass for the cut; no linkage matrices), against the route it replaced
  (``z_route``: native linkage matrices, then ``cut_linkage``) and fastcluster's linkage +
  scipy's fcluster, on a 2048-filter 1x1 conv, a 512x512x3x3 conv and every conv of ResNet-50;
* ``crossover``: centroids against matrix at several (n, d), the measurements behind the
  ``method="auto"`` rule;
* ``memory``: 20,000 x 16 and 100,000 x 8, each in a fresh subprocess: time and peak RSS growth
  (fastcluster for 20,000 x 16 too); the old matrix path needed 8 n^2 bytes (3.2 GB, 80 GB);
* every conv of torchvision ResNet-50 and VGG-16 (random init: only shapes matter), one problem
  per input channel with the kernels of all filters as points (d = kh*kw): accelprune on all
  cores and on one, scipy and fastcluster loops (fastcluster in a 2-thread pool too).

``cpu ref/native``: the same comparison in process CPU time (fastcluster_1t or _2t against
native), which a busy machine distorts less than wall time.

Roofline columns (a work model, not counters): ``flop/problem`` and ``bytes/problem`` of the path
taken, the rate achieved (``GFLOP/s``) and its share of what this machine does (``%dgemm``: a
float64 matmul on the same number of threads, measured in the same run; ``%copy``: a 256 MB
copy's bandwidth; above 100% means the data came from cache). The centroid chain's model is
1.6 n^2 Ward-cost evaluations per problem (counted: 2.9 scans per merge over the live
clusters), each 3d + 5 flops reading 8(d + 2) bytes
(from cache: the O(n d) working set fits in L2). The matrix path's: n^2 d / 2 * 3 flops for the
distances plus 12 flops and 24 bytes per live entry and merge for the Lance-Williams updates and
scans. The 1-D path's: ~40 n log2 n operations.

Run: ``python -m benchmarks.bench_ward [--quick] [--repeats N]``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.cluster.hierarchy as sch

from accelprune import cut_linkage, ward_linkage_batched
from accelprune.cluster import ward_cut_layer, ward_method
from accelprune.selection import ward_problems
from benchmarks.harness import Row, cpu_model, measure, report
from benchmarks.model_shapes import conv_weights

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# the machine and the work model


def machine_rates(threads: int) -> dict[str, float]:
    """What this machine does right now: float64 matmul GFLOP/s on ``threads`` threads, and the
    bandwidth of a 256 MB copy (GB/s, read + write)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(1024, 1024, dtype=torch.float64)
        t = measure(lambda: a @ a, warmup=1, repeats=5)
        x = torch.ones(2**25, dtype=torch.float64)
        y = torch.empty_like(x)
        c = measure(lambda: y.copy_(x), warmup=1, repeats=5)
    finally:
        torch.set_num_threads(previous)
    return {"dgemm_gflops": 2 * 1024**3 / t.median_s / 1e9,
            "copy_gbs": 2 * x.numel() * 8 / c.median_s / 1e9}


def work_model(n: int, d: int, method: str) -> tuple[float, float]:
    """(flops, bytes) of one problem of n points in d dimensions on ``method``'s path."""
    if method == "auto":
        method = ward_method(n, d)
    if method == "sorted":
        ops = 40.0 * n * max(1.0, math.log2(n))
        return ops, 8.0 * 12 * n
    if method == "matrix":
        updates = n * n / 2.0  # sum over merges of the live count
        return 1.5 * n * n * d + 12.0 * updates, 8.0 * n * (n + d) + 24.0 * updates
    evaluations = 1.6 * n * n
    return evaluations * (3 * d + 5), evaluations * 8.0 * (d + 2)


def roofline(problems: list[tuple[int, int, int]], seconds: float, threads: int, rates: dict,
             method: str = "auto") -> dict[str, object]:
    """Extra columns for a row: problems is [(count, n, d)], timed at ``seconds``."""
    flops = sum(b * work_model(n, d, method)[0] for b, n, d in problems)
    moved = sum(b * work_model(n, d, method)[1] for b, n, d in problems)
    count = sum(b for b, _, _ in problems)
    gflops = flops / seconds / 1e9
    return {
        "flop/problem": f"{flops / count:.3g}",
        "bytes/problem": f"{moved / count:.3g}",
        "GFLOP/s": f"{gflops:.2f}",
        "%dgemm": f"{100 * gflops / rates[threads]['dgemm_gflops']:.0f}%",
        "%copy": f"{100 * moved / seconds / 1e9 / rates[threads]['copy_gbs']:.0f}%",
    }


# ---------------------------------------------------------------------------------------------
# runners (bound with functools.partial: no loop variables captured late)


def run_native(batches, threads, method="auto"):
    for batch in batches:
        ward_linkage_batched(batch, n_threads=threads, method=method)


def layer_merges(n: int) -> int:
    """The merges a layer cut makes in the benchmarks: REPrune at 50% (k = n/2 filters kept)."""
    return n - n // 2


def run_layer_cut(batches, threads):
    """REPrune's layer cut of each batch (one layer each), as the event runs it."""
    for batch in batches:
        ward_cut_layer(batch, layer_merges(batch.shape[1]), n_threads=threads)


def run_z_route(batches, threads):
    """The route the layer cut replaced: linkage matrices, the height of row m - 1, cut_linkage."""
    for batch in batches:
        Z = ward_linkage_batched(batch, n_threads=threads)
        cut_linkage(Z, height=Z[:, layer_merges(batch.shape[1]) - 1, 2].max())


def fastcluster_linkages(batch, pool=None) -> list:
    """fastcluster's linkage of every problem of one batch (on the pool's threads if given)."""
    import fastcluster

    def one(x):
        return fastcluster.linkage_vector(x, "ward")

    return [one(x) for x in batch] if pool is None else list(pool.map(one, batch))


def run_fastcluster(batches, pool=None):
    for batch in batches:
        fastcluster_linkages(batch, pool)


def run_fastcluster_cut(batches, pool=None):
    """fastcluster's linkage of each problem, then scipy's fcluster at the layer's height."""
    for batch in batches:
        linkages = fastcluster_linkages(batch, pool)
        height = max(Z[layer_merges(batch.shape[1]) - 1, 2] for Z in linkages)
        [sch.fcluster(Z, height, "distance") for Z in linkages]


def run_scipy(batches):
    for batch in batches:
        [sch.linkage(x, "ward") for x in batch]


def cpu_seconds(fn, repeats: int) -> float:
    """Median process CPU time of fn() (all threads): unlike wall time, it does not grow while
    other jobs hold the cores, so its ratios stay meaningful on a busy machine."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return float(np.median(times))


def cpu_ratio(reference, fast, repeats: int) -> dict[str, object]:
    ref_s, fast_s = cpu_seconds(reference, 1), cpu_seconds(fast, repeats)
    return {"cpu_ref_s": round(ref_s, 4), "cpu_native_s": round(fast_s, 4),
            "cpu ref/native": f"{ref_s / fast_s:.1f}x"}


def shape_of(batches) -> list[tuple[int, int, int]]:
    return [tuple(int(s) for s in b.shape) for b in batches]


# ---------------------------------------------------------------------------------------------
# memory, in a fresh interpreter each


MEMORY_SCRIPT = """
import importlib.util, json, sys, time
import numpy as np

def peak_rss_mb():  # VmHWM: this process's peak (ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

n, d, engine = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
X = np.random.default_rng(0).standard_normal((n, d))
if engine == "fastcluster":
    import fastcluster
    run = lambda: fastcluster.linkage_vector(X, "ward")
else:
    spec = importlib.util.spec_from_file_location("_native", sys.argv[4])
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    run = lambda: native.ward_linkage_batched(X[None], 1, "auto")
before = peak_rss_mb()
t = time.perf_counter()
run()
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "rss_growth_mb": peak_rss_mb() - before}))
"""


def memory_case(n: int, d: int, engine: str) -> dict:
    from accelprune._backend import native_module

    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT), str(n), str(d), engine,
         native_module().__file__],
        capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------------------------
# the cases


def per_thread_rows(args, rates, pool) -> list[Row]:
    rng = np.random.default_rng(0)
    rows = []
    count = 16 if args.quick else 64
    X = [rng.standard_normal((count, 512, 9))]
    t = {
        "native": measure(functools.partial(run_native, X, 1), repeats=args.repeats),
        "matrix_1t": measure(functools.partial(run_native, X, 1, "matrix"), repeats=args.repeats),
        "fastcluster_1t": measure(functools.partial(run_fastcluster, X), warmup=0,
                                  repeats=args.ref_repeats),
        "scipy": measure(functools.partial(run_scipy, X), warmup=0, repeats=args.ref_repeats),
    }
    times = {k: v.median_s for k, v in t.items()}
    rows.append(Row(f"d>1 per thread: {count} x 512 points in 9-D", times,
                    {"threads": 1, "path": ward_method(512, 9),
                     **roofline(shape_of(X), times["native"], 1, rates),
                     **cpu_ratio(functools.partial(run_fastcluster, X),
                                 functools.partial(run_native, X, 1), args.repeats)}))

    layer = [rng.standard_normal((512, 512, 9))]  # one 512x512x3x3 conv
    if args.quick:
        layer = [layer[0][:64]]
    t = {
        "native": measure(functools.partial(run_native, layer, 2), repeats=args.repeats),
        "native_1t": measure(functools.partial(run_native, layer, 1), repeats=args.repeats),
        "fastcluster_2t": measure(functools.partial(run_fastcluster, layer, pool), warmup=0,
                                  repeats=args.ref_repeats),
        "fastcluster_1t": measure(functools.partial(run_fastcluster, layer), warmup=0,
                                  repeats=args.ref_repeats),
    }
    times = {k: v.median_s for k, v in t.items()}
    rows.append(Row(f"one 512x512x3x3 layer ({layer[0].shape[0]} problems)", times,
                    {"threads": 2, "path": ward_method(512, 9),
                     **roofline(shape_of(layer), times["native"], 2, rates),
                     **cpu_ratio(functools.partial(run_fastcluster, layer, pool),
                                 functools.partial(run_native, layer, 2), args.repeats)}))

    ones = [rng.standard_normal((256 if args.quick else 1024, 2048, 1))]  # a 2048-filter 1x1
    t = {
        "native": measure(functools.partial(run_native, ones, 1), repeats=args.repeats),
        "fastcluster_1t": measure(functools.partial(run_fastcluster, ones), warmup=0,
                                  repeats=args.ref_repeats),
    }
    times = {k: v.median_s for k, v in t.items()}
    rows.append(Row(f"1-D: {ones[0].shape[0]} x 2048 points", times,
                    {"threads": 1, "path": "sorted",
                     **roofline(shape_of(ones), times["native"], 1, rates)}))
    return rows


def layer_cut_rows(args, rates, pool) -> list[Row]:
    """REPrune's layer cut (k = n/2) against the Z route and fastcluster + fcluster."""
    rng = np.random.default_rng(2)
    threads = rates["threads"]
    # as REPrune passes them: transposed float32 views of a weight (filters, c_in, kh, kw)
    ones = [ward_problems(rng.standard_normal((2048, 128 if args.quick else 1024, 1, 1),
                                              dtype=np.float32))]
    layer = [ward_problems(rng.standard_normal((512, 64 if args.quick else 512, 3, 3),
                                               dtype=np.float32))]
    cases = [(f"layer cut 1-D: {ones[0].shape[0]} x 2048 points, 1 thread", ones, 1),
             (f"layer cut 9-D: {layer[0].shape[0]} x 512 points, 1 thread", layer, 1),
             (f"layer cut 9-D: {layer[0].shape[0]} x 512 points, {threads} threads", layer,
              threads)]
    resnet = layer_problems("resnet50", args.quick)
    cases.append((f"layer cut resnet50 all convs, {threads} threads", resnet, threads))
    rows = []
    for case, batches, t_count in cases:
        t = {
            "native": measure(functools.partial(run_layer_cut, batches, t_count),
                              repeats=args.repeats),
            "z_route": measure(functools.partial(run_z_route, batches, t_count),
                               repeats=args.repeats),
        }
        if "resnet50" not in case or args.quick:  # fastcluster takes ~15 s on all of ResNet-50
            key = "fastcluster_1t" if t_count == 1 else "fastcluster_2t"
            t[key] = measure(functools.partial(run_fastcluster_cut, batches,
                                               None if t_count == 1 else pool),
                             warmup=0, repeats=args.ref_repeats)
        times = {k: v.median_s for k, v in t.items()}
        rows.append(Row(case, times, {
            "threads": t_count, "problems": sum(b.shape[0] for b in batches),
            **roofline(shape_of(batches), times["native"], t_count, rates)}))
    return rows


def crossover_rows(args, rates) -> list[Row]:
    rows = []
    rng = np.random.default_rng(1)
    # either side of the rule's boundary d = n^2 / 256 up to n = 256 (csrc/ward.hpp,
    # choose_method), and beyond it
    cases = [(64, 9), (64, 25), (128, 49), (128, 128), (256, 128), (256, 256), (512, 512),
             (512, 2048), (1024, 49), (2048, 49)]
    if args.quick:
        cases = [(256, 16), (512, 49)]
    for n, d in cases:
        X = [rng.standard_normal((max(2, (1 << 22) // (n * n)), n, d))]
        t = {
            "native": measure(functools.partial(run_native, X, 1), repeats=args.repeats),
            "centroids_1t": measure(functools.partial(run_native, X, 1, "centroids"),
                                    repeats=args.repeats),
            "matrix_1t": measure(functools.partial(run_native, X, 1, "matrix"),
                                 repeats=args.repeats),
        }
        times = {k: v.median_s for k, v in t.items()}
        rows.append(Row(f"crossover: {X[0].shape[0]} x {n} points in {d}-D", times,
                        {"threads": 1, "path": ward_method(n, d),
                         **roofline(shape_of(X), times["native"], 1, rates)}))
    return rows


def memory_rows(args, rates) -> list[Row]:
    rows = []
    cases = [(20_000, 16, True), (100_000, 8, False)]
    if args.quick:
        cases = [(5_000, 16, True)]
    for n, d, with_fastcluster in cases:
        native = memory_case(n, d, "native")
        times = {"native": native["seconds"]}
        extra = {"threads": 1, "path": ward_method(n, d),
                 "rss_growth_mb": round(native["rss_growth_mb"], 1),
                 "matrix_would_need_mb": round(8 * n * n / 2**20)}
        if with_fastcluster:
            fc = memory_case(n, d, "fastcluster")
            times["fastcluster_1t"] = fc["seconds"]
            extra["fastcluster_rss_growth_mb"] = round(fc["rss_growth_mb"], 1)
        extra.update(roofline([(1, n, d)], native["seconds"], 1, rates))
        rows.append(Row(f"memory: {n} x {d}", times, extra))
    return rows


def layer_problems(model_name: str, quick: bool) -> list[np.ndarray]:
    problems = [ward_problems(w) for _, w in conv_weights(model_name)]
    problems = [p for p in problems if p.shape[1] > 1]
    if quick:  # a few layers of each kind, few channels each
        problems = [p[:16] for p in problems[:: max(1, len(problems) // 6)]]
    return problems


def model_rows(args, rates, pool) -> list[Row]:
    rows = []
    threads = rates["threads"]
    for model_name in ("resnet50", "vgg16"):
        problems = layer_problems(model_name, args.quick)
        subsets = {f"{model_name} all convs": problems}
        if model_name == "resnet50":
            subsets[f"{model_name} 1x1 convs (d=1)"] = [p for p in problems if p.shape[2] == 1]
            subsets[f"{model_name} kxk convs (d>1)"] = [p for p in problems if p.shape[2] > 1]
        for case, subset in subsets.items():
            t = {
                "native": measure(functools.partial(run_native, subset, threads),
                                  repeats=args.repeats),
                "native_1t": measure(functools.partial(run_native, subset, 1),
                                     repeats=args.repeats),
                "fastcluster_2t": measure(functools.partial(run_fastcluster, subset, pool),
                                          warmup=0, repeats=args.ref_repeats),
                "fastcluster_1t": measure(functools.partial(run_fastcluster, subset), warmup=0,
                                          repeats=args.ref_repeats),
            }
            # scipy's loop takes minutes on the 1x1 convs; it runs on the whole models only.
            if "(" not in case:
                t["scipy"] = measure(functools.partial(run_scipy, subset), warmup=0,
                                     repeats=args.ref_repeats)
            times = {k: v.median_s for k, v in t.items()}
            rows.append(Row(case, times, {
                "threads": threads, "layers": len(subset),
                "problems": sum(p.shape[0] for p in subset),
                **roofline(shape_of(subset), times["native"], threads, rates)}))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases, for a smoke check")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the fast paths")
    parser.add_argument("--ref-repeats", type=int, default=1, help="repeats of the references")
    parser.add_argument("--skip-models", action="store_true", help="no ResNet-50/VGG-16 rows")
    parser.add_argument("--only", choices=["per-thread", "layer-cut", "crossover", "memory",
                                           "models"],
                        help="measure one group and replace its rows in the saved JSON")
    args = parser.parse_args(argv)
    from accelprune._backend import thread_count

    threads = thread_count(None)
    started = time.time()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rates = {1: machine_rates(1), threads: machine_rates(threads), "threads": threads}
    groups = {
        "per-thread": lambda pool: per_thread_rows(args, rates, pool),
        "layer-cut": lambda pool: layer_cut_rows(args, rates, pool),
        "crossover": lambda pool: crossover_rows(args, rates),
        "memory": lambda pool: memory_rows(args, rates),
        "models": lambda pool: [] if args.skip_models else model_rows(args, rates, pool),
    }
    with ThreadPoolExecutor(2) as pool:
        rows = [row for name, group in groups.items() if args.only in (None, name)
                for row in group(pool)]
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    name = "ward_quick" if args.quick else "ward"
    doc = report(
        name,
        rows,
        fast="native",
        references=["scipy", "fastcluster_2t", "fastcluster_1t", "native_1t", "matrix_1t",
                    "centroids_1t", "z_route"],
        notes={
            "cpu_model": cpu_model(),
            "machine_rates": {str(k): v for k, v in rates.items() if k != "threads"},
            "load_average_before_after": [load_before, load_after],
            "wall_s": round(time.time() - started, 1),
            "weights": "random init (only shapes matter for timing)",
            "repeats": {"fast": args.repeats, "reference": args.ref_repeats},
            "roofline": "work model, see the module docstring; %dgemm and %copy against "
                        "machine_rates measured in the same run",
            "targets": "d>1 per thread >= 4x fastcluster_1t; 20,000 x 16 under 600 MB "
                       "growth; 100,000 x 8 completes; ResNet-50 >= 50x scipy",
        },
        save=args.only is None,
    )
    if args.only is not None:
        merge_rows(name, doc, args.only)


# The case names of the groups whose rows all start alike (merge_rows replaces them as a whole).
GROUP_PREFIXES = {"crossover": "crossover:", "memory": "memory:", "layer-cut": "layer cut"}


def merge_rows(name: str, doc: dict, group: str) -> None:
    """Replace the rows of one group in results/{name}.json, noting when and in what load."""
    from benchmarks.harness import RESULTS_DIR

    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():  # nothing to merge into: these rows are the file
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"(saved {len(doc['rows'])} rows as {path.name})")
        return
    saved = json.loads(path.read_text())
    fresh = {row["case"]: row for row in doc["rows"]}
    # a group whose cases changed leaves no rows of the old cases behind
    prefix = GROUP_PREFIXES.get(group)
    kept = [row for row in saved["rows"]
            if row["case"] in fresh or prefix is None or not row["case"].startswith(prefix)]
    saved["rows"] = [fresh.pop(row["case"], row) for row in kept] + list(fresh.values())
    saved["notes"].setdefault("remeasured", []).append({
        "group": group, "date": doc["date"], "cases": [row["case"] for row in doc["rows"]],
        "load_average_before_after": doc["notes"]["load_average_before_after"]})
    path.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"(merged {len(doc['rows'])} rows into {path.name})")


if __name__ == "__main__":
    main()

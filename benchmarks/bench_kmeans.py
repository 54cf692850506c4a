"""C-SGD's clustering at transformer scale: :func:`accelprune.kmeans.kmeans` against scipy.

Two channel groups, random Gaussian filters (float32), half the filters kept:

* ``vit_b_mlp``: ViT-B/16's MLP, 3072 filters of 768 into 1536 clusters;
* ``llama7b_mlp``: LLaMA-7B's MLP, 11008 filters of 4096 into 5504 clusters.

Paths: ``accelprune`` = :func:`accelprune.kmeans.kmeans` with its defaults (blocked k-means++ in
16 rounds, at most 10 Lloyd iterations, tol 1e-4) on ``--device``; ``scipy`` = C-SGD's reference
clustering, :func:`accelprune.selection.cluster_filters` with ``backend="reference"`` (exact
k-means++ seeding with scipy's draws, then scipy's float64 ``kmeans2``, 10 iterations);
``kmeans_ref`` = :func:`accelprune.kmeans.kmeans_ref`
(this module's seeds, then scipy's ``kmeans2``). scipy runs on the small case only unless
``--scipy-large`` (the issue extrapolates about 17 minutes there). Besides the times: the
Lloyd iterations run, whether they converged, each path's CPU time (process time, all threads,
last run: on a shared machine, CPU time / wall time shows how much of the machine a run got, and
CPU-time ratios are the fairer comparison), and the inertia relative to scipy's.

Run: ``python -m benchmarks.bench_kmeans [--quick] [--device cpu|cuda] [--repeats N]
[--threads N] [--scipy-large]``.
JSON: ``benchmarks/results/kmeans.json`` (``kmeans_cuda.json`` on a GPU).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from accelprune.kmeans import kmeans_fit, kmeans_ref
from accelprune.selection import cluster_filters
from benchmarks.harness import Row, measure, report

CASES = {  # name: (filters, features per filter, clusters)
    "vit_b_mlp": (3072, 768, 1536),
    "llama7b_mlp": (11008, 4096, 5504),
}
QUICK_CASES = {"vit_b_mlp/4": (768, 192, 384), "llama7b_mlp/8": (1376, 512, 688)}


def inertia(X: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances to the cluster means (float64)."""
    k = labels.max() + 1
    sums = np.zeros((k, X.shape[1]))
    np.add.at(sums, labels, X)
    means = sums / np.bincount(labels, minlength=k)[:, None]
    return float(((X - means[labels]) ** 2).sum())


def run_case(name: str, n: int, d: int, k: int, device: torch.device, repeats: int,
             with_scipy: bool) -> Row:
    X = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    Xd = X.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    big = n * k * d > 1e11
    out, cpu = {}, {}

    def run(path, fn):
        def call():
            start = time.process_time()
            out[path] = fn()
            cpu[path] = time.process_time() - start
        return call

    timings = {"accelprune": measure(run("accelprune", lambda: kmeans_fit(Xd, k, seed=0)),
                                     warmup=0 if big else 1, repeats=repeats,
                                     sync=sync).median_s}
    result = out["accelprune"]
    X64 = X.double().numpy()
    extra = {"n x d -> k": f"{n} x {d} -> {k}", "iters": result.n_iter,
             "converged": result.converged}
    paths = {"scipy": lambda: cluster_filters(X64, k, backend="reference"),
             "kmeans_ref": lambda: kmeans_ref(X, k)}
    for path, fn in paths.items() if with_scipy else ():
        timings[path] = measure(run(path, fn), warmup=0, repeats=1).median_s
    for path in timings:
        extra[f"cpu s ({path})"] = f"{cpu[path]:.2f}"
    if with_scipy:
        ours = inertia(X64, result.labels)
        extra["inertia / scipy"] = f"{ours / inertia(X64, out['scipy']):.4f}"
        extra["inertia / kmeans_ref"] = f"{ours / inertia(X64, out['kmeans_ref']):.4f}"
    print(f"  {name}: {timings}  {extra}", flush=True)
    return Row(name, timings, extra)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return next(names)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats of the fast path (default 3; 1 on the large case)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, one per core)")
    parser.add_argument("--scipy-large", action="store_true",
                        help="also run scipy on the LLaMA-sized group (many minutes)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = QUICK_CASES if args.quick else CASES
    load_before = os.getloadavg()
    rows = []
    for i, (name, (n, d, k)) in enumerate(cases.items()):
        big = n * k * d > 1e11
        repeats = args.repeats or (1 if big else 3)
        rows.append(run_case(name, n, d, k, device, repeats, with_scipy=i == 0 or
                             args.scipy_large or args.quick))
    suffix = ("" if device.type == "cpu" else f"_{device.type}") + (
        f"_threads{args.threads}" if args.threads else "")
    return report(f"kmeans{suffix}" + ("_quick" if args.quick else ""), rows,
                  fast="accelprune", references=["scipy", "kmeans_ref"],
                  notes={"device": str(device), "threads": torch.get_num_threads(),
                         "cpu_model": cpu_model(),
                         "load_average_before_after": [round(load_before[0], 2),
                                                       round(os.getloadavg()[0], 2)],
                         "data": "standard normal float32, torch seed 0",
                         "accelprune": "kmeans(seed=0) defaults: init_rounds=16, iters=10, "
                                       "tol=1e-4",
                         "scipy": "selection.cluster_filters(backend='reference'): exact "
                                  "k-means++ + kmeans2 float64"})


if __name__ == "__main__":
    main()

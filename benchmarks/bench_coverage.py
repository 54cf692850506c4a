"""Greedy maximum coverage (REPrune's filter selection) on the labels of real models.

For every conv of torchvision ResNet-50 and VGG-16 (random init: only shapes matter) at 50%
sparsity: k = n // 2 filters to keep; each input channel's kernels are Ward-clustered and every
channel is cut at the layer-wide height h_l = max over channels of the height of merge n - k
(ALGORITHMS.md section 3, step 2). Labels are computed once, before any timing. Times, for one
``max_coverage`` call per layer over a whole model (or a named subset of its layers):

* ``numba``: accelprune's fast path, all cores (``numba_1t``: one thread);
* ``numpy``: greedy with every gain recomputed by NumPy at each step, what one would write
  without incremental updates (``accelprune.coverage._max_coverage_numpy``);
* ``reference``: the textbook Python greedy with sets (``max_coverage_ref``). It needs minutes
  for a whole ResNet-50, so by default it runs only on the layers with at most 128 filters,
  a row of its own; ``--reference-all`` runs it on whole models too.

Also reported, each in a fresh subprocess: importing numba; the first call with an empty Numba
cache (compiling: "cold"); the first call with the cache it left (loading: "warm"); and, in a
process that called :func:`accelprune.coverage.warmup` first (what a pruner does when it is
built), the warmup itself and then the first call, which is then free of loading. The timed
rows above are all after warmup.

Roofline columns (a work model, not counters): ``MB`` is what the fast path must move at least,
``BYTES_PER_KERNEL`` per (channel, filter) label: the index build reads the int32 label and
writes a slot and a member entry (2 bytes each: slots up to 8,191 filters, members up to 32,767;
4 beyond; the model below counts 2); the greedy reads each slot
row it selects and, as every pair is covered once, each member once with its int64 gain read and
written. ``GB/s`` is that over the Numba time, ``% peak BW`` against a streaming add measured in
the same run (bench_kernels.stream_gbs). Far below 100%: the greedy waits on scattered member
lists (latency), not on bandwidth.

Run: ``python -m benchmarks.bench_coverage [--quick] [--repeats N] [--reference-all]``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from accelprune._backend import thread_count
from accelprune.cluster import cut_linkage, ward_linkage_batched
from accelprune.coverage import _max_coverage_numpy, max_coverage, max_coverage_ref, warmup
from accelprune.selection import ward_problems
from benchmarks.bench_kernels import roofline, stream_gbs
from benchmarks.harness import Row, measure, report
from benchmarks.model_shapes import conv_weights

SPARSITY = 0.5
REFERENCE_MAX_FILTERS = 128  # the default reference subset: layers this narrow
TARGET_SECONDS, TARGET_RATIO = 0.1, 200  # ResNet-50 on 2 cores, and numpy / numba
BYTES_PER_KERNEL = 4 + 2 + 2 + 1 + 2 + 16  # label, slot, member; slot row, member, gain r+w


def layer_labels(weight) -> tuple[np.ndarray, int]:
    """REPrune's cluster labels (c_in, n) of one conv at SPARSITY, and k."""
    X = ward_problems(weight)
    n = X.shape[1]
    k = max(1, n - int(round(SPARSITY * n)))
    if k == n:
        return np.tile(np.arange(n, dtype=np.int32), (X.shape[0], 1)), k
    Z = ward_linkage_batched(X)
    height = Z[:, n - k - 1, 2].max()  # merge n - k is row n - k - 1
    return cut_linkage(Z, height=np.full(len(Z), height)), k


def model_layers(model_name: str, quick: bool) -> list[tuple[str, np.ndarray, int]]:
    weights = conv_weights(model_name)
    if quick:  # the narrow layers only, a smoke check
        weights = [(name, w) for name, w in weights if w.shape[0] * w.shape[1] <= 64 * 256][:8]
    return [(name, *layer_labels(w)) for name, w in weights]


def run_all(layers, solve):
    return [solve(labels, k) for _, labels, k in layers]


FIRST_CALL = textwrap.dedent("""
    import sys, time
    import numpy as np
    from accelprune.coverage import max_coverage, warmup
    labels = np.random.default_rng(0).integers(0, 8, (32, 64)).astype(np.int32)
    t0 = time.perf_counter()
    import numba
    t1 = time.perf_counter()
    warm = warmup() if sys.argv[1] == "warmup" else 0.0
    t2 = time.perf_counter()
    max_coverage(labels, 32)
    print(t1 - t0, warm, time.perf_counter() - t2)
""")


def first_call_seconds(cache_dir: str, warm_up: bool = False) -> tuple[float, float, float]:
    """Seconds to import numba, for warmup() (0 unless ``warm_up``), and for the first
    max_coverage call, in a new Python process using ``cache_dir`` as Numba's cache."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir,
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", FIRST_CALL, "warmup" if warm_up else "call"],
                         env=env, check=True, capture_output=True, text=True)
    import_s, warmup_s, call_s = out.stdout.strip().splitlines()[-1].split()
    return float(import_s), float(warmup_s), float(call_s)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few narrow layers, for a smoke check")
    parser.add_argument("--repeats", type=int, default=7, help="repeats of the Numba path")
    parser.add_argument("--reference-all", action="store_true",
                        help="also run the textbook reference on whole models (minutes)")
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    with tempfile.TemporaryDirectory() as cache_dir:
        numba_import_s, _, compile_s = first_call_seconds(cache_dir)
        _, _, cached_s = first_call_seconds(cache_dir)
        _, warmup_s, after_warmup_s = first_call_seconds(cache_dir, warm_up=True)
    jit = {"import numba": numba_import_s,
           "first call, cold (empty cache: compiles)": compile_s,
           "first call, warm (next process: loads the cache)": cached_s,
           "warmup() in a new process (loads the cache)": warmup_s,
           "first call after warmup()": after_warmup_s}
    warmup()  # loaded (or compiled) before any timing
    import torch

    peak = stream_gbs(torch.device("cpu"))

    rows, totals = [], {}
    for model_name in ("resnet50", "vgg16"):
        layers = model_layers(model_name, args.quick)
        narrow = [layer for layer in layers if layer[1].shape[1] <= REFERENCE_MAX_FILTERS]
        cases = {f"{model_name} {'quick subset' if args.quick else 'all convs'}": layers}
        if not args.quick:
            cases[f"{model_name} convs with <= {REFERENCE_MAX_FILTERS} filters"] = narrow
        for case, subset in cases.items():
            slow_repeats = 3 if args.quick else 1
            numpy_results = []

            def numpy_greedy(subset=subset, out=numpy_results):
                out[:] = run_all(subset, _max_coverage_numpy)

            def numba_all_threads(subset=subset):
                run_all(subset, max_coverage)

            def numba_one_thread(subset=subset):
                run_all(subset, lambda lab, keep: max_coverage(lab, keep, n_threads=1))

            def reference(subset=subset):
                run_all(subset, max_coverage_ref)

            timings = {
                "numba": measure(numba_all_threads, repeats=args.repeats),
                "numba_1t": measure(numba_one_thread, repeats=args.repeats),
                "numpy": measure(numpy_greedy, warmup=0, repeats=slow_repeats),
            }
            with_reference = args.quick or args.reference_all or subset is narrow
            if with_reference:
                timings["reference"] = measure(reference, warmup=0, repeats=slow_repeats)
            # the timed paths must agree, or the comparison means nothing
            for fast, slow in zip(run_all(subset, max_coverage), numpy_results, strict=True):
                assert np.array_equal(fast.selected, slow.selected), case
            kernels = sum(labels.size for _, labels, _ in subset)
            rows.append(Row(case, {name: t.median_s for name, t in timings.items()}, {
                "layers": len(subset),
                "kernels": kernels,
                "reference": "yes" if with_reference else "skipped",
                **roofline(kernels * BYTES_PER_KERNEL, timings["numba"].median_s, peak),
            }))
            totals[case] = timings

    doc = report(
        "coverage_quick" if args.quick else "coverage",
        rows,
        fast="numba",
        references=["numpy", "reference"],
        notes={
            "sparsity": SPARSITY,
            "labels": "Ward per input channel, all channels cut at the layer-wide height of merge "
                      "n - k (ALGORITHMS.md 3.2); computed before timing",
            "threads": "index built by Python threads over channel blocks of >= 2**17 kernels "
                       "(all cores); the greedy loop is serial; no Numba threading layer. "
                       "numba_1t: one thread",
            "cpus": thread_count(None),
            "load_average_at_start": load_at_start,
            "stream_gbs": peak,
            "jit_seconds": jit,
            "reference_subset": f"layers with <= {REFERENCE_MAX_FILTERS} filters"
                                " (whole models too with --reference-all)",
        },
    )
    print("\nin a fresh process:")
    for what, seconds in jit.items():
        print(f"  {what}: {seconds:.2f} s")
    key = "resnet50 all convs"
    if key in totals:
        fast, numpy_s = totals[key]["numba"].median_s, totals[key]["numpy"].median_s
        one_thread = totals[key]["numba_1t"].median_s
        print(f"\nResNet-50, all convs: {fast:.3f} s on {thread_count(None)} threads "
              f"(target <= {TARGET_SECONDS} s on 2 cores); numpy / numba = {numpy_s / fast:.0f}x "
              f"(target >= {TARGET_RATIO}x); with one thread {numpy_s / one_thread:.0f}x")
    return doc


if __name__ == "__main__":
    main()

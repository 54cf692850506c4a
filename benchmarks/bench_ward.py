"""Ward clustering throughput: every REPrune clustering problem of a real model.

For each conv of torchvision ResNet-50 and VGG-16 (random init: only shapes matter), one Ward
problem per input channel with the kernels of all filters as points (d = kh*kw). Times:

* ``native``: accelprune's batched engine, one call per layer, all cores;
* ``native_1t``: the same on one thread;
* ``scipy``: a loop of ``scipy.cluster.hierarchy.linkage(x, "ward")``;
* ``fastcluster_1t`` / ``fastcluster_2t``: ``fastcluster.linkage_vector(x, "ward")`` in a loop
  and in a 2-thread pool (fastcluster releases the GIL).

Run: ``python -m benchmarks.bench_ward [--quick] [--repeats N]``.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.cluster.hierarchy as sch

from accelprune import ward_linkage_batched
from benchmarks.harness import Row, measure, report
from benchmarks.model_shapes import conv_weights, ward_problems


def layer_problems(model_name: str, quick: bool) -> list[np.ndarray]:
    problems = [ward_problems(w) for _, w in conv_weights(model_name)]
    problems = [p for p in problems if p.shape[1] > 1]
    if quick:  # a few layers of each kind, few channels each
        problems = [p[:16] for p in problems[:: max(1, len(problems) // 6)]]
    return problems


def run_all(problems, fn):
    for batch in problems:
        fn(batch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few small layers, for a smoke check")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the fast paths")
    parser.add_argument("--ref-repeats", type=int, default=1, help="repeats of scipy (slow)")
    args = parser.parse_args(argv)
    import fastcluster

    pool = ThreadPoolExecutor(2)
    rows = []
    for model_name in ("resnet50", "vgg16"):
        problems = layer_problems(model_name, args.quick)
        subsets = {f"{model_name} all convs": problems}
        if model_name == "resnet50":
            subsets[f"{model_name} 1x1 convs (d=1)"] = [p for p in problems if p.shape[2] == 1]
            subsets[f"{model_name} kxk convs (d>1)"] = [p for p in problems if p.shape[2] > 1]
        for case, subset in subsets.items():
            fast, ref = args.repeats, args.ref_repeats
            timings = {
                "native": measure(lambda: run_all(subset, ward_linkage_batched), repeats=fast),
                "native_1t": measure(
                    lambda: run_all(subset, lambda b: ward_linkage_batched(b, n_threads=1)),
                    repeats=fast),
                "fastcluster_2t": measure(lambda: run_all(
                    subset, lambda b: list(pool.map(lambda x: fastcluster.linkage_vector(x, "ward"), b))),
                    warmup=0, repeats=ref),
                "fastcluster_1t": measure(lambda: run_all(
                    subset, lambda b: [fastcluster.linkage_vector(x, "ward") for x in b]),
                    warmup=0, repeats=ref),
                "scipy": measure(lambda: run_all(
                    subset, lambda b: [sch.linkage(x, "ward") for x in b]), warmup=0, repeats=ref),
            }
            rows.append(Row(
                case,
                {k: t.median_s for k, t in timings.items()},
                {"layers": len(subset), "problems": sum(p.shape[0] for p in subset)},
            ))
    report(
        "ward_quick" if args.quick else "ward",
        rows,
        fast="native",
        references=["scipy", "fastcluster_2t", "fastcluster_1t", "native_1t"],
        notes={
            "weights": "random init (only shapes matter for timing)",
            "repeats": {"fast": args.repeats, "reference": args.ref_repeats},
            "targets": "ResNet-50 >= 50x scipy and >= 7x fastcluster_2t; VGG-16 >= 2x fastcluster_2t",
        },
    )


if __name__ == "__main__":
    main()

"""What Centripetal SGD costs per training step, on torchvision ResNet-50 (random init).

The whole pipeline of :class:`accelprune.CSGD` (keep ratio 0.5, k-means clusters, coupled
residual groups included): every clustered conv weight, its BN γ/β (and biases) are transformed
between ``backward()`` and ``optimizer.step()``. Two rows:

* ``transform``: the gradient transform alone, on gradients from one backward pass;
* ``train step``: forward + backward + transform + SGD-momentum step; ``sgd`` is the same step
  without C-SGD, so ``overhead`` is what C-SGD adds to training.

Transform paths: ``accelprune`` = :meth:`CSGD.apply_gradients` (:func:`csgd_transform_` with a
prebuilt plan: the fused Triton kernel on CUDA, the fused Numba pass on the CPU);
``function`` = :func:`csgd_transform_` called with the label arrays, as a user's own loop would
(the plan is cached by the labels' content); ``reference`` = ``backend="reference"`` (the torch
segment form); ``dense_ref`` = the paper's ``G' = M·G + D·W`` (:func:`csgd_transform_dense_ref`,
M and D built per call); ``segment_ref`` = :func:`csgd_transform_ref` (a Python loop over
clusters, transform row only). Roofline columns beside the transform: the bytes a perfect
kernel moves (read W and G, write G), the GB/s of ``accelprune`` and ``function``, and the
percentage of the machine's bandwidth (GPU: nominal DRAM; CPU: a measured STREAM-style add).
The setup (tracing the model and k-means on every group, once per training run) is reported
beside them.

Run: ``python -m benchmarks.bench_csgd [--quick] [--device cpu|cuda] [--repeats N]``. On the CPU
inputs are small (the step, not the transform, dominates anyway); on a GPU, ImageNet-sized.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from accelprune import CSGD
from accelprune.kernels import csgd_transform_, csgd_transform_dense_ref, csgd_transform_ref
from benchmarks.bench_kernels import peak_bandwidth_gbs, roofline
from benchmarks.harness import Row, measure, report


def build(device: torch.device, batch: int, size: int, keep_ratio: float):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    t0 = time.perf_counter()
    # the third argument becomes ``sparsity`` (issue 11); at 0.5 both readings agree
    csgd = CSGD(model, x[:1], keep_ratio, centripetal_strength=0.05, weight_decay=1e-4)
    setup_s = time.perf_counter() - t0
    return model, csgd, x, y, setup_s


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small inputs, few repeats (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        batch, size = (8, 112) if args.quick else (64, 224)
    else:
        batch, size = (2, 64) if args.quick else (8, 128)
    repeats = args.repeats or (3 if args.quick else 10)
    sync = torch.cuda.synchronize if cuda else None

    model, csgd, x, y, setup_s = build(device, batch, size, args.keep_ratio)
    params = [t.param for t in csgd.transformed]
    labels = [csgd.clusters[t.group].labels for t in csgd.transformed]
    etas = [t.weight_decay for t in csgd.transformed]
    epss = [t.centripetal for t in csgd.transformed]
    optimizer = torch.optim.SGD(csgd.param_groups(), lr=1e-4, momentum=0.9)
    model.train()

    def backward():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()

    transforms = {
        "accelprune": csgd.apply_gradients,
        "function": lambda: csgd_transform_(params, labels, weight_decay=etas, centripetal=epss),
        "reference": lambda: csgd_transform_(params, labels, weight_decay=etas, centripetal=epss,
                                             backend="reference"),
        "dense_ref": lambda: csgd_transform_dense_ref(params, labels, weight_decay=etas,
                                                      centripetal=epss),
        "segment_ref": lambda: csgd_transform_ref(params, labels, weight_decay=etas,
                                                  centripetal=epss),
    }

    def train_step(transform=None):
        def step():
            backward()
            if transform is not None:
                transform()
            optimizer.step()
        return step

    backward()  # gradients for the transform-only row (the transform rewrites them in place)
    transform_times = {}
    for name, fn in transforms.items():  # the Python loop over clusters is slow: fewer repeats
        n = repeats if name != "segment_ref" else max(2, repeats // 3)
        transform_times[name] = measure(fn, repeats=n, sync=sync).median_s
    step_times = {"sgd": measure(train_step(), repeats=repeats, sync=sync).median_s}
    for name in ("accelprune", "dense_ref"):
        step = train_step(transforms[name])
        step_times[name] = measure(step, repeats=repeats, sync=sync).median_s

    shape = {"model": "resnet50", "input": f"{batch}x3x{size}x{size}", "device": str(device),
             "params": len(params), "clusters": sum(c.n_clusters for c in csgd.clusters)}
    bytes_moved = 3 * sum(p.numel() * p.element_size() for p in params)  # W, G read; G written
    peak = peak_bandwidth_gbs(device)
    function_s = transform_times["function"]
    transform_extra = {**roofline(bytes_moved, transform_times["accelprune"], peak),
                       "GB/s function": round(bytes_moved / function_s / 1e9, 1),
                       "dense_ref / function": f"{transform_times['dense_ref'] / function_s:.1f}x"}
    rows = [
        Row("transform", transform_times, {**shape, **transform_extra, "overhead": ""}),
        Row("train step", step_times,
            {**shape, "overhead": f"{step_times['accelprune'] / step_times['sgd'] - 1:+.1%}"}),
    ]
    return report("csgd_gpu" if cuda else "csgd", rows, fast="accelprune",
                  references=["dense_ref", "segment_ref", "reference"],
                  notes={"setup_s (trace + k-means, once)": round(setup_s, 2),
                         "peak_bandwidth_GBps": peak,
                         "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                         "groups": len(csgd.groups), "keep_ratio": args.keep_ratio,
                         "quick": args.quick},
                  save=not args.quick)


if __name__ == "__main__":
    main()

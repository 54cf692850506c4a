"""Importance scoring and the C-SGD gradient transform over a whole model's parameters.

Parameters of torchvision ResNet-50 and VGG-16 (random init: only shapes matter): every conv
weight and bias and every BatchNorm γ/β. The final classifier and VGG's fully connected layers
are left out (C-SGD prunes conv filters; a dense (n, n) baseline on VGG's 4096 x 25088 linear
alone would be ~0.8 TFLOP).

Importance (one call scores all tensors): ``triton`` = :func:`filter_scores` on CUDA (one
launch), ``eager`` = :func:`filter_scores_ref` (a torch loop over layers).

C-SGD (one call transforms all params in place), clusters: per conv layer, n/2 random cluster
ids shared by the conv weight, its bias and its BN (sizes from 1 up, like k-means' output):

* ``function``: :func:`csgd_transform_` called with the label arrays (as a user calling the
  function at every step would; the plan is cached by the labels' content); on CUDA the fused
  Triton kernel, on the CPU the fused Numba pass;
* ``plan``: the same with a prebuilt :class:`CSGDPlan` (what :class:`accelprune.CSGD` does);
* ``reference``: ``backend="reference"``, the torch segment form (index_add_ / index_select);
* ``dense``: ``G' = M·G + D·W`` with M and D prebuilt (the paper's form; building them is not
  timed, which favours the baseline).

Roofline columns: MB is what a perfect kernel moves (importance reads each weight, and gradient,
once; C-SGD reads W and G and writes G), GB/s what the fast path achieved, % peak BW against the
machine's: on a GPU its nominal DRAM bandwidth (memory clock x bus width), on the CPU a measured
STREAM-style add (so on a busy machine both shrink together).

Run: ``python -m benchmarks.bench_kernels [--quick] [--repeats N] [--device cpu|cuda]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from accelprune.kernels import CSGDPlan, csgd_transform_, filter_scores, filter_scores_ref
from accelprune.kernels.csgd import dense_operators
from benchmarks.harness import Row, measure, report


@dataclasses.dataclass
class Layer:
    """One conv with the params C-SGD transforms together: weight, bias, BN γ, BN β."""
    name: str
    params: list[torch.Tensor]
    labels: torch.Tensor  # (n,) cluster ids shared by the layer's params


def model_layers(model_name: str, device: torch.device, *, quick: bool,
                 seed: int = 0) -> list[Layer]:
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, model_name)(weights=None)
    layers: list[Layer] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            params = [module.weight] + ([module.bias] if module.bias is not None else [])
            layers.append(Layer(name, params, torch.empty(0)))
        elif isinstance(module, torch.nn.BatchNorm2d) and layers:
            # torchvision builds each BN right after the conv it normalises
            if layers[-1].params[0].shape[0] == module.num_features and len(layers[-1].params) < 3:
                layers[-1].params += [module.weight, module.bias]
    if quick:  # a spread of small and large layers
        layers = layers[:: max(1, len(layers) // 8)]
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in layers:
        n = layer.params[0].shape[0]
        labels = torch.randint(0, max(1, n // 2), (n,), generator=g)
        params = []
        for p in layer.params:
            q = p.detach().to(device).requires_grad_()
            q.grad = torch.randn(q.shape, generator=g).to(device)
            params.append(q)
        out.append(Layer(layer.name, params, labels.to(device)))
    return out


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    """The memory bandwidth to compare with, in GB/s.

    GPU: nominal DRAM bandwidth (double data rate x bus width). CPU: measured, a STREAM-style
    add (``c = a + b`` on 3 x 256 MB float32, torch's threads), the best of 5: what this
    machine's cores can move now (others' work on a shared machine lowers it too).
    """
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        clock_khz = getattr(props, "memory_clock_rate", 0)
        bus_bits = getattr(props, "memory_bus_width", 0)
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None
    return stream_gbs(device)


def stream_gbs(device: torch.device, n: int = 1 << 26) -> float:
    """Measured memory bandwidth (GB/s) of ``c = a + b`` on float32 arrays of ``n`` elements
    (three 256 MB streams), the best of 5."""
    a, b = torch.ones(n, device=device), torch.ones(n, device=device)
    c = torch.empty(n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    best = measure(lambda: torch.add(a, b, out=c), warmup=1, repeats=5, sync=sync).min_s
    return 3 * n * 4 / best / 1e9


def roofline(bytes_moved: int, seconds: float, peak: float | None) -> dict[str, object]:
    """The extra columns: bytes a perfect kernel moves, achieved GB/s, % of the machine's."""
    achieved = bytes_moved / seconds / 1e9
    extra: dict[str, object] = {"MB": round(bytes_moved / 1e6, 1), "GB/s": round(achieved, 1)}
    if peak:
        extra["% peak BW"] = round(100 * achieved / peak, 1)
    return extra


def importance_rows(model_name, layers, device, timer, peak) -> list[Row]:
    weights = [p for layer in layers for p in layer.params if p.dim() > 1]
    gammas = [layer.params[-2] for layer in layers if len(layer.params) >= 3]
    tensors = weights + gammas
    grads = [t.grad for t in tensors]
    rows = []
    for kind in ("l1", "l2", "taylor"):
        kw = dict(kind=kind, grads=grads if kind == "taylor" else None)
        reads = 2 if kind == "taylor" else 1  # weights, and gradients for taylor
        bytes_moved = reads * sum(t.numel() * t.element_size() for t in tensors)
        timings = {"eager": timer(lambda kw=kw: filter_scores_ref(tensors, **kw))}
        if device.type == "cuda":
            timings["triton"] = timer(lambda kw=kw: filter_scores(tensors, backend="triton",
                                                                  **kw))
        fast = timings.get("triton", timings["eager"])
        extra = {"tensors": len(tensors), **roofline(bytes_moved, fast, peak)}
        rows.append(Row(f"{model_name} {kind}", timings, extra))
    return rows


def csgd_rows(model_name, layers, device, timer, peak, eta=1e-4, eps=3e-3) -> list[Row]:
    params, clusters, etas, epss = [], [], [], []
    for layer in layers:
        for j, p in enumerate(layer.params):
            params.append(p)
            clusters.append(layer.labels)
            etas.append(eta if j == 0 else 0.0)  # ALGORITHMS.md §4: bias/BN get η = 0, 0.1·ε
            epss.append(eps if j == 0 else 0.1 * eps)
    plan = CSGDPlan(params, clusters)
    coefs = dict(weight_decay=etas, centripetal=epss)

    dense_ops = [(p, *dense_operators(labels, e, c))
                 for p, labels, e, c in zip(params, clusters, etas, epss, strict=True)]

    def dense():
        with torch.no_grad():
            for p, M, D in dense_ops:
                n = p.shape[0]
                G = p.grad.view(n, -1)
                G.copy_(M @ G + D @ p.detach().view(n, -1))

    def function():  # the label arrays passed at every call (the plan is cached by content)
        csgd_transform_(params, clusters, backend="auto", **coefs)

    def with_plan():
        csgd_transform_(params, plan, backend="auto", **coefs)

    timings = {"function": timer(function), "plan": timer(with_plan), "dense": timer(dense),
               "reference": timer(lambda: csgd_transform_(params, plan, backend="reference",
                                                           **coefs))}
    bytes_moved = 3 * sum(p.numel() * p.element_size() for p in params)  # read W, G; write G
    path = "triton fused" if device.type == "cuda" else "numba fused (CPU)"
    extra = {"fast path": path, "params": len(params),
             "clusters": sum(len(s) for s in plan.sizes),
             **roofline(bytes_moved, timings["function"], peak),
             "GB/s plan": round(bytes_moved / timings["plan"] / 1e9, 1),
             "GB/s reference": round(bytes_moved / timings["reference"] / 1e9, 1),
             "dense / plan": f"{timings['dense'] / timings['plan']:.1f}x"}
    if device.type == "cuda" and peak:
        # As in training (no sync per step): ten calls queued, one sync. The host work of a call
        # then overlaps the previous kernel, so this is the kernel's own throughput.
        queued = timer(lambda: [with_plan() for _ in range(10)]) / 10
        extra["GB/s queued"] = round(bytes_moved / queued / 1e9, 1)
        extra["% peak queued"] = round(100 * bytes_moved / queued / 1e9 / peak, 1)
    return [Row(f"{model_name} C-SGD", timings, extra)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few layers, for a smoke check")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); on a busy machine 1 avoids "
                             "OpenMP threads spinning against each other")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    repeats = 3 if args.quick else args.repeats

    def timer(fn):
        return measure(fn, warmup=2 if device.type == "cuda" else 1, repeats=repeats,
                       sync=sync).median_s

    peak = peak_bandwidth_gbs(device)
    imp, cs = [], []
    for model_name in args.models:
        layers = model_layers(model_name, device, quick=args.quick)
        imp += importance_rows(model_name, layers, device, timer, peak)
        cs += csgd_rows(model_name, layers, device, timer, peak)

    suffix = "_quick" if args.quick else ""
    tag = "_gpu" if device.type == "cuda" else "_cpu"
    notes = {"device": str(device), "repeats": repeats, "peak_bandwidth_GBps": peak,
             "stream_add_GBps (measured)": round(stream_gbs(device), 1),
             "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
             "cpu_threads": torch.get_num_threads(),
             "weights": "random init (only shapes matter)"}
    report(f"kernels_importance{tag}{suffix}", imp, fast="triton", references=["eager"],
           notes={**notes, "target": "H100: triton >= 5x eager"})
    report(f"kernels_csgd{tag}{suffix}", cs, fast="function", references=["dense", "reference"],
           notes={**notes, "target": "csgd_transform_ as a function (labels each call) >= 50x "
                                    "dense on the CPU; H100/H200: >= 10x dense at >= 70% of "
                                    "peak HBM bandwidth",
                  "bytes": "read W and G, write G, once each (what a perfect kernel moves)",
                  "peak_bandwidth": "GPU: nominal DRAM; CPU: measured STREAM-style add"})


if __name__ == "__main__":
    main()

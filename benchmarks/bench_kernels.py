"""Importance scoring and the C-SGD gradient transform over a whole model's parameters.

Parameters of torchvision ResNet-50 and VGG-16 (random init: only shapes matter): every conv
weight and bias and every BatchNorm γ/β. The final classifier and VGG's fully connected layers
are left out (C-SGD prunes conv filters; a dense (n, n) baseline on VGG's 4096 x 25088 linear
alone would be ~0.8 TFLOP).

Importance (one call scores all tensors): ``triton`` = :func:`filter_scores` on CUDA (one
launch), ``eager`` = :func:`filter_scores_ref` (a torch loop over layers).

C-SGD (one call transforms all params in place), clusters: per conv layer, n/2 random cluster
ids shared by the conv weight, its bias and its BN (sizes from 1 up, like k-means' output):

* ``fast``: :func:`csgd_transform_` with a prebuilt :class:`CSGDPlan`; on CUDA the fused Triton
  kernel, on the CPU the torch segment form;
* ``segment`` (GPU only; on the CPU it is ``fast``): the per-layer torch segment form on CUDA;
* ``dense``: ``G' = M·G + D·W`` with M and D prebuilt (the paper's form; building them is not
  timed, which favours the baseline).

GB/s counts the bytes a perfect kernel moves: importance reads each weight (and gradient) once;
C-SGD reads W and G and writes G. On a GPU the last column compares with the device's peak
memory bandwidth (from its memory clock and bus width).

Run: ``python -m benchmarks.bench_kernels [--quick] [--repeats N] [--device cpu|cuda]``.
"""
from __future__ import annotations

import argparse
import dataclasses

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
    """Nominal DRAM bandwidth of the GPU (double data rate x bus width), in GB/s."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


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
        timings = {"eager": timer(lambda: filter_scores_ref(tensors, **kw))}
        if device.type == "cuda":
            timings["triton"] = timer(lambda: filter_scores(tensors, backend="triton", **kw))
        fast = timings.get("triton", timings["eager"])
        extra = {"tensors": len(tensors), "MB": round(bytes_moved / 1e6, 1),
                 "GB/s": round(bytes_moved / fast / 1e9, 1)}
        if peak:
            extra["% peak BW"] = round(100 * bytes_moved / fast / 1e9 / peak, 1)
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

    def fast():
        csgd_transform_(params, plan, backend="auto", **coefs)

    timings = {"fast": timer(fast), "dense": timer(dense)}
    if device.type == "cuda":
        timings["segment"] = timer(lambda: csgd_transform_(params, plan, backend="torch", **coefs))
    bytes_moved = 3 * sum(p.numel() * p.element_size() for p in params)
    extra = {"fast path": "triton fused" if device.type == "cuda" else "torch segment",
             "params": len(params), "clusters": sum(len(s) for s in plan.sizes),
             "MB": round(bytes_moved / 1e6, 1),
             "GB/s": round(bytes_moved / timings["fast"] / 1e9, 1)}
    if peak:
        extra["% peak BW"] = round(100 * bytes_moved / timings["fast"] / 1e9 / peak, 1)
        # As in training (no sync per step): ten calls queued, one sync. The host work of a call
        # then overlaps the previous kernel, so this is the kernel's own throughput.
        queued = timer(lambda: [fast() for _ in range(10)]) / 10
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
    tag = "" if device.type == "cuda" else "_cpu"
    notes = {"device": str(device), "repeats": repeats, "peak_bandwidth_GBps": peak,
             "cpu_threads": torch.get_num_threads(),
             "weights": "random init (only shapes matter)"}
    report(f"kernels_importance{tag}{suffix}", imp, fast="triton", references=["eager"],
           notes={**notes, "target": "H100: triton >= 5x eager"})
    report(f"kernels_csgd{tag}{suffix}", cs, fast="fast", references=["dense", "segment"],
           notes={**notes, "target": "CPU (2 cores): fast >= 20x dense; H100: >= 10x dense at "
                                    ">= 60% of peak HBM bandwidth"})


if __name__ == "__main__":
    main()

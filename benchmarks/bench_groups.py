"""Channel-group discovery: accelprune.group_search.find_groups against Torch-Pruning's
DependencyGraph.get_all_groups, on the same dependency graph (tracing excluded, timed apart).

Torch-Pruning runs in a forked child with a time limit: on Hugging Face LLaMA it never finishes
(see accelprune/group_search.py), reported as "> N s". Where it finishes, the column "same"
says whether both found the same groups (members, handlers, index sets).

    python -m benchmarks.bench_groups            # all models, TP limited to 60 s each
    python -m benchmarks.bench_groups --quick    # small models only, TP limited to 10 s
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
import warnings

import torch
import torch_pruning as tp
from torch import nn

from accelprune.group_search import find_groups, find_groups_ref
from benchmarks.harness import Row, cpu_model, measure, report

FAST, REF = "find_groups", "tp_get_all_groups"


def _llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, use_cache=False, max_position_embeddings=64,
    )
    ids = torch.randint(0, 128, (1, 8))
    return LlamaForCausalLM(config), ids, lambda m, x: m(x).logits


def _cases(quick: bool):
    import timm
    import torchvision

    x32, x224 = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 224, 224)
    encoder = lambda n: nn.TransformerEncoder(  # noqa: E731
        nn.TransformerEncoderLayer(256, 8, 1024, batch_first=True), n, enable_nested_tensor=False
    )
    cases = [
        ("resnet18", lambda: (torchvision.models.resnet18(), x32, None)),
        ("mobilenet_v2", lambda: (torchvision.models.mobilenet_v2(), x32, None)),
        ("TransformerEncoder x12 (d256)", lambda: (encoder(12), torch.randn(1, 8, 256), None)),
        ("llama 2 layers (hidden 256, GQA)", lambda: _llama(2)),
    ]
    if quick:
        return cases
    return cases + [
        ("TransformerEncoder x6 (d256)", lambda: (encoder(6), torch.randn(1, 8, 256), None)),
        ("TransformerEncoder x24 (d256)", lambda: (encoder(24), torch.randn(1, 8, 256), None)),
        ("densenet121", lambda: (torchvision.models.densenet121(), x32, None)),
        ("timm vit_small_patch16_224", lambda: (
            timm.create_model("vit_small_patch16_224", pretrained=False), x224, None)),
        ("timm convnext_tiny", lambda: (timm.create_model("convnext_tiny", pretrained=False),
                                        x32, None)),
        ("vit_b_16", lambda: (torchvision.models.vit_b_16(), x224, None)),
        ("llama 8 layers (hidden 256, GQA)", lambda: _llama(8)),
        ("llama 32 layers (hidden 256, GQA)", lambda: _llama(32)),
    ]


def _signature(DG, groups):
    def name(node):
        m = node.module
        return DG._module2name.get(m, node.name) if isinstance(m, nn.Module) else node.name

    return [{(name(d.target), d.handler.__name__, tuple(sorted(i))) for d, i in g} for g in groups]


def _tp_child(DG, repeats, conn):
    """First one timed run (its time and groups sent at once), then the median of ``repeats``."""
    try:
        t0 = time.perf_counter()
        groups = find_groups_ref(DG)
        conn.send((time.perf_counter() - t0, _signature(DG, groups)))
        timing = measure(lambda: find_groups_ref(DG), warmup=0, repeats=repeats)
        conn.send((timing.median_s, None))
    except Exception as e:  # reported, not raised: the parent prints the table regardless
        conn.send((None, f"{type(e).__name__}: {e}"))
    conn.close()


def _time_tp(DG, repeats: int, limit_s: float):
    """TP's median time and groups, or (None, "> limit_s s") if its first run does not finish
    within ``limit_s`` (the child is killed)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_tp_child, args=(DG, repeats, child))
    proc.start()
    child.close()
    result = (None, f"> {limit_s:g} s")
    try:
        if parent.poll(limit_s):
            first_s, groups = parent.recv()
            result = (first_s, groups)
            if first_s is not None and parent.poll(first_s * repeats * 3 + limit_s):
                median_s, _ = parent.recv()
                result = (median_s if median_s is not None else first_s, groups)
    finally:
        proc.kill()
        proc.join()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models only")
    parser.add_argument("--tp-timeout", type=float, default=None,
                        help="seconds per Torch-Pruning run (default 60, quick 10)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    limit = args.tp_timeout or (10.0 if args.quick else 60.0)

    rows = []
    for case, make in _cases(args.quick):
        torch.manual_seed(0)
        model, example, forward_fn = make()
        model.eval()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            DG = tp.DependencyGraph().build_dependency(
                model, example, forward_fn=forward_fn, verbose=False
            )
        trace_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = _signature(DG, find_groups(DG))  # the first call also finds wrong TP mappings
        first_s = time.perf_counter() - t0
        mine = measure(lambda DG=DG: find_groups(DG), warmup=0, repeats=args.repeats).median_s
        tp_s, tp_groups = _time_tp(DG, args.repeats, limit)
        timings = {FAST: mine}
        extra = {
            "nodes": len(DG.module2node),
            "groups": len(ours),
            "trace": f"{trace_s:.2f} s",
            "first call": f"{first_s * 1e3:.1f} ms",
            "us/node": f"{mine / len(DG.module2node) * 1e6:.0f}",
        }
        if tp_s is None:
            extra["tp"] = tp_groups
            extra["same"] = "n/a"
        else:
            timings[REF] = tp_s
            extra["tp"] = "finished"
            extra["same"] = str(tp_groups == ours)
        rows.append(Row(case, timings, extra))
        print(f"{case}: {mine:.3f} s vs {extra['tp'] if tp_s is None else f'{tp_s:.3f} s'}",
              flush=True)

    report(
        "groups",
        rows,
        fast=FAST,
        references=[REF],
        notes={
            "what": "channel-group discovery on a built DependencyGraph (tracing excluded)",
            "tp_timeout_s": limit,
            "torch_pruning": getattr(tp, "__version__", "?"),
            "torch_threads": torch.get_num_threads(),
            "cpu": cpu_model(),
            "load_average_at_end": os.getloadavg(),
        },
        save=not args.quick,
    )


if __name__ == "__main__":
    main()

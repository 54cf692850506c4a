"""Robustness sweep: accelprune's public pruning entry points over real model architectures.

Every model is built from its config only (random init, nothing downloads) and every method runs
on a fresh copy of it. Each (model, method) ends in one status:

* ``ok``: the method ran, the model still runs, its output shape is unchanged, no hook was left
  behind and (where the method says it pruned) the parameter count went down; a method that
  promises losslessness (C-SGD on collapsed clusters) moved the output by at most 1e-4 relative.
* ``noop``: the method ran and changed nothing (no prunable group): not an error, recorded.
* ``refused``: a ValueError / TypeError, with the model left exactly as it was (state_dict,
  parameter shapes, module types, hooks). Acceptable where the method cannot apply.
* ``crash``: any other exception.
* ``wrong``: a check above failed (the reason is recorded), or a refusal left the model changed.
* ``timeout``: the model's subprocess ran out of time before this method finished.

Each model runs in its own subprocess with a timeout, so one hang does not stop the sweep.

    python -m benchmarks.zoo_sweep                  # everything, writes results/zoo_sweep.json
    python -m benchmarks.zoo_sweep --only tv_resnet18 hf_gpt2 --no-save
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

from benchmarks.harness import RESULTS_DIR, machine_info

LOSSLESS_TOL = 1e-4
SPARSITY = 0.3
HEAD_SPARSITY = 0.5
MACS_REDUCTION = 0.3
# prune_to_macs' bisection, cut short to keep the sweep affordable on a shared 2-core machine
MACS_OPTIONS = dict(tolerance=0.05, max_iterations=6)
TIMEOUT_S = 420


# ---------------------------------------------------------------------------------------------
# models, from configs only


def _tv(name, size=64, **kw):
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kw)
    return build, ("image", size)


def _timm(name, size=64, **kw):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, **kw)
    return build, ("image", size)


def _hf(config_cls, model_cls, **kw):
    def build():
        import transformers

        config = getattr(transformers, config_cls)(**kw)
        return getattr(transformers, model_cls)(config)
    return build, ("tokens", kw.get("vocab_size", 128))


_TINY = dict(vocab_size=128, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
             intermediate_size=128)

MODELS = {
    "tv_resnet18": _tv("resnet18"),
    "tv_mobilenet_v2": _tv("mobilenet_v2"),
    "tv_mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "tv_shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),
    "tv_squeezenet1_0": _tv("squeezenet1_0"),
    "tv_densenet121": _tv("densenet121", 32),
    "tv_efficientnet_b0": _tv("efficientnet_b0"),
    "tv_regnet_y_400mf": _tv("regnet_y_400mf"),
    "tv_mnasnet0_5": _tv("mnasnet0_5"),
    "tv_googlenet": _tv("googlenet", aux_logits=False, init_weights=False),
    "tv_convnext_tiny": _tv("convnext_tiny", 32),
    "tv_vit_b_16": _tv("vit_b_16", 32, image_size=32),
    "tv_swin_t": _tv("swin_t", 64),
    "timm_resnet18": _timm("resnet18"),
    "timm_efficientnet_b0": _timm("efficientnet_b0"),
    "timm_mobilenetv3_small_050": _timm("mobilenetv3_small_050"),
    "timm_regnetx_002": _timm("regnetx_002"),
    "timm_convnext_atto": _timm("convnext_atto"),
    "timm_vit_tiny": _timm("vit_tiny_patch16_224", 32, img_size=32),
    "timm_deit_tiny": _timm("deit_tiny_patch16_224", 32, img_size=32),
    "timm_mixer_s16": _timm("mixer_s16_224", 32, img_size=32),
    "timm_swin_small_cfg": _timm("swin_tiny_patch4_window7_224", 32, img_size=32, window_size=4,
                                 embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
    "timm_levit_128s": _timm("levit_128s", 64, img_size=64),
    "timm_ghostnet_050": _timm("ghostnet_050"),
    "hf_gpt2": _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=128, n_layer=2, n_embd=64,
                   n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "hf_bert": _hf("BertConfig", "BertForMaskedLM", max_position_embeddings=64, **_TINY),
    "hf_llama": _hf("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, **_TINY),
    "hf_mistral": _hf("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, **_TINY),
    "hf_qwen2": _hf("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2, **_TINY),
    "hf_opt": _hf("OPTConfig", "OPTForCausalLM", vocab_size=128, num_hidden_layers=2,
                  hidden_size=64, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                  max_position_embeddings=64),
    "hf_phi": _hf("PhiConfig", "PhiForCausalLM", **_TINY),
}


def example_inputs(kind):
    import torch

    what, size = kind
    g = torch.Generator().manual_seed(0)
    if what == "image":
        return torch.randn(1, 3, size, size, generator=g)
    return torch.randint(0, size, (1, 16), generator=g)


# ---------------------------------------------------------------------------------------------
# checks


def forward(model, x):
    """The tensor to compare from whatever the model returns: its first (a Hugging Face
    model's logits), found as accelprune finds outputs."""
    from accelprune.tracing import call_model, output_tensors

    return output_tensors(call_model(model, x))[0]


def run_model(model, x):
    import torch

    with torch.no_grad():
        return forward(model, x).detach().clone()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def snapshot(model) -> dict:
    """What a refused call must leave as it found: tensors, shapes, module types, hooks."""
    hooks = {}
    for name, m in model.named_modules():
        counts = tuple(len(getattr(m, a, {})) for a in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
            "_state_dict_hooks", "_load_state_dict_pre_hooks"))
        if any(counts):
            hooks[name] = counts
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "hooks": hooks,
        "grads": sum(p.grad is not None for p in model.parameters()),
    }


def snapshot_diff(a: dict, b: dict) -> str | None:
    if a["types"] != b["types"]:
        return "module structure changed"
    if a["hooks"] != b["hooks"]:
        return f"hooks changed: {a['hooks']} -> {b['hooks']}"
    if a["state"].keys() != b["state"].keys():
        return "state_dict keys changed"
    for k, v in a["state"].items():
        w = b["state"][k]
        if v.shape != w.shape:
            return f"{k} shape {tuple(v.shape)} -> {tuple(w.shape)}"
        if not torch_equal(v, w):
            return f"{k} values changed"
    return None


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b)) or (a.is_floating_point() and bool(
        torch.equal(torch.isnan(a), torch.isnan(b))) and bool(
        torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))))


def relative_change(y0, y1) -> float:
    scale = float(y0.abs().max()) or 1.0
    return float((y0 - y1).abs().max()) / scale


def hooks_of(model) -> dict:
    return snapshot(model)["hooks"] if model is not None else {}


# ---------------------------------------------------------------------------------------------
# the methods: each prunes ``model`` in place and returns (pruned?, lossless?, note)


def collapse_clusters(csgd) -> None:
    """What converged centripetal training ends at, at once: the tests' own helper
    (tests/convergence.py), so that the sweep checks the fold on the same collapse."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from convergence import collapse_clusters as collapse

    collapse(csgd)


# a method that changes the model on purpose before its last call (C-SGD trains, then prunes)
# leaves here what that call must restore if it refuses
_PRE_CALL: dict = {}


def m_l1(model, x):
    import accelprune

    accelprune.prune(model, x, SPARSITY, "l1")
    return False, False, ""  # prune() makes no claim: nothing to prune is "noop", not "wrong"


def m_reprune(model, x):
    import accelprune

    pruner = accelprune.REPrune(model, x, SPARSITY)
    pruner.prune()
    return True, False, f"{len(pruner.groups)} groups, {len(pruner.skipped)} skipped"


def _csgd(model, x, head_sparsity):
    import torch

    import accelprune

    csgd = accelprune.CSGD(model, x, SPARSITY, head_sparsity=head_sparsity)
    optimizer = torch.optim.SGD(csgd.param_groups(), lr=1e-3, momentum=0.9)
    model.zero_grad()
    y = forward(model, x)
    y.float().pow(2).mean().backward()
    csgd.apply_gradients()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    collapse_clusters(csgd)
    reference = run_model(model, x)
    _PRE_CALL["snapshot"] = snapshot(model)  # a refused prune() must restore this, not the start
    report = csgd.prune()
    change = relative_change(reference, run_model(model, x))
    note = (f"{len(report.layers)} groups, {len(report.heads)} head modules, "
            f"{len(report.skipped)} skipped; fold change {change:.1e}")
    return bool(report.layers or report.heads), change, note


def m_csgd(model, x):
    return _csgd(model, x, None)


def m_csgd_heads(model, x):
    return _csgd(model, x, HEAD_SPARSITY)


def m_macs(model, x):
    import accelprune
    from accelprune.reporting import model_stats

    before = model_stats(model, x)["macs"]
    s = accelprune.prune_to_macs(model, x, "l1", MACS_REDUCTION, **MACS_OPTIONS)
    after = model_stats(model, x)["macs"]
    kept = after / before
    note = f"sparsity {s:.3f}, MACs kept {kept:.3f}"
    return s > 0, False, note


def m_heads(model, x):
    from accelprune.attention import prune_heads

    prune_heads(model, x, HEAD_SPARSITY)
    return True, False, ""


def m_depth(model, x):
    import accelprune

    result = accelprune.prune_layers(model, x, 1)
    return True, False, f"removed {result.removed}"


METHODS = {"l1": m_l1, "reprune": m_reprune, "csgd": m_csgd, "csgd_heads": m_csgd_heads,
           "macs": m_macs, "heads": m_heads, "depth": m_depth}


# ---------------------------------------------------------------------------------------------
# one model, in a subprocess


def classify(model, x, method) -> dict:
    import torch

    model.eval()
    y0 = run_model(model, x)
    before = snapshot(model)
    params0 = n_params(model)
    torch.manual_seed(0)
    _PRE_CALL.clear()
    t0 = time.perf_counter()
    try:
        pruned, lossless, note = METHODS[method](model, x)
    except (ValueError, TypeError) as e:
        changed = snapshot_diff(_PRE_CALL.get("snapshot", before), snapshot(model))
        status = "wrong" if changed else "refused"
        detail = f"{type(e).__name__}: {e}"
        if changed:
            detail = f"refused but left the model changed ({changed}); {detail}"
        return dict(status=status, detail=detail[:600], seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - the sweep's point is to catch everything
        tb = traceback.format_exc(limit=6)
        return dict(status="crash", detail=f"{type(e).__name__}: {e}"[:600], traceback=tb[-3000:],
                    seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    problems = []
    model.eval()
    try:
        y1 = run_model(model, x)
        if y1.shape != y0.shape:
            problems.append(f"output shape {tuple(y0.shape)} -> {tuple(y1.shape)}")
    except Exception as e:  # noqa: BLE001
        problems.append(f"forward fails afterwards: {type(e).__name__}: {e}"[:400])
    if snapshot(model)["hooks"] != before["hooks"]:
        problems.append(f"hooks left: {before['hooks']} -> {snapshot(model)['hooks']}")
    params1 = n_params(model)
    if pruned and params1 >= params0:
        problems.append(f"said it pruned but params {params0} -> {params1}")
    if lossless is not False and lossless > LOSSLESS_TOL:
        problems.append(f"lossless fold moved the output by {lossless:.2e} relative")
    if problems:
        status = "wrong"
    elif params1 == params0 and snapshot_diff(before, snapshot(model)) is None:
        status = "noop"
    else:
        status = "ok"
    detail = "; ".join(problems + ([note] if note else []))
    return dict(status=status, detail=detail[:600], params=[params0, params1], seconds=seconds)


def methods_for(name: str) -> list[str]:
    transformer = name.startswith("hf_") or any(
        k in name for k in ("vit", "deit", "swin", "levit", "mixer"))
    return [m for m in METHODS if m != "csgd_heads" or transformer]


def child(name: str, methods: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    build, kind = MODELS[name]
    torch.manual_seed(0)
    try:
        base = build().eval()
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"method": "build", "status": "crash",
                          "detail": f"{type(e).__name__}: {e}"[:600]}), flush=True)
        return
    x = example_inputs(kind)
    for method in methods:
        result = classify(copy.deepcopy(base), x, method)
        print(json.dumps({"method": method, **result}), flush=True)


def run_one(name: str, methods: list[str], timeout: float) -> dict[str, dict]:
    cmd = [sys.executable, "-m", "benchmarks.zoo_sweep", "--child", name, "--methods", *methods]
    results: dict[str, dict] = {}
    timed_out = False
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        timed_out = True
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = ""
    for line in stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row.pop("method")] = row
    for method in methods:
        if method not in results and "build" not in results:
            results[method] = (dict(status="timeout", detail=f"over {timeout:.0f} s")
                               if timed_out else
                               dict(status="crash", detail="the process died: " + stderr[-600:]))
    return results


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def embedded(saved: dict) -> dict:
    """A saved sweep cut to what the comparison needs: commit, summary, status and detail."""
    return {"commit": saved.get("commit", "unknown"), "date": saved.get("date"),
            "summary": saved["summary"],
            "results": {model: {m: {"status": r["status"], "detail": r["detail"]}
                                for m, r in rows.items()}
                        for model, rows in saved["results"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="model names (default: all)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--out", default="zoo_sweep.json")
    parser.add_argument("--before", help="a saved sweep (e.g. of the base commit) to embed "
                                         "under 'before', for the comparison")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.methods)
        return
    names = args.only or list(MODELS)
    table: dict[str, dict[str, dict]] = {}
    start = time.perf_counter()
    for name in names:
        methods = [m for m in args.methods if m in methods_for(name)]
        t0 = time.perf_counter()
        table[name] = run_one(name, methods, args.timeout)
        cells = "  ".join(f"{m}={table[name][m]['status']}" for m in table[name])
        print(f"{name:28s} {time.perf_counter() - t0:6.1f}s  {cells}", flush=True)
        for m, row in table[name].items():
            if row["status"] in ("crash", "wrong", "timeout"):
                print(f"    {m}: {row['detail'][:300]}", flush=True)
    statuses = [row["status"] for rows in table.values() for row in rows.values()]
    summary = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"total {time.perf_counter() - start:.0f} s: {summary}")
    if not args.no_save:
        import timm
        import torch
        import torchvision
        import transformers

        out = {
            "benchmark": "zoo_sweep",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "timm": timm.__version__, "transformers": transformers.__version__},
            "settings": dict(sparsity=SPARSITY, head_sparsity=HEAD_SPARSITY,
                             macs_reduction=MACS_REDUCTION, macs_options=MACS_OPTIONS,
                             lossless_tolerance=LOSSLESS_TOL, timeout_s=args.timeout),
            "commit": _commit(),
            "summary": summary,
            "results": table,
        }
        if args.before:
            out["before"] = embedded(json.loads(Path(args.before).read_text()))
        path = RESULTS_DIR / args.out
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

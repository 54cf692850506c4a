"""Pruning a LLaMA-shaped model: time and peak memory, accelprune against Torch-Pruning.

Every run happens in a fresh subprocess that builds the model (random init, bfloat16), prunes
the MLP widths to 50% with an L1 criterion and reports, as JSON on its last stdout line:

* ``build_s``: building the model; ``prune_s``: the pruning call (tracing, channel groups,
  scoring, surgery);
* memory from the process's RSS high-water mark (``getrusage``; Linux reports KiB):
  ``base_rss`` after imports, ``model_rss`` once the model is built, ``peak_rss`` at the end;
  ``peak_over_model = (peak_rss - base_rss) / model_bytes`` is the figure the issue bounds
  (<= 1.5: pruning must not hold a second copy of the model).

Methods, on the same model and inputs, both pruning only the MLP hidden widths (gate/up rows
and down columns; attention, the residual stream and the head are left alone):

* ``accelprune``: ``accelprune.prune(model, ids, 0.5, "l1", ignored_layers=attention)``;
* ``torch_pruning``: ``tp.pruner.MetaPruner`` with ``MagnitudeImportance(p=1)``, the same
  ignored layers, ``pruning_ratio=0.5``, one ``step()``.

Models: ``hf`` is ``transformers.LlamaForCausalLM`` from a ``LlamaConfig``; ``plain`` is the same
architecture written in plain PyTorch (RMSNorm, GQA attention, SwiGLU MLP, untied head), the
same shapes and parameter count. Torch-Pruning's group search does not finish on the Hugging
Face model (issue 12, item 2), so each run has a timeout and a timed-out run is recorded as such.

    python -m benchmarks.bench_large --quick            # plain + hf at hidden 512, 4 layers
    python -m benchmarks.bench_large                    # hidden 2048, 16 layers, ~1.1B params
    python -m benchmarks.bench_large --cases plain:quick,plain:full,hf:tiny --timeout 900
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SIZES = {
    # name: (hidden, layers, intermediate, heads, kv heads, vocab)
    "tiny": (128, 2, 352, 8, 4, 1024),
    "quick": (512, 4, 1408, 8, 4, 8192),
    "full": (2048, 16, 5632, 32, 4, 32000),
}
METHODS = ("accelprune", "torch_pruning")


# ---------------------------------------------------------------------------------------------
# the models


def plain_llama(hidden, layers, intermediate, heads, kv_heads, vocab):
    """LLaMA in plain PyTorch: what LlamaForCausalLM computes, without Hugging Face's machinery."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            var = x.float().pow(2).mean(-1, keepdim=True)
            return self.weight * (x.float() * torch.rsqrt(var + 1e-6)).to(x.dtype)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.head_dim = hidden // heads
            self.q_proj = nn.Linear(hidden, hidden, bias=False)
            self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
            self.o_proj = nn.Linear(hidden, hidden, bias=False)

        def forward(self, x):
            B, T, _ = x.shape

            def split(t, n):
                return t.view(B, T, n, self.head_dim).transpose(1, 2)

            q = split(self.q_proj(x), heads)
            k = split(self.k_proj(x), kv_heads).repeat_interleave(heads // kv_heads, 1)
            v = split(self.v_proj(x), kv_heads).repeat_interleave(heads // kv_heads, 1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(a.transpose(1, 2).reshape(B, T, hidden))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
            self.up_proj = nn.Linear(hidden, intermediate, bias=False)
            self.down_proj = nn.Linear(intermediate, hidden, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm = RMSNorm(hidden), RMSNorm(hidden)
            self.self_attn, self.mlp = Attention(), MLP()

        def forward(self, x):
            x = x + self.self_attn(self.input_layernorm(x))
            return x + self.mlp(self.post_attention_layernorm(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, hidden)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))
            self.norm = RMSNorm(hidden)
            self.lm_head = nn.Linear(hidden, vocab, bias=False)

        def forward(self, input_ids):
            x = self.embed_tokens(input_ids)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.norm(x))

    return Model()


def hf_llama(hidden, layers, intermediate, heads, kv_heads, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers,
                      intermediate_size=intermediate, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=vocab, use_cache=False,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def attention_and_head(model):
    """The layers both methods leave alone: every attention projection and the LM head."""
    from torch import nn

    return [m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (".self_attn." in f".{n}." or n.endswith("lm_head"))]


# ---------------------------------------------------------------------------------------------
# one run, in its own process


def _rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(model_kind: str, size: str, method: str) -> dict:
    import torch
    import torch_pruning as tp

    import accelprune

    torch.manual_seed(0)
    torch.set_num_threads(2)
    base = _current_rss_bytes()
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # parameters created in bf16: no fp32 copy
    try:
        model = (plain_llama if model_kind == "plain" else hf_llama)(*SIZES[size])
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to(torch.bfloat16).eval()
    build_s = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    model_rss = _current_rss_bytes()
    ids = torch.randint(0, SIZES[size][5], (1, 16), generator=torch.Generator().manual_seed(0))
    ignored = attention_and_head(model)
    inter = SIZES[size][2]

    t0 = time.perf_counter()
    if method == "accelprune":
        accelprune.prune(model, ids, 0.5, "l1", ignored_layers=ignored, prune_coupled=True)
    else:
        pruner = tp.pruner.MetaPruner(model, ids, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.5, ignored_layers=ignored)
        pruner.step()
    prune_s = time.perf_counter() - t0
    mlp = [m for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    with torch.no_grad():
        model(ids)  # the pruned model still runs
    peak = _rss_peak_bytes()
    return {
        "model": model_kind, "size": size, "method": method, "params": params,
        "params_after": sum(p.numel() for p in model.parameters()),
        "intermediate_before": inter, "intermediate_after": [m.in_features for m in mlp][:1],
        "hidden_after": model.lm_head.in_features,
        "build_s": build_s, "prune_s": prune_s, "model_bytes": model_bytes, "base_rss": base,
        "model_rss": model_rss, "peak_rss": peak, "peak_over_model": (peak - base) / model_bytes,
    }


def run_one(model_kind: str, size: str, method: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_large", "--worker", model_kind, size, method]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": model_kind, "size": size, "method": method, "status": "timeout",
                "timeout_s": timeout,
                "note": "did not finish (Torch-Pruning's channel-group search, see issue 12)"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"model": model_kind, "size": size, "method": method, "status": "error",
                "error": " | ".join(tail), "wall_s": time.perf_counter() - t0}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "status": "ok"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the quick size (~40M params)")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated MODEL:SIZE (MODEL: plain, hf; SIZE: {list(SIZES)})")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--out", default="large", help="results file name (benchmarks/results)")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "SIZE", "METHOD"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    from benchmarks.harness import Row, report

    size = "quick" if args.quick else "full"
    cases = [c.split(":") for c in args.cases.split(",")] if args.cases else \
        [("plain", size), ("hf", size)]
    results, rows = [], []
    for model_kind, size in cases:
        timings, extra = {}, {}
        for method in args.methods.split(","):
            r = run_one(model_kind, size, method, args.timeout)
            results.append(r)
            print(json.dumps(r), flush=True)
            if r["status"] == "ok":
                timings[method] = r["prune_s"]
                extra[f"{method} peak/model"] = f"{r['peak_over_model']:.2f}"
            else:
                extra[f"{method} peak/model"] = r["status"]
        params = [r["params"] for r in results if r["model"] == model_kind
                  and r["size"] == size and "params" in r]
        extra["params"] = f"{params[0] / 1e6:.0f}M" if params else "-"
        rows.append(Row(f"{model_kind}-{size}", timings, extra))
    doc = report(args.out, rows, fast="accelprune", references=["torch_pruning"],
                 notes={"runs": results,
                        "what": "prune MLP widths 50% (L1) of a random-init bf16 LLaMA-shaped "
                                "model; time of the pruning call, RSS high-water in a subprocess",
                        "machine_shared": "2 cores shared with other engineers: quote ratios"})
    return doc


if __name__ == "__main__":
    main()

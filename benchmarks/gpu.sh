#!/usr/bin/env bash
# Every GPU test and GPU benchmark of accelprune, in one run (issue 14).
#
#   bash benchmarks/gpu.sh            # from anywhere; PYTHON=... to choose the interpreter
#   bash benchmarks/gpu.sh --quick    # small benchmark shapes (a smoke run, about a minute)
#
# 1. checks that a CUDA device is visible (and stops with a clear message when not);
# 2. runs the GPU tests: `pytest -m gpu` over tests/ (Triton kernels compiled for the device
#    against their references); a skipped GPU test fails the script, since on a GPU nothing
#    should skip;
# 3. runs the GPU benchmarks, each writing JSON with the device name (machine.gpu) to
#    benchmarks/results/:
#      kernels_importance_gpu.json  filter_scores in one Triton launch vs the eager per-layer loop
#      kernels_csgd_gpu.json        csgd_transform_ (fused Triton) vs dense M.G + D.W, with the
#                                   achieved HBM bandwidth against the device's nominal peak
#      csgd_gpu.json                the C-SGD pipeline per training step on ResNet-50
#    (with --quick they are written as *_quick.json, except csgd, which --quick does not save);
# 4. prints where the results are.
#
# The targets (issue 14, H100/H200): filter_scores >= 10x the eager loop; csgd_transform_ >= 10x
# dense at >= 70% of HBM bandwidth. Exit status: 0 when every step ran, else the first failure's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
QUICK=()
if [[ "${1:-}" == "--quick" ]]; then
    QUICK=(--quick)
elif [[ $# -gt 0 ]]; then
    echo "usage: bash benchmarks/gpu.sh [--quick]" >&2
    exit 2
fi
# Triton must compile for the GPU: an interpreter setting inherited from a CPU session would
# silently run every kernel on the host.
unset TRITON_INTERPRET
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

step() { printf '\n=== %s ===\n' "$*"; }

step "device"
if ! DEVICE="$("$PYTHON" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device "
             f"(torch.version.cuda={torch.version.cuda}, "
             f"CUDA_VISIBLE_DEVICES={__import__('os').environ.get('CUDA_VISIBLE_DEVICES')!r})")
props = torch.cuda.get_device_properties(0)
import triton  # the GPU paths need it
print(f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), "
      f"torch {torch.__version__}, triton {triton.__version__}")
EOF
)"; then
    echo "gpu.sh: FAILED: no usable CUDA device; these tests and benchmarks need a GPU." >&2
    echo "gpu.sh: (on a CPU machine run the usual suite; Triton kernels are checked there under" >&2
    echo "gpu.sh:  TRITON_INTERPRET=1 and compiled for sm_90 without a device)" >&2
    exit 1
fi
echo "$DEVICE"

step "GPU tests (pytest -m gpu)"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
set +e
"$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider tests 2>&1 | tee "$LOG"
STATUS=${PIPESTATUS[0]}
set -e
if [[ $STATUS -ne 0 ]]; then
    echo "gpu.sh: FAILED: GPU tests (exit $STATUS)" >&2
    exit "$STATUS"
fi
if grep -Eq '[0-9]+ skipped' "$LOG"; then
    echo "gpu.sh: FAILED: GPU tests were skipped on a GPU machine (reasons above)" >&2
    exit 1
fi

step "benchmark: importance scores and the C-SGD transform (bench_kernels)"
"$PYTHON" -m benchmarks.bench_kernels --device cuda "${QUICK[@]}"

step "benchmark: the C-SGD pipeline per training step (bench_csgd)"
"$PYTHON" -m benchmarks.bench_csgd --device cuda "${QUICK[@]}"

step "results"
ls -l benchmarks/results/*_gpu*.json
echo "device: $DEVICE"

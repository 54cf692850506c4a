"""Tests for accelprune.kernels: batched importance scores and the C-SGD gradient transform.

The Triton kernels are tested on the CPU through the Triton interpreter, with small shapes (a
few programs per launch). Triton picks interpreter or compiler once, when it is imported
(``triton.jit`` reads ``TRITON_INTERPRET`` at decoration time, also for its own ``tl.*``
helpers), and the two modes cannot be mixed in one process. So the tests that launch kernels on
CPU tensors run in a child pytest process started with ``TRITON_INTERPRET=1``
(:func:`test_triton_kernels_under_the_interpreter`); in the main process they skip, and the
environment of the main process, shared with other test modules, is never changed. The main
process also compiles the kernels for an H100 (sm_90) without a GPU, and GPU parity tests run
when CUDA is present (marker ``gpu``).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from interpreted import INTERPRETED, ROOT, run_under_interpreter

import accelprune._backend as backend_mod
from accelprune.kernels import (
    CSGDPlan,
    csgd_transform_,
    csgd_transform_dense_ref,
    csgd_transform_ref,
    filter_scores,
    filter_scores_ref,
)
from accelprune.kernels import csgd as csgd_mod
from accelprune.kernels import importance as importance_mod
from accelprune.kernels._common import select_backend

HAS_CUDA = torch.cuda.is_available()
# Set by test_triton_kernels_under_the_interpreter for its child process, before Triton loads.
needs_cuda = pytest.mark.skipif(not HAS_CUDA or INTERPRETED,
                                reason="needs a CUDA device (none here) and compiled Triton")


def need_triton_on_cpu():
    """Skip unless this process runs Triton in the interpreter (the child process does)."""
    if not INTERPRETED:
        pytest.skip("launches Triton on CPU tensors: runs in the TRITON_INTERPRET=1 child process "
                    "of test_triton_kernels_under_the_interpreter")


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_triton_kernels_under_the_interpreter():
    """Run this module again in a child process with TRITON_INTERPRET=1 set from the start."""
    if INTERPRETED:
        pytest.skip("this is the child process")
    returncode, output = run_under_interpreter(__file__, timeout=900)
    assert returncode == 0, output
    assert "passed" in output and "TRITON_INTERPRET=1 child process" not in output, output


# ---------------------------------------------------------------------------------------------
# helpers


def assert_close_to_fp64(ours, ref, exact64, *, rel_atol=1e-5):
    """flash-attention's rule: |ours − fp64| <= 2·|ref − fp64| + atol (atol relative to scale)."""
    ours, ref, exact64 = ours.double(), ref.double(), exact64.double()
    atol = rel_atol * exact64.abs().clamp_min(1.0)
    bound = 2 * (ref - exact64).abs() + atol
    err = (ours - exact64).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def scores_fp64(tensors, kind, grads=None):
    """Scores straight from the definitions, in float64 (the ground truth)."""
    out = []
    for i, w in enumerate(tensors):
        rows = w.double().reshape(w.shape[0], -1)
        if kind == "taylor":
            rows = rows * grads[i].double().reshape(w.shape[0], -1)
        out.append(rows.pow(2).sum(1).sqrt() if kind == "l2" else rows.abs().sum(1))
    return out


def mixed_tensors(dtype=torch.float32, seed=0):
    """A conv with rows longer than one column block and more rows than one row block, a
    channels_last conv, a linear, a non-contiguous (transposed) linear and a 1-D param."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return [
        randn(20, 6, 5, 5),
        randn(9, 4, 3, 3).contiguous(memory_format=torch.channels_last),
        randn(7, 3),
        randn(11, 5).t(),
        randn(9),
    ]


def with_grads(params, seed=1, integer=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        if integer:
            q.grad = torch.randint(-4, 5, p.shape, generator=g).to(p.dtype)
        else:
            q.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        out.append(q)
    return out


def clone_params(params):
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.grad = p.grad.clone()
        out.append(q)
    return out


def csgd_params(dtype=torch.float32, seed=0):
    """Conv weight + BN γ/β + bias of one layer, a linear with rows longer than the kernel's
    block (several column chunks), a channels_last conv with a channels_last gradient (used in
    place) and one with a contiguous gradient (worked on through copies)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    params = [
        randn(12, 3, 3, 3),
        randn(12),
        randn(12),
        randn(12),
        randn(6, 1100),
        randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last),
        randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last),
    ]
    clusters = [
        torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 4, 5]),
        torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 4, 5]),
        torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 4, 5]),
        torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 4, 5]),
        torch.tensor([9, 3, 9, 3, 7, 9]),  # ids need not be 0..k-1
        torch.arange(8) // 2,
        torch.tensor([0, 1, 0, 1, 0, 1, 2, 3]),
    ]
    params = with_grads(params, seed + 1)
    params[5].grad = params[5].grad.contiguous(memory_format=torch.channels_last)
    return params, clusters


COEFS = dict(weight_decay=[1e-2, 0.0, 0.0, 0.0, 3e-2, 1e-2, 0.1],
             centripetal=[0.3, 0.03, 0.03, 0.03, 0.5, 0.2, 0.7])


def csgd_fp64_truth(params, clusters, **coefs):
    ps64 = [p.detach().double().requires_grad_() for p in params]
    for q, p in zip(ps64, params, strict=True):
        q.grad = p.grad.double().clone()  # .double() of a float64 grad is the grad itself
    csgd_transform_ref(ps64, clusters, **coefs)
    return [q.grad for q in ps64]


# ---------------------------------------------------------------------------------------------
# import hygiene


def test_import_does_not_load_kernels_or_initialise_cuda():
    """What accelprune controls: importing it loads none of its Triton kernels (the module that
    imports Triton) and no Numba kernel, and does not initialise CUDA. (Whether ``triton`` is in
    sys.modules is not accelprune's to decide: torchvision imports torch._dynamo, which imports
    Triton when it is installed.)"""
    code = (
        "import sys, torch, accelprune, accelprune.kernels, accelprune.coverage\n"
        "assert 'accelprune.kernels._triton_kernels' not in sys.modules, "
        "'accelprune imported its Triton kernels eagerly'\n"
        "assert accelprune.coverage._kernels is None, 'coverage kernels loaded on import'\n"
        "from accelprune.kernels import _cpu_kernels\n"
        "assert _cpu_kernels._kernel.cache_info().currsize == 0, 'CPU kernel loaded on import'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised on import'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# dispatch


def test_select_backend_auto_uses_triton_only_on_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("auto", torch.device("cpu")) == "reference"
    assert select_backend("auto", torch.device("cuda")) == "triton"
    assert select_backend("reference", torch.device("cuda")) == "reference"
    assert select_backend("triton", torch.device("cpu")) == "triton"


def test_select_backend_without_triton_falls_back_or_raises(monkeypatch):
    monkeypatch.setattr(backend_mod, "available", lambda fast: False)
    assert select_backend("auto", torch.device("cuda")) == "reference"
    with pytest.raises(RuntimeError, match="triton"):
        select_backend("triton", torch.device("cuda"))


def test_explicit_triton_on_cpu_without_interpreter_raises(no_interpreter):
    w = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        filter_scores([w], backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        csgd_transform_([_one_param()], [torch.zeros(6, dtype=torch.long)], weight_decay=0.0,
                        centripetal=0.1, backend="triton")


@pytest.mark.parametrize("bad", ["torch", "cuda", "Reference", 3])
def test_unknown_backend_rejected(bad):
    """0.x: the old name "torch" is gone (no alias); errors name the valid choices."""
    error, match = (TypeError, "backend must be a string") if bad == 3 else (
        ValueError, r"unknown backend .*'auto'.*'reference'.*'triton'")
    with pytest.raises(error, match=match):
        filter_scores([torch.randn(3, 2)], backend=bad)
    p = _one_param()
    before = p.grad.clone()
    with pytest.raises(error, match=match):
        csgd_transform_([p], [torch.zeros(6, dtype=torch.long)], weight_decay=0.0,
                        centripetal=0.1, backend=bad)
    assert torch.equal(p.grad, before)


def test_auto_on_cpu_runs_the_torch_path_even_under_the_interpreter(monkeypatch):
    calls = []
    monkeypatch.setattr(importance_mod, "_filter_scores_triton", lambda *a: calls.append("scores"))
    monkeypatch.setattr(csgd_mod, "_csgd_transform_triton", lambda *a: calls.append("csgd"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w = torch.randn(5, 2)
    assert torch.equal(filter_scores([w])[0], w.abs().sum(1))
    params, clusters = csgd_params()
    csgd_transform_(params, clusters, backend="auto", **COEFS)
    assert calls == []
    filter_scores([w], backend="triton")
    csgd_transform_(params, clusters, backend="triton", **COEFS)
    assert calls == ["scores", "csgd"]


# ---------------------------------------------------------------------------------------------
# filter_scores: parity


@pytest.mark.parametrize("kind", ["l1", "l2", "taylor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_filter_scores_triton_matches_reference(kind, dtype):
    need_triton_on_cpu()
    tensors = mixed_tensors(dtype)
    grads = [p.grad for p in with_grads(tensors)] if kind == "taylor" else None
    ref = filter_scores_ref(tensors, kind=kind, grads=grads)
    ours = filter_scores(tensors, kind=kind, grads=grads, backend="triton")
    truth = scores_fp64(tensors, kind, grads)
    assert len(ours) == len(tensors)
    for o, r, t, w in zip(ours, ref, truth, tensors, strict=True):
        assert o.dtype == torch.float32 and o.shape == (w.shape[0],)
        assert_close_to_fp64(o, r, t)


@pytest.mark.parametrize("kind", ["l1", "l2", "taylor"])
def test_filter_scores_exact_on_integer_data(kind):
    need_triton_on_cpu()
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randint(-3, 4, s, generator=g).float() for s in [(20, 6, 5, 5), (7, 3), (9,)]]
    grads = [torch.randint(-3, 4, t.shape, generator=g).float() for t in tensors]
    grads = grads if kind == "taylor" else None
    ref = filter_scores_ref(tensors, kind=kind, grads=grads)
    ours = filter_scores(tensors, kind=kind, grads=grads, backend="triton")
    for o, r, t in zip(ours, ref, scores_fp64(tensors, kind, grads), strict=True):
        assert torch.equal(o, r)
        assert torch.equal(r, t.float())


def test_filter_scores_abs_is_magnitude_of_1d_params():
    need_triton_on_cpu()
    gammas = [torch.randn(9), torch.randn(33).half()]
    ref = filter_scores_ref(gammas, kind="abs")
    ours = filter_scores(gammas, kind="abs", backend="triton")
    for o, r, gamma in zip(ours, ref, gammas, strict=True):
        assert torch.equal(o, gamma.float().abs())
        assert torch.equal(r, gamma.float().abs())


def test_filter_scores_mixed_dtypes_in_one_call():
    need_triton_on_cpu()
    tensors = [torch.randn(5, 4), torch.randn(3, 8).half(), torch.randn(6, dtype=torch.float64)]
    ours = filter_scores(tensors, kind="l2", backend="triton")
    ref = filter_scores_ref(tensors, kind="l2")
    for o, r, t in zip(ours, ref, scores_fp64(tensors, "l2"), strict=True):
        assert_close_to_fp64(o, r, t)


def test_filter_scores_does_not_modify_inputs():
    need_triton_on_cpu()
    tensors = mixed_tensors()
    grads = [p.grad for p in with_grads(tensors)]
    before = [t.clone() for t in tensors + grads]
    filter_scores(tensors, kind="taylor", grads=grads, backend="triton")
    filter_scores(tensors, kind="taylor", grads=grads, backend="reference")
    for t, b in zip(tensors + grads, before, strict=True):
        assert torch.equal(t, b)


@settings(max_examples=10, deadline=None)
@given(
    shapes=st.lists(
        st.one_of(
            st.tuples(st.integers(1, 40)),
            st.tuples(st.integers(1, 40), st.integers(1, 300)),
            st.tuples(st.integers(1, 20), st.integers(1, 8), st.integers(1, 3), st.integers(1, 3)),
        ),
        min_size=1, max_size=4,
    ),
    kind=st.sampled_from(["l1", "l2", "taylor"]),
    seed=st.integers(0, 2**16),
)
def test_filter_scores_random_shapes(shapes, kind, seed):
    need_triton_on_cpu()
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes] if kind == "taylor" else None
    ref = filter_scores_ref(tensors, kind=kind, grads=grads)
    ours = filter_scores(tensors, kind=kind, grads=grads, backend="triton")
    for o, r, t in zip(ours, ref, scores_fp64(tensors, kind, grads), strict=True):
        assert_close_to_fp64(o, r, t)


# ---------------------------------------------------------------------------------------------
# filter_scores: bad input


@pytest.mark.parametrize("path", ["reference", "auto", "triton"])
def test_filter_scores_rejects_non_finite(path):
    if path == "triton":
        need_triton_on_cpu()
    w = torch.randn(4, 3)
    w[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"tensors\[1\].*not finite"):
        filter_scores([torch.randn(2), w], backend=path)
    g = torch.randn(4, 3)
    g[0, 0] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        filter_scores([torch.randn(4, 3)], kind="taylor", grads=[g], backend=path)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: filter_scores(torch.randn(3, 2)), TypeError, "list or tuple"),
        (lambda: filter_scores([]), ValueError, "empty"),
        (lambda: filter_scores([torch.randn(3, 2)], kind="l3"), ValueError, "unknown kind"),
        (lambda: filter_scores([torch.randn(3, 2)], kind="abs"), ValueError, "1-D"),
        (lambda: filter_scores([torch.randn(3, 2)], kind="taylor"), ValueError, "needs grads"),
        (lambda: filter_scores([torch.randn(3, 2)], kind="taylor", grads=[torch.randn(2, 3)]),
         ValueError, "shape"),
        (lambda: filter_scores([torch.randn(3, 2)], kind="taylor", grads=[]), ValueError, "grads"),
        (lambda: filter_scores([torch.randn(3, 2)], kind="taylor",
                               grads=[torch.randn(3, 2).half()]), TypeError, "dtype"),
        (lambda: filter_scores([torch.randn(3, 2)], grads=[torch.randn(3, 2)]),
         ValueError, "taylor"),
        (lambda: filter_scores([torch.ones(3, 2, dtype=torch.int64)]), TypeError, "float"),
        (lambda: filter_scores([torch.randn(0, 4)]), ValueError, "empty"),
        (lambda: filter_scores([torch.tensor(1.0)]), ValueError, "scalar"),
        (lambda: filter_scores([np.ones((3, 2))]), TypeError, "torch.Tensor"),
        (lambda: filter_scores([torch.randn(3, 2), torch.randn(3, 2, device="meta")]),
         ValueError, "one device"),
    ],
)
def test_filter_scores_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# C-SGD: parity between the paths


def test_csgd_paths_agree_with_fp64_reference():
    need_triton_on_cpu()
    params, clusters = csgd_params()
    truth = csgd_fp64_truth(params, clusters, **COEFS)
    ref, torch_path, dense, fused = (clone_params(params) for _ in range(4))
    grad_objects = [q.grad for q in fused + torch_path]
    csgd_transform_ref(ref, clusters, **COEFS)
    csgd_transform_(torch_path, clusters, backend="reference", **COEFS)
    csgd_transform_dense_ref(dense, clusters, **COEFS)
    csgd_transform_(fused, clusters, backend="triton", **COEFS)
    in_place = zip(fused + torch_path, grad_objects, strict=True)
    assert all(q.grad is g for q, g in in_place)
    assert fused[5].grad.is_contiguous(memory_format=torch.channels_last)  # written in place
    for i, t in enumerate(truth):
        for result in (torch_path, dense, fused):
            assert_close_to_fp64(result[i].grad, ref[i].grad, t)
        assert torch.equal(fused[i].detach(), params[i].detach())  # weights untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_csgd_low_and_double_precision(dtype):
    need_triton_on_cpu()
    params, clusters = csgd_params(dtype)
    truth = csgd_fp64_truth(params, clusters, **COEFS)
    ref, torch_path, fused = (clone_params(params) for _ in range(3))
    csgd_transform_ref(ref, clusters, **COEFS)
    csgd_transform_(torch_path, clusters, backend="reference", **COEFS)
    csgd_transform_(fused, clusters, backend="triton", **COEFS)
    for i, t in enumerate(truth):
        assert ref[i].grad.dtype == dtype
        rel = 1e-12 if dtype == torch.float64 else 1e-6
        # both round the float32 result once to dtype; allow that one rounding step
        ulp = (t.abs() * torch.finfo(dtype).eps).clamp_min(torch.finfo(dtype).tiny)
        for result in (torch_path, fused):
            err = (result[i].grad.double() - t).abs()
            bound = 2 * (ref[i].grad.double() - t).abs() + ulp + rel
            assert bool((err <= bound).all())


def _dyadic_case(bias_dtype):
    """Integer weights and grads, clusters of size 1, 2 and 4, dyadic coefficients: every
    path computes these exactly (the bias in ``bias_dtype``, the rest float32)."""
    g = torch.Generator().manual_seed(5)
    params = [torch.randint(-8, 9, (8, 2, 3, 3), generator=g).float(),
              torch.randint(-8, 9, (8,), generator=g).to(bias_dtype),
              torch.randint(-8, 9, (4, 1030), generator=g).float()]
    clusters = [torch.tensor([0, 1, 1, 2, 2, 2, 2, 3]), torch.tensor([0, 1, 1, 2, 2, 2, 2, 3]),
                torch.tensor([5, 5, 0, 1])]
    coefs = dict(weight_decay=0.5, centripetal=[0.25, 0.125, 0.75])
    return with_grads(params, integer=True), clusters, coefs


def test_csgd_exact_on_dyadic_data():
    """Integer weights/grads, clusters of size 1, 2, 4 and dyadic η, ε: every path is exact."""
    need_triton_on_cpu()
    params, clusters, coefs = _dyadic_case(torch.float32)
    truth = csgd_fp64_truth(params, clusters, **coefs)
    results = [clone_params(params) for _ in range(4)]
    csgd_transform_ref(results[0], clusters, **coefs)
    csgd_transform_(results[1], clusters, backend="reference", **coefs)
    csgd_transform_dense_ref(results[2], clusters, **coefs)
    csgd_transform_(results[3], clusters, backend="triton", **coefs)
    for result in results:
        for q, t in zip(result, truth, strict=True):
            assert torch.equal(q.grad.double(), t)


def test_csgd_plan_gives_the_same_result_as_raw_clusters():
    need_triton_on_cpu()
    params, clusters = csgd_params()
    plan = CSGDPlan(params, clusters)
    a, b, c = (clone_params(params) for _ in range(3))
    csgd_transform_(a, clusters, backend="reference", **COEFS)
    csgd_transform_(b, plan, backend="reference", **COEFS)
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(a, b, strict=True))
    csgd_transform_(c, plan, backend="triton", **COEFS)
    d = clone_params(params)
    csgd_transform_(d, plan, backend="triton", **COEFS)  # cached tables reused
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(c, d, strict=True))


@pytest.mark.parametrize("path", ["reference", "auto", "triton"])
def test_csgd_plan_reused_over_steps(path):
    """Like a training loop: one plan, fresh gradient tensors each step, changing coefficients.
    The per-plan caches (validated coefficients, the kernel's address table) must follow."""
    if path == "triton":
        need_triton_on_cpu()
    params, clusters = csgd_params()
    plan = CSGDPlan(params, clusters)
    steps = [COEFS, COEFS, dict(weight_decay=0.2, centripetal=0.9), dict(COEFS)]
    for step, coefs in enumerate(steps):
        ours = clone_params(params)
        for q in ours:  # new gradient buffers and values at every step
            q.grad = q.grad * (step + 1)
        expected = clone_params(ours)
        csgd_transform_ref(expected, clusters, **coefs)
        csgd_transform_(ours, plan, backend=path, **coefs)
        for q, e in zip(ours, expected, strict=True):
            torch.testing.assert_close(q.grad, e.grad, rtol=1e-5, atol=1e-5)


def test_csgd_plan_still_validates_each_call():
    params, clusters = csgd_params()
    plan = CSGDPlan(params, clusters)
    csgd_transform_(params, plan, **COEFS)
    params[2].grad = None
    with pytest.raises(ValueError, match=r"params\[2\].*no \.grad"):
        csgd_transform_(params, plan, **COEFS)
    params[2].grad = params[1].grad
    with pytest.raises(ValueError, match="twice"):
        csgd_transform_(params, plan, **COEFS)
    params[2].grad = torch.zeros(12)
    with pytest.raises(ValueError, match="centripetal"):
        csgd_transform_(params, plan, weight_decay=COEFS["weight_decay"], centripetal=[0.1] * 3)
    with pytest.raises(ValueError, match="plan has 7 params but 6"):
        csgd_transform_(params[:6], plan, **COEFS)


@pytest.mark.parametrize("path", ["reference", "auto", "triton"])
def test_csgd_non_contiguous_grad_is_written_in_place(path):
    if path == "triton":
        need_triton_on_cpu()
    w = torch.randn(6, 4).requires_grad_()
    w.grad = torch.randn(4, 6).t()  # same shape, transposed strides
    grad = w.grad
    expected = clone_params([w])
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    csgd_transform_ref(expected, [labels], weight_decay=0.1, centripetal=0.2)
    csgd_transform_([w], [labels], weight_decay=0.1, centripetal=0.2, backend=path)
    assert w.grad is grad
    torch.testing.assert_close(w.grad, expected[0].grad)


# ---------------------------------------------------------------------------------------------
# C-SGD: the invariants of ALGORITHMS.md §4


def check_csgd_invariants(before, after, labels, eta, eps):
    W = before.detach().reshape(len(labels), -1).double()
    G = before.grad.reshape(len(labels), -1).double()
    G_new = after.grad.reshape(len(labels), -1).double()
    scale = 1e-5 * (1 + W.abs().max() + G.abs().max())
    for h in torch.unique(labels):
        rows = torch.nonzero(labels == h).squeeze(1)
        if len(rows) == 1:  # singleton: plain weight decay
            torch.testing.assert_close(G_new[rows], G[rows] + eta * W[rows], atol=scale, rtol=0)
            continue
        a = rows[0]
        for b in rows[1:]:
            torch.testing.assert_close(G_new[a] - G_new[b], (eta + eps) * (W[a] - W[b]),
                                       atol=scale, rtol=0)
        # the cluster's mean gradient is mean(G) + η·mean(W): the pull toward the centre sums to 0
        torch.testing.assert_close(G_new[rows].mean(0), G[rows].mean(0) + eta * W[rows].mean(0),
                                   atol=scale, rtol=0)


@pytest.mark.parametrize("path", ["reference", "auto", "triton"])
def test_csgd_invariants(path):
    if path == "triton":
        need_triton_on_cpu()
    params, clusters = csgd_params()
    after = clone_params(params)
    csgd_transform_(after, clusters, backend=path, **COEFS)
    plan = CSGDPlan(params, clusters)
    for i in range(len(params)):
        check_csgd_invariants(params[i], after[i], torch.from_numpy(plan.labels[i]),
                              COEFS["weight_decay"][i], COEFS["centripetal"][i])


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 24),
    inner=st.sampled_from([(), (5,), (3, 2, 2)]),
    k=st.integers(1, 24),
    eta=st.floats(0, 0.1),
    eps=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_csgd_torch_path_random(n, inner, k, eta, eps, seed):
    g = torch.Generator().manual_seed(seed)
    (p,) = with_grads([torch.randn((n, *inner), generator=g)], seed=seed + 1)
    labels = torch.randint(0, k, (n,), generator=g)
    after, ref = clone_params([p]), clone_params([p])
    csgd_transform_(after, [labels], weight_decay=eta, centripetal=eps, backend="reference")
    csgd_transform_ref(ref, [labels], weight_decay=eta, centripetal=eps)
    truth = csgd_fp64_truth([p], [labels], weight_decay=eta, centripetal=eps)
    assert_close_to_fp64(after[0].grad, ref[0].grad, truth[0])
    check_csgd_invariants(p, after[0], labels, eta, eps)


# ---------------------------------------------------------------------------------------------
# C-SGD: bad input


def _one_param(n=6, grad=True):
    p = torch.randn(n, 3).requires_grad_()
    if grad:
        p.grad = torch.randn(n, 3)
    return p


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: ([_one_param()], [torch.zeros(5, dtype=torch.long)]), ValueError, "5 entries"),
        (lambda: ([_one_param()], [torch.tensor([0, 1, -1, 0, 1, 2])]), ValueError, "negative"),
        (lambda: ([_one_param()], [torch.zeros(6)]), TypeError, "integer"),
        (lambda: ([_one_param()], [torch.zeros(6, 1, dtype=torch.long)]), ValueError, "1-D"),
        (lambda: ([_one_param(grad=False)], [torch.zeros(6, dtype=torch.long)]), ValueError,
         "no .grad"),
        (lambda: ([_one_param(), _one_param()], [torch.zeros(6, dtype=torch.long)]), ValueError,
         "1 cluster arrays for 2"),
        (lambda: ([], []), ValueError, "empty"),
        (lambda: (_one_param(), [torch.zeros(6, dtype=torch.long)]), TypeError, "list or tuple"),
        (lambda: ([torch.randn(0, 3)], [torch.zeros(0, dtype=torch.long)]), ValueError,
         "non-empty"),
    ],
)
def test_csgd_bad_input(make, error, match):
    params, clusters = make()
    before = [p.grad.clone() if isinstance(p, torch.Tensor) and p.grad is not None else None
              for p in (params if isinstance(params, list) else [])]
    with pytest.raises(error, match=match):
        csgd_transform_(params, clusters, weight_decay=0.0, centripetal=0.1)
    for p, b in zip(params if isinstance(params, list) else [], before, strict=True):
        if b is not None:
            assert torch.equal(p.grad, b)  # nothing touched before the error


def test_csgd_rejects_duplicates_bad_coefficients_and_plan_mismatch():
    p = _one_param()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="twice"):
        csgd_transform_([p, p], [labels, labels], weight_decay=0.0, centripetal=0.1)
    with pytest.raises(ValueError, match="centripetal"):
        csgd_transform_([p], [labels], weight_decay=0.0, centripetal=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        csgd_transform_([p], [labels], weight_decay=[0.0, 0.1], centripetal=0.1)
    with pytest.raises(ValueError, match="finite"):
        csgd_transform_([p], [labels], weight_decay=float("nan"), centripetal=0.1)
    with pytest.raises(TypeError, match="weight_decay"):
        csgd_transform_([p], [labels], weight_decay="0.1", centripetal=0.1)
    plan = CSGDPlan([torch.empty(6, 4)], [labels])
    with pytest.raises(ValueError, match="plan was built for"):
        csgd_transform_([p], plan, weight_decay=0.0, centripetal=0.1)
    m = torch.randn(6, 3, device="meta").requires_grad_()
    m.grad = torch.randn(6, 3, device="meta")
    with pytest.raises(ValueError, match="one device"):
        csgd_transform_([p, m], [labels, labels], weight_decay=0.0, centripetal=0.1)


# ---------------------------------------------------------------------------------------------
# compiled (not interpreted) kernels: lower them for an H100 without a GPU


def _compile_for_sm90(kernel, pointer_args, constexprs):
    """Run Triton's real pipeline (TTIR -> PTX -> cubin via the bundled ptxas) for sm_90.

    The interpreter does not exercise lowering (pointer casts, constexpr branches, IEEE sqrt);
    this catches kernels that run interpreted but would not compile for a GPU.
    """
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - depends on the installed Triton
        pytest.skip(f"Triton's ahead-of-time compiler API is unavailable: {exc}")
    signature = {**pointer_args, **{name: "constexpr" for name in constexprs}}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                              target=GPUTarget("cuda", 90, 32))
    return compiled.asm["ptx"]


@pytest.mark.skipif(INTERPRETED, reason="needs Triton in compiler mode (main process only)")
def test_kernels_compile_for_sm90(monkeypatch, tmp_path):
    import triton.language as tl

    from accelprune.kernels import _triton_kernels as tk

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # cold and private: really compiles
    for elem, acc, kinds in [("bf16", tl.float32, range(4)), ("fp64", tl.float64, [tk.KIND_L2])]:
        for kind in kinds:
            ptx = _compile_for_sm90(
                tk.filter_scores_kernel,
                {"table_ptr": "*i64", "task_ptr": "*i64", "out_ptr": "*fp32", "X0": f"*{elem}",
                 "G0": f"*{elem}"},
                {"KIND": kind, "ACC": acc, "BLOCK_R": tk.FS_BLOCK_R, "BLOCK_F": tk.FS_BLOCK_F},
            )
            if kind == tk.KIND_L2:
                assert ("sqrt.rn.f64" if elem == "fp64" else "sqrt.rn.f32") in ptx
    for elem, acc in [("fp32", tl.float32), ("fp16", tl.float32), ("fp64", tl.float64)]:
        _compile_for_sm90(
            tk.csgd_kernel,
            {"param_ptr": "*i64", "task_ptr": "*i64", "cluster_ptr": "*i64", "member_ptr": "*i64",
             "W0": f"*{elem}"},
            {"ACC": acc, "BLOCK": tk.CS_BLOCK},
        )


@pytest.mark.skipif(INTERPRETED, reason="needs Triton imported in compiler mode")
def test_interpreter_requested_after_triton_was_imported_gives_a_clear_error(monkeypatch):
    from accelprune.kernels import _triton_kernels  # noqa: F401  (imports Triton, compiler mode)

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late: Triton is already loaded
    with pytest.raises(RuntimeError, match="before Triton is first imported"):
        filter_scores([torch.randn(4, 3)], backend="triton")
    with pytest.raises(RuntimeError, match="before Triton is first imported"):
        csgd_transform_([_one_param()], [torch.zeros(6, dtype=torch.long)], weight_decay=0.0,
                        centripetal=0.1, backend="triton")


# ---------------------------------------------------------------------------------------------
# GPU parity (real kernels)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["l1", "l2", "taylor"])
def test_gpu_filter_scores_parity(kind):
    tensors = [t.cuda() for t in mixed_tensors()] + [torch.randn(512, 256, 3, 3, device="cuda")]
    grads = [torch.randn_like(t) for t in tensors] if kind == "taylor" else None
    ours = filter_scores(tensors, kind=kind, grads=grads)  # auto -> triton on CUDA
    ref = filter_scores_ref(tensors, kind=kind, grads=grads)
    for o, r, t in zip(ours, ref, scores_fp64(tensors, kind, grads), strict=True):
        assert o.is_cuda
        assert_close_to_fp64(o, r, t)


@pytest.mark.gpu
@needs_cuda
def test_gpu_csgd_parity(monkeypatch):
    calls = []
    real = csgd_mod._csgd_transform_triton
    monkeypatch.setattr(csgd_mod, "_csgd_transform_triton", lambda *a: calls.append(1) or real(*a))
    params, clusters = csgd_params()
    big = torch.randn(256, 128, 3, 3).requires_grad_()
    big.grad = torch.randn_like(big)
    params, clusters = params + [big], clusters + [torch.randint(0, 100, (256,))]
    coefs = dict(weight_decay=COEFS["weight_decay"] + [1e-3],
                 centripetal=COEFS["centripetal"] + [0.05])
    truth = csgd_fp64_truth(params, clusters, **coefs)
    ref = clone_params(params)
    csgd_transform_ref(ref, clusters, **coefs)
    gpu = [p.detach().cuda().requires_grad_() for p in params]
    for q, p in zip(gpu, params, strict=True):
        q.grad = p.grad.cuda()
    csgd_transform_(gpu, CSGDPlan(gpu, clusters), **coefs)  # auto -> triton on CUDA
    assert calls == [1]
    for q, r, t in zip(gpu, ref, truth, strict=True):
        assert_close_to_fp64(q.grad.cpu(), r.grad, t)


# ---------------------------------------------------------------------------------------------
# C-SGD: the fused CPU pass (backend="auto" on CPU tensors), plan caching, dtypes


def _run_paths(params, clusters, coefs):
    """(fused CPU pass, torch reference path, readable reference) results, each on a copy."""
    fused, torch_path, ref = (clone_params(params) for _ in range(3))
    csgd_transform_(fused, clusters, backend="auto", **coefs)
    csgd_transform_(torch_path, clusters, backend="reference", **coefs)
    csgd_transform_ref(ref, clusters, **coefs)
    return fused, torch_path, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_csgd_fused_cpu_pass_matches_the_references(monkeypatch, dtype):
    calls = []
    real = csgd_mod._csgd_transform_cpu
    monkeypatch.setattr(csgd_mod, "_csgd_transform_cpu", lambda *a: calls.append(1) or real(*a))
    params, clusters = csgd_params(dtype)
    grads = [p.grad for p in params]
    truth = csgd_fp64_truth(params, clusters, **COEFS)
    fused, torch_path, ref = _run_paths(params, clusters, COEFS)
    assert calls == [1]
    dense = clone_params(params)
    csgd_transform_dense_ref(dense, clusters, **COEFS)
    for i, t in enumerate(truth):
        assert fused[i].grad.dtype == dtype
        assert_close_to_fp64(fused[i].grad, ref[i].grad, t, rel_atol=1e-5 if dtype ==
                             torch.float32 else 1e-12)
        torch.testing.assert_close(fused[i].grad, dense[i].grad, rtol=1e-5, atol=1e-5)
        assert torch.equal(params[i].grad, grads[i])  # the originals were copies
    assert fused[5].grad.is_contiguous(memory_format=torch.channels_last)


def test_csgd_fused_cpu_pass_is_exact_on_dyadic_data():
    params, clusters, coefs = _dyadic_case(torch.float64)
    truth = csgd_fp64_truth(params, clusters, **coefs)
    fused = clone_params(params)
    csgd_transform_(fused, clusters, **coefs)
    for q, t in zip(fused, truth, strict=True):
        assert torch.equal(q.grad.double(), t)


def test_csgd_fused_cpu_pass_does_not_depend_on_the_thread_split(monkeypatch):
    from accelprune.kernels import _cpu_kernels

    g = torch.Generator().manual_seed(2)
    params = with_grads([torch.randn(64, 16, 3, 3, generator=g), torch.randn(64, generator=g),
                         torch.randn(40, 300, generator=g)])
    clusters = [torch.randint(0, 20, (64,), generator=g)] * 2 + [torch.randint(0, 9, (40,),
                                                                               generator=g)]
    results = []
    for work in (1 << 40, 1, 500):  # one chunk; as many chunks as threads; in between
        monkeypatch.setattr(_cpu_kernels, "_WORK_PER_THREAD", work)
        plan = CSGDPlan(params, clusters)
        for threads in (1, 2, 3):
            monkeypatch.setattr(csgd_mod, "thread_count", lambda _, t=threads: t)
            out = clone_params(params)
            csgd_transform_(out, plan, weight_decay=0.01, centripetal=0.2)
            results.append([q.grad for q in out])
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0], strict=True))


def test_split_work_covers_every_cluster_once():
    from accelprune.kernels._cpu_kernels import split_work

    rng = np.random.default_rng(0)
    sizes = [rng.integers(1, 9, k) for k in (1, 50, 7, 300)]
    for threads in (1, 2, 3, 8):
        chunks = split_work(sizes, [9, 1, 4608, 3], threads)
        assert 1 <= len(chunks) <= threads
        pieces = sorted(piece for chunk in chunks for piece in chunk)
        for p, k in enumerate(len(s) for s in sizes):
            mine = [(c0, c1) for q, c0, c1 in pieces if q == p]
            assert mine[0][0] == 0 and mine[-1][1] == k
            assert all(a[1] == b[0] for a, b in zip(mine, mine[1:], strict=False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["auto", "reference"])
def test_half_precision_weights_are_accepted(dtype, path):
    """Any real float dtype (the docs' promise): float16/bfloat16 params, grads and scores."""
    params, clusters = csgd_params(dtype)
    truth = csgd_fp64_truth(params, clusters, **COEFS)
    ours = clone_params(params)
    csgd_transform_(ours, clusters, backend=path, **COEFS)
    for q, t in zip(ours, truth, strict=True):
        assert q.grad.dtype == dtype
        ulp = (t.abs() * torch.finfo(dtype).eps).clamp_min(torch.finfo(dtype).tiny)
        assert bool(((q.grad.double() - t).abs() <= 2 * ulp + 1e-3).all())
    tensors = mixed_tensors(dtype)
    for kind in ("l1", "l2", "taylor"):
        grads = [p.grad for p in with_grads(tensors)] if kind == "taylor" else None
        scores = filter_scores(tensors, kind=kind, grads=grads, backend=path)
        for s, t in zip(scores, scores_fp64(tensors, kind, grads), strict=True):
            assert s.dtype == torch.float32
            torch.testing.assert_close(s.double(), t, rtol=1e-5, atol=1e-5)


def test_csgd_cluster_ids_beyond_int64_are_ids_not_negative():
    p = _one_param()
    huge = np.array([2**63, 5, 2**64 - 1, 5, 2**63, 0], dtype=np.uint64)
    small = np.array([2, 1, 3, 1, 2, 0])  # the same partition
    a, b = clone_params([p]), clone_params([p])
    csgd_transform_(a, [huge], weight_decay=0.1, centripetal=0.2)
    csgd_transform_ref(b, [small], weight_decay=0.1, centripetal=0.2)
    torch.testing.assert_close(a[0].grad, b[0].grad)


def test_function_calls_reuse_one_plan_per_label_content(monkeypatch):
    built = []
    real_init = CSGDPlan.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(CSGDPlan, "__init__", counting_init)
    csgd_mod._plans.clear()
    params, clusters = csgd_params()
    for step in range(3):  # fresh gradients each step, the same label arrays
        ours = clone_params(params)
        for q in ours:
            q.grad = q.grad * (step + 1)
        csgd_transform_(ours, clusters, **COEFS)
    assert len(built) == 1
    copies = [c.clone() for c in clusters]  # other objects, same content: the same plan
    csgd_transform_(clone_params(params), copies, **COEFS)
    assert len(built) == 1
    # changed in place: a new plan, and the result follows the new labels
    clusters[0][0], clusters[0][1] = 1, 3
    ours, expected = clone_params(params), clone_params(params)
    csgd_transform_(ours, clusters, **COEFS)
    assert len(built) == 2
    csgd_transform_ref(expected, clusters, **COEFS)  # the references build their own plan
    for q, e in zip(ours, expected, strict=True):
        torch.testing.assert_close(q.grad, e.grad)
    # numpy label arrays are keyed by content too (the same content as the tensors: a hit)
    built.clear()
    as_numpy = [c.numpy().copy() for c in clusters]
    csgd_transform_(clone_params(params), as_numpy, **COEFS)
    csgd_transform_(clone_params(params), [a.copy() for a in as_numpy], **COEFS)
    as_numpy[3][0] = 7
    csgd_transform_(clone_params(params), as_numpy, **COEFS)
    assert len(built) == 1


def test_cached_plans_are_bounded_and_bad_labels_are_not_cached():
    csgd_mod._plans.clear()
    p = _one_param()
    for shift in range(csgd_mod._PlanCache.SIZE + 5):
        csgd_transform_([p], [np.arange(6) + shift], weight_decay=0.0, centripetal=0.1)
    assert len(csgd_mod._plans._entries) == csgd_mod._PlanCache.SIZE
    csgd_mod._plans.clear()
    with pytest.raises(ValueError, match="negative"):
        csgd_transform_([p], [np.array([0, 1, -1, 0, 1, 2])], weight_decay=0.0, centripetal=0.1)
    assert len(csgd_mod._plans._entries) == 0


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU message")
def test_gpu_script_fails_loudly_without_cuda():
    script = os.path.join(ROOT, "benchmarks", "gpu.sh")
    result = subprocess.run(["bash", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 1
    assert "no usable CUDA device" in result.stderr and "sees no CUDA device" in result.stderr
    assert "pytest" not in result.stdout  # stopped before running anything

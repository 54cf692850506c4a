"""N:M semi-structured sparsity: the selection kernel and its reference, nm_prune, and the
conversion to torch's semi-structured format.

The Triton kernel is checked on the CPU through the interpreter in a child process started with
``TRITON_INTERPRET=1`` (Triton picks interpreter or compiler once, when imported: see
tests/test_kernels.py), with small shapes; on a real GPU by the ``gpu`` tests.
"""
from __future__ import annotations

import copy

import pytest
import torch
from failsafe import leaves_unchanged
from hypothesis import given, settings
from hypothesis import strategies as st
from interpreted import INTERPRETED, run_under_interpreter
from torch import nn

import accelprune
from accelprune.kernels.nm import nm_keep_mask, nm_keep_mask_ref
from accelprune.masks import get_masks
from accelprune.semi_structured import is_nm_sparse, nm_prune, to_semi_structured

HAS_CUDA = torch.cuda.is_available()


def need_triton_on_cpu():
    if not INTERPRETED:
        pytest.skip("launches Triton on CPU tensors: runs in the TRITON_INTERPRET=1 child process "
                    "of test_nm_kernel_under_the_interpreter")


def test_nm_kernel_under_the_interpreter():
    """Run this module's kernel tests again in a child process with TRITON_INTERPRET=1."""
    if INTERPRETED:
        pytest.skip("this is the child process")
    returncode, output = run_under_interpreter(__file__, "-k", "triton", timeout=600)
    assert returncode == 0, output
    assert "passed" in output and "TRITON_INTERPRET=1 child process" not in output, output


# -- the selection ---------------------------------------------------------------------------

def _brute_force(scores, n):
    """Keep entry j when fewer than n entries beat it (greater, or equal and earlier)."""
    R, m = scores.shape
    keep = torch.zeros(R, m, dtype=torch.bool)
    for r in range(R):
        for j in range(m):
            beaten = sum(1 for k in range(m) if scores[r, k] > scores[r, j]
                         or (scores[r, k] == scores[r, j] and k < j))
            keep[r, j] = beaten < n
    return keep


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_reference_keeps_the_n_largest_ties_to_the_earlier(m, rows, seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, m + 1, (1,), generator=g))
    scores = torch.randint(0, 3, (rows, m), generator=g).float()  # many ties
    before = scores.clone()
    keep = nm_keep_mask_ref(scores, n)
    assert torch.equal(keep, _brute_force(scores, n))
    assert torch.equal(scores, before)


@pytest.mark.parametrize("m,n", [(4, 2), (8, 4), (3, 1), (4, 4), (16, 3), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_triton_matches_reference_exactly(m, n, dtype):
    need_triton_on_cpu()
    g = torch.Generator().manual_seed(m * 10 + n)
    for scores in (torch.randint(0, 3, (300, m), generator=g).to(dtype),  # ties
                   torch.randn(257, m, generator=g).abs().to(dtype)):
        assert torch.equal(nm_keep_mask(scores, n, backend="triton"), nm_keep_mask_ref(scores, n))


def test_auto_on_cpu_is_the_reference():
    scores = torch.rand(50, 4)
    assert torch.equal(nm_keep_mask(scores, 2), nm_keep_mask_ref(scores, 2))


@pytest.mark.parametrize("scores,n,err,match", [
    (torch.rand(4), 2, ValueError, "2-D"),
    (torch.rand(3, 4), 5, ValueError, "at most m"),
    (torch.rand(3, 4), 0, ValueError, "n must be"),
    (torch.tensor([[1.0, float("nan"), 0.0, 2.0]]), 2, ValueError, "NaN"),
    (torch.ones(3, 4, dtype=torch.int64), 2, TypeError, "float"),
    ([[1.0, 2.0]], 1, TypeError, "torch.Tensor"),
    (torch.zeros(0, 4), 2, ValueError, "empty"),
])
def test_selection_bad_input(scores, n, err, match):
    with pytest.raises(err, match=match):
        nm_keep_mask(scores, n)


# -- nm_prune ----------------------------------------------------------------------------------

def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),      # 3 input channels: skipped for m = 4
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, padding=1, groups=2),  # 8 inputs per group
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: 1 input, skipped
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5),  # 12 = 3 groups of 4
    )


def _expected_conv_mask(w, n, m):
    """Per output channel and kernel position, the n largest |w| of each m input channels."""
    out, cin, kh, kw = w.shape
    mask = torch.zeros_like(w)
    for o in range(out):
        for i in range(kh):
            for j in range(kw):
                col = w[o, :, i, j].abs()
                for start in range(0, cin, m):
                    grp = col[start:start + m]
                    top = torch.sort(grp, descending=True, stable=True).indices[:n]
                    mask[o, start + top, i, j] = 1
    return mask


def test_nm_prune_masks_every_group_of_m_inputs():
    model, x = _model(), torch.randn(2, 3, 8, 8)
    dense = copy.deepcopy(model)
    report = nm_prune(model, 2, 4)
    assert set(report.pruned) == {"2.weight", "3.weight", "7.weight", "9.weight"}
    assert set(report.skipped) == {"0.weight", "4.weight"}
    assert "not a multiple of m = 4" in report.skipped["0.weight"]
    assert all(s == 0.5 for s in report.pruned.values())
    masks = get_masks(model)
    for name in ("2", "3"):
        w = dense.get_submodule(name).weight.detach()
        assert torch.equal(masks[f"{name}.weight"], _expected_conv_mask(w, 2, 4))
    for name in ("7", "9"):
        w = dense.get_submodule(name).weight.detach()
        expected = nm_keep_mask_ref(w.abs().reshape(-1, 4), 2).reshape(w.shape).float()
        assert torch.equal(masks[f"{name}.weight"], expected)
        kept = w.reshape(-1, 4).abs().sort(1).values
        assert torch.all(kept[:, 2:].min(1).values >= kept[:, :2].max(1).values)
    for name in ("2", "3", "7", "9"):
        mod = model.get_submodule(name)
        assert hasattr(mod, "weight_orig") and is_nm_sparse(mod.weight, 2, 4, module=mod)
    assert model(x).shape == (2, 5)


def test_nm_prune_1_of_4_and_existing_masks_are_kept():
    model = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(32, dtype=torch.float32).reshape(4, 8) + 1)
    accelprune.magnitude_prune(model, 0.25, scope="layer")  # masks the 8 smallest
    nm_prune(model, 1, 4)
    mask = model[0].weight_mask
    # row 0 (1..8) was masked entirely; elsewhere the largest of each group of 4 stays
    expected = torch.zeros(4, 8)
    expected[1:, 3] = expected[1:, 7] = 1
    assert torch.equal(mask, expected)


def test_taylor_importance_needs_gradients():
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="backward"):
        nm_prune(model, importance="taylor")
    model(torch.randn(3, 8)).sum().backward()
    report = nm_prune(model, importance="taylor")
    assert report.pruned == {"0.weight": 0.5}


def test_ties_go_to_the_earlier_inputs():
    model = nn.Sequential(nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    nm_prune(model)
    assert torch.equal(model[0].weight_mask, torch.tensor([[1.0, 1, 0, 0] * 2] * 2))


def test_parameters_selects_layers():
    model = _model()
    report = nm_prune(model, parameters=["7"])
    assert list(report.pruned) == ["7.weight"] and not report.skipped
    assert set(get_masks(model)) == {"7.weight"}


@pytest.mark.parametrize("kwargs,err,match", [
    ({"n": 4, "m": 4}, ValueError, "n must be below m"),
    ({"n": 0}, ValueError, "n must be"),
    ({"m": 1}, ValueError, "m must be"),
    ({"n": 2.0}, TypeError, "n must be an integer"),
    ({"importance": "l2"}, ValueError, "unknown importance"),
    ({"importance": None}, TypeError, "importance"),
    ({"parameters": ["nope"]}, ValueError, "nope"),
])
def test_nm_prune_bad_input(kwargs, err, match):
    model = _model()
    with pytest.raises(err, match=match):
        nm_prune(model, **kwargs)
    assert not get_masks(model)
    with pytest.raises(TypeError, match="nn.Module"):
        nm_prune("model")


# -- to_semi_structured ------------------------------------------------------------------------

def test_to_semi_structured_on_cpu_says_why_and_changes_nothing():
    model = _model()
    nm_prune(model)
    accelprune.make_permanent(model)
    weights = {n: p for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="CUDA"):
        report = to_semi_structured(model)
    assert set(report) == {"7", "9"}
    assert all("CUDA" in why for why in report.values())
    assert all(p is weights[n] for n, p in model.named_parameters())


def test_to_semi_structured_asks_for_make_permanent():
    model = _model()
    nm_prune(model)
    report = to_semi_structured(model)
    assert "make_permanent" in report["7"]


def test_is_nm_sparse():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4]])
    assert is_nm_sparse(w, 2, 4) and not is_nm_sparse(w, 1, 4)
    assert not is_nm_sparse(torch.ones(2, 6), 2, 4)  # 6 is not a multiple of 4


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA device")
def test_gpu_triton_selection_matches_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (100_003, 4), generator=g).float().cuda()
    assert torch.equal(nm_keep_mask(scores, 2), nm_keep_mask_ref(scores, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs a CUDA device")
def test_gpu_to_semi_structured_converts_and_agrees():
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("2:4 sparse tensor cores need compute capability >= 8.0")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).half().cuda()
    nm_prune(model)
    accelprune.make_permanent(model)
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    with torch.no_grad():
        dense = model(x)
        report = to_semi_structured(model)
        assert report == {"0": "converted", "2": "converted"}
        torch.testing.assert_close(model(x), dense, rtol=1e-2, atol=1e-2)


def test_a_failure_while_applying_masks_leaves_none(monkeypatch):
    import torch.nn.utils.prune as torch_prune

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    real, calls = torch_prune.custom_from_mask, []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_prune, "custom_from_mask", fail_on_second)
    with leaves_unchanged(model, torch.randn(2, 8), raises=RuntimeError, match="injected"):
        nm_prune(model, 2, 4)
    assert not any(torch_prune.is_pruned(m) for m in model.modules())

"""N:M selection: which ``n`` of every ``m`` consecutive scores to keep, for many rows at once.

The input is one (R, m) table of scores: every row a group of ``m`` consecutive weights along
a layer's input dimension, the groups of all layers of a model stacked together, so that one
launch (Triton, on CUDA) or one vectorised call (torch) selects for the whole model. The output
is a (R, m) bool table, True where the weight is kept: exactly ``n`` per row.

Ties go to the earlier position in the group (a deterministic, documented rule both paths
share): entry j is kept when fewer than ``n`` entries of its row beat it, where k beats j if
s_k > s_j, or s_k == s_j and k < j.

* :func:`nm_keep_mask_ref`: torch, a stable descending sort per row (the oracle; CPU path);
* :func:`nm_keep_mask`: dispatches; on CUDA a Triton kernel counts, for every entry, the
  entries that beat it (m is small: m loads of a column per block of rows, no sort).

Importing this module does not import Triton.
"""
from __future__ import annotations

import functools

import torch

from accelprune._validation import check_int
from accelprune.kernels._common import check_float_tensor, device_context, select_backend

__all__ = ["nm_keep_mask", "nm_keep_mask_ref"]

NM_BLOCK_R = 128  # rows (groups) per program; a starting point, not tuned
_MAX_M = 64  # the kernel unrolls over m
tl = None  # triton.language, set by _compiled_kernel() on first use


def _check(scores, n):
    scores = check_float_tensor(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (groups, m), got shape {tuple(scores.shape)}")
    m = scores.shape[1]
    n = check_int(n, "n", low=1)
    if n > m:
        raise ValueError(f"n must be at most m = {m} (the row length), got {n}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or Inf")
    return scores, n, m


def nm_keep_mask_ref(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(R, m) bool, True for the ``n`` highest scores of each row (ties: earlier first).

    Torch reference: a stable descending sort per row keeps equal scores in position order, so
    the first ``n`` of the order are exactly the entries fewer than ``n`` others beat.
    ``scores`` is not modified.
    """
    scores, n, m = _check(scores, n)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(1, order, True)


def nm_keep_mask(scores: torch.Tensor, n: int, *, backend: str = "auto") -> torch.Tensor:
    """As :func:`nm_keep_mask_ref`, by Triton on CUDA tensors (``backend="auto"``), on CPU
    tensors too under ``TRITON_INTERPRET=1`` with ``backend="triton"``; ``backend="reference"``
    is the reference. Exactly equal to the reference on every input. Rows longer than 64 (the
    kernel unrolls over m) go to the reference."""
    scores, n, m = _check(scores, n)
    if select_backend(backend, scores.device) == "reference" or m > _MAX_M:
        return nm_keep_mask_ref(scores, n)
    return _nm_keep_mask_triton(scores, n, m)


# ---------------------------------------------------------------------------------------------
# Triton path. The kernel is compiled on first use: this module must stay importable without
# Triton, so the decorator is applied then (annotations are strings here, so ``tl`` need not
# exist at import time; the kernel finds it among this module's globals once it is loaded).


def _nm_keep_kernel(score_ptr, keep_ptr, R, N: tl.constexpr, M: tl.constexpr,
                    MP: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program ``pid`` decides rows ``pid·BLOCK_R ..``: rank = how many entries beat each one."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, MP)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < M)[None, :]
    s = tl.load(score_ptr + rows[:, None] * M + cols[None, :], mask=mask, other=0.0)
    rank = tl.zeros([BLOCK_R, MP], dtype=tl.int32)
    for k in tl.static_range(M):
        sk = tl.load(score_ptr + rows * M + k, mask=row_ok, other=0.0)
        beats = (sk[:, None] > s) | ((sk[:, None] == s) & (k < cols[None, :]))
        rank += beats.to(tl.int32)
    keep = rank < N
    tl.store(keep_ptr + rows[:, None] * M + cols[None, :], keep.to(tl.int8), mask=mask)


@functools.cache
def _compiled_kernel():
    import triton
    import triton.language

    global tl
    tl = triton.language
    return triton.jit(_nm_keep_kernel)


def _nm_keep_mask_triton(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    kernel = _compiled_kernel()
    if scores.device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(kernel, InterpretedFunction):
            raise RuntimeError(
                "backend='triton' on CPU tensors needs the Triton interpreter, but Triton was "
                "imported without it; set TRITON_INTERPRET=1 before Triton is first imported")
    s = scores.detach().contiguous()
    keep = torch.empty(s.shape, dtype=torch.int8, device=s.device)
    R = s.shape[0]
    if R:
        with device_context(s.device):
            grid = (-(-R // NM_BLOCK_R),)
            kernel[grid](s, keep, R, N=n, M=m, MP=max(2, 1 << (m - 1).bit_length()),
                         BLOCK_R=NM_BLOCK_R)
    return keep.bool()

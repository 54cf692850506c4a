"""Per-output-channel importance scores of many weight tensors at once.

Scoring a whole network the eager way is one or two tiny kernel launches per layer, hundreds in
all, so on a GPU the time goes to launch overhead, not to reading the weights. The Triton path
scores every tensor in one launch (per dtype present): a ragged table of tensor addresses and
shapes, one program per block of rows. The eager per-layer loop is the reference and the CPU
path.

Kinds (row ``i`` = output channel ``i``, i.e. ``w.reshape(n, -1)[i]``):

* ``"l1"``: Σ|w|;  ``"l2"``: ‖w‖₂;  ``"abs"``: |w| of a 1-D param (e.g. BN γ);
* ``"taylor"``: Σ|w·g| with ``g`` the gradient (first-order Taylor).

float16 / bfloat16 inputs are accumulated in float32, float64 in float64; scores are float32.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from accelprune.kernels._common import (
    acc_dtype,
    check_float_tensor,
    common_device,
    device_context,
    rows_dense,
    same_layout,
    select_backend,
    upload_int64,
)

__all__ = ["filter_scores", "filter_scores_ref", "SCORE_KINDS"]

SCORE_KINDS = ("l1", "l2", "abs", "taylor")


# ---------------------------------------------------------------------------------------------
# input checks


def _check_inputs(tensors, kind, grads):
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError("tensors is empty; pass at least one weight tensor")
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {SCORE_KINDS}")
    tensors = [check_float_tensor(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    if kind == "abs":
        for i, t in enumerate(tensors):
            if t.dim() != 1:
                raise ValueError(f"kind='abs' scores 1-D params (e.g. BN weight); tensors[{i}] "
                                 f"has shape {tuple(t.shape)}; use 'l1' or 'l2' for weights")
    if kind == "taylor":
        if grads is None:
            raise ValueError("kind='taylor' needs grads (one gradient per tensor)")
        if isinstance(grads, torch.Tensor) or not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list or tuple of tensors, got {type(grads).__name__}")
        if len(grads) != len(tensors):
            raise ValueError(f"got {len(grads)} grads for {len(tensors)} tensors")
        grads = [check_float_tensor(g, f"grads[{i}]") for i, g in enumerate(grads)]
        for i, (t, g) in enumerate(zip(tensors, grads, strict=True)):
            if g.shape != t.shape:
                raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, but tensors[{i}] has "
                                 f"shape {tuple(t.shape)}")
            if g.dtype != t.dtype:
                raise TypeError(f"grads[{i}] has dtype {g.dtype}, but tensors[{i}] has {t.dtype}")
    elif grads is not None:
        raise ValueError(f"grads are only used by kind='taylor', not kind={kind!r}")
    device = common_device(tensors + (grads or []), "tensors and grads")
    return tensors, grads, device


def _checked_finite(scores: list[torch.Tensor], flat: torch.Tensor) -> list[torch.Tensor]:
    """Raise if any score is NaN/Inf (one reduction and one sync for all tensors).

    A NaN or Inf anywhere in a row (weight or gradient) makes its score NaN or Inf, so checking
    the few scores is as good as checking the whole weights, at a fraction of the cost.
    """
    if not bool(torch.isfinite(flat).all()):
        bad = next(i for i, s in enumerate(scores) if not bool(torch.isfinite(s).all()))
        raise ValueError(f"scores of tensors[{bad}] are not finite: the tensor (or its gradient) "
                         "contains NaN/Inf, or its sum overflows")
    return scores


# ---------------------------------------------------------------------------------------------
# reference: the eager per-layer loop (also the CPU path)


def filter_scores_ref(tensors, *, kind: str = "l1", grads=None) -> list[torch.Tensor]:
    """Eager torch, one layer at a time: the oracle for :func:`filter_scores`.

    ``tensors``: list of tensors, each (n, ...) with n output channels; returns one float32
    tensor of shape (n,) per input tensor, on the inputs' device. Inputs are not modified.
    """
    tensors, grads, _ = _check_inputs(tensors, kind, grads)
    scores = []
    for i, w in enumerate(tensors):
        rows = w.detach().reshape(w.shape[0], -1).to(acc_dtype(w.dtype))
        if kind == "taylor":
            g = grads[i].detach().reshape(w.shape[0], -1).to(rows.dtype)
            score = (rows * g).abs().sum(dim=1)
        elif kind == "l2":
            score = torch.linalg.vector_norm(rows, dim=1)
        else:  # l1; abs is l1 over rows of length 1
            score = rows.abs().sum(dim=1)
        scores.append(score.float())
    return _checked_finite(scores, torch.cat(scores))


# ---------------------------------------------------------------------------------------------
# Triton path


@functools.lru_cache(maxsize=32)
def _row_block_tasks(n_rows: tuple[int, ...], block_r: int) -> np.ndarray:
    """(T, 2) int64 task table: (tensor index, first row) for every block of ``block_r`` rows."""
    counts = [-(-n // block_r) for n in n_rows]
    tensor = np.repeat(np.arange(len(n_rows), dtype=np.int64), counts)
    first_row = np.concatenate([np.arange(c, dtype=np.int64) * block_r for c in counts])
    tasks = np.stack([tensor, first_row], axis=1)
    tasks.setflags(write=False)
    return tasks


def _filter_scores_triton(tensors, grads, kind, device) -> list[torch.Tensor]:
    from accelprune.kernels import _triton_kernels as tk

    tk.check_launchable(device)
    kernel = tk.filter_scores_kernel
    kind_ids = {"l1": tk.KIND_L1, "l2": tk.KIND_L2, "abs": tk.KIND_ABS, "taylor": tk.KIND_TAYLOR}
    kind_id = kind_ids[kind]
    n_rows = [t.shape[0] for t in tensors]
    out = torch.empty(sum(n_rows), dtype=torch.float32, device=device)
    out_offsets = np.cumsum([0, *n_rows[:-1]])

    # The kernel reads rows as dense blocks; a weight and its gradient must share a layout.
    xs, gs = [], []
    for i, t in enumerate(tensors):
        x = rows_dense(t.detach())
        g = x
        if kind == "taylor":
            g = rows_dense(grads[i].detach())
            if not same_layout(x, g):
                x, g = x.contiguous(), g.contiguous()
        xs.append(x)
        gs.append(g)

    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, x in enumerate(xs):
        by_dtype.setdefault(x.dtype, []).append(i)
    with device_context(device):
        for dtype, members in by_dtype.items():
            table = np.array([[xs[i].data_ptr(), gs[i].data_ptr(), n_rows[i],
                               xs[i].numel() // n_rows[i], out_offsets[i]] for i in members],
                             dtype=np.int64)
            tasks = _row_block_tasks(tuple(n_rows[i] for i in members), tk.FS_BLOCK_R)
            packed = upload_int64(np.concatenate([tasks.ravel(), table.ravel()]), device)
            kernel[(len(tasks),)](
                packed[tasks.size:], packed, out, xs[members[0]], gs[members[0]],
                KIND=kind_id, ACC=tk.acc_type(dtype), BLOCK_R=tk.FS_BLOCK_R, BLOCK_F=tk.FS_BLOCK_F,
            )
    return _checked_finite(list(torch.split(out, n_rows)), out)


# ---------------------------------------------------------------------------------------------
# public dispatcher


def filter_scores(tensors, *, kind: str = "l1", grads=None,
                  backend: str = "auto") -> list[torch.Tensor]:
    """One score per output channel for each tensor in ``tensors``.

    Args:
        tensors: list of float tensors of mixed shapes: conv weights (n, c, kh, kw), linear
            weights (n, f), 1-D params such as BN γ (n,). All on one device.
        kind: ``"l1"`` Σ|w|, ``"l2"`` ‖w‖₂, ``"abs"`` |w| (1-D params only), ``"taylor"``
            Σ|w·g| (needs ``grads``).
        grads: for ``"taylor"``, one gradient per tensor, same shapes and dtypes.
        backend: ``"auto"`` (Triton on CUDA tensors, the reference otherwise), ``"triton"``
            (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"reference"`` (the eager loop,
            :func:`filter_scores_ref`).

    Returns:
        list of float32 tensors of shape (n,), one per input, on the inputs' device.

    Raises:
        TypeError / ValueError for bad input (including NaN/Inf scores), RuntimeError when
        ``backend="triton"`` cannot run here.
    """
    tensors, grads, device = _check_inputs(tensors, kind, grads)
    if select_backend(backend, device) == "reference":
        return filter_scores_ref(tensors, kind=kind, grads=grads)
    return _filter_scores_triton(tensors, grads, kind, device)

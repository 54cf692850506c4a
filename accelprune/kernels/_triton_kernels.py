"""The Triton kernels behind :mod:`accelprune.kernels` (this module imports Triton: import lazily).

Both kernels are *ragged*: one launch covers many tensors of different shapes. The launcher
packs, per tensor, its data address and shape into a small int64 table, and the kernel turns an
address back into a typed pointer (``int.to(tl.pointer_type(...))``), so no tensor is copied or
concatenated. All tensors of one launch share one dtype (the pointer type is a compile-time
constant); the launchers issue one launch per dtype present.

Every tensor is seen as ``n`` rows of ``F`` contiguous elements (row = output channel). The
kernels accumulate in ``ACC`` (float32, or float64 for float64 inputs).

The block sizes are starting points chosen for an H100-class GPU and have not been tuned.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# ---------------------------------------------------------------------------------------------
# importance scores

KIND_L1 = 0
KIND_L2 = 1
KIND_ABS = 2
KIND_TAYLOR = 3

# Tables (int64, row-major; the strides 2 and 5 below are their widths):
#   tasks: one row per program: (tensor index, first row)
#   table: one row per tensor: (weight address, grad address, n rows, row length F, offset of
#          its scores in `out`)
FS_BLOCK_R = 16  # rows per program
FS_BLOCK_F = 128  # columns per step of a program's loop over the row


@triton.jit
def filter_scores_kernel(table_ptr, task_ptr, out_ptr, X0, G0, KIND: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Program ``pid`` scores rows ``row0 .. row0 + BLOCK_R`` of tensor ``t`` (task table)."""
    pid = tl.program_id(0)
    t = tl.load(task_ptr + 2 * pid)
    row0 = tl.load(task_ptr + 2 * pid + 1)
    entry = table_ptr + t * 5
    x = tl.load(entry).to(tl.pointer_type(X0.dtype.element_ty))
    g = tl.load(entry + 1).to(tl.pointer_type(G0.dtype.element_ty))
    n_rows = tl.load(entry + 2)
    row_len = tl.load(entry + 3)
    out_offset = tl.load(entry + 4)

    rows = row0 + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    acc = tl.zeros([BLOCK_R, BLOCK_F], dtype=ACC)
    for col0 in range(0, row_len, BLOCK_F):
        cols = col0 + tl.arange(0, BLOCK_F)
        mask = row_ok[:, None] & (cols < row_len)[None, :]
        offsets = rows[:, None] * row_len + cols[None, :]
        w = tl.load(x + offsets, mask=mask, other=0.0).to(ACC)
        if KIND == 3:  # taylor
            grad = tl.load(g + offsets, mask=mask, other=0.0).to(ACC)
            acc += tl.abs(w * grad)
        elif KIND == 1:  # l2
            acc += w * w
        else:  # l1, abs
            acc += tl.abs(w)
    score = tl.sum(acc, axis=1)
    if KIND == 1:
        # IEEE square root (tl.sqrt may be approximate on GPUs), so integer data match exactly
        if ACC == tl.float64:
            score = tl.sqrt(score)
        else:
            score = tl.sqrt_rn(score)
    tl.store(out_ptr + out_offset + rows, score.to(tl.float32), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# C-SGD gradient transform

# Tables (int64, row-major; the strides 5, 6 and 2 below are their widths):
#   params:   one row per param: (weight address, grad address, row length F, η and ε as
#             float64 bit patterns)
#   tasks:    one row per program: (param, first cluster, n clusters, span, first column,
#             largest cluster size)
#   clusters: one row per cluster: (start in members, size)
#   members:  row indices of every param, grouped by cluster
CS_BLOCK = 1024  # lanes per program


@triton.jit
def csgd_kernel(param_ptr, task_ptr, cluster_ptr, member_ptr, W0, ACC: tl.constexpr,
                BLOCK: tl.constexpr):
    """G'_a = mean_H(G − ε·W) + (η + ε)·W_a for every row a of cluster H (in place on G).

    A task covers ``n_clusters`` consecutive clusters of one param and the columns
    ``col0 .. col0 + span``: lane ``l`` works on cluster ``l // span``, column ``l % span``. Long
    rows (F > BLOCK) give one cluster per task and several tasks per cluster; short rows (BN γ,
    F = 1) pack BLOCK // F clusters into one task, so tiny params do not cost a program per row.
    Two passes over the cluster's rows: the first sums G − ε·W, the second writes G' (it reads W
    only; every (row, column) is read and written by exactly one lane of one program).
    """
    pid = tl.program_id(0)
    task = task_ptr + pid * 6
    p = tl.load(task)
    first_cluster = tl.load(task + 1)
    n_clusters = tl.load(task + 2)
    span = tl.load(task + 3)
    col0 = tl.load(task + 4)
    max_size = tl.load(task + 5)

    entry = param_ptr + p * 5
    w = tl.load(entry).to(tl.pointer_type(W0.dtype.element_ty))
    g = tl.load(entry + 1).to(tl.pointer_type(W0.dtype.element_ty))
    row_len = tl.load(entry + 2)
    eta = tl.load(entry + 3).to(tl.float64, bitcast=True).to(ACC)
    eps = tl.load(entry + 4).to(tl.float64, bitcast=True).to(ACC)

    lane = tl.arange(0, BLOCK)
    slot = lane // span
    col = col0 + lane % span
    active = (slot < n_clusters) & (col < row_len)
    cluster = first_cluster + slot
    start = tl.load(cluster_ptr + 2 * cluster, mask=active, other=0)
    size = tl.load(cluster_ptr + 2 * cluster + 1, mask=active, other=1)

    total = tl.zeros([BLOCK], dtype=ACC)
    for j in range(0, max_size):
        member = active & (j < size)
        row = tl.load(member_ptr + start + j, mask=member, other=0)
        offsets = row * row_len + col
        grad = tl.load(g + offsets, mask=member, other=0.0).to(ACC)
        weight = tl.load(w + offsets, mask=member, other=0.0).to(ACC)
        total += grad - eps * weight
    centre = total / size.to(ACC)
    for j in range(0, max_size):
        member = active & (j < size)
        row = tl.load(member_ptr + start + j, mask=member, other=0)
        offsets = row * row_len + col
        weight = tl.load(w + offsets, mask=member, other=0.0).to(ACC)
        new_grad = centre + (eta + eps) * weight
        tl.store(g + offsets, new_grad.to(W0.dtype.element_ty), mask=member)


# ---------------------------------------------------------------------------------------------
# interpreter mode


def interpreted() -> bool:
    """Whether these kernels run in the Triton interpreter (decided when Triton was imported)."""
    return isinstance(filter_scores_kernel, InterpretedFunction)


def check_launchable(device) -> None:
    """Raise a clear error instead of Triton's own when CPU tensors meet compiled kernels.

    Triton decides interpreter or compiler when it is imported: ``triton.jit`` reads
    ``TRITON_INTERPRET`` at decoration time, for these kernels and for Triton's own helpers
    (``tl.zeros``, ...). Setting the variable later, in a process that already imported Triton,
    does not switch modes (and mixing both modes in one process breaks Triton 3.x).
    """
    if device.type == "cpu" and not interpreted():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter, but Triton was imported "
            "without it; set TRITON_INTERPRET=1 in the environment before Triton is first imported "
            "(e.g. when starting the process)"
        )


def acc_type(dtype):
    """The accumulator type for inputs of ``dtype``: float64 stays float64, the rest float32."""
    import torch

    return tl.float64 if dtype == torch.float64 else tl.float32

"""Pieces shared by the kernel modules: backend choice, tensor checks, launch plumbing.

Nothing here imports Triton; the launchers import :mod:`._triton_kernels` only when they run.
"""
from __future__ import annotations

import contextlib
import numbers

import numpy as np
import torch

from accelprune._backend import resolve, triton_interpreted

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def select_backend(backend, device: torch.device) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device``.

    ``backend`` is ``"auto"`` | ``"triton"`` | ``"reference"``, resolved by
    :func:`accelprune._backend.resolve` (which also takes ``"native"`` for the fast path, as
    everywhere in accelprune); anything else raises an error naming the choices.
    ``"auto"`` runs Triton on CUDA tensors only (the interpreter is far too slow to be picked
    implicitly). An explicit ``"triton"`` also runs on CPU tensors under ``TRITON_INTERPRET=1``
    and raises otherwise.
    """
    path = resolve(backend, fast="triton", reference="reference")
    if path == "reference":
        return "reference"
    if device.type == "cuda":
        return "triton"
    if backend == "auto":
        return "reference"
    if triton_interpreted():
        return "triton"
    raise RuntimeError(
        f"backend={backend!r} needs CUDA tensors (these are on {device}), or TRITON_INTERPRET=1 "
        "to run the Triton interpreter on the CPU; use backend='reference' or 'auto' instead"
    )


def common_device(tensors, name: str) -> torch.device:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name} must all be on one device, got {sorted(map(str, devices))}")
    return devices.pop()


def check_float_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (output channels), got a scalar")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate float16/bfloat16 (and float32) in float32, float64 in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when each output channel is one contiguous block of ``numel / n`` elements
    (row-major, or channels_last for conv weights), else a contiguous copy.

    The kernels only need every row to be a dense block with the same inner layout in the
    weight and its gradient; channels_last weights therefore need no copy.
    """
    if t.is_contiguous():
        return t
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride()


def per_param_coefficient(value, name: str, count: int) -> list[float]:
    """A non-negative finite float, or a sequence of ``count`` of them, as a list."""
    values = [value] * count if isinstance(value, numbers.Number) else value
    try:
        if isinstance(values, (str, bytes)):
            raise TypeError
        values = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a number or a sequence of numbers, got "
                        f"{type(value).__name__}") from None
    if len(values) != count:
        raise ValueError(f"{name} must be one number or {count} (one per param), got {len(values)}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}[{i}] must be a real number, got {type(v).__name__}")
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{name}[{i}] must be finite and >= 0, got {v}")
        out.append(float(v))
    return out


def device_context(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def upload_int64(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host int64 table as a tensor on ``device``, without blocking the host.

    A copy from pageable memory would synchronise with the GPU; staging through pinned memory
    from PyTorch's caching host allocator (which keeps the block until the copy is done) lets
    the launch that follows be queued while earlier GPU work still runs.
    """
    table = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    if device.type == "cpu":
        return table
    return table.pin_memory().to(device, non_blocking=True)

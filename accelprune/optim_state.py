"""Carry optimizer state (momentum, Adam moments, ...) through structural pruning.

Pruning replaces a layer's parameters by smaller ones, so an optimizer built before an event
points at tensors the model no longer uses, and its state would be lost. Torch-Pruning copies a
parameter's ``.grad`` along with the kept slices when it rebuilds the parameter; we use exactly
that to learn, for every element of every new parameter, which element of the old one it came
from: before the surgery each ``.grad`` is replaced by a *probe* holding each element's own flat
index, and afterwards the new ``.grad`` says where every kept element came from. No knowledge of
layer types, pruning dimensions or index mappings (flatten, concat) is needed here.

The probe stores the index in the bits of the float (int32 for float32 parameters, int64 for
float64), offset into the normal range so that it is an ordinary finite number: copies keep bits
exactly, while float arithmetic would round indices above 2**24. Real gradients are put back
(sliced the same way) afterwards.

Usage::

    with track_parameters(model) as tracker:
        ...  # any surgery that goes through Torch-Pruning's pruning functions
    optimizer = tracker.remap(optimizer)
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

__all__ = ["ParameterChange", "ParameterTracker", "track_parameters", "remap_optimizer"]

# Bits of 1.0: probe values are 1.0, the next float up, ... (normal, finite, exactly copied).
_PROBE = {
    torch.float32: (torch.int32, 0x3F800000, 0x7F800000 - 0x3F800000),
    torch.float64: (torch.int64, 0x3FF0000000000000, 0x7FF0000000000000 - 0x3FF0000000000000),
}


@dataclass
class ParameterChange:
    """One parameter replaced by surgery: ``new`` holds ``old.reshape(-1)[source]``.

    source: int64 tensor shaped like ``new`` (flat indices into ``old``), or None when the
    mapping could not be recovered (then the state of that parameter is dropped).
    """

    name: str
    old: torch.nn.Parameter
    new: torch.nn.Parameter
    source: torch.Tensor | None

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """Slice a tensor shaped like ``old`` (a state buffer or gradient) the way ``new`` was."""
        return tensor.reshape(-1)[self.source.to(tensor.device)].reshape(self.new.shape).clone()


def _probe(param: torch.Tensor) -> torch.Tensor | None:
    """A tensor like ``param`` whose element i holds i in its bits; None for unsupported dtypes."""
    if param.dtype not in _PROBE:
        return None
    int_dtype, offset, capacity = _PROBE[param.dtype]
    if param.numel() > capacity:
        return None
    index = torch.arange(offset, offset + param.numel(), dtype=int_dtype, device=param.device)
    return index.view(param.dtype).reshape(param.shape)


def _read_probe(grad: torch.Tensor | None, old_numel: int) -> torch.Tensor | None:
    if grad is None or grad.dtype not in _PROBE:
        return None
    int_dtype, offset, _ = _PROBE[grad.dtype]
    source = grad.detach().view(int_dtype).to(torch.int64) - offset
    if source.numel() and (source.min() < 0 or source.max() >= old_numel):
        return None  # not our probe (e.g. the surgery recomputed the gradient)
    return source


class ParameterTracker:
    """Records which parameters a surgery replaces, and where their elements came from."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._before = dict(model.named_parameters())
        self._grads = {name: p.grad for name, p in self._before.items()}
        self.changes: list[ParameterChange] = []

    def _install(self) -> None:
        for p in self._before.values():
            p.grad = _probe(p.detach())

    def _restore(self) -> None:
        """Give the old parameters their real gradients back (surgery failed or was undone)."""
        for name, p in self._before.items():
            p.grad = self._grads[name]

    def _collect(self) -> None:
        unmapped = []
        for name, new in self.model.named_parameters():
            old = self._before.get(name)
            if old is None or new is old:
                continue
            change = ParameterChange(name, old, new, _read_probe(new.grad, old.numel()))
            grad = self._grads[name]
            new.grad = None if grad is None or change.source is None else change.take(grad)
            if change.source is None:
                unmapped.append(name)
            self.changes.append(change)
        self._restore()  # the old objects (kept or replaced) get their real gradients back
        if unmapped:
            dtypes = sorted({str(self._before[n].dtype) for n in unmapped})
            warnings.warn(f"could not trace how {unmapped} were pruned (dtype {dtypes}, or a "
                          "surgery that drops gradients); their optimizer state is reset",
                          RuntimeWarning, stacklevel=3)

    def remap(self, optimizer: torch.optim.Optimizer | None):
        """Point ``optimizer`` at the new parameters, with their state sliced; in place.

        The same optimizer object is returned, so learning-rate schedulers that hold it keep
        working. State tensors shaped like the parameter (momentum, exp_avg, ...) are sliced;
        others (step counters) are kept as they are; anything shaped otherwise is dropped.
        """
        return remap_optimizer(optimizer, self.changes)


def remap_optimizer(optimizer: torch.optim.Optimizer | None, changes: list[ParameterChange]):
    """Replace old by new parameters in ``optimizer`` (in place) and slice their state."""
    if optimizer is None or not changes:
        return optimizer
    by_old = {id(c.old): c for c in changes}
    for group in optimizer.param_groups:
        group["params"] = [by_old[id(p)].new if id(p) in by_old else p for p in group["params"]]
    for change in changes:
        state = optimizer.state.pop(change.old, None)
        if not state or change.source is None:
            continue
        optimizer.state[change.new] = {key: _slice_state(value, change)
                                       for key, value in state.items()
                                       if not _is_foreign(value, change)}
    return optimizer


def _is_foreign(value, change: ParameterChange) -> bool:
    """A tensor state entry that is neither a scalar nor shaped like the parameter."""
    return torch.is_tensor(value) and value.dim() > 0 and value.shape != change.old.shape


def _slice_state(value, change: ParameterChange):
    if torch.is_tensor(value) and value.dim() > 0:
        return change.take(value)
    return value


@contextlib.contextmanager
def track_parameters(model: torch.nn.Module):
    """Context manager: trace the parameters replaced by the surgery inside the block.

    On an exception the real gradients are restored and the exception propagates.
    """
    tracker = ParameterTracker(model)
    tracker._install()
    try:
        yield tracker
    except BaseException:
        tracker._restore()
        raise
    tracker._collect()

"""Shared check that a failing call left a model exactly as it was.

::

    with leaves_unchanged(model, x, match="would break the model"):
        accelprune.prune(model, x, 0.5)

records, before the call, everything a failed call could leave behind and compares it after
the call raised:

* the state_dict: same keys, the very same tensor objects, equal values (bit for bit);
* the module tree (names and types) and every module's integer attributes (widths);
* every module's forward / forward-pre / backward / backward-pre hooks (same dicts' contents),
  and torch's global module hooks;
* every module's train/eval flag and every parameter's ``requires_grad`` and ``.grad``;
* the forward output on the example inputs (eval mode, no grad): identical;
* a forward with autograd and a backward still run (nothing left that breaks them; the
  gradients are put back afterwards), and ``copy.deepcopy(model)`` works and computes the same.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.nn.modules import module as torch_module

from accelprune.serialization import _module_records
from accelprune.tracing import call_model, eval_mode, output_tensors

__all__ = ["ModelState", "leaves_unchanged"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_load_state_dict_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _outputs(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad(), eval_mode(model):
        return [t.detach().clone() for t in output_tensors(call_model(model, inputs))]


class ModelState:
    """A record of ``model`` to compare against after a failed call."""

    def __init__(self, model: torch.nn.Module, example_inputs=None, *, backward: bool = True):
        self.model, self.inputs, self.backward = model, example_inputs, backward
        self.modules = [(n, type(m)) for n, m in model.named_modules()]
        self.records = _module_records(model)
        live = model.state_dict(keep_vars=True)
        self.tensor_ids = {k: id(v) for k, v in live.items()}
        self.state = {k: v.detach().clone() for k, v in live.items()}
        self.hooks = self._hooks(model)
        self.global_hooks = {g: dict(getattr(torch_module, g)) for g in _GLOBAL_HOOKS}
        self.training = [m.training for m in model.modules()]
        self.requires_grad = [(n, p.requires_grad) for n, p in model.named_parameters()]
        self.grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        self.output = None if example_inputs is None else _outputs(model, example_inputs)

    @staticmethod
    def _hooks(model) -> dict:
        return {(n, d): list(getattr(m, d).items()) for n, m in model.named_modules()
                for d in _HOOK_DICTS if isinstance(getattr(m, d, None), dict)}

    def assert_unchanged(self) -> None:
        model = self.model
        assert [(n, type(m)) for n, m in model.named_modules()] == self.modules, "module tree"
        assert _module_records(model) == self.records, "module attributes (widths) changed"
        live = model.state_dict(keep_vars=True)
        assert live.keys() == self.state.keys(), "state_dict keys changed"
        for k, v in live.items():
            assert id(v) == self.tensor_ids[k], f"{k} is a different tensor object"
            assert v.shape == self.state[k].shape, f"{k} changed shape"
            assert torch.equal(v.detach(), self.state[k]), f"{k} changed value"
        hooks = self._hooks(model)
        for key, before in self.hooks.items():
            assert hooks[key] == before, f"hooks left on {key[0] or 'the model'!r}: {key[1]}"
        for g, before in self.global_hooks.items():
            assert dict(getattr(torch_module, g)) == before, f"global hooks left: {g}"
        assert [m.training for m in model.modules()] == self.training, "train/eval flags changed"
        assert [(n, p.requires_grad) for n, p in model.named_parameters()] == self.requires_grad
        for p, g in zip(model.parameters(), self.grads, strict=True):
            assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g)), \
                "gradients changed"
        if self.inputs is None:
            return
        for got, want in zip(_outputs(model, self.inputs), self.output, strict=True):
            assert torch.equal(got, want), "the forward output changed"
        # deepcopy before the autograd forward: torch cannot deepcopy a masked model
        # (torch.nn.utils.prune) whose computed weight has a grad_fn, failed call or not
        clone = copy.deepcopy(model)
        for got, want in zip(_outputs(clone, self.inputs), self.output, strict=True):
            assert torch.equal(got, want), "a deepcopy computes something else"
        if self.backward:
            self._backward_still_runs()

    def _backward_still_runs(self) -> None:
        model = self.model
        grads = [p.grad for p in model.parameters()]
        try:
            with eval_mode(model):
                out = output_tensors(call_model(model, self.inputs))
            floats = [t for t in out if t.is_floating_point() and t.requires_grad]
            if floats:
                sum(t.sum() for t in floats).backward()
        finally:
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g


@contextlib.contextmanager
def leaves_unchanged(model, example_inputs=None, *, raises=(ValueError, TypeError, RuntimeError),
                     match: str | None = None, backward: bool = True):
    """Expect the block to raise (``raises``, message matching ``match``) and leave ``model``
    exactly as it was (see the module docstring). Yields pytest's ExceptionInfo.
    ``backward=False`` skips the check that a forward with autograd and a backward still run
    (for models that cannot run one)."""
    state = ModelState(model, example_inputs, backward=backward)
    with pytest.raises(raises, match=match) as info:
        yield info
    state.assert_unchanged()


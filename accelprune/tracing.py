"""Running a model: its inputs in any form, its outputs as tensors, modes put back afterwards.

Every pipeline runs the model on ``example_inputs`` (to trace it, to check a surgery, to count
MACs). This module is the one place that knows how:

* ``example_inputs``: a tensor (``model(x)``), a tuple or list (``model(*inputs)``) or a dict
  (``model(**inputs)``, e.g. ``{"input_ids": ids, "attention_mask": mask}``);
* outputs: tensors nested in tuples, lists, dicts and dataclass-like containers (Hugging Face
  ``ModelOutput``\\ s are dicts). Members that are not tensors (a ``DynamicCache``, ``None``, an
  int) are ignored; ``output_transform(output) -> tensor(s)`` picks what matters when the
  default does not;
* :func:`eval_mode`: every module's train/eval flag saved and restored exactly;
* :class:`ForwardDiagnosis`: a traced forward that names the module where things go wrong
  (a forward error, a module that ran without autograd, an output cut from the graph), with
  its hooks removed whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "TraceError",
    "ForwardDiagnosis",
    "call_model",
    "check_example_inputs",
    "eval_mode",
    "no_kv_cache",
    "first_sample",
    "output_shapes",
    "output_tensors",
    "refuse_meta_tensors",
]


class TraceError(ValueError):
    """The model cannot be traced on its example inputs; the message names where and why."""


def check_example_inputs(example_inputs):
    """``example_inputs`` checked for form: a tensor, a non-empty tuple/list or dict."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    if isinstance(example_inputs, dict) and example_inputs:
        return example_inputs
    raise TypeError("example_inputs must be a tensor, a non-empty tuple/list of positional inputs "
                    f"or a non-empty dict of keyword inputs, got {type(example_inputs).__name__}")


def call_model(model: nn.Module, example_inputs):
    """Run ``model`` on ``example_inputs`` (tensor → ``model(x)``, tuple/list → ``model(*x)``,
    dict → ``model(**x)``)."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def output_tensors(output, output_transform: Callable | None = None) -> list[torch.Tensor]:
    """The tensors of a model's output, in order; non-tensor members are skipped.

    ``output_transform`` is applied first (to pick e.g. ``out.logits`` from an unusual output).
    """
    if output_transform is not None:
        output = output_transform(output)
    found: list[torch.Tensor] = []
    _collect(output, found, depth=0)
    return found


def _collect(obj, found: list, depth: int) -> None:
    if depth > 32:  # a self-referencing container: stop, it is not model output
        return
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _collect(o, found, depth + 1)
    elif isinstance(obj, dict):  # includes Hugging Face ModelOutput
        for o in obj.values():
            _collect(o, found, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _collect(getattr(obj, f.name), found, depth + 1)


def output_shapes(output, output_transform: Callable | None = None) -> list[tuple]:
    return [tuple(t.shape) for t in output_tensors(output, output_transform)]


def first_sample(example_inputs):
    """The inputs cut to one sample (dim 0 of every tensor), e.g. for per-sample MACs."""
    def cut(t):
        return t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t

    if isinstance(example_inputs, torch.Tensor):
        return cut(example_inputs)
    if isinstance(example_inputs, dict):
        return {k: cut(v) for k, v in example_inputs.items()}
    return tuple(cut(t) for t in example_inputs)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode (no BN statistics updates, no dropout) and restore every
    module's own train/eval flag afterwards, whatever happens inside."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def no_kv_cache(model: nn.Module):
    """Hugging Face models with ``config.use_cache`` off for the block (restored afterwards,
    whatever happens): a traced forward must not build a KV cache, whose ``torch.cat`` onto the
    empty cache of the first step Torch-Pruning cannot map (GPT-2 failed to trace with it)."""
    configs = {id(c): c for m in model.modules()
               if getattr(c := getattr(m, "config", None), "use_cache", False) is True}
    try:
        for c in configs.values():
            c.use_cache = False
        yield model
    finally:
        for c in configs.values():
            c.use_cache = True


class ForwardDiagnosis:
    """A forward pass that says where tracing goes wrong.

    Used as Torch-Pruning's ``forward_fn``: hooks on every module record the module running when
    the forward fails, modules that ran without autograd and the last module whose output had a
    ``grad_fn``. The hooks live only during the call (removed in ``finally``). Afterwards
    ``executed`` lists the modules that ran and ``reference_shapes`` the output tensors' shapes.
    Raises :class:`TraceError`.
    """

    def __init__(self, names: dict[nn.Module, str], output_transform: Callable | None = None):
        self.names = names
        self.output_transform = output_transform
        self.executed: list[nn.Module] = []
        self.reference_shapes: list[tuple] | None = None
        self.output_grad_fns: set = set()  # autograd nodes that made the output tensors

    def __call__(self, model: nn.Module, example_inputs):
        stack, last_with_grad = [], []

        def pre(module, args):
            stack.append(module)

        def post(module, args, out):
            stack.pop()
            self.executed.append(module)
            tensors = output_tensors(out)
            if (tensors and all(t.grad_fn is None for t in tensors)
                    and any(p.requires_grad for p in module.parameters(False))):
                raise TraceError(
                    f"cannot trace the model: module {self.names.get(module, '?')!r} "
                    f"({type(module).__name__}) ran without autograd (torch.no_grad()?)")
            if any(t.grad_fn is not None for t in tensors):
                last_with_grad[:] = [module]

        hooks = []
        try:
            try:
                for m in model.modules():
                    hooks.append(m.register_forward_pre_hook(pre))
                    hooks.append(m.register_forward_hook(post))
            except Exception as e:
                raise TraceError(f"cannot trace the model: registering forward hooks failed "
                                 f"({type(e).__name__}: {e}); scripted (torch.jit) submodules "
                                 "cannot be traced") from e
            try:
                out = call_model(model, example_inputs)
            except TraceError:
                raise
            except Exception as e:
                where = (f"module {self.names.get(stack[-1], '?')!r} ({type(stack[-1]).__name__})"
                         if stack else "the model's forward")
                raise TraceError(f"forward on example_inputs failed in {where}: "
                                 f"{type(e).__name__}: {e}") from e
        finally:
            for h in hooks:
                h.remove()
        try:
            tensors = output_tensors(out, self.output_transform)
        except Exception as e:
            raise TraceError(f"output_transform failed: {type(e).__name__}: {e}") from e
        if not tensors:
            raise TraceError(f"cannot trace the model: its output ({type(out).__name__}) holds no "
                             "tensors; pass output_transform to pick them")
        floats = [t for t in tensors if t.is_floating_point()]
        if not floats or any(t.grad_fn is None for t in floats):
            after = (f" after module {self.names.get(last_with_grad[0], '?')!r}"
                     if last_with_grad else "")
            raise TraceError(f"cannot trace the model: its output is cut from the autograd "
                             f"graph{after} (.detach(), .data, .numpy(), .item(), "
                             "torch.no_grad(), integer ops)")
        self.reference_shapes = [tuple(t.shape) for t in tensors]
        self.output_grad_fns = {t.grad_fn for t in floats}
        # Torch-Pruning walks back from what the forward returns: give it only float tensors
        return floats[0] if len(floats) == 1 else floats


def refuse_meta_tensors(model: nn.Module, example_inputs=None) -> None:
    """Meta tensors have shapes but no values: nothing can be traced, scored or checked."""
    inputs = ([] if example_inputs is None else [example_inputs]
              if isinstance(example_inputs, torch.Tensor) else
              list(example_inputs.values() if isinstance(example_inputs, dict) else example_inputs))
    for what, tensors in (("the model", [*model.parameters(), *model.buffers()]),
                          ("example_inputs", inputs)):
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
            raise ValueError(f"{what} holds meta tensors (shapes without data, e.g. built under "
                             "torch.device('meta')); materialise it first (model.to_empty("
                             "device='cpu') and load weights, or accelprune.load(path, model))")

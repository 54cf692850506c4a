"""Depth pruning: remove whole blocks (seed 002, section 3.3, "layer pruning").

A block can go when its input and output have the same shape: a residual block (the skip path
carries the signal on without it), a transformer encoder / decoder layer. :func:`find_blocks`
lists them by running the model once; :func:`prune_layers` scores them on one or more batches
and replaces the ``n`` least important with :class:`SkippedBlock`, an identity that accepts
whatever the block accepted and returns its input in the form the block returned (a tensor, or
a tuple with the hidden states first, as Hugging Face decoder layers of older versions do).

The model keeps its class and its module names (the container keeps its length, so layer
indices, e.g. a Hugging Face attention's ``layer_idx``, still match); only the removed blocks'
parameters are gone. What is removed is returned (names, scores and the modules themselves, so
``model.set_submodule(name, result.modules[name])`` puts one back).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from accelprune._validation import check_int
from accelprune.tracing import (
    call_model,
    check_example_inputs,
    eval_mode,
    output_shapes,
    output_tensors,
)

__all__ = ["DEPTH_IMPORTANCES", "LayerPruneResult", "SkippedBlock", "find_blocks",
           "prune_layers"]

# How a block's importance is measured (see prune_layers).
DEPTH_IMPORTANCES = ("taylor", "output", "cosine")

_CONTAINERS = (nn.Sequential, nn.ModuleList)


class SkippedBlock(nn.Module):
    """The identity that replaces a removed block.

    It takes any arguments (a Hugging Face decoder layer is called with attention masks, position
    embeddings, a cache...) and returns the block's main input: positional argument 0, or the
    keyword ``input_name`` when the block was called with it by keyword. ``output_length`` is
    None when the block returned a tensor; otherwise the block returned a tuple of that length
    with the hidden states first, and the identity returns ``(hidden, None, ...)``.
    """

    def __init__(self, replaced: str, input_name: str | None = None,
                 output_length: int | None = None):
        super().__init__()
        self.replaced = replaced
        self.input_name = input_name
        self.output_length = output_length

    def forward(self, *args, **kwargs):
        if args:
            hidden = args[0]
        elif self.input_name is not None and self.input_name in kwargs:
            hidden = kwargs[self.input_name]
        else:
            raise TypeError(f"SkippedBlock (was {self.replaced}) got no input to pass on")
        if self.output_length is None:
            return hidden
        return (hidden,) + (None,) * (self.output_length - 1)

    def extra_repr(self) -> str:
        return f"was={self.replaced}"


@dataclasses.dataclass
class LayerPruneResult:
    """What :func:`prune_layers` removed.

    removed: names of the removed blocks, least important first.
    scores: every candidate block's score (higher = more important), in model order.
    importance: the measure used.
    modules: the removed blocks themselves, by name (to put one back:
        ``model.set_submodule(name, result.modules[name])``).
    """

    removed: list[str]
    scores: dict[str, float]
    importance: str
    modules: dict[str, nn.Module] = dataclasses.field(repr=False, default_factory=dict)


# -- finding blocks ------------------------------------------------------------------------------

@dataclasses.dataclass
class _Call:
    """One recorded call of a candidate block."""
    calls: int = 0
    input_name: str | None = None   # None: positional argument 0
    in_shape: tuple | None = None
    out_shape: tuple | None = None
    out_dtype: torch.dtype | None = None
    in_dtype: torch.dtype | None = None
    output_length: int | None = None  # None: returned a tensor


def _primary_input(args, kwargs):
    """(name or None, tensor) of a block's main input: positional 0, else ``hidden_states`` /
    the first tensor keyword."""
    if args:
        return None, args[0] if isinstance(args[0], torch.Tensor) else None
    for key in ("hidden_states", "x", "input"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return key, kwargs[key]
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key, value
    return None, None


def _primary_output(out):
    """(output length or None, main tensor) of a block's output: a tensor, or the first member
    of a tuple/list."""
    if isinstance(out, torch.Tensor):
        return None, out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return len(out), out[0]
    return None, None


def _container_children(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every non-leaf member of an ``nn.Sequential`` / ``nn.ModuleList``
    (a stack of layers), each module once."""
    found, seen = {}, {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, _CONTAINERS):
            continue
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            seen[id(child)] = seen.get(id(child), 0) + 1
            if any(True for _ in child.children()):
                found[name] = child
    return {n: m for n, m in found.items() if seen[id(m)] == 1}  # shared modules: not removable


def _record_calls(model: nn.Module, candidates: dict[str, nn.Module], example_inputs):
    """Run the model once, recording each candidate's calls; returns (calls, output)."""
    calls = {name: _Call() for name in candidates}

    def hook_for(name):
        def hook(module, args, kwargs, out):
            rec = calls[name]
            rec.calls += 1
            rec.input_name, x = _primary_input(args, kwargs)
            rec.output_length, y = _primary_output(out)
            if x is not None and y is not None:
                rec.in_shape, rec.in_dtype = tuple(x.shape), x.dtype
                rec.out_shape, rec.out_dtype = tuple(y.shape), y.dtype
        return hook

    handles = []
    try:
        for name, m in candidates.items():
            handles.append(m.register_forward_hook(hook_for(name), with_kwargs=True))
        with torch.no_grad(), eval_mode(model):
            try:
                out = call_model(model, example_inputs)
            except Exception as e:
                raise ValueError(f"forward on example_inputs failed: {type(e).__name__}: {e}") \
                    from e
    finally:
        for h in handles:
            h.remove()
    return calls, out


def _removable(calls: dict[str, _Call]) -> list[str]:
    ok = [n for n, c in calls.items()
          if c.calls == 1 and c.in_shape is not None and c.in_shape == c.out_shape
          and c.in_dtype == c.out_dtype]
    # keep the outermost: a residual block may hold shape-preserving sub-layers that are not
    # residual themselves, and removing those is not what depth pruning means
    return [n for n in ok if not any(n.startswith(o + ".") for o in ok)]


def find_blocks(model: nn.Module, example_inputs) -> list[str]:
    """Names of the blocks :func:`prune_layers` may remove, in model order.

    A block is a non-leaf member of an ``nn.Sequential`` or ``nn.ModuleList`` (a stack of
    layers: ``layer1.0`` of a torchvision ResNet, ``encoder.layers.encoder_layer_3`` of a
    torchvision ViT, ``blocks.3`` of a timm ViT, ``model.layers.3`` of a Hugging Face LLaMA)
    that runs exactly once on ``example_inputs`` and returns a tensor (or a tuple led by one) of
    the shape and dtype of its main input. Blocks inside another such block are not listed.
    The model is run once in eval mode, without gradients; it is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = check_example_inputs(example_inputs)
    candidates = _container_children(model)
    calls, _ = _record_calls(model, candidates, inputs)
    return _removable(calls)


# -- scoring -------------------------------------------------------------------------------------

def _check_batches(data, example_inputs, loss_fn) -> list:
    if data is None:
        if loss_fn is not None:
            raise ValueError("loss_fn needs labelled data: pass data=[(inputs, target), ...]")
        return [example_inputs]
    if isinstance(data, (torch.Tensor, dict, str)) or not isinstance(data, Iterable):
        raise TypeError("data must be an iterable of batches (e.g. a list or a DataLoader), got "
                        f"{type(data).__name__}; wrap a single batch in a list")
    batches = list(data)
    if not batches:
        raise ValueError("data is empty")
    if loss_fn is not None:
        for i, b in enumerate(batches):
            if not (isinstance(b, (tuple, list)) and len(b) == 2):
                raise ValueError(f"with loss_fn, every batch must be an (inputs, target) pair; "
                                 f"batch {i} is a {type(b).__name__}")
        return [(check_example_inputs(x), t) for x, t in batches]
    return [check_example_inputs(b) for b in batches]


def _default_loss(out) -> torch.Tensor:
    """A label-free loss: the model's own loss when it computed one (a Hugging Face model given
    ``labels``), else cross-entropy against its own predictions (argmax over the last dim) for
    outputs with classes on the last dim, else half the squared norm of the output."""
    if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    floats = [t for t in output_tensors(out) if t.is_floating_point()]
    if not floats:
        raise ValueError("the model's output holds no float tensor to take a loss of; "
                         "pass loss_fn and labelled data")
    logits = floats[0]
    if logits.dim() >= 2 and logits.shape[-1] > 1:
        flat = logits.reshape(-1, logits.shape[-1]).float()
        return F.cross_entropy(flat, flat.argmax(1).detach())
    return 0.5 * logits.float().pow(2).sum()


class _Capture:
    """Forward hooks on the candidate blocks keeping each one's input and output."""

    def __init__(self, blocks: dict[str, nn.Module], keep_graph: bool):
        self.blocks = blocks
        self.keep_graph = keep_graph
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self):
        for name, m in self.blocks.items():
            self.handles.append(m.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def _hook(self, name):
        def hook(module, args, kwargs, out):
            _, x = _primary_input(args, kwargs)
            _, y = _primary_output(out)
            # clones: a later in-place op (ReLU(inplace=True)) must not change what was seen
            self.inputs[name] = x.detach().clone()
            self.outputs[name] = y if self.keep_graph else y.detach().clone()
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def _run_batch(model, inputs, index: int):
    """The model's output on one scoring batch; a failure names the batch."""
    try:
        return call_model(model, inputs)
    except Exception as e:
        hint = (" (a batch of (inputs, target) pairs needs loss_fn)"
                if isinstance(inputs, tuple) and len(inputs) == 2 else "")
        raise ValueError(f"forward on data batch {index} failed{hint}: "
                         f"{type(e).__name__}: {e}") from e


def _per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1) if t.dim() > 0 else t.reshape(1)


def _taylor_scores(model, blocks, batches, loss_fn) -> dict[str, float]:
    """Mean over samples of |<∂L/∂y, x − y>|: the first-order change of the loss when block
    output y is replaced by its input x."""
    totals = dict.fromkeys(blocks, 0.0)
    samples = 0
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:  # frozen models still need a graph from the blocks to the loss
            p.requires_grad_(True)
        for index, batch in enumerate(batches):
            inputs, target = batch if loss_fn is not None else (batch, None)
            with torch.enable_grad(), _Capture(blocks, keep_graph=True) as cap:
                out = _run_batch(model, inputs, index)
                loss = _default_loss(out) if loss_fn is None else loss_fn(out, target)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("the loss must be a scalar tensor")
            names = [n for n in blocks if cap.outputs[n].requires_grad]
            missing = [n for n in blocks if n not in names]
            if missing:
                raise ValueError(f"block {missing[0]!r} is cut from the autograd graph; "
                                 "use importance='output' or 'cosine'")
            # autograd.grad, not backward(): no parameter's .grad is touched
            grads = torch.autograd.grad(loss, [cap.outputs[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                y = cap.outputs[n].detach()
                if g is None:
                    continue  # the loss does not depend on this block
                change = _per_sample_sum(g.double() * (cap.inputs[n].double() - y.double()))
                totals[n] += float(change.abs().sum())
            samples += _batch_size(cap.inputs[names[0]]) if names else 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {n: v / max(samples, 1) for n, v in totals.items()}


def _batch_size(t: torch.Tensor) -> int:
    return int(t.shape[0]) if t.dim() > 0 else 1


def _output_scores(model, blocks, batches, skipped) -> dict[str, float]:
    """‖f(x) − f₋ᵦ(x)‖ / ‖f(x)‖ over the model's float outputs: how much removing block b alone
    changes what the model returns, measured exactly (one forward per block and batch)."""
    totals = dict.fromkeys(blocks, 0.0)
    with torch.no_grad():
        for index, inputs in enumerate(batches):
            ref = _float_outputs(_run_batch(model, inputs, index))
            norm = math.sqrt(sum(float(r.double().pow(2).sum()) for r in ref)) or 1.0
            for name, block in blocks.items():
                model.set_submodule(name, skipped[name])
                try:
                    new = _float_outputs(call_model(model, inputs))
                except Exception as e:
                    raise ValueError(f"removing block {name!r} breaks the model "
                                     f"({type(e).__name__}: {e}); the model is unchanged") from e
                finally:
                    model.set_submodule(name, block)
                diff = math.sqrt(sum(float((a.double() - b.double()).pow(2).sum())
                                     for a, b in zip(new, ref, strict=True)))
                totals[name] += diff / norm
    return {n: v / len(batches) for n, v in totals.items()}


def _float_outputs(out) -> list[torch.Tensor]:
    return [t for t in output_tensors(out) if t.is_floating_point()]


def _cosine_scores(model, blocks, batches) -> dict[str, float]:
    """Mean over samples of 1 − cos(x, y) between each block's input and output, each sample
    flattened (ShortGPT's block influence): one forward per batch."""
    totals = dict.fromkeys(blocks, 0.0)
    samples = 0
    with torch.no_grad():
        for index, inputs in enumerate(batches):
            with _Capture(blocks, keep_graph=False) as cap:
                _run_batch(model, inputs, index)
            for n in blocks:
                x, y = cap.inputs[n].double(), cap.outputs[n].double()
                x, y = x.reshape(_batch_size(x), -1), y.reshape(_batch_size(y), -1)
                totals[n] += float((1 - F.cosine_similarity(x, y, dim=1, eps=1e-12)).sum())
            samples += _batch_size(cap.inputs[next(iter(blocks))])
    return {n: v / max(samples, 1) for n, v in totals.items()}


# -- the public function -------------------------------------------------------------------------

def prune_layers(model: nn.Module, example_inputs, n: int, *, importance: str = "taylor",
                 data=None, loss_fn: Callable | None = None,
                 blocks: Iterable[str] | None = None) -> LayerPruneResult:
    """Replace the ``n`` least important blocks of ``model`` with identities, in place.

    Args:
        model: the network; modified in place, keeping its class. All or nothing: on any error
            it is left exactly as it was.
        example_inputs: a tensor, tuple/list of positional inputs or dict of keyword inputs
            (e.g. ``{"input_ids": ids}``); used to find the blocks and to check the result.
        n: how many blocks to remove, at most the number of candidates (:func:`find_blocks`).
        importance: how a block is scored, on every batch of ``data`` (the model in eval mode):

            * ``"taylor"`` (default; the seed's gradient-based measure, made to measure
              removal): |⟨∂L/∂y, x − y⟩| per sample, the first-order change of the loss when the
              block's output y is replaced by its input x; one forward and backward per batch,
              gradients taken with ``torch.autograd.grad`` (no parameter's ``.grad`` changes).
              Cheap, but a first-order estimate: a block whose removal is a large step is
              ranked by the local slope.
            * ``"output"``: ‖f(x) − f₋ᵦ(x)‖ / ‖f(x)‖, how much the model's float outputs change
              when that block alone is removed. Exact and label-free, at one forward per block
              and batch: the measure to trust when the forward is affordable.
            * ``"cosine"``: 1 − cos(x, y) between the block's input and output, per flattened
              sample (ShortGPT's block influence); one forward per batch, no labels, but it sees
              only the block, not what follows it.
        data: batches to score on (a list or a DataLoader); default ``[example_inputs]``. Each
            batch is model inputs in a form ``example_inputs`` accepts, or an ``(inputs,
            target)`` pair when ``loss_fn`` is given.
        loss_fn: ``loss_fn(output, target) -> scalar`` for ``"taylor"`` on labelled data. By
            default the loss is label-free: the model's own ``output.loss`` when it returns one
            (a Hugging Face model given ``labels``), else cross-entropy against its own argmax
            predictions over the last dim.
        blocks: restrict the candidates to these names: ones :func:`find_blocks` lists, or
            any other non-leaf module that runs once and keeps its input's shape (blocks kept
            as plain attributes, such as timm RegNet's ``s3.b2``, which find_blocks does not
            look for).

    Returns:
        :class:`LayerPruneResult`: the removed names (least important first), every candidate's
        score and the removed modules. Ties go to the earlier block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = check_example_inputs(example_inputs)
    n = check_int(n, "n", low=0)
    if not isinstance(importance, str):
        raise TypeError(f"importance must be a string, got {type(importance).__name__}")
    if importance not in DEPTH_IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; expected one of "
                         f"{list(DEPTH_IMPORTANCES)}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if loss_fn is not None and importance != "taylor":
        raise ValueError(f"loss_fn is only used by importance='taylor', not {importance!r}")
    batches = _check_batches(data, inputs, loss_fn)

    candidates = _container_children(model)
    if blocks is not None:
        candidates.update(_named_blocks(model, blocks, candidates))
    calls, out = _record_calls(model, candidates, inputs)
    names = _removable(calls)
    if blocks is not None:
        names = _restrict(names, blocks, candidates, calls)
    if n > len(names):
        hint = ("" if blocks is not None else "; blocks kept as plain attributes rather than in "
                "an nn.Sequential / nn.ModuleList (timm's RegNet stages, for one) are found "
                "only when named in blocks=[...]")
        raise ValueError(f"cannot remove {n} blocks: the model has {len(names)} removable "
                         f"blocks (same input and output shape): {names}{hint}")
    reference_shapes = output_shapes(out)
    chosen = {name: candidates[name] for name in names}
    skipped = {name: SkippedBlock(type(m).__name__, calls[name].input_name,
                                  calls[name].output_length) for name, m in chosen.items()}
    if n == 0:
        return LayerPruneResult([], {}, importance)

    with eval_mode(model):
        if importance == "taylor":
            scores = _taylor_scores(model, chosen, batches, loss_fn)
        elif importance == "output":
            scores = _output_scores(model, chosen, batches, skipped)
        else:
            scores = _cosine_scores(model, chosen, batches)
    bad = [k for k, v in scores.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"importance {importance!r} of block {bad[0]!r} is NaN/Inf")

    if len(names) > 1 and len(set(scores.values())) == 1:
        warnings.warn(f"every block has the same {importance!r} score ({scores[names[0]]:.3g}; "
                      "e.g. a zero-initialised classifier gives zero gradients): the earliest "
                      "blocks are removed", RuntimeWarning, stacklevel=2)
    order = sorted(range(len(names)), key=lambda i: (scores[names[i]], i))
    removed = [names[i] for i in order[:n]]
    _replace_checked(model, inputs, {r: skipped[r] for r in removed}, chosen, reference_shapes)
    return LayerPruneResult(removed, {k: scores[k] for k in names}, importance,
                            {r: chosen[r] for r in removed})


def _block_names(blocks) -> list[str]:
    if isinstance(blocks, str) or not isinstance(blocks, Iterable):
        raise TypeError(f"blocks must be an iterable of module names, got {type(blocks).__name__}")
    wanted = list(blocks)
    for b in wanted:
        if not isinstance(b, str):
            raise TypeError(f"blocks must hold module names, got {type(b).__name__}")
    return wanted


def _named_blocks(model: nn.Module, blocks, candidates) -> dict[str, nn.Module]:
    """The non-leaf modules named in ``blocks`` that are not container members (timm's RegNet
    keeps a stage's blocks as attributes ``b1``, ``b2``...): named by the caller, they are
    candidates too, under the same checks (run once, keep the shape)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    holders = collections.Counter(id(m) for m in modules.values())
    shared = {i for i, count in holders.items() if count > 1}
    return {b: modules[b] for b in _block_names(blocks)
            if b in modules and b not in candidates and b
            and any(True for _ in modules[b].children()) and id(modules[b]) not in shared}


def _restrict(names, blocks, candidates, calls) -> list[str]:
    wanted = _block_names(blocks)
    for b in wanted:
        if b not in names:
            if b not in candidates:
                why = "is not a non-leaf module of the model (nor one shared by several parents)"
            elif calls[b].calls != 1:
                why = f"ran {calls[b].calls} times on example_inputs, not once"
            elif calls[b].in_shape != calls[b].out_shape:
                why = (f"changes the shape ({calls[b].in_shape} -> {calls[b].out_shape})")
            else:
                why = "lies inside another removable block"
            raise ValueError(f"block {b!r} cannot be removed: it {why}")
    keep = set(wanted)
    return [n for n in names if n in keep]


def _replace_checked(model, inputs, replacements, originals, reference_shapes) -> None:
    """Swap the blocks for identities, run the model and compare output shapes; undo on error."""
    done = []
    try:
        for name, new in replacements.items():
            model.set_submodule(name, new)
            done.append(name)
        with torch.no_grad(), eval_mode(model):
            shapes = output_shapes(call_model(model, inputs))
        if shapes != reference_shapes:
            raise ValueError(f"output shapes changed from {reference_shapes} to {shapes}")
    except Exception as e:
        for name in done:
            model.set_submodule(name, originals[name])
        raise ValueError(f"removing blocks {list(replacements)} breaks the model "
                         f"({type(e).__name__}: {e}); the model is unchanged") from e

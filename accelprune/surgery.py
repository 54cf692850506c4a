"""All-or-nothing surgery on channel groups: cut, check by a forward pass, or put everything back.

Torch-Pruning's ``group.prune()`` replaces the parameters of every member layer and edits
attributes (``out_channels``, ``num_features``...). A :class:`ModelSnapshot` keeps what one
surgery can change (the parameter and buffer *objects*, which are only referenced, not copied,
and the small attributes) so that :meth:`ModelSnapshot.restore` puts the very same objects back;
its module part is a :class:`ModuleSnapshot`, which also serves changes that are not a channel
group's (attention heads).
:func:`apply_checked` runs any change under a snapshot and checks the model afterwards: the
output shapes must be those seen when the graph was traced.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from accelprune.layers import conv_groups
from accelprune.tracing import call_model, eval_mode, no_kv_cache, output_shapes

__all__ = ["ModelSnapshot", "ModuleSnapshot", "apply_checked", "check_forward", "cut_group",
           "prune_groups", "surgery_error"]


class ModuleSnapshot:
    """What a change to some modules can alter, to be put back exactly (same objects): each
    module's parameter and buffer objects (references, not copies: a surgery replaces them with
    new, smaller tensors, so the old ones stay intact), its class and plain attributes, and the
    plain attributes of ``extra`` objects (a Hugging Face config, shared by every layer).

    Used alone for a change that is not a channel group's (e.g. removing attention heads) and as
    the module part of :class:`ModelSnapshot`. Memory cost: the replaced tensors are kept alive
    until the snapshot is dropped.
    """

    def __init__(self, modules, extra=()):
        modules = list({id(m): m for m in modules}.values())
        self.params = {m: dict(m._parameters) for m in modules}
        self.buffers = {m: dict(m._buffers) for m in modules}
        self.attrs = [(obj, _plain_attrs(obj)) for obj in [*modules, *extra]]
        # a surgery may switch a module's class (nn.MultiheadAttention → its head-pruned form)
        self.classes = [(m, type(m), {k: m.__dict__[k] for k in _PRIVATE_FLAGS if k in vars(m)})
                        for m in modules]

    def restore(self) -> None:
        _put_back_tensors(self.params, self.buffers)
        for m, cls, flags in self.classes:
            m.__class__ = cls
            m.__dict__.update(flags)
        for obj, attrs in self.attrs:
            for k in [k for k in vars(obj) if k not in attrs and not k.startswith("_")
                      and isinstance(vars(obj)[k], _SIMPLE)]:
                del obj.__dict__[k]  # added by the change
            for k, v in attrs.items():
                obj.__dict__[k] = copy.deepcopy(v)


class ModelSnapshot:
    """Everything surgery on some channel groups can change, to be restored exactly (same
    objects): the member modules (a :class:`ModuleSnapshot`), every other module's parameter
    dict, the dependency graph's module maps and pruning history, and the groups' widths."""

    def __init__(self, graph, groups):
        refuse_inside_unchanged(graph)  # every checked surgery starts here
        self.graph = graph
        DG = graph.DG
        members = {}
        with graph.unchanged():
            for g in groups:
                for dep, _ in g.tp_group():
                    m = dep.target.module
                    if isinstance(m, nn.Module):
                        members[id(m)] = m
        self.modules = ModuleSnapshot(members.values())
        # an unwrapped parameter is replaced on its parent, which need not be a member, and
        # retie() rebinds every holder of a tied parameter: keep the other modules' params too
        self.other_params = {m: dict(m._parameters) for m in graph.model.modules()
                             if id(m) not in members}
        self.module2node = dict(DG.module2node)
        self.node_modules = {node: node.module for node in DG.module2node.values()}
        self.param_to_name = dict(getattr(DG, "_param_to_name", {}))
        self.history = list(DG._pruning_history)
        self.widths = {id(g): g.n_channels for g in graph.all_groups}

    def restore(self) -> None:
        DG = self.graph.DG
        self.modules.restore()
        _put_back_tensors(self.other_params, {})
        DG.module2node.clear()
        DG.module2node.update(self.module2node)
        for node, module in self.node_modules.items():
            node.module = module
        if hasattr(DG, "_param_to_name"):
            DG._param_to_name.clear()
            DG._param_to_name.update(self.param_to_name)
        DG._pruning_history[:] = self.history
        for g in self.graph.all_groups:
            g.n_channels = self.widths[id(g)]


_SIMPLE = (int, float, bool, str, type(None), tuple, list, dict)
_PRIVATE_FLAGS = ("_qkv_same_embed_dim",)


def _put_back_tensors(params: dict, buffers: dict) -> None:
    """Each module's parameter and buffer dicts as they were (the very same tensor objects)."""
    for m, saved in params.items():
        m._parameters.clear()
        m._parameters.update(saved)
    for m, saved in buffers.items():
        m._buffers.clear()
        m._buffers.update(saved)


def _plain_attrs(obj) -> dict:
    """Public attributes of plain types (sizes, flags, ``training``: ModuleSnapshot.restore()
    deletes those it did not record, so the mode must be among them)."""
    return {k: copy.deepcopy(v) for k, v in vars(obj).items()
            if not k.startswith("_") and isinstance(v, _SIMPLE)}


def check_forward(graph) -> None:
    """Run the model on its example inputs (eval mode, no grad): the output shapes must be
    those seen when it was traced."""
    with eval_mode(graph.model), no_kv_cache(graph.model), torch.no_grad():  # as traced
        out = call_model(graph.model, graph.example_inputs)
    shapes = output_shapes(out, graph.output_transform)
    if shapes != graph.reference_shapes:
        raise RuntimeError(f"output shapes changed from {graph.reference_shapes} to {shapes}")


def refuse_inside_unchanged(graph) -> None:
    """Surgery inside ``ModelGraph.unchanged()`` would leave its shared group search stale."""
    if graph.read_only:
        raise RuntimeError("surgery inside ModelGraph.unchanged(): the graph is only read there")


def cut_group(graph, group, keep: np.ndarray) -> None:
    """Remove every channel of ``group`` not in ``keep`` (sorted current indices); unchecked."""
    n = group.n_channels
    remove = np.setdiff1d(np.arange(n), keep)
    if remove.size == 0:
        return
    tp_group = group.tp_group(remove)
    _check_grouped_convs(graph, group, tp_group)
    tp_group.prune(record_history=False)
    group.n_channels = len(keep)


def apply_checked(graph, groups, change: Callable[[], None]) -> None:
    """Run ``change()`` (surgery on ``groups``) and check the model; on any failure restore the
    model exactly and raise a ValueError naming the first of ``groups``."""
    snapshot = ModelSnapshot(graph, groups)
    try:
        change()
        check_forward(graph)
    except Exception as e:
        snapshot.restore()
        raise surgery_error(groups[0], e) from e


def prune_groups(graph, plan) -> None:
    """Cut several groups (``plan``: ``(group, sorted keep)`` pairs) with one check. All or
    nothing: on failure the model is restored and the groups are retried one by one to name the
    culprit, after which everything is restored again."""
    snapshot = ModelSnapshot(graph, [g for g, _ in plan])  # refuses surgery inside unchanged()
    if not plan:
        return  # after the snapshot: an empty plan is refused there too, as any surgery
    ties = shared_parameters(graph.model)
    try:
        for g, keep in plan:
            cut_group(graph, g, keep)
        retie(graph, ties)
        check_forward(graph)
    except Exception as first_error:
        snapshot.restore()
        if len(plan) == 1:
            raise surgery_error(plan[0][0], first_error) from first_error
        try:  # find which group breaks the model, then leave the model as it was
            for g, keep in plan:
                try:
                    cut_group(graph, g, keep)
                    retie(graph, ties)
                    check_forward(graph)
                except Exception as e:
                    raise surgery_error(g, e) from e
        finally:
            snapshot.restore()
        raise surgery_error(plan[-1][0], first_error) from first_error


def shared_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Parameters held by several modules (a tied ``lm_head`` and input embedding): for each,
    the ``(module, attribute)`` places holding it."""
    places: dict[int, list] = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((m, name))
    return [v for v in places.values() if len(v) > 1]


def retie(graph, ties) -> None:
    """After a cut, make tied parameters one object again. Torch-Pruning prunes each holder
    separately, which unties them; where every holder lost the same entries the first new
    tensor is shared again, otherwise ValueError (the ties would be pruned differently)."""
    for places in ties:
        params = [m._parameters[n] for m, n in places]
        if all(p is params[0] for p in params):
            continue
        first = params[0]
        for (m, n), p in zip(places, params, strict=True):
            if p.shape != first.shape or not torch.equal(p, first):
                where = ", ".join(f"{graph.name_of(mm)}.{nn_}" for mm, nn_ in places)
                raise ValueError(f"tied parameters ({where}) would be pruned differently")
            m._parameters[n] = first


def surgery_error(group, e: Exception) -> ValueError:
    if isinstance(e, ValueError) and str(e).startswith(f"group {group.name!r}"):
        return ValueError(f"{e}; the model was restored unchanged")
    return ValueError(f"pruning channel group {group.name!r} would break the model "
                      f"({type(e).__name__}: {e}); the model was restored unchanged")


def _check_grouped_convs(graph, group, tp_group) -> None:
    """Torch-Pruning removes the input channels of a grouped conv assuming every conv group loses
    the same local channels; refuse anything else rather than build a wrong (but runnable) model."""
    for dep, idxs in tp_group:
        m = dep.target.module
        blocks = conv_groups(m)
        if blocks == 1:
            continue
        width = m.out_channels if graph.DG.is_out_channel_pruning_fn(dep.handler) else m.in_channels
        per = width // blocks
        by_block = [sorted(i % per for i in idxs if i // per == j) for j in range(blocks)]
        if any(b != by_block[0] for b in by_block):
            raise ValueError(f"group {group.name!r}: grouped conv {graph.name_of(m)!r} ({blocks} "
                             "groups) needs the same channels removed from each of its groups")

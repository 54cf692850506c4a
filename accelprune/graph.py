"""Channel groups and checked surgery: a thin layer over Torch-Pruning's ``DependencyGraph``.

A *channel group* is one set of output channels that must be removed together: the convs /
linears producing them (several when their outputs are summed, e.g. a residual add), the
BatchNorms over them and the layers consuming them (whose input channels go too). Torch-Pruning
finds the coupling (residual adds, concats, flatten, depthwise convs); this module adds:

* the list of groups in model order, with names, never touching the model's outputs (the final
  classifier), without the groups of ``ignored_layers``, and (``prune_coupled=False``, default)
  without residual-coupled groups;
* surgery that never leaves a broken model: after every cut the model is run on the example
  inputs and its output shapes compared; on any failure the model is restored exactly (the very
  same parameter objects) and a ValueError names the group;
* C-SGD's fold-and-prune (ALGORITHMS.md §4.3).

Channel indices of a group are those of its first producer's output. Groups stay valid after
other groups are pruned: indices are recomputed from the root module at prune time.

``example_inputs``: a tensor (``model(x)``), a tuple or list (``model(*inputs)``) or a dict
(``model(**inputs)``).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from accelprune._validation import as_int_array

__all__ = ["ChannelGroup", "ModelGraph", "prune_channels", "fold_and_prune", "call_model"]

_PRODUCER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_BN_TYPES = nn.modules.batchnorm._BatchNorm


@dataclass(eq=False)
class ChannelGroup:
    """One set of coupled output channels that must be pruned together.

    name: name of the first producing module, e.g. ``"layer1.0.conv1"``.
    producers: modules (Conv/Linear) whose OUTPUT channels these are, in model order. Depthwise
        convs on the way are listed here too (their filters are per channel).
    bns: BatchNorm modules over these channels, in model order.
    consumers: modules (Conv/Linear, not depthwise) whose INPUT channels these are.
    n_channels: current width (updated in place after pruning).
    coupled: more than one (non-depthwise) producer, e.g. outputs summed by a residual add.
    """

    name: str
    producers: list[str]
    bns: list[str]
    consumers: list[str]
    n_channels: int
    coupled: bool
    _graph: ModelGraph = field(repr=False, compare=False, default=None)
    _root: nn.Module = field(repr=False, compare=False, default=None)
    _root_fn: object = field(repr=False, compare=False, default=None)


def call_model(model: nn.Module, example_inputs):
    """Run ``model`` on ``example_inputs`` (tensor → ``model(x)``, tuple/list → ``model(*x)``,
    dict → ``model(**x)``)."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _flat_tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_tensors(o)]
    return [out]  # not a tensor: reported by the caller


def _output_shapes(out) -> list[tuple]:
    return [
        tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        for t in _flat_tensors(out)
    ]


class _TraceError(Exception):
    """Raised in the traced forward; re-raised as ValueError (Torch-Pruning must not swallow it)."""


class ModelGraph:
    """The prunable channel groups of ``model`` and checked surgery on them.

    Args:
        model: the network (pruned in place by :meth:`prune_channels` / :meth:`fold_and_prune`).
        example_inputs: inputs for tracing and for the check after every surgery.
        ignored_layers: module names or modules whose OUTPUT channels are never pruned (a
            container ignores all its submodules). Their input channels may still shrink.
        prune_coupled: also list groups with several producers (residual-coupled outputs).
        progress: show a tqdm bar while the groups are built (large models take a while).

    Attributes:
        groups: the prunable :class:`ChannelGroup` s, in model order.
        all_groups: every group Torch-Pruning found outside ``ignored_layers``, including the
            classifier's and (with ``prune_coupled=False``) the coupled ones.
        DG: the underlying ``torch_pruning.DependencyGraph``.

    Building the graph runs the model once (in eval mode, with autograd on); the model's
    train/eval flags and ``requires_grad`` flags are restored afterwards. Raises ValueError
    naming the module where tracing fails (forward error, a cut autograd graph).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        *,
        ignored_layers=None,
        prune_coupled: bool = False,
        progress: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(prune_coupled, bool):
            raise TypeError(f"prune_coupled must be a bool, got {type(prune_coupled).__name__}")
        self.model = model
        self.example_inputs = example_inputs
        self.prune_coupled = prune_coupled
        self._names = {m: n for n, m in model.named_modules()}
        self._order = {n: i for i, n in enumerate(self._names.values())}
        self.ignored_layers = self._resolve_ignored(ignored_layers)

        bar = tqdm(
            total=None, desc="tracing model", unit="group", disable=not progress, leave=False
        )
        try:
            self.DG = self._build_dependency()
            bar.set_description("channel groups")
            self.groups, self.all_groups = self._find_groups(bar)
        finally:
            bar.close()

    # -- construction ------------------------------------------------------------------------

    def _resolve_ignored(self, ignored_layers) -> list[nn.Module]:
        if ignored_layers is None:
            return []
        if isinstance(ignored_layers, (str, nn.Module)):
            ignored_layers = [ignored_layers]
        by_name = {n: m for m, n in self._names.items()}
        out = []
        for item in ignored_layers:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"ignored_layers: the model has no module named {item!r}")
                module = by_name[item]
            elif isinstance(item, nn.Module):
                if item not in self._names:
                    raise ValueError(
                        f"ignored_layers: {type(item).__name__} module is not part of the model"
                    )
                module = item
            else:
                raise TypeError(
                    f"ignored_layers must hold module names or modules, got {type(item).__name__}"
                )
            out.extend(module.modules())
        return out

    def _build_dependency(self) -> tp.DependencyGraph:
        model = self.model
        modes = {m: m.training for m in model.modules()}
        grads = {p: p.requires_grad for p in model.parameters()}
        self._executed: list[nn.Module] = []
        try:
            for p in grads:  # frozen layers fed by plain inputs would have no grad_fn to trace
                p.requires_grad_(True)
            with torch.enable_grad(), warnings.catch_warnings():
                # Torch-Pruning warns about ops it treats as element-wise; the surgery check
                # below is what tells whether that was right.
                warnings.simplefilter("ignore")
                DG = tp.DependencyGraph().build_dependency(
                    model, self.example_inputs, forward_fn=self._traced_forward, verbose=False
                )
        except _TraceError as e:
            raise ValueError(str(e)) from e.__cause__
        except ValueError:
            raise
        except Exception as e:  # Torch-Pruning failed on some op of the autograd graph
            raise ValueError(
                f"Torch-Pruning could not trace the model: {type(e).__name__}: {e}"
            ) from e
        finally:
            for p, flag in grads.items():
                p.requires_grad_(flag)
            for m, flag in modes.items():
                m.training = flag
        unreached = [
            m
            for m in self._executed
            if isinstance(m, (*_PRODUCER_TYPES, _BN_TYPES)) and m not in DG.module2node
        ]
        if unreached:
            name = self._names[unreached[-1]]
            raise ValueError(
                f"cannot trace the model: the autograd graph from its output does not reach "
                f"{name!r} ({type(unreached[-1]).__name__}); an operation after it cuts the graph "
                f"(.detach(), .data, .numpy(), .item(), torch.no_grad(), integer ops)"
            )
        return DG

    def _traced_forward(self, model, example_inputs):
        """The forward Torch-Pruning traces, with hooks naming the module where things go wrong."""
        stack, executed, last_with_grad = [], self._executed, []

        def pre(module, args):
            stack.append(module)

        def post(module, args, out):
            stack.pop()
            executed.append(module)
            tensors = [t for t in _flat_tensors(out) if isinstance(t, torch.Tensor)]
            if (
                tensors
                and all(t.grad_fn is None for t in tensors)
                and any(True for _ in module.parameters(False))
            ):
                raise _TraceError(
                    f"cannot trace the model: module {self._names[module]!r} "
                    f"({type(module).__name__}) ran without autograd (torch.no_grad()?)"
                )
            if any(t.grad_fn is not None for t in tensors):
                last_with_grad[:] = [module]

        hooks = [
            h
            for m in model.modules()
            for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))
        ]
        try:
            out = call_model(model, example_inputs)
        except _TraceError:
            raise
        except Exception as e:
            where = (
                f"module {self._names[stack[-1]]!r} ({type(stack[-1]).__name__})"
                if stack
                else "the model's forward"
            )
            raise _TraceError(
                f"forward on example_inputs failed in {where}: {type(e).__name__}: {e}"
            ) from e
        finally:
            for h in hooks:
                h.remove()
        flat = _flat_tensors(out)
        bad = [o for o in flat if not isinstance(o, torch.Tensor)]
        if not flat or bad:
            raise _TraceError(
                f"cannot trace the model: its output must be tensors (nested in tuples, lists or "
                f"dicts), got {type(bad[0]).__name__ if bad else 'nothing'}"
            )
        if any(t.grad_fn is None for t in flat):
            after = f" after module {self._names[last_with_grad[0]]!r}" if last_with_grad else ""
            raise _TraceError(
                f"cannot trace the model: its output is cut from the autograd graph{after} "
                f"(.detach(), .data, .numpy(), .item(), torch.no_grad(), integer ops)"
            )
        self._reference_shapes = _output_shapes(out)
        return out

    def _find_groups(self, bar) -> tuple[list[ChannelGroup], list[ChannelGroup]]:
        DG = self.DG
        roots = [m for m in DG.module2node if isinstance(m, _PRODUCER_TYPES)]
        bar.reset(total=len(roots))
        groups, to_output = [], set()
        for tp_group in DG.get_all_groups(
            ignored_layers=self.ignored_layers, root_module_types=_PRODUCER_TYPES
        ):
            g = self._describe(tp_group)
            groups.append(g)
            if self._reaches_output(tp_group):
                to_output.add(g.name)
            bar.update(len(g.producers))
        bar.update(bar.total - bar.n)
        groups.sort(key=lambda g: self._order[g.name])
        prunable = [
            g for g in groups if g.name not in to_output and (self.prune_coupled or not g.coupled)
        ]
        return prunable, groups

    def _describe(self, tp_group) -> ChannelGroup:
        producers, depthwise, bns, consumers = [], set(), [], []
        for dep, _ in tp_group:
            m, fn = dep.target.module, dep.handler
            name = self._names.get(m)
            if name is None:  # Torch-Pruning's own ops (add, concat, reshape) and unwrapped params
                continue
            if isinstance(m, _PRODUCER_TYPES) and self.DG.is_out_channel_pruning_fn(fn):
                producers.append(name)
                if _is_depthwise(m):
                    depthwise.add(name)
            elif isinstance(m, _PRODUCER_TYPES) and self.DG.is_in_channel_pruning_fn(fn):
                consumers.append(name)
            elif isinstance(m, _BN_TYPES):
                bns.append(name)
        producers = sorted(set(producers), key=self._order.get)
        root = self.module(producers[0])
        return ChannelGroup(
            name=producers[0],
            producers=producers,
            bns=sorted(set(bns), key=self._order.get),
            consumers=sorted(set(consumers) - set(producers), key=self._order.get),
            n_channels=int(self.DG.get_out_channels(root)),
            coupled=len(set(producers) - depthwise) > 1,
            _graph=self,
            _root=root,
            _root_fn=self.DG.get_pruner_of_module(root).prune_out_channels,
        )

    def _reaches_output(self, tp_group) -> bool:
        """True when pruning the group would change the model's output (e.g. the final
        classifier's outputs): some node carrying these channels feeds nothing but the output."""
        for dep, _ in tp_group:
            node, fn = dep.target, dep.handler
            if (
                isinstance(node.module, _PRODUCER_TYPES)
                and self.DG.is_in_channel_pruning_fn(fn)
                and not _is_depthwise(node.module)
            ):
                continue  # the channels end here (input side of a consumer)
            if node.type == tp.ops.OPTYPE.OUTPUT or not node.outputs:
                return True
        return False

    # -- public API --------------------------------------------------------------------------

    def module(self, name: str) -> nn.Module:
        """The submodule called ``name`` (ValueError if there is none)."""
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module named {name!r}") from None

    def prune_channels(self, group: ChannelGroup, keep) -> None:
        """Keep only channels ``keep`` (1-D ints into the group's current channels) of ``group``:
        remove the others from every producer, BN and consumer. Channel order is preserved."""
        keep = self._check_keep(group, keep)
        self.prune_groups([(group, keep)])

    def prune_groups(self, plan) -> None:
        """Prune several groups at once: ``plan`` is a list of ``(group, keep)``. All or nothing:
        checked with a single forward pass; on failure the model is restored and the groups are
        retried one by one to name the culprit (then everything is restored again)."""
        plan = [(g, self._check_keep(g, keep)) for g, keep in plan]
        plan = [(g, keep) for g, keep in plan if len(keep) < g.n_channels]
        if not plan:
            return
        snapshot = _Snapshot(self, [g for g, _ in plan])
        try:
            for g, keep in plan:
                self._cut(g, keep)
            self._check_forward()
        except Exception as first_error:
            snapshot.restore()
            if len(plan) == 1:
                raise _surgery_error(plan[0][0], first_error) from first_error
            # find which group breaks the model, then leave the model as it was
            try:
                for g, keep in plan:
                    try:
                        self._cut(g, keep)
                        self._check_forward()
                    except Exception as e:
                        raise _surgery_error(g, e) from e
            finally:
                snapshot.restore()
            raise _surgery_error(plan[-1][0], first_error) from first_error
        for g, keep in plan:
            g.n_channels = len(keep)

    def fold_and_prune(self, group: ChannelGroup, clusters) -> None:
        """C-SGD's pruning (ALGORITHMS.md §4.3): in every cluster keep the lowest channel; add the
        consumers' input slices of the other members into the kept slice, then remove them.

        clusters: 1-D int labels, one per current channel (any integers; equal = same cluster).
        Lossless once the producers' filters (and BN entries) of each cluster are identical.
        """
        self._check_group(group)
        labels = as_int_array(clusters, "clusters", ndim=1)
        if labels.shape[0] != group.n_channels:
            raise ValueError(
                f"clusters has {labels.shape[0]} labels, but group {group.name!r} has "
                f"{group.n_channels} channels"
            )
        _, first = np.unique(labels, return_index=True)
        keep = np.sort(first)
        if len(keep) == group.n_channels:
            return
        kept_of = {
            int(lab): int(first_i) for lab, first_i in zip(*np.unique(labels, return_index=True), strict=True)
        }
        merge = [
            (int(c), kept_of[int(labels[c])])
            for c in range(len(labels))
            if kept_of[int(labels[c])] != c
        ]
        snapshot = _Snapshot(self, [group])
        try:
            self._fold_consumers(group, merge)
            self._cut(group, keep)
            self._check_forward()
        except Exception as e:
            snapshot.restore()
            raise _surgery_error(group, e) from e
        group.n_channels = len(keep)

    # -- internals ---------------------------------------------------------------------------

    def _check_group(self, group) -> None:
        if not isinstance(group, ChannelGroup):
            raise TypeError(f"group must be a ChannelGroup, got {type(group).__name__}")
        if group._graph is not self:
            raise ValueError(f"group {group.name!r} belongs to another ModelGraph")

    def _check_keep(self, group: ChannelGroup, keep) -> np.ndarray:
        self._check_group(group)
        if np.size(keep) == 0:  # before the dtype check: [] is float64 to numpy
            raise ValueError(f"keep is empty: group {group.name!r} must keep at least one channel")
        keep = as_int_array(keep, "keep", ndim=1)
        if keep.min() < 0 or keep.max() >= group.n_channels:
            raise ValueError(
                f"keep has indices outside [0, {group.n_channels}) for group {group.name!r}"
            )
        if len(np.unique(keep)) != len(keep):
            raise ValueError(f"keep has repeated indices for group {group.name!r}")
        return np.sort(keep)

    def _tp_group(self, g: ChannelGroup, idxs=None):
        """Torch-Pruning's group for ``g``, rebuilt from its root (all channels by default)."""
        if idxs is None:
            idxs = list(range(int(self.DG.get_out_channels(g._root))))
        return self.DG.get_pruning_group(g._root, g._root_fn, [int(i) for i in idxs])

    def _cut(self, g: ChannelGroup, keep: np.ndarray) -> None:
        n = int(self.DG.get_out_channels(g._root))
        remove = np.setdiff1d(np.arange(n), keep)
        if remove.size == 0:
            return
        tp_group = self._tp_group(g, remove)
        _check_grouped_convs(g, tp_group)
        tp_group.prune(record_history=False)

    def _check_forward(self) -> None:
        modes = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()  # no BN statistics updates, no dropout
            with torch.no_grad():
                out = call_model(self.model, self.example_inputs)
        finally:
            for m, flag in modes.items():
                m.training = flag
        shapes = _output_shapes(out)
        if shapes != self._reference_shapes:
            raise RuntimeError(f"output shapes changed from {self._reference_shapes} to {shapes}")

    def _fold_consumers(self, g: ChannelGroup, merge: list[tuple[int, int]]) -> None:
        """Add the input slices of channel c into those of its kept channel k, (c, k) in merge."""
        for item in self._tp_group(g):
            m = item.dep.target.module
            if not (
                isinstance(m, _PRODUCER_TYPES)
                and self.DG.is_in_channel_pruning_fn(item.dep.handler)
                and not _is_depthwise(m)
            ):
                continue
            # the consumer's input indices of each group channel: one for a conv (at the concat
            # offset, if any), a block of columns for a Linear after flatten
            cols: dict[int, list[int]] = {}
            for local, root in zip(item.idxs, item.root_idxs, strict=True):
                cols.setdefault(int(root), []).append(int(local))
            _fold_weight(m, self._names[m], cols, merge)


def _is_depthwise(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.modules.conv._ConvNd)
        and m.groups > 1
        and m.groups == m.in_channels == m.out_channels
    )


def _fold_weight(m: nn.Module, name: str, cols: dict[int, list[int]], merge) -> None:
    """New weight for consumer ``m``: column block of c added into that of k (per conv group)."""
    w = m.weight.detach().clone()
    if isinstance(m, nn.Linear):
        view, in_per_group, out_per_group = w, w.shape[1], w.shape[0]
    elif m.transposed:  # (in, out/groups, ...): input channels are rows
        view, in_per_group, out_per_group = w.transpose(0, 1), w.shape[0], w.shape[1]
        if m.groups > 1:
            raise ValueError(
                f"fold_and_prune does not support grouped transposed conv consumer {name!r}"
            )
    else:  # (out, in/groups, ...)
        view, in_per_group, out_per_group = w, w.shape[1], w.shape[0] // m.groups
    for c, k in merge:
        src, dst = cols.get(c, []), cols.get(k, [])
        if len(src) != len(dst):
            raise ValueError(
                f"consumer {name!r} sees channels {c} and {k} through blocks of different sizes"
            )
        for s, d in zip(src, dst, strict=True):
            gs, gd = s // in_per_group, d // in_per_group
            if gs != gd:
                raise ValueError(
                    f"cannot fold channel {c} into {k}: they feed different groups of grouped "
                    f"conv {name!r}"
                )
            rows = slice(
                gs * out_per_group, (gs + 1) * out_per_group
            )  # the outputs of that conv group
            view[rows, d % in_per_group] += view[rows, s % in_per_group]
    new = nn.Parameter(w, requires_grad=m.weight.requires_grad)
    if m.weight.grad is not None:  # keep the gradient (optimizer-state tracking relies on it)
        new.grad = m.weight.grad
    m.weight = new


def _check_grouped_convs(g: ChannelGroup, tp_group) -> None:
    """Torch-Pruning removes the input channels of a grouped conv assuming every conv group loses
    the same local channels; refuse anything else rather than build a wrong (but runnable) model."""
    for dep, idxs in tp_group:
        m = dep.target.module
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not _is_depthwise(m):
            per = (
                m.out_channels
                if tp_group._DG.is_out_channel_pruning_fn(dep.handler)
                else m.in_channels
            ) // m.groups
            by_group = [sorted(i % per for i in idxs if i // per == j) for j in range(m.groups)]
            if any(b != by_group[0] for b in by_group):
                raise ValueError(
                    f"group {g.name!r}: grouped conv {g._graph._names[m]!r} ({m.groups} groups) "
                    f"needs the same channels removed from each of its groups"
                )


def _surgery_error(g: ChannelGroup, e: Exception) -> ValueError:
    if isinstance(e, ValueError) and str(e).startswith(f"group {g.name!r}"):
        return ValueError(f"{e}; the model was restored")
    return ValueError(
        f"pruning channel group {g.name!r} would break the model ({type(e).__name__}: {e}); "
        f"the model was restored unchanged"
    )


class _Snapshot:
    """Everything surgery on some groups can change, to put back exactly (same objects)."""

    def __init__(self, graph: ModelGraph, groups: list[ChannelGroup]):
        self.graph = graph
        DG = graph.DG
        modules = {}
        for g in groups:
            for dep, _ in graph._tp_group(g):
                m = dep.target.module
                if isinstance(m, nn.Module):
                    modules[id(m)] = m
        # unwrapped parameters are replaced on their parent module: keep every module's params
        self.params = {m: dict(m._parameters) for m in graph.model.modules()}
        self.buffers = {m: dict(m._buffers) for m in modules.values()}
        self.attrs = {
            m: {
                k: copy.deepcopy(v)
                for k, v in vars(m).items()
                if not k.startswith("_")
                and k != "training"
                and not isinstance(v, (torch.Tensor, nn.Module))
                and _deepcopyable(v)
            }
            for m in modules.values()
        }
        self.module2node = dict(DG.module2node)
        self.node_modules = {node: node.module for node in DG.module2node.values()}
        self.param_to_name = dict(getattr(DG, "_param_to_name", {}))
        self.history = list(DG._pruning_history)

    def restore(self) -> None:
        DG = self.graph.DG
        for m, params in self.params.items():
            m._parameters.clear()
            m._parameters.update(params)
        for m, bufs in self.buffers.items():
            m._buffers.clear()
            m._buffers.update(bufs)
        for m, attrs in self.attrs.items():
            for k, v in attrs.items():
                m.__dict__[k] = copy.deepcopy(v)
        DG.module2node.clear()
        DG.module2node.update(self.module2node)
        for node, module in self.node_modules.items():
            node.module = module
        if hasattr(DG, "_param_to_name"):
            DG._param_to_name.clear()
            DG._param_to_name.update(self.param_to_name)
        DG._pruning_history[:] = self.history


def _deepcopyable(v) -> bool:
    return isinstance(v, (int, float, bool, str, type(None), tuple, list, dict))


def prune_channels(group: ChannelGroup, keep) -> None:
    """Module-level form of :meth:`ModelGraph.prune_channels` (forwards to the group's graph)."""
    if not isinstance(group, ChannelGroup):
        raise TypeError(f"group must be a ChannelGroup, got {type(group).__name__}")
    group._graph.prune_channels(group, keep)


def fold_and_prune(group: ChannelGroup, clusters) -> None:
    """Module-level form of :meth:`ModelGraph.fold_and_prune` (forwards to the group's graph)."""
    if not isinstance(group, ChannelGroup):
        raise TypeError(f"group must be a ChannelGroup, got {type(group).__name__}")
    group._graph.fold_and_prune(group, clusters)

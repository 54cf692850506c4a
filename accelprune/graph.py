"""Channel groups: which output channels must be removed together, over Torch-Pruning's
``DependencyGraph``.

A *channel group* is one set of output channels that must be removed together: the convs /
linears producing them (several when their outputs are summed, e.g. a residual add), the
BatchNorms over them and the layers consuming them (whose input channels go too). Torch-Pruning
finds the coupling (residual adds, concats, flatten, depthwise convs); this module lists the
groups in model order, with names, never touching the model's outputs (the final classifier),
without the groups of ``ignored_layers`` and (``prune_coupled=False``, default) without
residual-coupled groups; and it answers the structure questions the methods ask of a group
(its depthwise members, its conv-group blocks, its filters).

Removing channels goes through :mod:`accelprune.surgery` (checked, all or nothing); running the
model through :mod:`accelprune.tracing`.

Channel indices of a group are those of its first producer's output. Groups stay valid after
other groups are pruned: indices are recomputed from the root module at prune time.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from accelprune import surgery
from accelprune._validation import as_int_array
from accelprune.attention import find_head_groups, unsupported_attention
from accelprune.group_search import GraphSearch, find_groups, pruning_group
from accelprune.hf import sync_config
from accelprune.layers import (
    BATCHNORM_TYPES,
    PRODUCER_TYPES,
    blocks_of,
    is_depthwise,
    is_norm,
)
from accelprune.tracing import (
    ForwardDiagnosis,
    TraceError,
    check_example_inputs,
    eval_mode,
    no_kv_cache,
    refuse_meta_tensors,
)

__all__ = ["ChannelGroup", "ModelGraph", "prune_channels", "unsupported_layers"]


@dataclass(eq=False)
class ChannelGroup:
    """One set of coupled output channels that must be pruned together.

    name: name of the first producing module, e.g. ``"layer1.0.conv1"``.
    producers: modules (Conv/Linear) whose OUTPUT channels these are, in model order. Depthwise
        convs on the way are listed here too (their filters are per channel).
    bns: BatchNorm modules over these channels, in model order.
    consumers: modules (Conv/Linear, not depthwise) whose INPUT channels these are.
    n_channels: current width (updated in place after pruning).
    coupled: more than one (non-depthwise) producer, e.g. outputs summed by a residual add,
        or multiplied (LLaMA's gate and up projections, squeeze-and-excitation).
    residual: several producers' outputs are *added* (a residual stream): such groups are
        listed only with ``prune_coupled=True``. Multiplied producers (gated MLPs) are not.
    gated: several producers' outputs meet in a product and in no sum: a gated MLP (LLaMA's
        ``act(gate(x)) * up(x)``), squeeze-and-excitation. Pruning such a group removes the
        same channels from every producer, with nothing added to them downstream.
    norms: the other normalisation layers whose per-channel weights are members (pruned with
        the group, like ``bns``): LayerNorm, ConvNeXt's LayerNorm2d, GroupNorm, RMSNorm (torch's
        and Hugging Face's ``LlamaRMSNorm``...), in model order. Use
        :func:`accelprune.layers.normalises_over_channels` to know whether a norm mixes the
        channels (LayerNorm / RMSNorm do: their output for one channel depends on all).
    """

    name: str
    producers: list[str]
    bns: list[str]
    consumers: list[str]
    n_channels: int
    coupled: bool
    norms: list[str] = field(default_factory=list)
    residual: bool = False
    gated: bool = False
    _graph: ModelGraph = field(repr=False, compare=False, default=None)
    _root: nn.Module = field(repr=False, compare=False, default=None)
    _root_fn: object = field(repr=False, compare=False, default=None)

    def module(self, name: str) -> nn.Module:
        """The model's submodule ``name``."""
        return self._graph.module(name)

    @property
    def depthwise(self) -> list[str]:
        """Producers that are depthwise convs (one filter per channel: they follow a selection,
        there is nothing in them to compare across channels)."""
        return [p for p in self.producers if is_depthwise(self.module(p))]

    @property
    def filter_producers(self) -> list[str]:
        """Producers whose filters span the input channels: all but the depthwise ones."""
        return [p for p in self.producers if not is_depthwise(self.module(p))]

    @property
    def partial_members(self) -> list[tuple[str, int]]:
        """``(name, width)`` of the producers and BatchNorms whose own channels are not exactly
        the group's: a layer over a concat of these channels with others (DenseNet's norm1,
        GhostNet's depthwise conv after its ghost concat), or a producer of only part of them.
        Their rows are a slice of the group (or the group a slice of theirs)."""
        DG = self._graph.DG
        widths = {name: int(DG.get_out_channels(self.module(name)))
                  for name in self.producers + self.bns}
        return [(name, width) for name, width in widths.items() if width != self.n_channels]

    @property
    def blocks(self) -> int:
        """How many equal blocks grouped convs (producing or consuming) split the channels into:
        each block must keep the same local channels (see :func:`accelprune.layers.blocks_of`)."""
        return blocks_of((self.module(n) for n in self.producers + self.consumers),
                         self.n_channels)

    def tp_group(self, idxs=None) -> tp.dependency.Group:
        """Torch-Pruning's group for these channels (all of them by default), rebuilt from the
        root module so that it reflects earlier pruning (inside :meth:`ModelGraph.unchanged`, by
        the block's shared search: nothing is pruned there)."""
        DG = self._graph.DG
        if idxs is None:
            idxs = range(int(DG.get_out_channels(self._root)))
        # Torch-Pruning's own get_pruning_group never ends on some graphs (e.g. LLaMA's rotary
        # embedding): accelprune.group_search walks the same edges in linear time
        return pruning_group(DG, self._root, self._root_fn, [int(i) for i in idxs],
                             search=self._graph._shared_search())


def unsupported_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, class)`` of the leaf modules that hold a weight matrix but are not Conv/Linear
    layers (nor embeddings or norms): Hugging Face's ``Conv1D`` in GPT-2, for instance.
    Torch-Pruning has no pruner for them, so their channels are never a channel group."""
    found = []
    for name, m in model.named_modules():
        w = m._parameters.get("weight")
        if (w is None or w.dim() < 2 or next(m.children(), None) is not None
                or isinstance(m, (*PRODUCER_TYPES, nn.Embedding, nn.EmbeddingBag,
                                  nn.MultiheadAttention, BATCHNORM_TYPES)) or is_norm(m)):
            continue
        found.append((name, type(m).__name__))
    return found


def unsupported_hint(model: nn.Module) -> str:
    """The end of a "nothing to prune" message when :func:`unsupported_layers` found some."""
    layers = unsupported_layers(model)
    if not layers:
        return ""
    kinds = sorted({cls for _, cls in layers})
    names = ", ".join(repr(n) for n, _ in layers[:3]) + (", ..." if len(layers) > 3 else "")
    return (f"; its weight layers {names} are {'/'.join(kinds)} modules, which accelprune "
            f"cannot prune (it prunes nn.Conv1d/2d/3d and nn.Linear layers: Torch-Pruning has "
            f"no pruner for {'/'.join(kinds)})")


def _where_tracing_failed(error: BaseException, names: dict) -> str:
    """Where in the traced graph Torch-Pruning failed, for the error message: the node it was
    handling when it raised (the innermost frame with a Node argument) and the nearest named
    module upstream of it; "" when the traceback holds no node."""
    node, tb = None, error.__traceback__
    while tb is not None:
        code, local = tb.tb_frame.f_code, tb.tb_frame.f_locals
        for arg in code.co_varnames[:code.co_argcount]:
            if isinstance(local.get(arg), tp.dependency.Node):
                node = local[arg]
        tb = tb.tb_next
    if node is None:
        return ""
    op = (type(node.grad_fn).__name__ if node.grad_fn is not None and node.module not in names
          else type(node.module).__name__)
    after, seen, frontier = None, set(), [node]
    while frontier and after is None:  # breadth-first, towards the input
        nxt = []
        for n in frontier:
            if n.module in names and n is not node:
                after = names[n.module]
                break
            seen.add(id(n))
            nxt += [i for i in n.inputs if id(i) not in seen]
        frontier = nxt
    where = f" at {op}" + (f" after module {after!r}" if after else "")
    hint = ""
    if re.search("view|reshape", op, re.IGNORECASE):
        hint = (": Torch-Pruning follows channels through a reshape only when it flattens or "
                "unflattens them; a reshape that splits the channels into groups to reorder "
                "them (a channel shuffle, as in ShuffleNet) is not supported, so this model "
                "cannot be pruned structurally")
    return where + hint


def _shuffles_channels(node) -> bool:
    """Whether ``node`` is the transpose of a channel shuffle (ShuffleNet's
    ``x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)``): a swap of dims 1 and 2
    between a view of an (N, C, H, W) tensor and a reshape of a rank-5 one. Torch-Pruning
    treats the transpose as element-wise, so a cut through it runs but pairs the wrong
    channels afterwards: such groups are not prunable."""
    grad_fn, op = node.grad_fn, op_name(node)
    if op == "Transpose":
        swapped = {getattr(grad_fn, "_saved_dim0", 0) % 5, getattr(grad_fn, "_saved_dim1", 0) % 5}
    elif op == "Permute":
        dims = tuple(d % 5 for d in getattr(grad_fn, "_saved_dims", ()))
        swapped = {1, 2} if dims == (0, 2, 1, 3, 4) else set()
    else:
        return False
    if swapped != {1, 2}:
        return False
    return (any(_reshape_rank(i) == 4 for i in node.inputs)  # (N, C, H, W) in, ...
            and any(_reshape_rank(o) == 5 or (op_name(o) == "Clone"
                                             and any(_reshape_rank(p) == 5 for p in o.outputs))
                    for o in node.outputs))  # ... and a rank-5 tensor transposed (not a flatten)


def _reshape_rank(node) -> int | None:
    """The rank of the input of a view / reshape node (None for other nodes)."""
    if not op_name(node).startswith(("View", "Reshape", "UnsafeView")):
        return None
    return len(getattr(node.grad_fn, "_saved_self_sym_sizes", ()))


class ModelGraph:
    """The prunable channel groups of ``model`` and checked surgery on them.

    Args:
        model: the network (pruned in place by :meth:`prune_channels` / :meth:`prune_groups`).
        example_inputs: inputs for tracing and for the check after every surgery: a tensor, a
            tuple/list of positional inputs or a dict of keyword inputs.
        ignored_layers: module names or modules whose OUTPUT channels are never pruned (a
            container ignores all its submodules). Their input channels may still shrink.
        prune_coupled: also list groups with several producers (residual-coupled outputs).
        output_transform: ``fn(output) -> tensor(s)``, where the model's output is not tensors
            nested in tuples, lists, dicts or dataclasses (see :mod:`accelprune.tracing`).
        progress: show a tqdm bar while the groups are built (large models take a while).

    Attributes:
        groups: the prunable :class:`ChannelGroup` s, in model order.
        all_groups: every group Torch-Pruning found outside ``ignored_layers``, including the
            classifier's, (with ``prune_coupled=False``) the residual ones and the attention
            inner widths.
        head_groups: the attention modules whose whole heads can be pruned
            (:class:`accelprune.attention.HeadGroup`, see :func:`accelprune.prune_heads`). The
            channel groups of their inner width (q/k/v outputs) are never in ``groups``:
            removing single channels there shifts the head boundaries.
        DG: the underlying ``torch_pruning.DependencyGraph``.
        reference_shapes: the output shapes every surgery must preserve.

    Building the graph runs the model once (in eval mode, with autograd on); the model's
    train/eval flags, ``requires_grad`` flags and hooks are as before afterwards, also when it
    fails. Raises ValueError naming the module where tracing fails (forward error, a cut
    autograd graph).
    """

    def __init__(self, model: nn.Module, example_inputs, *, ignored_layers=None,
                 prune_coupled: bool = False, output_transform=None, progress: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(prune_coupled, bool):
            raise TypeError(f"prune_coupled must be a bool, got {type(prune_coupled).__name__}")
        if output_transform is not None and not callable(output_transform):
            raise TypeError("output_transform must be callable, "
                            f"got {type(output_transform).__name__}")
        self.model = model
        self.example_inputs = check_example_inputs(example_inputs)
        refuse_meta_tensors(model, self.example_inputs)
        self.prune_coupled = prune_coupled
        self.output_transform = output_transform
        self._names = {m: n for n, m in model.named_modules()}
        self._order = {n: i for i, n in enumerate(self._names.values())}
        self.ignored_layers = self._resolve_ignored(ignored_layers)

        self._reading: _ReadBlock | None = None  # the unchanged() block we are in, if any
        with tqdm(total=None, desc="tracing model", disable=not progress, leave=False):
            self.DG = self._build_dependency()
        self.head_groups = find_head_groups(model, self.ignored_layers)
        self.groups, self.all_groups = self._find_groups(progress)

    @contextlib.contextmanager
    def unchanged(self):
        """A block in which the graph is only read: the groups' ``tp_group()`` calls share one
        group search (widths and index mappings read once, not once a group). Checked surgery
        inside it (every path takes a :class:`~accelprune.surgery.ModelSnapshot`) is refused.
        The search is built on the first group read: a block that reads none costs nothing."""
        outer = self._reading
        if outer is None:
            self._reading = _ReadBlock(self.DG)
        try:
            yield self
        finally:
            self._reading = outer  # nested blocks share the outermost block's search

    @property
    def read_only(self) -> bool:
        """Whether the caller is inside :meth:`unchanged` (surgery must wait)."""
        return self._reading is not None

    @functools.cached_property
    def attention_free(self) -> bool:
        """Whether no traced node is attention-like (:func:`attention_kind`): then no group's
        channels go through attention, and groups need not be searched one by one for it (a
        ResNet-50's would cost 4 ms). Fixed by the trace, so worked out once: surgery swaps the
        tensors a node holds, never its operation (a MultiheadAttention whose heads are cut
        stays one)."""
        return all(attention_kind(node) is None for node in self.DG.module2node.values())

    def _shared_search(self) -> GraphSearch | None:
        """Inside :meth:`unchanged`, the block's group search; outside, None (each group read
        then builds its own, so that it sees earlier pruning)."""
        return None if self._reading is None else self._reading.search

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
                        f"ignored_layers: {type(item).__name__} module is not part of the model")
                module = item
            else:
                raise TypeError("ignored_layers must hold module names or modules, "
                                f"got {type(item).__name__}")
            out.extend(module.modules())
        return out

    def first_run(self, types) -> nn.Module | None:
        """The first module of ``types`` to run in the traced forward pass (e.g. the stem conv:
        the first convolution the input meets), or None."""
        return next((m for m in self._executed if isinstance(m, types)), None)

    def _build_dependency(self) -> tp.DependencyGraph:
        model = self.model
        grads = {p: p.requires_grad for p in model.parameters()}
        hooks = _HookState(model)
        forward = ForwardDiagnosis(self._names, self.output_transform)
        try:
            for p in grads:  # frozen layers fed by plain inputs would have no grad_fn to trace
                p.requires_grad_(True)
            with (torch.enable_grad(), eval_mode(model), no_kv_cache(model),
                  warnings.catch_warnings()):
                # Torch-Pruning warns about ops it treats as element-wise; the surgery check
                # is what tells whether that was right.
                warnings.simplefilter("ignore")
                DG = tp.DependencyGraph().build_dependency(
                    model, self.example_inputs, forward_fn=forward, verbose=False,
                    customized_pruners=_customized_pruners(model))
        except TraceError as e:
            raise ValueError(str(e)) from e.__cause__
        except ValueError:
            raise
        except Exception as e:  # Torch-Pruning failed on some op of the autograd graph
            raise ValueError(
                f"Torch-Pruning could not trace the model: {type(e).__name__}: {e}"
                f"{_where_tracing_failed(e, self._names)}") from e
        finally:
            hooks.restore()  # Torch-Pruning leaves its hooks behind when the forward fails
            for p, flag in grads.items():
                p.requires_grad_(flag)
        self.reference_shapes = forward.reference_shapes
        self._output_grad_fns = forward.output_grad_fns
        self._executed = forward.executed
        unreached = [m for m in forward.executed
                     if isinstance(m, (*PRODUCER_TYPES, BATCHNORM_TYPES))
                     and m not in DG.module2node]
        if unreached:
            name = self._names[unreached[-1]]
            raise ValueError(
                f"cannot trace the model: the autograd graph from its output does not reach "
                f"{name!r} ({type(unreached[-1]).__name__}); an operation after it cuts the graph "
                f"(.detach(), .data, .numpy(), .item(), torch.no_grad(), integer ops)")
        return DG

    def _find_groups(self, progress: bool) -> tuple[list[ChannelGroup], list[ChannelGroup]]:
        groups, to_output, not_prunable = [], set(), set()
        ties = [{id(m) for m, _ in places} for places in surgery.shared_parameters(self.model)]
        for tp_group in find_groups(self.DG, ignored_layers=self.ignored_layers,
                                    root_module_types=PRODUCER_TYPES, progress=progress):
            g = self._describe(tp_group)
            groups.append(g)
            if self._reaches_output(tp_group):
                to_output.add(g.name)
            if ties and self._splits_a_tie(tp_group, ties):
                not_prunable.add(g.name)
            if any(_shuffles_channels(dep.target) for dep, _ in tp_group):
                not_prunable.add(g.name)  # Torch-Pruning maps a channel shuffle wrongly
        groups.sort(key=lambda g: self._order[g.name])
        inner = {n for h in self.head_groups for r, n in h.projections.items() if r != "o"}
        inner |= {f"{n}.out_proj" for n in unsupported_attention(self.model)}
        prunable = [g for g in groups
                    if g.name not in to_output and g.name not in not_prunable
                    and (self.prune_coupled or not g.residual)
                    and not inner.intersection(g.producers)]
        return prunable, groups

    def _splits_a_tie(self, tp_group, ties: list[set[int]]) -> bool:
        """Whether the group reaches some but not all holders of a tied parameter (BERT's MLM
        head: its transform's channels are the input columns of a decoder whose weight is the
        word embedding, which the group does not reach): pruning it would untie them, which
        the surgery refuses, so the group is not prunable."""
        members = set()
        for dep, _ in tp_group:
            m = dep.target.module
            if isinstance(m, nn.Parameter):
                name = self._owner_name(m)
                m = self.module(name) if name is not None else None
            if isinstance(m, nn.Module):
                members.add(id(m))
        return any(members & holders and not holders <= members for holders in ties)

    def _owner_name(self, m) -> str | None:
        """The module name of a group member: a module's own name, or for an unwrapped parameter
        (Torch-Pruning's node for e.g. ``LlamaRMSNorm.weight``) the name of the module holding
        it; None for Torch-Pruning's own ops (add, concat, reshape)."""
        if isinstance(m, nn.Parameter):
            pname = getattr(self.DG, "_param_to_name", {}).get(m)
            return pname.rsplit(".", 1)[0] if pname and "." in pname else None
        return self._names.get(m)

    def _describe(self, tp_group) -> ChannelGroup:
        producers, depthwise, bns, consumers, norms = [], set(), [], [], []
        for dep, _ in tp_group:
            m, fn = dep.target.module, dep.handler
            name = self._owner_name(m)
            if name is None:
                continue
            if isinstance(m, nn.Parameter):
                if name in self._order and is_norm(self.module(name)):
                    norms.append(name)
                continue
            if isinstance(m, PRODUCER_TYPES) and self.DG.is_out_channel_pruning_fn(fn):
                producers.append(name)
                if is_depthwise(m):
                    depthwise.add(name)
            elif isinstance(m, PRODUCER_TYPES) and self.DG.is_in_channel_pruning_fn(fn):
                consumers.append(name)
            elif isinstance(m, BATCHNORM_TYPES):
                bns.append(name)
            elif is_norm(m):
                norms.append(name)
        producers = sorted(set(producers), key=self._order.get)
        root = self.module(producers[0])
        coupled = len(set(producers) - depthwise) > 1
        summed = coupled and _joined_by(tp_group, ("AddBackward", "SubBackward"))
        return ChannelGroup(
            name=producers[0],
            producers=producers,
            bns=sorted(set(bns), key=self._order.get),
            consumers=sorted(set(consumers) - set(producers), key=self._order.get),
            n_channels=int(self.DG.get_out_channels(root)),
            coupled=coupled,
            norms=sorted(set(norms), key=self._order.get),
            residual=summed,
            gated=coupled and not summed and _joined_by(tp_group, ("MulBackward",)),
            _graph=self,
            _root=root,
            _root_fn=self.DG.get_pruner_of_module(root).prune_out_channels,
        )

    def _reaches_output(self, tp_group) -> bool:
        """True when pruning the group would change the model's output (e.g. the final
        classifier's outputs): some node carrying these channels feeds nothing but the output."""
        for dep, _ in tp_group:
            node, fn = dep.target, dep.handler
            if (isinstance(node.module, PRODUCER_TYPES) and self.DG.is_in_channel_pruning_fn(fn)
                    and not is_depthwise(node.module)):
                continue  # the channels end here (input side of a consumer)
            if node.type == tp.ops.OPTYPE.OUTPUT or not node.outputs:
                return True
            if node.grad_fn is not None and node.grad_fn in self._output_grad_fns:
                return True  # it makes an output tensor that also feeds on (BERT's hidden states)
        return False

    # -- public API --------------------------------------------------------------------------

    def module(self, name: str) -> nn.Module:
        """The submodule called ``name`` (ValueError if there is none)."""
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module named {name!r}") from None

    def name_of(self, module: nn.Module) -> str:
        """The name of ``module`` in the model (as when the graph was built)."""
        return self._names[module]

    def check_group(self, group) -> ChannelGroup:
        """``group``, checked to be one of this graph's groups."""
        if not isinstance(group, ChannelGroup):
            raise TypeError(f"group must be a ChannelGroup, got {type(group).__name__}")
        if group._graph is not self:
            raise ValueError(f"group {group.name!r} belongs to another ModelGraph")
        return group

    def check_keep(self, group: ChannelGroup, keep) -> np.ndarray:
        """``keep`` as sorted, unique int64 indices into the group's current channels."""
        self.check_group(group)
        if np.size(keep) == 0:  # before the dtype check: [] is float64 to numpy
            raise ValueError(f"keep is empty: group {group.name!r} must keep at least one channel")
        keep = as_int_array(keep, "keep", ndim=1)
        if keep.min() < 0 or keep.max() >= group.n_channels:
            raise ValueError(
                f"keep has indices outside [0, {group.n_channels}) for group {group.name!r}")
        if len(np.unique(keep)) != len(keep):
            raise ValueError(f"keep has repeated indices for group {group.name!r}")
        return np.sort(keep)

    def prune_channels(self, group: ChannelGroup, keep) -> None:
        """Keep only channels ``keep`` (1-D ints into the group's current channels) of ``group``:
        remove the others from every producer, BN and consumer. Channel order is preserved."""
        self.prune_groups([(group, keep)])

    def prune_groups(self, plan) -> None:
        """Prune several groups at once: ``plan`` is a list of ``(group, keep)``. All or nothing:
        checked with a single forward pass; on failure the model is restored and a ValueError
        names the group that breaks it (see :func:`accelprune.surgery.prune_groups`)."""
        plan = [(g, self.check_keep(g, keep)) for g, keep in plan]
        surgery.prune_groups(self, [(g, keep) for g, keep in plan if len(keep) < g.n_channels])
        sync_config(self.model)  # a Hugging Face config follows the new widths


class _ReadBlock:
    """One (outermost) :meth:`ModelGraph.unchanged` block. Its group search caches widths and
    refreshes Torch-Pruning's index mappings once, so it is valid only while nothing is pruned:
    hence built on the block's first group read and dropped when the block ends."""

    def __init__(self, DG: tp.DependencyGraph):
        self.DG = DG

    @functools.cached_property
    def search(self) -> GraphSearch:
        return GraphSearch(self.DG)


# Matrix products among traced operations: attention's q·kᵀ, or a layer's own product.
MATMUL_OPS = frozenset("Mm Addmm Bmm Baddbmm Matmul Mv Dot".split())


def op_name(node) -> str:
    """A traced node's operation, from its autograd function (``AddmmBackward0``: ``Addmm``)."""
    fn = node.grad_fn
    name = fn.name() if hasattr(fn, "name") else type(fn).__name__
    return re.sub(r"Backward\d*$", "", name)


def attention_kind(node) -> str | None:
    """"attention" for a MultiheadAttention, scaled-dot-product attention, softmax or attention
    node, "matmul" for a matrix product (attention's q·kᵀ, or a layer's own), else None."""
    if isinstance(node.module, nn.MultiheadAttention):
        return "attention"
    if node.type != tp.ops.OPTYPE.ELEMENTWISE or node.grad_fn is None:
        return None
    op = op_name(node)
    if "ScaledDotProduct" in op or "Softmax" in op or "Attention" in op:
        return "attention"
    return "matmul" if op in MATMUL_OPS else None


def _joined_by(tp_group, ops: tuple[str, ...]) -> bool:
    """Some element-wise operation whose grad_fn name starts with one of ``ops`` takes two of
    the group's tensors: ("AddBackward", "SubBackward"), the producers' outputs are summed, as
    in a residual stream; ("MulBackward",), they are multiplied, as in a gated MLP."""
    nodes = {dep.target for dep, _ in tp_group} | {dep.source for dep, _ in tp_group}
    for node in nodes:
        if node.type != tp.ops.OPTYPE.ELEMENTWISE:
            continue
        op = type(node.grad_fn).__name__ if node.grad_fn is not None else ""
        if op.startswith(ops) and sum(
                i in nodes for i in node.inputs) >= 2:
            return True
    return False


class _RMSNormPruner(tp.pruner.BasePruningFunc):
    """torch's ``nn.RMSNorm``: Torch-Pruning (1.6) sees only its weight as a bare parameter and
    would leave ``normalized_shape`` stale; this prunes the weight and the shape together."""

    TARGET_MODULES = nn.RMSNorm

    def prune_out_channels(self, layer: nn.RMSNorm, idxs) -> nn.Module:
        n = layer.normalized_shape[-1]
        keep = torch.tensor(sorted(set(range(n)) - {int(i) for i in idxs}), dtype=torch.long)
        if layer.weight is not None:
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, -1)
        layer.normalized_shape = (*layer.normalized_shape[:-1], len(keep))
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.RMSNorm) -> int:
        return layer.normalized_shape[-1]

    get_in_channels = get_out_channels


def _customized_pruners(model: nn.Module) -> dict:
    """Pruners Torch-Pruning lacks, for the module types present in ``model``."""
    pruners = {}
    if any(isinstance(m, nn.RMSNorm) for m in model.modules()):
        pruners[nn.RMSNorm] = _RMSNormPruner()
    return pruners


class _HookState:
    """Every module's hook dictionaries, to put back after a failed trace."""

    _DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
              "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks_with_kwargs")

    def __init__(self, model: nn.Module):
        self.saved = [(m, name, dict(getattr(m, name))) for m in model.modules()
                      for name in self._DICTS if isinstance(getattr(m, name, None), dict)]

    def restore(self) -> None:
        for m, name, content in self.saved:
            d = getattr(m, name)
            if d.keys() != content.keys():
                d.clear()
                d.update(content)


def prune_channels(group: ChannelGroup, keep) -> None:
    """Module-level form of :meth:`ModelGraph.prune_channels` (forwards to the group's graph)."""
    if not isinstance(group, ChannelGroup):
        raise TypeError(f"group must be a ChannelGroup, got {type(group).__name__}")
    group._graph.prune_channels(group, keep)

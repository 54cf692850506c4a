"""Channel groups from Torch-Pruning's dependency graph, in time linear in the graph.

:func:`find_groups` is a drop-in for ``DG.get_all_groups(ignored_layers, root_module_types)`` and
:func:`pruning_group` for ``DG.get_pruning_group(module, pruning_fn, idxs)``: they return
Torch-Pruning ``Group`` objects (``for dep, idxs in group``, ``item.root_idxs``,
``group.prune()``) with the same members and indices, built from the same dependency edges and
index mappings. :func:`find_groups_ref` is Torch-Pruning's own search, the oracle of the tests.

Why Torch-Pruning's search hangs (torch-pruning 1.6.1)
-------------------------------------------------------
``get_all_groups`` calls ``get_pruning_group`` once per unvisited root, and that walks the
dependency edges depth-first carrying the *whole* list of ``(idx, root_idx)`` pairs. It stops a
path only when the target already holds the very same list (``Group.has_pruning_op``: same
target, same handler, equal list). Three costs follow:

1. **Non-termination on LLaMA** (the 4-minute hang). Hugging Face's ``rotate_half`` ends in
   ``torch.cat((-x2, x1), dim=-1)`` on the 4-D ``(batch, heads, seq, head_dim)`` tensor.
   ``CatBackward0._saved_dim`` reads -1 as the unsigned 18446744073709551615, which slips past the
   guard ``_saved_dim != 1 and _saved_dim < MAX_VALID_DIM`` in ``update_concat_index_mapping``,
   so the concat gets a *channel* index mapping with offsets inferred from the layer widths:
   ``[0, 128, 256]`` for the key path (4 KV heads x 32), although the real halves are 16 wide on
   head_dim. Going through that concat maps channel ``i`` to ``i + 128``. The concat sits on a
   cycle of element-wise edges (the key tensor feeds both the slices into the concat and
   ``k * cos``; both reach the same ``add``; element-wise nodes propagate both ways), so each
   turn of the cycle shifts every index by another 128: the lists never repeat, the stop test
   never fires, and the walk runs forever with indices 128, 256, ..., 12800, ... (measured: the
   scaled-dot-product-attention node is re-entered with ever larger indices; every q/k/v root of
   every layer hits it, since SDPA couples q, k and v element-wise). The query path's concat got
   no mapping only because its widths could not be inferred (``concat_sizes`` None), so TP is
   not even consistent between q and k. Same symptom: VainF/Torch-Pruning#527 (Qwen3-8B).
2. **Quadratic work per group**, even where it terminates: ``has_pruning_op`` (for every item
   added) and ``add_and_merge`` (for every item merged) scan the whole group list, comparing
   ``c``-long index lists where the target matches, and an item is added again each time a
   different list reaches it. A group of ``k`` items thus costs at least ``O(k^2)`` scans; the
   residual stream of a transformer has items in every layer, so ``k`` grows with depth
   (measured in benchmarks/bench_groups.py: nn.TransformerEncoder, 6 -> 24 layers).
3. **A full-graph pass per root**: ``index_mapping.update_index_mapping`` (every concat, split,
   reshape, slice) runs at the start of every ``get_pruning_group``.

How this module computes the same groups
----------------------------------------
A group is the set of pairs ``(state, idx)`` reachable from ``(root, i)`` for the root's
channels ``i``, where a state is ``(node, handler)`` and each dependency edge whose trigger is
the state's handler maps indices through its index mappings. Every TP mapping acts on each index
independently (concat/split/slice shift or filter, flatten expands or divides, GQA repeats), so
the union of the lists TP's walk carries equals this reachable set. :func:`_propagate` computes
it with a worklist that carries only the *new* indices of a state (numpy arrays, vectorised
mappings), so every (state, idx) pair is expanded once: time linear in the size of the group.
Index mappings are refreshed once per search, and roots are taken in TP's order with TP's
"skip a root already in an earlier group" rule, so the list of groups is TP's.

Where the result differs from Torch-Pruning's
---------------------------------------------
* Member sets and index sets are identical. Items are merged per ``(target, handler)`` like TP;
  their order is first-discovery order (TP's on every model tested, not guaranteed in general).
  The ``root_idx`` of an index reached along several paths is that of the first arrival.
* **A mapping that sends an index outside a layer's width is switched off.** When an index that
  has passed an index mapping lands outside the channel range of a real layer (Linear, Conv,
  norm, embedding, parameter), or any index leaves ``[0, bound)`` with ``bound`` the sum of all
  layer widths, TP's own answer is wrong (importance would index out of range) or infinite. The
  op that owns the last mapping on that path (here LLaMA's ``rotate_half`` concat of the keys)
  then becomes a pass-through, as TP already treats a concat whose widths it cannot infer (the
  queries' one), and the search is repeated (all of it, if an earlier group went through that
  op's mapping). The switched-off ops are remembered per graph (so
  :func:`pruning_group` at pruning time agrees with the search), logged at INFO, and listed by
  :func:`overridden_mappings`. On every model where TP terminates that the tests cover, nothing
  is switched off and the groups are equal.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Iterable, Sequence
from numbers import Number

import numpy as np
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.dependency.dependency import Dependency
from tqdm.auto import tqdm

__all__ = ["find_groups", "find_groups_ref", "pruning_group", "GraphSearch",
           "overridden_mappings"]

_log = logging.getLogger(__name__)

DEFAULT_ROOT_TYPES = (ops.TORCH_CONV, ops.TORCH_LINEAR)

# Ops whose nodes carry no weights: no width to check indices against.
_OP_TYPES = frozenset(
    {
        ops.OPTYPE.CONCAT,
        ops.OPTYPE.SPLIT,
        ops.OPTYPE.ELEMENTWISE,
        ops.OPTYPE.RESHAPE,
        ops.OPTYPE.UNBIND,
        ops.OPTYPE.EXPAND,
        ops.OPTYPE.SLICE,
        ops.OPTYPE.OUTPUT,
        ops.OPTYPE.CUSTOMIZED,
    }
)

# Which node type owns each kind of index mapping (the op whose update function set it).
_MAPPING_OWNER = {
    tp_index_mapping._ConcatIndexMapping: (ops.OPTYPE.CONCAT,),
    tp_index_mapping._SplitIndexMapping: (ops.OPTYPE.SPLIT, ops.OPTYPE.UNBIND),
    tp_index_mapping._SliceIndexMapping: (ops.OPTYPE.SLICE,),
    tp_index_mapping._FlattenIndexMapping: (ops.OPTYPE.RESHAPE, ops.OPTYPE.LINEAR),
    tp_index_mapping._GQAIndexMapping: (ops.OPTYPE.EXPAND,),
}

# Per dependency graph: the op nodes whose index mappings are switched off (see module doc).
_OVERRIDDEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_NO_ROOT = -1  # root_idx None (TP's GQA mapping forgets the root)


# -- public API ------------------------------------------------------------------------------


def find_groups(
    DG: tp.DependencyGraph,
    *,
    ignored_layers: Iterable[nn.Module] = (),
    root_module_types: Sequence[type] = DEFAULT_ROOT_TYPES,
    progress: bool = False,
) -> list[tp.dependency.Group]:
    """All channel groups of ``DG``: the groups ``DG.get_all_groups(ignored_layers,
    root_module_types)`` yields, as a list, in linear time (see the module docstring).

    Args:
        DG: a built ``torch_pruning.DependencyGraph``.
        ignored_layers: modules whose output channels must not be pruned; a group that prunes
            the output of any of them is left out (TP's rule, identity comparison).
        root_module_types: module types a group may start from (TP's default: conv, linear).
        progress: show a tqdm bar over the candidate roots.

    Returns:
        ``torch_pruning`` ``Group`` objects holding all channels of their root, root first.
    """
    _check_graph(DG)
    root_types = _check_root_types(root_module_types)
    ignored = {id(m) for m in (*_as_list(ignored_layers), *DG.IGNORED_LAYERS_IN_TRACING)}
    roots = [
        m
        for m in list(DG.module2node)
        if id(m) not in ignored and isinstance(m, root_types) and _out_channels(DG, m) is not None
    ]
    search = GraphSearch(DG)
    while True:
        groups, used = _all_groups(DG, search, roots, ignored, progress)
        # a group found before an op was switched off may have used its mapping: search again
        # (the switched-off set only grows, so this ends; on LLaMA no group is stale)
        if not any(u & search.off for u in used):
            return groups


def _all_groups(DG, search, roots, ignored, progress):
    """TP's get_all_groups loop: roots in graph order, skipping any already pruned as an output
    in an earlier group; a group touching an ignored layer's outputs is left out."""
    visited, groups, used = set(), [], []
    for m in tqdm(roots, desc="channel groups", unit="root", disable=not progress, leave=False):
        if id(m) in visited:
            continue
        pruner = DG.get_pruner_of_module(m)
        group = search.group(m, pruner.prune_out_channels, range(pruner.get_out_channels(m)))
        used.append(search.used)
        prunable = True
        for dep, _ in group:
            if DG.is_out_channel_pruning_fn(dep.handler):
                visited.add(id(dep.target.module))
                prunable = prunable and id(dep.target.module) not in ignored
        if prunable:
            groups.append(group)
    return groups, used


def find_groups_ref(
    DG: tp.DependencyGraph,
    *,
    ignored_layers: Iterable[nn.Module] = (),
    root_module_types: Sequence[type] = DEFAULT_ROOT_TYPES,
) -> list[tp.dependency.Group]:
    """Torch-Pruning's own ``get_all_groups``, as a list: the reference :func:`find_groups`
    is tested against. May not terminate (Hugging Face LLaMA: see the module docstring)."""
    _check_graph(DG)
    return list(
        DG.get_all_groups(
            ignored_layers=_as_list(ignored_layers),
            root_module_types=_check_root_types(root_module_types),
        )
    )


def pruning_group(DG: tp.DependencyGraph, module, pruning_fn, idxs, *,
                  search: GraphSearch | None = None) -> tp.dependency.Group:
    """Drop-in for ``DG.get_pruning_group(module, pruning_fn, idxs)``: the group that pruning
    ``idxs`` of ``module`` with ``pruning_fn`` implies, in linear time. Use it at pruning time
    too, so that ops switched off by :func:`find_groups` stay switched off.

    ``search``: a :class:`GraphSearch` of ``DG`` to reuse (several groups, no pruning between).
    """
    _check_graph(DG)
    if module not in DG.module2node:
        raise ValueError(f"module {module} is not in the dependency graph")
    if search is not None and search.DG is not DG:
        raise ValueError("search belongs to another dependency graph")
    if isinstance(idxs, Number):
        idxs = [idxs]
    return (search or GraphSearch(DG)).group(module, pruning_fn, idxs)


def overridden_mappings(DG: tp.DependencyGraph) -> list[str]:
    """Names of the ops whose Torch-Pruning index mapping was switched off for ``DG`` because
    it sent channels outside a layer's width (empty on graphs TP handles correctly)."""
    return sorted(node.name for node in _OVERRIDDEN.get(DG, ()))


# -- the search ------------------------------------------------------------------------------


class _BadMapping(Exception):
    """An index left the valid range after passing the index mapping owned by ``owner``."""

    def __init__(self, owner, where):
        super().__init__(owner, where)
        self.owner, self.where = owner, where


class _State:
    """Indices reached at one ``(node, handler)``: first dependency, indices in arrival order."""

    __slots__ = ("dep", "idx", "root", "seen")

    def __init__(self, dep):
        self.dep, self.idx, self.root, self.seen = dep, [], [], None

    def add(self, idx: np.ndarray, root: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Record the indices not seen before here (``idx`` has no repeats); return them."""
        if self.seen is None:  # first arrival, by far the most common case
            self.seen = idx
        elif idx is self.seen or (len(idx) == len(self.seen) and np.array_equal(idx, self.seen)):
            return idx[:0], root[:0]  # the way back over an edge: the same indices again
        else:
            keep = ~np.isin(idx, self.seen)
            idx, root = idx[keep], root[keep]
            if len(idx) == 0:
                return idx, root
            self.seen = np.concatenate([self.seen, idx])
        self.idx.append(idx)
        self.root.append(root)
        return idx, root


class GraphSearch:
    """Group search over one dependency graph (index mappings refreshed once, as TP does per
    call; widths cached for the search's lifetime: build a new one after pruning). One search
    can serve several :func:`pruning_group` calls while the graph does not change (about half
    of a group's cost is building it)."""

    def __init__(self, DG: tp.DependencyGraph):
        _check_graph(DG)
        self.DG = DG
        tp_index_mapping.update_index_mapping(DG)
        self.off = _OVERRIDDEN.setdefault(DG, set())
        self.used: set = set()
        self._widths: dict = {}

    @functools.cached_property
    def bound(self) -> int:
        """1 + every layer's widths: no valid index reaches it. Summed on first use, i.e. only
        when indices come through an index mapping (most of a search's start-up otherwise)."""
        return 1 + sum(
            w for node in self.DG.module2node.values() if node.type not in _OP_TYPES
            for w in (self._width(node, True), self._width(node, False)) if w
        )

    def group(self, module, pruning_fn, idxs) -> tp.dependency.Group:
        DG = self.DG
        if (
            isinstance(module, ops.TORCH_CONV)
            and module.groups == module.out_channels
            and module.out_channels > 1
        ):
            pruning_fn = tp.pruner.function.prune_depthwise_conv_out_channels  # as TP does
        idx = np.asarray([int(i) for i in idxs], dtype=np.int64)
        idx, _ = _first_of_each(idx, idx)  # a repeated root index adds nothing
        while True:
            self.used = set()  # the ops whose index mappings this group went through
            try:
                states = self._propagate(DG.module2node[module], pruning_fn, idx)
                break
            except _BadMapping as bad:
                self.off.add(bad.owner)  # always a new op: the loop ends
                _log.info(
                    "Torch-Pruning's index mapping of %s sends channels outside %s; treating "
                    "it as a pass-through",
                    bad.owner.name,
                    bad.where,
                )
        return self._to_group(states)

    def _propagate(self, root_node, fn, idx: np.ndarray) -> dict:
        """All (state -> indices) reachable from the root; raises _BadMapping (see module doc)."""
        root_dep = Dependency(fn, fn, source=root_node, target=root_node)
        first = _State(root_dep)
        states = {(root_node, fn): first}
        new_idx, new_root = first.add(idx, idx.copy())
        stack = [(root_node, fn, new_idx, new_root, None)]
        while stack:
            node, fn, idx, root, owner = stack.pop()
            for dep in node.dependencies:
                if not dep.is_triggered_by(fn):
                    continue
                m_idx, m_root, m_owner = self._map(dep, idx, root, owner)
                if len(m_idx) == 0:
                    continue
                key = (dep.target, dep.handler)
                state = states.get(key)
                if state is None:
                    state = states[key] = _State(dep)
                m_idx, m_root = state.add(m_idx, m_root)
                if len(m_idx) == 0:
                    continue
                self._check_range(dep, m_idx, m_owner)
                stack.append((dep.target, dep.handler, m_idx, m_root, m_owner))
        return states

    def _map(self, dep, idx, root, owner):
        for mapping in dep.index_mapping:
            if mapping is None:
                continue
            mapping_owner = self._owner(dep, mapping)
            if mapping_owner is not None and mapping_owner in self.off:
                continue
            idx, root = _apply_mapping(mapping, idx, root)
            if mapping_owner is not None:
                owner = mapping_owner
                self.used.add(mapping_owner)
        return idx, root, owner

    def _owner(self, dep, mapping):
        """The op whose update function set ``mapping`` on ``dep`` (any op end for a mapping
        class this module does not know)."""
        types = _MAPPING_OWNER.get(type(mapping), _OP_TYPES)
        for node in (dep.source, dep.target):
            if node.type in types:
                return node
        return None

    def _check_range(self, dep, idx: np.ndarray, owner) -> None:
        if owner is None:
            return  # no mapping on the path: TP's answer, whatever it is, is finite
        lo, hi = int(idx.min()), int(idx.max())
        node = dep.target
        if lo < 0 or hi >= self.bound:
            raise _BadMapping(owner, f"[0, {self.bound}) at {node.name}")
        if node.type in _OP_TYPES:
            return
        width = self._width(node, self.DG.is_out_channel_pruning_fn(dep.handler))
        if width is not None and hi >= width:
            raise _BadMapping(owner, f"the {width} channels of {node.name}")

    def _width(self, node, out: bool):
        key = (node, out)
        if key not in self._widths:
            try:
                get = self.DG.get_out_channels if out else self.DG.get_in_channels
                w = get(node)
            except Exception:  # a pruner without a notion of width (customised layers)
                w = None
            self._widths[key] = int(w) if isinstance(w, Number) else None
        return self._widths[key]

    def _to_group(self, states: dict) -> tp.dependency.Group:
        """TP's merged group: one item per (target, handler), plain idxs and ``root_idxs``."""
        ignored_params = list(getattr(self.DG, "ignored_params", None) or ())
        group = tp.dependency.Group()
        group._DG = self.DG
        as_list = _ListCache()
        for state in states.values():
            target = state.dep.target.module
            if isinstance(target, nn.Parameter) and any(target is p for p in ignored_params):
                continue
            item = _helpers.GroupItem(state.dep, as_list(state.idx))
            item.root_idxs = as_list(state.root, none=_NO_ROOT)
            group._group.append(item)
        return group


class _ListCache:
    """Python lists of numpy chunks; most states carry the very same array (no mapping on the
    way), so convert each array once and hand out copies (TP's items own their lists)."""

    def __init__(self):
        self._lists: dict[int, list] = {}
        self._alive: list = []  # keeps the arrays alive so that their ids stay unique

    def __call__(self, chunks: list[np.ndarray], none=None) -> list:
        if len(chunks) != 1:
            return self._convert(np.concatenate(chunks), none)
        key = id(chunks[0])
        if key not in self._lists:
            self._alive.append(chunks[0])
            self._lists[key] = self._convert(chunks[0], none)
        return list(self._lists[key])

    @staticmethod
    def _convert(a: np.ndarray, none) -> list:
        out = a.tolist()
        if none is not None and len(a) and a.min() == none:
            out = [None if v == none else v for v in out]
        return out


# -- Torch-Pruning's index mappings, vectorised ----------------------------------------------


def _apply_mapping(mapping, idx: np.ndarray, root: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``mapping`` applied to each (idx, root) pair, as TP's callable does on _HybridIndex lists,
    then duplicates of an index dropped (first kept), as TP's merge does."""
    kind = type(mapping)
    if kind is tp_index_mapping._ConcatIndexMapping:
        lo, hi = mapping.offset[0], mapping.offset[1]
        if mapping.reverse:
            keep = (idx >= lo) & (idx < hi)
            return idx[keep] - lo, root[keep]
        return idx + lo, root
    if kind is tp_index_mapping._SplitIndexMapping:
        lo, hi = mapping.offset[0], mapping.offset[1]
        if mapping.reverse:
            return idx + lo, root
        keep = (idx >= lo) & (idx < hi)
        return idx[keep] - lo, root[keep]
    if kind is tp_index_mapping._SliceIndexMapping:
        start, step, end = mapping.start, mapping.step, mapping.end
        if mapping.reverse:
            return idx * step + start, root
        keep = (idx >= start) & (idx < end) & ((idx - start) % step == 0)
        return (idx[keep] - start) // step, root[keep]
    if kind is tp_index_mapping._FlattenIndexMapping:
        stride = mapping._stride
        if mapping.reverse:
            return _first_of_each(idx // stride, root)
        return (idx[:, None] * stride + np.arange(stride)).ravel(), np.repeat(root, stride)
    if kind is tp_index_mapping._GQAIndexMapping:
        if not mapping.reverse:
            return idx[:0], root[:0]
        hd, rep = mapping.head_dim, mapping.repeat
        new = idx - idx // (hd * rep) * hd * (rep - 1) - idx // hd % rep * hd
        return _first_of_each(new, np.full_like(root, _NO_ROOT))
    return _apply_tp_mapping(mapping, idx, root)


def _first_of_each(idx: np.ndarray, root: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, first = np.unique(idx, return_index=True)
    first.sort()
    return idx[first], root[first]


def _apply_tp_mapping(mapping, idx: np.ndarray, root: np.ndarray):
    """Any other mapping (a future TP version, a customised one): TP's callable itself."""
    hybrid = [
        _helpers._HybridIndex(idx=i, root_idx=None if r == _NO_ROOT else r)
        for i, r in zip(idx.tolist(), root.tolist(), strict=True)
    ]
    out = mapping(hybrid)
    new_idx = np.asarray([h.idx for h in out], dtype=np.int64)
    new_root = np.asarray([_NO_ROOT if h.root_idx is None else h.root_idx for h in out], np.int64)
    return _first_of_each(new_idx, new_root)


# -- argument checks -------------------------------------------------------------------------


def _check_graph(DG) -> None:
    if not isinstance(DG, tp.DependencyGraph):
        raise TypeError(f"DG must be a torch_pruning.DependencyGraph, got {type(DG).__name__}")
    if not hasattr(DG, "module2node"):
        raise ValueError("DG has no graph yet: call DG.build_dependency(model, example_inputs)")


def _check_root_types(root_module_types) -> tuple[type, ...]:
    if isinstance(root_module_types, type):
        root_module_types = (root_module_types,)
    types = tuple(root_module_types)
    if not all(isinstance(t, type) for t in types):
        raise TypeError("root_module_types must be classes (e.g. torch.nn.Linear)")
    return types


def _as_list(ignored_layers) -> list:
    if ignored_layers is None:
        return []
    if isinstance(ignored_layers, nn.Module):
        return [ignored_layers]
    return list(ignored_layers)


def _out_channels(DG, m):
    pruner = DG.get_pruner_of_module(m)
    return None if pruner is None else pruner.get_out_channels(m)

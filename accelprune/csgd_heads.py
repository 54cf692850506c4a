"""C-SGD on whole attention heads (``CSGD(..., head_sparsity=...)``): which heads fold exactly,
their features for clustering, the row labels the gradient transform uses, and the fold.

A *unit* is what :class:`accelprune.attention.HeadGroup` prunes: one query head, or under
grouped-query attention one key/value head with the query heads that read it. If two units of
one attention module have identical q, k and v rows (weights and biases, block by block: the
j-th row of one unit's q block equals the j-th row of the other's), they compute identical
attention outputs, whatever the input: the same projections, the same per-head operations
(scaling, RoPE, a per-head-dim q/k norm, the softmax over keys), on the same input. The output
projection sees the two outputs through its own column blocks, ``O_a·h + O_b·h = (O_a + O_b)·h``,
so unit b is removed after adding its o columns onto unit a's: the model does not move.

So the transform pulls *rows* together: row j of unit u's q block is clustered with row j of
every unit in u's cluster (label ``cluster(u)·L + j`` for a projection whose unit blocks have L
rows), which is exactly what :func:`accelprune.kernels.csgd_transform_` does for channel groups,
with these labels instead of one label per channel.

The fold is exact only if nothing treats the heads of one module differently. Refused (listed
by name, with the reason, in ``CSGD.skipped``; ``strict=True`` raises):

* **state besides the projections**: any parameter or buffer in the attention module other than
  the q/k/v/o projections', a per-head-dim norm (``q_norm``/``k_norm`` of LLaMA relatives, timm:
  shared by every head) and rotary-embedding buffers (per position and dimension, the same for
  every head). Per-head position biases, attention sinks, talking-heads mixing are such state;
  C-SGD does not pull it together, so equal q/k/v rows would not give equal heads;
* **a projection parameter shared with another module** (the cut would untie it);
* **the probe**: before training, every unit's q/k/v rows are set (temporarily, on swapped-in
  copies) to unit 0's and the model is run once on the example inputs; the output projection's
  input blocks must then be equal for every unit. Catches what no parameter shows: head-dependent
  code in a forward (ALiBi slopes computed on the fly, per-head masks). ``nn.MultiheadAttention``
  is not probed (its output projection is not called as a module); its forward is PyTorch's own,
  uniform over heads;
* what :func:`accelprune.attention.unrecognised_attention` lists: ``nn.MultiheadAttention``
  layouts that cannot be cut, and other modules that look like attention but whose layout is
  not recognised (GPT-2's ``c_attn`` Conv1D, fused ``query_key_value`` layouts, per-head
  position biases...).

What stays per head: attention *weights* a model returns (Hugging Face ``output_attentions``,
``nn.MultiheadAttention``'s head-averaged ``need_weights``) describe the remaining heads; the
fold is exact for the attention output and everything computed from it.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from accelprune import surgery
from accelprune.attention import (
    HeadGroup,
    HeadSnapshot,
    cut_units,
    unrecognised_attention,
)
from accelprune.selection import cluster_filters
from accelprune.tracing import call_model, eval_mode

__all__ = ["cluster_heads", "fold_checked", "fold_heads", "foldable_head_groups",
           "head_fold_blockers", "head_params", "head_row_labels", "head_unit_features",
           "probe_head_folds", "shared_parameter_ids"]

# Relative tolerance of the probe (at least 4 ulps of the activations' dtype): identical heads
# computed by the same batched kernels agree to rounding; heads treated differently differ by more.
_PROBE_RTOL = 1e-5


# ---------------------------------------------------------------------------------------------
# which projections, which rows


def head_params(group: HeadGroup) -> list[tuple[str, nn.Module, str, bool]]:
    """The params whose rows are the units' q/k/v: ``(role, module, attribute, kernel)`` for
    every weight (``kernel=True``) and bias present (``"q"``, ``"k"``, ``"v"`` or ``"qkv"``)."""
    out = []
    for role in group.projections:
        if role == "o":
            continue
        m = group.module(role)
        w_attr, b_attr = group.param_names(role)
        out.append((role, m, w_attr, True))
        if isinstance(getattr(m, b_attr, None), torch.Tensor):
            out.append((role, m, b_attr, False))
    return out


def head_row_labels(group: HeadGroup, role: str, unit_labels: np.ndarray) -> np.ndarray:
    """Row labels of projection ``role`` for the transform: row j of unit u's block gets
    ``unit_labels[u] · L + j`` (L: rows per unit in that projection), so that the transform pulls
    corresponding rows of the units of one cluster together. (rows,) int64."""
    unit_labels = np.asarray(unit_labels, dtype=np.int64)
    table = group.unit_row_table(role)
    width = table.shape[1]
    labels = np.full(table.size, -1, dtype=np.int64)
    labels[table] = unit_labels[:, None] * width + np.arange(width)
    if (labels < 0).any():  # every row belongs to a unit in the layouts attention.py knows
        raise ValueError(f"head group {group.name!r}: projection {role!r} has rows of no unit")
    return labels


@torch.no_grad()
def head_unit_features(group: HeadGroup) -> np.ndarray:
    """(n_units, F) float64: each unit's q, k, v rows and biases, flattened and concatenated in
    a fixed order (what k-means clusters)."""
    parts = [group.unit_rows(role, getattr(m, attr).detach()).reshape(group.n_units, -1)
             .cpu().double() for role, m, attr, _ in head_params(group)]
    return torch.cat(parts, dim=1).numpy()


# ---------------------------------------------------------------------------------------------
# when is the head fold exact?


def _kind(m) -> str:
    return type(m).__name__


def _allowed_extra(owner: nn.Module, tensor: torch.Tensor, group: HeadGroup,
                   is_buffer: bool) -> bool:
    """State that is the same for every head: a norm over head_dim, rotary buffers."""
    kind = _kind(owner).lower()
    if "norm" in kind:
        return tuple(tensor.shape) == (group.head_dim,)
    return is_buffer and "rotary" in kind


def head_fold_blockers(group: HeadGroup, shared: set[int] | None = None) -> list[str]:
    """Why folding ``group``'s units would not be exact, from its structure (empty when none; the
    forward is checked by :func:`probe_head_folds`). ``shared``: ids of parameters held by
    several modules (:func:`accelprune.surgery.shared_parameters`)."""
    attn = group.module()
    # the projections' own tensors (a packed MultiheadAttention is its own "qkv" projection)
    own = {id(t) for role in group.projections
           for t in [*group.module(role).parameters(), *group.module(role).buffers()]}
    owners = {}
    for name, m in attn.named_modules():
        for attr, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is not None:
                where = ".".join(n for n in (group.name, name, attr) if n)
                owners.setdefault(id(t), (where, m, t, attr in m._buffers))
    extra = [where for i, (where, m, t, is_buffer) in owners.items()
             if i not in own and not _allowed_extra(m, t, group, is_buffer)]
    reasons = []
    if extra:
        reasons.append(f"{_kind(attn)} {group.name!r} has state besides its q/k/v/o projections "
                       f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}) that C-SGD "
                       "does not pull together: heads with equal q/k/v rows could still differ "
                       "(per-head position biases, attention sinks, head mixing)")
    shared = shared or set()
    tied = [f"{group.projections[role]}.{attr}" for role, m, attr, _ in head_params(group)
            if id(getattr(m, attr)) in shared]
    if id(group.module("o").weight) in shared:
        tied.append(f"{group.projections['o']}.weight")
    if tied:
        reasons.append(f"{', '.join(tied)} of {group.name!r} is shared with another module: "
                       "cutting its heads would untie it")
    return reasons


def shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters held by more than one module (tied weights)."""
    return {id(module._parameters[attr])
            for (module, attr), *_ in surgery.shared_parameters(model)}


@torch.no_grad()
def probe_head_folds(model: nn.Module, example_inputs, groups) -> dict[str, str]:
    """Attention name → reason, for the ``groups`` whose units, made identical, do not compute
    identical outputs on ``example_inputs``.

    Every unit's q/k/v rows are set to unit 0's on swapped-in copies (the model's own parameter
    objects are put back untouched, also on failure), the model is run once in eval mode, and
    the output projection's input is compared block by block. ``nn.MultiheadAttention``
    (``"packed"``) is not probed: its output projection is not called as a module.
    """
    probed = [g for g in groups if g.layout != "packed" and g.n_units > 1]
    if not probed:
        return {}
    captured: dict[str, torch.Tensor] = {}
    handles, swapped = [], []
    try:
        for g in probed:
            for role, m, attr, _ in head_params(g):
                t = m._parameters[attr]
                source = np.arange(t.shape[0])  # rows outside the units stay as they are
                table = g.unit_row_table(role)
                source[table] = table[0]
                swapped.append((m, attr, t))
                m._parameters[attr] = nn.Parameter(
                    t.detach().index_select(0, torch.as_tensor(source, device=t.device)),
                    requires_grad=False)

            def capture(module, args, name=g.name):
                if name not in captured and args and isinstance(args[0], torch.Tensor):
                    captured[name] = args[0].detach()

            handles.append(g.module("o").register_forward_pre_hook(capture))
        with eval_mode(model):
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, attr, t in reversed(swapped):
            m._parameters[attr] = t
    reasons = {}
    for g in probed:
        x = captured.get(g.name)
        if x is None:
            reasons[g.name] = (f"its output projection {g.projections['o']!r} did not run on the "
                               "example inputs: the head fold cannot be checked")
            continue
        blocks = x.double().reshape(-1, g.n_units, g.heads_per_unit * g.head_dim)
        gap = float((blocks - blocks[:, :1]).abs().max())
        scale = max(float(blocks.abs().max()), 1e-30)
        if not gap <= max(_PROBE_RTOL, 4 * torch.finfo(x.dtype).eps) * scale:
            reasons[g.name] = (f"{_kind(g.module())} {g.name!r} treats its heads differently: "
                               "with every unit's q/k/v rows made equal, the heads' outputs still "
                               f"differ by {gap:.3g} (scale {scale:.3g}) on the example inputs "
                               "(per-head biases such as ALiBi, per-head masks, head mixing)")
    return reasons


def foldable_head_groups(graph) -> tuple[list[HeadGroup], list[tuple[str, list[str]]]]:
    """The head groups of ``graph`` (an :class:`accelprune.graph.ModelGraph`) whose fold is
    exact, and ``(name, reasons)`` for every other attention module: the structural refusals
    (:func:`head_fold_blockers`), the probe's (:func:`probe_head_folds`) and the layouts not
    recognised (:func:`unrecognised_attention`)."""
    groups, model = graph.head_groups, graph.model
    shared = shared_parameter_ids(model)
    reasons = {g.name: head_fold_blockers(g, shared) for g in groups}
    probed = probe_head_folds(model, graph.example_inputs,
                              [g for g in groups if not reasons[g.name]])
    for name, why in probed.items():
        reasons[name].append(why)
    refused = [(name, [why]) for name, why
               in unrecognised_attention(model, graph.ignored_layers)]
    refused += [(g.name, reasons[g.name]) for g in groups if reasons[g.name]]
    return [g for g in groups if not reasons[g.name]], refused


def cluster_heads(groups, head_sparsity: float, *, method: str, seed: int,
                  backend: str) -> list[np.ndarray]:
    """Unit labels per head group (numbered by first appearance, as
    :func:`accelprune.selection.cluster_filters` gives them): ``method`` ("kmeans" or "even") on
    :func:`head_unit_features`, k = max(1, round((1 - head_sparsity) · units)); group i is
    seeded with ``seed + i``. ``backend``: C-SGD's ("reference" → scipy's k-means)."""
    out = []
    for i, g in enumerate(groups):
        k = max(1, round((1 - head_sparsity) * g.n_units))
        try:
            out.append(cluster_filters(head_unit_features(g), k, method=method, seed=seed + i,
                                       backend="reference" if backend == "reference" else "auto"))
        except ValueError as e:
            raise ValueError(f"cannot cluster the heads of {g.name!r}: {e}") from None
    return out


# ---------------------------------------------------------------------------------------------
# the fold


@torch.no_grad()
def fold_heads(group: HeadGroup, unit_labels) -> None:
    """In every cluster of units keep the lowest; add the output projection's column blocks of
    the others onto the kept unit's, then cut them (:func:`accelprune.attention.cut_units`).
    Unchecked: run under a :class:`accelprune.attention.HeadSnapshot` and check the model."""
    labels = np.asarray(unit_labels, dtype=np.int64)
    if labels.shape != (group.n_units,):
        raise ValueError(f"head group {group.name!r} has {group.n_units} units, got "
                         f"{labels.shape} labels")
    kept_of = dict(zip(*np.unique(labels, return_index=True), strict=True))
    o = group.module("o")
    w = o.weight.detach().clone()
    for u, lab in enumerate(labels):
        keep = int(kept_of[lab])
        if keep != u:
            into, add = (torch.as_tensor(group.rows([i])["o"], device=w.device)
                         for i in (keep, u))
            w[:, into] += w[:, add]
    o.weight = nn.Parameter(w, requires_grad=o.weight.requires_grad)
    cut_units(group, np.sort(np.array(list(kept_of.values()), dtype=np.int64)))


def fold_checked(graph, channel_folds, head_folds, fold_channels) -> None:
    """Channel folds (``(ChannelGroup, labels)``, done by ``fold_channels(graph, group,
    labels)``) and head folds (``(HeadGroup, unit labels)``, :func:`fold_heads`) in one
    surgery, checked by one forward pass. All or nothing: on any failure every module,
    attribute, config value and head count is put back and a ValueError says what failed and
    why, always in one shape: ``folding <what> failed (<error>); the model was restored
    unchanged``, <what> naming the fold (``channel group 'name'``, ``the heads of 'name'``) or,
    when the check fails, the folds it checked."""
    channels = surgery.ModelSnapshot(graph, [g for g, _ in channel_folds])
    heads = HeadSnapshot(graph.model, [g for g, _ in head_folds])
    steps = [(f"channel group {g.name!r}", functools.partial(fold_channels, graph, g, labels))
             for g, labels in channel_folds]
    steps += [(f"the heads of {g.name!r}", functools.partial(fold_heads, g, labels))
              for g, labels in head_folds]
    try:
        for name, fold in steps:
            what = name
            fold()
        what = _checked(steps)
        surgery.check_forward(graph)
    except Exception as e:
        heads.restore()
        channels.restore()
        raise ValueError(f"folding {what} failed ({type(e).__name__}: {e}); the model was "
                         "restored unchanged") from e


def _checked(steps) -> str:
    """What the forward check after the folds covers, for its error message."""
    if not steps:
        return "nothing (the forward check)"
    more = f" and {len(steps) - 1} more" if len(steps) > 1 else ""
    return f"{steps[0][0]}{more} (the forward check after folding)"

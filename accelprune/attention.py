"""Whole attention heads as pruning units: find them, score them, remove them all or nothing.

Channel pruning inside an attention block's inner dimension is wrong even where it runs: the
inner dimension is cut into heads by a reshape, so removing arbitrary channels shifts the head
boundaries. Heads are removed whole instead, and with grouped-query attention (fewer key/value
heads than query heads) the unit is one *key/value group*: a KV head and the query heads that
read it, so the ratio ``num_heads / num_kv_heads`` (which the modules' forwards rely on) stays.

Recognised layouts (by structure, not by class, so that relatives work too):

* ``"separate"``: children ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (Linear) and an int
  ``head_dim`` (Hugging Face LLaMA, Mistral, Qwen2...); or children ``query``, ``key``,
  ``value`` and an int ``attention_head_size`` with the output projection at the parent's
  ``output.dense`` (Hugging Face BERT, RoBERTa...).
* ``"fused"``: a child ``qkv`` Linear (rows q | k | v), ``proj`` Linear, int ``num_heads`` and
  ``head_dim`` (timm's ``Attention``, used by its ViTs). Skipped when it has a ``norm`` over the
  inner dimension or a ``gate``.

``nn.MultiheadAttention`` is not head-prunable in place: its forward requires the inner width to
equal the embedding width. Its modules are reported by :func:`unsupported_attention`.

After pruning, the head-count attributes the module keeps (``num_heads``,
``num_attention_heads``, ``num_key_value_heads``, ``all_head_size``, ``attn_dim``) are updated,
and a Hugging Face model's config is brought in step (:func:`accelprune.hf.sync_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from accelprune import surgery
from accelprune._validation import check_fraction, check_int
from accelprune.tracing import call_model, check_example_inputs, eval_mode, output_shapes

__all__ = ["HeadGroup", "find_head_groups", "head_scores", "prune_heads", "prune_head_groups",
           "unsupported_attention"]

# Attributes holding a head count or an inner width, updated after pruning when present.
_QUERY_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads")
_INNER_WIDTH_ATTRS = ("all_head_size", "attn_dim")


@dataclass(eq=False)
class HeadGroup:
    """One attention module's heads, pruned in units of key/value groups.

    name: the attention module (e.g. ``"model.layers.0.self_attn"``).
    layout: ``"separate"`` (q, k, v, o Linear layers) or ``"fused"`` (one qkv Linear).
    projections: role → module name: ``q``, ``k``, ``v``, ``o`` (separate) or ``qkv``, ``o``.
    num_heads / num_kv_heads / head_dim: current counts (updated in place after pruning).
    """

    name: str
    layout: str
    projections: dict[str, str]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    _model: nn.Module = field(repr=False, default=None)

    @property
    def heads_per_unit(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def n_units(self) -> int:
        """How many prunable units: key/value groups (= heads without GQA)."""
        return self.num_kv_heads

    def module(self, role: str = None) -> nn.Module:
        """The attention module, or its projection ``role`` ("q", "k", "v", "o", "qkv")."""
        name = self.name if role is None else self.projections[role]
        return self._model.get_submodule(name)

    def update_module_attrs(self) -> None:
        """Set the attention module's head-count attributes (``num_heads``,
        ``num_key_value_heads``, ``all_head_size``...) from this group's counts."""
        _set_head_attrs(self)

    def rows(self, units) -> dict[str, np.ndarray]:
        """For kept ``units``: role → output rows to keep (``o``: input columns)."""
        units = np.asarray(units, dtype=np.int64)
        D, G = self.head_dim, self.heads_per_unit
        q_heads = (units[:, None] * G + np.arange(G)).ravel()
        q_rows = (q_heads[:, None] * D + np.arange(D)).ravel()
        kv_rows = (units[:, None] * D + np.arange(D)).ravel()
        if self.layout == "fused":
            inner = self.num_heads * D
            return {"qkv": np.concatenate([q_rows, kv_rows + inner, kv_rows + 2 * inner]),
                    "o": q_rows}
        return {"q": q_rows, "k": kv_rows, "v": kv_rows, "o": q_rows}


def _linear(m, name):
    child = getattr(m, name, None)
    return child if isinstance(child, nn.Linear) else None


def _int_attr(m, name):
    v = getattr(m, name, None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _describe(model: nn.Module, name: str, m: nn.Module) -> HeadGroup | None:
    """The head group of module ``m`` if it is an attention layout this module knows."""
    if all(_linear(m, r) for r in ("q_proj", "k_proj", "v_proj", "o_proj")) and _int_attr(
            m, "head_dim"):
        names = {r: f"{name}.{r}_proj" for r in "qkvo"}
        D = m.head_dim
        layout = "separate"
        q, k = m.q_proj.out_features, m.k_proj.out_features
    elif all(_linear(m, r) for r in ("query", "key", "value")) and _int_attr(
            m, "attention_head_size"):
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = model.get_submodule(parent_name)
        out = getattr(getattr(parent, "output", None), "dense", None)
        if not isinstance(out, nn.Linear):
            return None
        prefix = f"{parent_name}." if parent_name else ""
        names = {"q": f"{name}.query", "k": f"{name}.key", "v": f"{name}.value",
                 "o": f"{prefix}output.dense"}
        D = m.attention_head_size
        layout = "separate"
        q, k = m.query.out_features, m.key.out_features
    elif (_linear(m, "qkv") and _linear(m, "proj") and _int_attr(m, "num_heads")
          and _int_attr(m, "head_dim")):
        if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity) or getattr(
                m, "gate", None) is not None:
            return None  # a norm over the inner width or a gate: not handled
        if m.qkv.out_features != 3 * m.num_heads * m.head_dim:
            return None
        names = {"qkv": f"{name}.qkv", "o": f"{name}.proj"}
        D = m.head_dim
        layout = "fused"
        q = k = m.num_heads * D
    else:
        return None
    if q % D or k % D or (q // D) % (k // D):
        return None
    return HeadGroup(name=name, layout=layout, projections=names, num_heads=q // D,
                     num_kv_heads=k // D, head_dim=D, _model=model)


def find_head_groups(model: nn.Module, ignored_layers=None) -> list[HeadGroup]:
    """The head groups of ``model`` in model order (see the module docstring for the layouts).

    ignored_layers: module names or modules; an attention module is skipped when it or any of
    its projections is (or is inside) one of them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ignored = _ignored_names(model, ignored_layers)
    groups = []
    for name, m in model.named_modules():
        g = _describe(model, name, m)
        if g is None:
            continue
        if any(n in ignored for n in [g.name, *g.projections.values()]):
            continue
        groups.append(g)
    return groups


def _ignored_names(model, ignored_layers) -> set[str]:
    if ignored_layers is None:
        return set()
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    names = {m: n for n, m in model.named_modules()}
    by_name = {n: m for m, n in names.items()}
    out = set()
    for item in ignored_layers:
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"ignored_layers: the model has no module named {item!r}")
            item = by_name[item]
        elif not isinstance(item, nn.Module) or item not in names:
            raise ValueError(f"ignored_layers: {item!r} is not a module of the model")
        out.update(names[m] for m in item.modules())
    return out


def unsupported_attention(model: nn.Module) -> list[str]:
    """Names of attention modules whose heads cannot be pruned in place
    (``nn.MultiheadAttention``: its forward needs inner width == embedding width)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


@torch.no_grad()
def head_scores(group: HeadGroup, importance="l1", *, generator=None) -> np.ndarray:
    """One score per unit (key/value group), higher = more important.

    ``"l1"``: Σ|w| over every weight the unit owns (its q, k, v rows and biases, its o columns);
    ``"l2"``: the square root of Σw² over the same; ``"random"``: uniform (``generator``);
    a callable ``importance(group) -> n_units scores`` is used as it is.
    """
    if callable(importance):
        scores = np.asarray(importance(group), dtype=np.float64)
        if scores.shape != (group.n_units,) or not np.isfinite(scores).all():
            raise ValueError(f"importance returned {scores.shape} scores (NaN/Inf?) for head "
                             f"group {group.name!r} of {group.n_units} units")
        return scores
    if importance == "random":
        return torch.rand(group.n_units, generator=generator, dtype=torch.float64).numpy()
    if importance not in ("l1", "l2"):
        raise ValueError(f"unknown head importance {importance!r}; expected 'l1', 'l2', "
                         "'random' or a callable")
    power = 1 if importance == "l1" else 2
    total = np.zeros(group.n_units)
    for u in range(group.n_units):
        for role, rows in group.rows([u]).items():
            m = group.module(role)
            idx = torch.as_tensor(rows, device=m.weight.device)
            if role == "o":
                parts = [m.weight.index_select(1, idx)]
            else:
                parts = [m.weight.index_select(0, idx)]
                if m.bias is not None:
                    parts.append(m.bias.index_select(0, idx))
            total[u] += sum(float(p.double().abs().pow(power).sum()) for p in parts)
    return total if power == 1 else np.sqrt(total)


def _cut(group: HeadGroup, keep_units: np.ndarray) -> None:
    """Keep only ``keep_units`` (sorted) of ``group``: slice the projections, update the
    attention module's head-count attributes. Unchecked."""
    for role, rows in group.rows(keep_units).items():
        m = group.module(role)
        idx = torch.as_tensor(rows, device=m.weight.device)
        dim = 1 if role == "o" else 0
        m.weight = nn.Parameter(m.weight.detach().index_select(dim, idx).clone(),
                                requires_grad=m.weight.requires_grad)
        if role == "o":
            m.in_features = len(rows)
        else:
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.detach().index_select(0, idx).clone(),
                                      requires_grad=m.bias.requires_grad)
            m.out_features = len(rows)
    G = group.heads_per_unit
    group.num_kv_heads = len(keep_units)
    group.num_heads = len(keep_units) * G
    group.update_module_attrs()


def _set_head_attrs(group: HeadGroup) -> None:
    attn = group.module()
    for attr in _QUERY_HEAD_ATTRS:
        if _int_attr(attn, attr):
            setattr(attn, attr, group.num_heads)
    for attr in _KV_HEAD_ATTRS:
        if _int_attr(attn, attr):
            setattr(attn, attr, group.num_kv_heads)
    for attr in _INNER_WIDTH_ATTRS:
        if _int_attr(attn, attr):
            setattr(attn, attr, group.num_heads * group.head_dim)


class _Checker:
    """What surgery.check_forward needs: the model, its inputs and the output shapes to keep."""

    def __init__(self, model, example_inputs, output_transform):
        self.model = model
        self.example_inputs = example_inputs
        self.output_transform = output_transform
        with eval_mode(model), torch.no_grad():
            self.reference_shapes = output_shapes(call_model(model, example_inputs),
                                                  output_transform)


def prune_head_groups(model: nn.Module, example_inputs, plan, *, output_transform=None) -> None:
    """Keep only the given units of several head groups (``plan``: ``(HeadGroup, keep_units)``
    pairs). All or nothing: the model is run once afterwards on ``example_inputs`` (output
    shapes must not change); on any failure every module, attribute and config value is put
    back and a ValueError names the first group. The model's config is synced on success."""
    from accelprune.hf import sync_config

    example_inputs = check_example_inputs(example_inputs)
    checked = []
    for g, keep in plan:
        keep = np.unique(np.asarray(keep, dtype=np.int64))
        if keep.size == 0 or keep.min() < 0 or keep.max() >= g.n_units:
            raise ValueError(f"head group {g.name!r}: keep must hold 1 to {g.n_units} unit "
                             f"indices in [0, {g.n_units})")
        if keep.size < g.n_units:
            checked.append((g, keep))
    if not checked:
        return
    checker = _Checker(model, example_inputs, output_transform)
    modules = [g.module(r) for g, _ in checked for r in [None, *g.projections]]
    counts = [(g, g.num_heads, g.num_kv_heads) for g, _ in checked]
    config = getattr(model, "config", None)
    snapshot = surgery.ModuleSnapshot(modules, extra=[config] if config is not None else [])
    try:
        for g, keep in checked:
            _cut(g, keep)
        surgery.check_forward(checker)
        sync_config(model)
    except Exception as e:
        snapshot.restore()
        for g, h, kv in counts:
            g.num_heads, g.num_kv_heads = h, kv
        raise ValueError(f"pruning the heads of {checked[0][0].name!r} would break the model "
                         f"({type(e).__name__}: {e}); the model was restored unchanged") from e


def prune_heads(model: nn.Module, example_inputs, sparsity: float = 0.25, importance="l1", *,
                ignored_layers=None, output_transform=None, seed: int = 0) -> nn.Module:
    """Remove whole attention heads from ``model``, in place; returns ``model``.

    Every recognised attention module (see :func:`find_head_groups`) loses
    ⌊sparsity · n⌋ of its n units, keeping at least one; a unit is a key/value group (one KV
    head with its query heads) under grouped-query attention, one head otherwise. Units are
    ranked per module by :func:`head_scores` (``importance``: "l1", "l2", "random" or a
    callable). All or nothing (see :func:`prune_head_groups`); a Hugging Face model's config
    is updated (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``) where every layer
    keeps the same count (see :func:`accelprune.hf.sync_config`).

    ``nn.MultiheadAttention`` modules are left as they are (listed by
    :func:`unsupported_attention`); ValueError if the model has no prunable attention at all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sparsity = check_fraction(sparsity, "sparsity")
    seed = check_int(seed, "seed", low=0)
    groups = find_head_groups(model, ignored_layers)
    if not groups:
        extra = unsupported_attention(model)
        hint = (f" (nn.MultiheadAttention is not supported: {extra[:3]})" if extra else "")
        raise ValueError(f"the model has no attention module whose heads can be pruned{hint}")
    generator = torch.Generator().manual_seed(seed)
    plan = []
    for g in groups:
        n_drop = min(int(np.floor(sparsity * g.n_units + 1e-9)), g.n_units - 1)
        if n_drop == 0:
            continue
        scores = head_scores(g, importance, generator=generator)
        drop = np.argsort(scores, kind="stable")[:n_drop]
        plan.append((g, np.setdiff1d(np.arange(g.n_units), drop)))
    prune_head_groups(model, example_inputs, plan, output_transform=output_transform)
    return model

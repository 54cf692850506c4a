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

* ``"packed"``: ``nn.MultiheadAttention`` (self-attention shapes: one ``in_proj_weight``,
  no ``bias_k``/``bias_v``, no ``add_zero_attn``). Its own forward requires the inner width to
  equal the embedding width, so when its heads are pruned the module's class is switched to
  :class:`HeadPrunedMultiheadAttention`, a subclass with the same parameters, attributes and call
  signature whose forward allows ``num_heads * head_dim < embed_dim`` (it also turns PyTorch's
  fused encoder fast path off for that layer). Others are listed by
  :func:`unsupported_attention`.

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
from accelprune.selection import reprune_select
from accelprune.tracing import call_model, check_example_inputs, eval_mode, output_shapes

__all__ = ["HEAD_IMPORTANCES", "HeadGroup", "HeadPrunedMultiheadAttention", "HeadSnapshot",
           "cut_units", "find_head_groups", "head_scores", "prune_heads", "prune_head_groups",
           "unrecognised_attention", "unsupported_attention"]

HEAD_IMPORTANCES = ("l1", "l2", "random", "reprune")
"""The named ways :func:`prune_heads` chooses units (besides a callable)."""

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
        if self.layout in ("fused", "packed"):
            inner = self.num_heads * D
            return {"qkv": np.concatenate([q_rows, kv_rows + inner, kv_rows + 2 * inner]),
                    "o": q_rows}
        return {"q": q_rows, "k": kv_rows, "v": kv_rows, "o": q_rows}

    def unit_row_table(self, role: str) -> np.ndarray:
        """(n_units, rows per unit) int64: row ``[u, j]`` is unit u's j-th row of projection
        ``role`` (``o``: input column)."""
        return np.stack([self.rows([u])[role] for u in range(self.n_units)])

    def param_names(self, role: str) -> tuple[str, str]:
        """The weight and bias attribute names of projection ``role``."""
        if self.layout == "packed" and role == "qkv":
            return "in_proj_weight", "in_proj_bias"
        return "weight", "bias"

    def unit_rows(self, role: str, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of ``tensor`` (a weight or bias of input projection ``role``) unit by unit:
        (n_units, rows per unit, *the rest of its shape)."""
        rows = self.unit_row_table(role)
        picked = tensor.index_select(0, torch.as_tensor(rows.reshape(-1), device=tensor.device))
        return picked.reshape(*rows.shape, *tensor.shape[1:])

    def unit_weights(self) -> list[torch.Tensor]:
        """Each unit's q, k and v weight rows: one (n_units, rows per unit, in_features) tensor
        per input projection (``q``, ``k``, ``v``, or the one ``qkv``). A unit's rows seen per
        input column are what REPrune compares (its kernels, :func:`prune_heads`)."""
        return [self.unit_rows(role, getattr(self.module(role), self.param_names(role)[0])
                               .detach())
                for role in self.projections if role != "o"]


def _linear(m, name):
    child = getattr(m, name, None)
    return child if isinstance(child, nn.Linear) else None


def _int_attr(m, name):
    v = getattr(m, name, None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _describe(model: nn.Module, name: str, m: nn.Module) -> HeadGroup | None:
    """The head group of module ``m`` if it is an attention layout this module knows."""
    # the output projection's name: LLaMA-style o_proj, OPT's out_proj, Phi's dense
    o_name = next((o for o in ("o_proj", "out_proj", "dense") if _linear(m, o)), None)
    if (o_name and all(_linear(m, r) for r in ("q_proj", "k_proj", "v_proj"))
            and _int_attr(m, "head_dim")):
        names = {**{r: f"{name}.{r}_proj" for r in "qkv"}, "o": f"{name}.{o_name}"}
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
    elif isinstance(m, nn.MultiheadAttention):
        packed = m._qkv_same_embed_dim or isinstance(m, HeadPrunedMultiheadAttention)
        if not packed or m.bias_k is not None or m.add_zero_attn:
            return None
        D = m.head_dim
        names = {"qkv": name, "o": f"{name}.out_proj" if name else "out_proj"}
        layout = "packed"
        q = k = m.in_proj_weight.shape[0] // 3
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
    """Names of ``nn.MultiheadAttention`` modules whose heads cannot be pruned (separate
    key/value widths, ``bias_k``/``bias_v``, ``add_zero_attn``)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) and _describe(model, n, m) is None]


_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")


def unrecognised_attention(model: nn.Module, ignored=()) -> list[tuple[str, str]]:
    """``(name, reason)`` for the modules that look like attention but whose heads accelprune
    cannot cut: the ``nn.MultiheadAttention`` layouts :func:`unsupported_attention` names, then
    modules with parameters whose class name says attention or that hold an integer head count,
    which neither are, contain nor sit inside a recognised layout (GPT-2's ``c_attn`` Conv1D,
    Swin's and LeViT's attention with per-head position biases). One discovery
    (:func:`find_head_groups`) answers both: a MultiheadAttention it does not return is one it
    cannot cut. ``ignored``: modules not to list. Used by :func:`prune_heads`' refusal and by
    C-SGD's head fold (:func:`accelprune.csgd_heads.foldable_head_groups`)."""
    known = {g.name for g in find_head_groups(model)}  # ignored or not: they are recognised
    ignored = {id(m) for m in ignored}
    candidates = [(name, m) for name, m in model.named_modules()
                  if name not in known and id(m) not in ignored]
    out = [(name, "nn.MultiheadAttention with separate key/value widths, bias_k/bias_v or "
                  "add_zero_attn: its heads cannot be cut")
           for name, m in candidates if isinstance(m, nn.MultiheadAttention)]
    out += [(name, _why_not_recognised(name, m)) for name, m in candidates
            if not isinstance(m, nn.MultiheadAttention) and _looks_like_attention(m)
            and any(True for _ in m.parameters())
            and not any(_nested(name, k) or _nested(k, name) for k in known)]
    return out


def _looks_like_attention(m: nn.Module) -> bool:
    return ("attention" in type(m).__name__.lower()
            or any(_int_attr(m, a) for a in _HEAD_COUNT_ATTRS))


def _why_not_recognised(name: str, m: nn.Module) -> str:
    kind = type(m).__name__
    tables = [n for n, p in m.named_parameters(recurse=False)
              if "bias" in n and p.dim() >= 1 and n not in ("bias", "in_proj_bias")]
    if tables:
        return (f"{kind} {name!r} has per-head position biases {tables}, which are not cut with "
                "the heads")
    return (f"{kind} {name!r} is an attention layout accelprune does not recognise (separate "
            "q/k/v/o Linear layers with head_dim, BERT's query/key/value, timm's fused qkv, "
            "nn.MultiheadAttention)")


def _nested(inner: str, outer: str) -> bool:
    """Whether module ``inner`` is ``outer`` or inside it ("" is the model itself)."""
    return inner == outer or not outer or inner.startswith(f"{outer}.")


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
            w_name, b_name = group.param_names(role)
            weight, bias = getattr(m, w_name), getattr(m, b_name)
            idx = torch.as_tensor(rows, device=weight.device)
            if role == "o":
                parts = [weight.index_select(1, idx)]
            else:
                parts = [weight.index_select(0, idx)]
                if bias is not None:
                    parts.append(bias.index_select(0, idx))
            total[u] += sum(float(p.double().abs().pow(power).sum()) for p in parts)
    return total if power == 1 else np.sqrt(total)


def cut_units(group: HeadGroup, keep_units: np.ndarray) -> None:
    """Keep only ``keep_units`` (sorted unit indices) of ``group``: slice the projections, update
    the attention module's head-count attributes. Unchecked: run it under a
    :class:`HeadSnapshot` and check the model (as :func:`prune_head_groups` does)."""
    if group.layout == "packed" and not isinstance(group.module(),
                                                   HeadPrunedMultiheadAttention):
        group.module().__class__ = HeadPrunedMultiheadAttention  # a forward for inner < embed
        group.module()._qkv_same_embed_dim = False  # keeps PyTorch's fused encoder path off
        for enc in _encoders(group._model):  # decided at construction: nested tensors
            if any(getattr(layer, "self_attn", None) is group.module() for layer in enc.layers):
                enc.use_nested_tensor = False
    for role, rows in group.rows(keep_units).items():
        m = group.module(role)
        w_name, b_name = group.param_names(role)
        weight, bias = getattr(m, w_name), getattr(m, b_name)
        idx = torch.as_tensor(rows, device=weight.device)
        dim = 1 if role == "o" else 0
        setattr(m, w_name, nn.Parameter(weight.detach().index_select(dim, idx).clone(),
                                        requires_grad=weight.requires_grad))
        if role == "o":
            m.in_features = len(rows)
        else:
            if bias is not None:
                setattr(m, b_name, nn.Parameter(bias.detach().index_select(0, idx).clone(),
                                                requires_grad=bias.requires_grad))
            if isinstance(m, nn.Linear):
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


def _encoders(model: nn.Module) -> list[nn.TransformerEncoder]:
    return [m for m in model.modules() if isinstance(m, nn.TransformerEncoder)]


class HeadSnapshot:
    """Everything :func:`cut_units` on ``groups`` can change, to be put back exactly by
    :meth:`restore`: the attention modules and their projections (parameter objects, plain
    attributes, the class of a packed MultiheadAttention), ``nn.TransformerEncoder`` flags, the
    model's config, and the groups' own head counts."""

    def __init__(self, model: nn.Module, groups):
        groups = list(groups)
        modules = [g.module(r) for g in groups for r in [None, *g.projections]]
        modules += _encoders(model)
        config = getattr(model, "config", None)
        self._modules = surgery.ModuleSnapshot(modules,
                                               extra=[config] if config is not None else [])
        self._counts = [(g, g.num_heads, g.num_kv_heads) for g in groups]

    def restore(self) -> None:
        self._modules.restore()
        for g, heads, kv_heads in self._counts:
            g.num_heads, g.num_kv_heads = heads, kv_heads


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
    snapshot = HeadSnapshot(model, [g for g, _ in checked])
    try:
        for g, keep in checked:
            cut_units(g, keep)
        surgery.check_forward(checker)
    except Exception as e:
        snapshot.restore()
        raise ValueError(f"pruning the heads of {checked[0][0].name!r} would break the model "
                         f"({type(e).__name__}: {e}); the model was restored unchanged") from e
    sync_config(model)  # after the check: it may only warn, never undo the surgery


def prune_heads(model: nn.Module, example_inputs, sparsity: float = 0.25, importance="l1", *,
                ignored_layers=None, output_transform=None, seed: int = 0) -> nn.Module:
    """Remove whole attention heads from ``model``, in place; returns ``model``.

    Every recognised attention module (see :func:`find_head_groups`) loses
    ⌊sparsity · n⌋ of its n units, keeping at least one; a unit is a key/value group (one KV
    head with its query heads) under grouped-query attention, one head otherwise. Units are
    ranked per module by :func:`head_scores` (``importance``: "l1", "l2", "random" or a
    callable), or chosen by REPrune's selection (``importance="reprune"``): the units are the
    filters and a unit's q/k/v rows at one input column (:meth:`HeadGroup.unit_weights`) its
    kernel there; per input column the kernels are Ward-clustered, all columns are cut at one
    height, and greedy maximum coverage keeps the units that cover the most clusters (seeded
    ties), so that heads which duplicate others go first (:func:`accelprune.reprune_select`).
    All or nothing (see :func:`prune_head_groups`); a Hugging Face model's config is updated
    (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``) where every layer keeps the
    same count (see :func:`accelprune.hf.sync_config`).

    ``nn.MultiheadAttention`` layouts it cannot cut are left as they are (listed by
    :func:`unsupported_attention`); ValueError if the model has no prunable attention at all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sparsity = check_fraction(sparsity, "sparsity")
    seed = check_int(seed, "seed", low=0)
    if not callable(importance) and importance not in HEAD_IMPORTANCES:
        raise ValueError(f"unknown head importance {importance!r}; expected one of "
                         f"{list(HEAD_IMPORTANCES)} or a callable")
    groups = find_head_groups(model, ignored_layers)
    if not groups:
        unknown = unrecognised_attention(model)
        hint = ("; not recognised: " + "; ".join(f"{n!r}: {why}" for n, why in unknown[:3])
                + ("; ..." if len(unknown) > 3 else "")) if unknown else ""
        raise ValueError(f"the model has no attention module whose heads can be pruned{hint}")
    generator = torch.Generator().manual_seed(seed)
    plan = []
    for g in groups:
        n_drop = min(int(np.floor(sparsity * g.n_units + 1e-9)), g.n_units - 1)
        if n_drop == 0:
            continue
        if importance == "reprune":
            # units are the filters, their q/k/v rows at one input column the kernels
            kernels = [w.transpose(1, 2) for w in g.unit_weights()]
            keep = np.sort(reprune_select(kernels, g.n_units - n_drop, seed=seed))
        else:
            scores = head_scores(g, importance, generator=generator)
            keep = np.setdiff1d(np.arange(g.n_units), np.argsort(scores, kind="stable")[:n_drop])
        plan.append((g, keep))
    prune_head_groups(model, example_inputs, plan, output_transform=output_transform)
    return model


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` after head pruning: the same parameters (``in_proj_weight`` of
    shape (3 · num_heads · head_dim, embed_dim), ``out_proj`` from that inner width back to
    ``embed_dim``), attributes and call signature, with a forward that does not require the
    inner width to equal ``embed_dim``. Not constructed directly: :func:`prune_heads` switches
    the class of a pruned module. Self-attention layouts only (no ``bias_k``/``add_zero_attn``).
    ``_qkv_same_embed_dim`` is set False so that ``nn.TransformerEncoderLayer`` does not take
    its fused fast path (which assumes inner width == ``embed_dim``); the weights stay packed.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("HeadPrunedMultiheadAttention is made by accelprune.prune_heads from an "
                        "nn.MultiheadAttention, not constructed")

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, _ = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (self.in_proj_bias.chunk(3) if self.in_proj_bias is not None
                         else (None, None, None))

        def heads(x, w, b, n):
            return nn.functional.linear(x, w, b).view(B, n, H, D).transpose(1, 2)

        q, k, v = heads(query, w_q, b_q, L), heads(key, w_k, b_k, S), heads(value, w_v, b_v, S)
        scores = q @ k.transpose(-2, -1) * D ** -0.5
        scores = scores + _additive_mask(attn_mask, key_padding_mask, is_causal, (B, H, L, S),
                                         scores.dtype, scores.device)
        weights = scores.softmax(dim=-1)
        weights = nn.functional.dropout(weights, self.dropout, self.training)
        # F.linear as in torch's own forward: out_proj is not run as a module, so tracers
        # (Torch-Pruning) see one attention node, as for nn.MultiheadAttention
        out = nn.functional.linear((weights @ v).transpose(1, 2).reshape(B, L, H * D),
                                   self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.mean(1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights


def _additive_mask(attn_mask, key_padding_mask, is_causal, shape, dtype, device):
    """nn.MultiheadAttention's masks (boolean: True = not allowed; float: added) as one float
    tensor broadcastable to ``shape`` = (B, H, L, S)."""
    B, H, L, S = shape

    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    total = torch.zeros((), dtype=dtype, device=device)
    if attn_mask is not None:
        m = additive(attn_mask)
        total = total + (m.view(B, H, L, S) if m.dim() == 3 else m)
    elif is_causal:
        total = total + additive(torch.ones(L, S, dtype=torch.bool, device=device).triu(1))
    if key_padding_mask is not None:
        total = total + additive(key_padding_mask).view(B, 1, 1, S)
    return total

"""Hugging Face models kept consistent after pruning: their config in step with the modules.

A Hugging Face model is rebuilt from its config by ``from_pretrained``, so after pruning the
config must describe the pruned shapes. :func:`sync_config` reads the widths back from the
modules (called after every checked surgery: channel groups and heads):

* ``intermediate_size``: the MLP width (LLaMA's ``down_proj`` input, BERT's
  ``intermediate.dense`` output), and the MLP modules' own ``intermediate_size`` attribute;
* ``num_attention_heads`` / ``num_key_value_heads`` / ``head_dim``: from the head groups
  (:mod:`accelprune.attention`), only for configs that carry ``head_dim`` (LLaMA and its
  relatives read it; BERT derives its head size from ``hidden_size / num_attention_heads``, so
  it cannot describe pruned heads);
* ``hidden_size``: the input embedding's width.

A value is written only where every layer agrees and the config's own validation accepts it
(LLaMA's config wants ``hidden_size`` to be a multiple of ``num_attention_heads``, even with an
explicit ``head_dim``). Where layers differ (global ranking, heads of a BERT) or the validation
refuses, the config cannot describe the model: the per-layer values are recorded in
``config.accelprune_pruned`` and ``from_pretrained`` would fail on the shapes; load such a
checkpoint with :func:`load_pruned`, which builds the model from its config and then resizes
every parameter to the saved shape.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["sync_config", "load_pruned", "resize_to_state_dict"]


def _config(model):
    config = getattr(model, "config", None)
    return config if config is not None and hasattr(config, "to_dict") else None


def mlp_widths(model: nn.Module) -> dict[str, int]:
    """MLP name → hidden width, for LLaMA-style (``down_proj``) and BERT-style
    (``intermediate.dense``) blocks."""
    widths = {}
    for name, m in model.named_modules():
        down = getattr(m, "down_proj", None)
        if isinstance(down, nn.Linear) and isinstance(getattr(m, "up_proj", None), nn.Linear):
            widths[name] = down.in_features
        inter = getattr(getattr(m, "intermediate", None), "dense", None)
        if isinstance(inter, nn.Linear) and isinstance(
                getattr(getattr(m, "output", None), "dense", None), nn.Linear):
            widths[name] = inter.out_features
    return widths


def sync_config(model: nn.Module) -> dict:
    """Bring ``model.config`` (a Hugging Face config; anything else: nothing happens) in step
    with the modules' current shapes; returns ``{key: (new, old)}`` for the values changed. See
    the module docstring."""
    from accelprune.attention import find_head_groups

    config = _config(model)
    if config is None:
        return {}
    changes, differing = {}, {}

    widths = mlp_widths(model)
    for name, w in widths.items():
        m = model.get_submodule(name)
        if isinstance(getattr(m, "intermediate_size", None), int):
            m.intermediate_size = w
    _set_uniform(config, "intermediate_size", widths, changes, differing)

    heads = find_head_groups(model)
    if heads and isinstance(getattr(config, "head_dim", None), int):
        _set_uniform(config, "num_attention_heads", {g.name: g.num_heads for g in heads},
                     changes, differing)
        if hasattr(config, "num_key_value_heads"):
            _set_uniform(config, "num_key_value_heads", {g.name: g.num_kv_heads for g in heads},
                         changes, differing)
        _set_uniform(config, "head_dim", {g.name: g.head_dim for g in heads}, changes, differing)
    elif heads:
        counts = {g.name: g.num_heads for g in heads}
        if set(counts.values()) != {getattr(config, "num_attention_heads", None)}:
            differing["num_attention_heads"] = counts  # the config cannot say it

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(emb, nn.Embedding) and hasattr(config, "hidden_size"):
        _set_uniform(config, "hidden_size", {"embeddings": emb.embedding_dim}, changes, differing)

    _keep_config_valid(config, changes, differing)
    if differing:
        config.accelprune_pruned = differing
        warnings.warn(f"the config cannot describe the pruned model ({sorted(differing)} differ "
                      "across layers, or the config's validation refuses them): save_pretrained "
                      "works, load with accelprune.hf.load_pruned", stacklevel=2)
    elif hasattr(config, "accelprune_pruned"):
        del config.accelprune_pruned
    return changes


def _keep_config_valid(config, changes: dict, differing: dict) -> None:
    """Hugging Face validates configs (LLaMA: ``hidden_size`` a multiple of the head count, even
    with an explicit ``head_dim``). A value the config refuses is put back and recorded as one
    the config cannot describe, newest kind first (hidden size, heads, MLP width)."""
    validate = getattr(config, "validate", None)
    if not callable(validate) or not changes:
        return
    for key in ("hidden_size", "head_dim", "num_key_value_heads", "num_attention_heads",
                "intermediate_size"):
        try:
            validate()
            return
        except Exception:
            if key in changes:
                new, old = changes.pop(key)
                differing[key] = {"model": new}
                setattr(config, key, old)


def _set_uniform(config, key, values: dict, changes: dict, differing: dict) -> None:
    if not values or not hasattr(config, key):
        return
    distinct = set(values.values())
    if len(distinct) > 1:
        differing[key] = dict(values)
        return
    (value,) = distinct
    old = getattr(config, key)
    if old != value:
        setattr(config, key, value)
        changes[key] = (value, old)


def resize_to_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Give every parameter and buffer of ``model`` named in ``state_dict`` the saved shape
    (new uninitialised tensors where they differ) and update Linear / Embedding / norm sizes and
    the attention modules' head counts, so that ``load_state_dict`` then fits."""
    from accelprune.attention import find_head_groups

    for key, tensor in state_dict.items():
        owner_name, _, attr = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            continue
        current = getattr(owner, attr, None)
        if not isinstance(current, torch.Tensor) or current.shape == tensor.shape:
            continue
        new = torch.empty(tensor.shape, dtype=current.dtype, device=current.device)
        if isinstance(current, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=current.requires_grad))
        else:
            owner._buffers[attr] = new
        _update_sizes(owner)
    for g in find_head_groups(model):
        g.update_module_attrs()


def _update_sizes(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = m.weight.shape
    elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def load_pruned(model_class, path, **kwargs) -> nn.Module:
    """Load a pruned model saved by ``save_pretrained`` whose config cannot describe it (see
    :func:`sync_config`): the model is built from the saved config, resized to the saved
    tensors (:func:`resize_to_state_dict`) and loaded strictly. Nothing downloads."""
    import os

    from safetensors.torch import load_file

    config = model_class.config_class.from_pretrained(path, local_files_only=True)
    model = model_class(config, **kwargs)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no .safetensors file in {path!r}")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    resize_to_state_dict(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()

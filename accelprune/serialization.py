"""Save and load (pruned) models without running code from the file.

``accelprune.save(model, path)`` writes a **weights-only** file: a ``torch.save`` of plain data
(dicts, lists, strings, numbers) and tensors, which ``torch.load(weights_only=True)`` reads
without unpickling any Python object. It holds

* the ``state_dict`` (and the non-persistent buffers), in the model's own dtypes;
* per module its type name and its integer attributes (``out_channels``, ``in_features``,
  ``num_features``, ``groups``, ``normalized_shape``...): what a fresh, unpruned instance of the
  architecture needs to be reshaped to the pruned widths;
* the blocks :func:`accelprune.prune_layers` removed (each a :class:`SkippedBlock`), so that a
  fresh instance has the same blocks taken out before it is reshaped;
* optionally the constructor of the architecture: ``"torchvision:NAME"``, ``"accelprune:NAME"``,
  ``"timm:NAME"`` or ``"transformers:CLASS"`` with a Hugging Face config, and its keyword
  arguments (inferred for accelprune's CIFAR models, timm models and Hugging Face models; give
  it for torchvision ones: ``save(model, path, constructor="torchvision:resnet18")``);
* a SHA-256 digest over all of the above, checked on load: a corrupted file is refused.

``accelprune.load(path, model)`` reshapes ``model`` (a fresh instance of the same architecture)
to the saved widths (and folds away the BatchNorms the saved model had fused into its convs) and
fills its weights; ``accelprune.load(path)`` rebuilds the model from the
constructor named in the file (files written by the ``accelprune`` CLI name theirs). Loading
never runs code from the file: at most it calls a constructor of torchvision, timm, Hugging Face
transformers (never ``trust_remote_code``) or accelprune with plain-data arguments, and it never
downloads weights.

Files written by accelprune 0.1 (a whole pickled module) are refused unless
``allow_pickle=True``: **unsafe**, unpickling runs whatever code the file names; only use it for
files you wrote yourself, then save them again in the new format.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile

import torch
from torch import nn

from accelprune import constructors
from accelprune.depth import SkippedBlock
from accelprune.fusion import find_conv_bn_pairs
from accelprune.layers import BATCHNORM_TYPES

__all__ = ["save", "load", "constructor_of"]

_FORMAT = "accelprune.model"
_VERSION = 2
# Integer attributes that pruning changes (Torch-Pruning's pruners, accelprune's head pruning):
# load() sets them to the saved values. Every other integer attribute must already agree.
WIDTH_ATTRS = frozenset({
    "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
    "normalized_shape", "num_channels", "num_groups", "num_parameters", "embedding_dim",
    "num_embeddings", "embed_dim", "kdim", "vdim", "head_dim", "num_heads", "hidden_size",
    "input_size", "proj_size", "hidden_dim", "mlp_dim", "intermediate_size",
    "num_attention_heads", "attention_head_size", "all_head_size", "num_key_value_heads",
    "num_key_value_groups", "dim", "channels",
})


# ---------------------------------------------------------------------------------------------
# save


def save(model: nn.Module, path: str | os.PathLike, *, constructor: str | dict | None = None,
         constructor_kwargs: dict | None = None) -> None:
    """Write ``model`` (weights and pruned widths) to ``path`` as a weights-only file.

    constructor: how to rebuild the architecture without ``model=`` at load time:
        ``"torchvision:NAME"``, ``"accelprune:NAME"``, ``"timm:NAME"``, ``"transformers:CLASS"``
        or a Hugging Face config dict; None infers it where the model says what it is
        (accelprune's CIFAR models, timm, Hugging Face), else the file needs ``model=`` to load.
    constructor_kwargs: plain-data keyword arguments for it (e.g. ``{"num_classes": 10}``).

    The file is written to a temporary name and renamed: a failed save leaves no partial file.
    Models under ``torch.nn.utils.prune`` masks must be finalised first
    (:func:`accelprune.make_permanent`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = _check_path(path)
    spec = constructors.spec_from_arguments(model, constructor, constructor_kwargs)
    payload = _payload(model, spec)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".accelprune-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not path:
        raise ValueError("path is empty")
    return path


def _type_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _is_int_attr(v) -> bool:
    """An int, or a tuple/list of ints (bools excluded: they are flags, not sizes)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return (isinstance(v, (tuple, list)) and len(v) > 0
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v))


def _module_records(model: nn.Module) -> dict:
    records = {}
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(m).items()
                 if not k.startswith("_") and k != "training" and _is_int_attr(v)}
        records[name] = {"type": _type_name(m), "attrs": attrs}
    return records


def _nonpersistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        for bname in getattr(m, "_non_persistent_buffers_set", ()):
            b = m._buffers.get(bname)
            if isinstance(b, torch.Tensor):
                out[f"{prefix}.{bname}" if prefix else bname] = b.detach()
    return out


def _payload(model: nn.Module, spec: dict | None) -> dict:
    from torch.nn.utils import prune

    masked = [n for n, m in model.named_modules() if prune.is_pruned(m)]
    if masked:
        raise ValueError(f"module {masked[0]!r} is under a torch.nn.utils.prune mask; call "
                         "accelprune.make_permanent(model) before saving")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.is_sparse or v.layout != torch.strided:
            raise ValueError(f"cannot save {k!r}: only dense tensors are supported")
    meta = {
        "modules": _module_records(model),
        "constructor": spec,
        "training": bool(model.training),
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
        "skipped_blocks": {n: {"replaced": m.replaced, "input_name": m.input_name,
                               "output_length": m.output_length}
                           for n, m in model.named_modules() if isinstance(m, SkippedBlock)},
        "torch_version": str(torch.__version__),
    }
    _check_plain(meta, "model metadata")
    payload = {"format": _FORMAT, "version": _VERSION, "meta": meta, "state_dict": state,
               "nonpersistent": _nonpersistent_buffers(model)}
    payload["sha256"] = _digest(payload)
    return payload


def _check_plain(obj, what: str, depth: int = 0) -> None:
    """Only data torch's weights-only loader reads back: None, bool, int, float, str, and
    lists/tuples/dicts of them (keys str or int)."""
    if depth > 64:
        raise ValueError(f"{what} is nested too deeply")
    # exact types: a subclass (an IntEnum, torch's TorchVersion) pickles as a global that
    # weights-only loading refuses
    if obj is None or type(obj) in (bool, int, float, str):
        return
    if type(obj) in (list, tuple):
        for v in obj:
            _check_plain(v, what, depth + 1)
        return
    if type(obj) is dict:
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{what}: dict keys must be str or int, got {type(k).__name__}")
            _check_plain(v, what, depth + 1)
        return
    raise TypeError(f"{what} must be plain data (numbers, strings, lists, dicts), "
                    f"got {type(obj).__name__}")


def _tensor_bytes(t: torch.Tensor):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _digest(payload: dict) -> str:
    """SHA-256 over the metadata (canonical JSON) and every tensor's name, dtype, shape, bytes."""
    h = hashlib.sha256()
    h.update(f"{payload['format']}\0{payload['version']}\0".encode())
    h.update(json.dumps(payload["meta"], sort_keys=True, default=str).encode())
    for section in ("state_dict", "nonpersistent"):
        tensors = payload[section]
        for key in sorted(tensors):
            t = tensors[key]
            h.update(f"\0{section}\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# load


def load(path: str | os.PathLike, model: nn.Module | None = None, *, allow_pickle: bool = False,
         map_location="cpu") -> nn.Module:
    """The model saved at ``path`` by :func:`save`.

    model: a fresh (unpruned) instance of the saved architecture: it is reshaped in place to the
        saved widths, filled with the saved weights and returned. Without it the model is built
        from the constructor named in the file (ValueError when there is none).
    allow_pickle: also read files holding pickled Python objects (accelprune 0.1's whole-module
        files). **Unsafe**: unpickling runs code named by the file; only for files you trust.
    map_location: where the tensors are loaded (a built model is moved there).

    Refused with a ValueError naming the path: empty, truncated or corrupted files (the
    SHA-256 digest does not match), files of another format, pickled objects (unless
    ``allow_pickle``), unknown constructors, and a ``model`` whose structure differs from the
    saved one (then ``model`` is left as it was).
    """
    path = _check_path(path)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if not isinstance(allow_pickle, bool):
        raise TypeError(f"allow_pickle must be a bool, got {type(allow_pickle).__name__}")
    try:
        payload = _read(path, map_location)
    except _PickledFile:
        if not allow_pickle:
            raise
        return _load_pickled(path, model, map_location)
    if model is None:
        spec = payload["meta"]["constructor"]
        if spec is None:
            raise ValueError(f"{path!r} names no constructor: pass model=, a fresh instance of "
                             "the saved architecture (or save with constructor='torchvision:...')")
        model = _build_bounded(spec, payload, repr(path))
        apply_payload(model, payload, where=repr(path))
        if isinstance(map_location, (str, torch.device)):
            model.to(map_location)
        return model
    apply_payload(model, payload, where=repr(path))
    return model


def _build_bounded(spec: dict, payload: dict, where: str) -> nn.Module:
    """The file's constructor, stopped early if it builds far more than the file holds."""
    max_modules = 4 * len(payload["meta"]["modules"]) + 100  # slack: modules replaced on the way
    available = constructors.available_memory()
    max_bytes = (available if available is not None else 2**36) // 2
    try:
        with constructors.size_limits(max_modules, max_bytes, where):
            return constructors.build(spec, where=where)
    except ValueError:
        raise
    except Exception as e:  # an argument the constructor rejects, an allocation that fails
        raise ValueError(f"{where}: building {spec['name']} failed "
                         f"({type(e).__name__}: {_first_line(e)})") from None


def constructor_of(path: str | os.PathLike) -> dict | None:
    """The constructor entry (``{"name": ..., "kwargs": ...}``) of a file written by :func:`save`,
    None when it names none. The file is read and checked as by :func:`load`."""
    return _read(_check_path(path), "cpu")["meta"]["constructor"]


class _PickledFile(ValueError):
    """The file holds pickled Python objects (refused unless allow_pickle=True)."""


def _read(path: str, map_location) -> dict:
    """The checked payload of a weights-only file (ValueError naming ``path`` otherwise)."""
    if os.path.isdir(path):
        raise ValueError(f"cannot load {path!r}: it is a directory")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot load {path!r}: the file is empty")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower() and "unsupported global" not in str(e).lower():
            raise ValueError(f"cannot load {path!r}: the file is corrupted or not a torch file "
                             f"({type(e).__name__}: {_first_line(e)})") from None
        raise _PickledFile(
            f"refused to load {path!r}: it holds pickled Python objects, and unpickling them "
            "could run code from the file. accelprune.save writes weights-only files; if you "
            "wrote this one yourself with accelprune 0.1, load it once with "
            "allow_pickle=True (unsafe) and save it again") from None
    except Exception as e:  # truncated zip, bad magic, EOF...
        raise ValueError(f"cannot load {path!r}: the file is truncated, corrupted or not a torch "
                         f"file ({type(e).__name__}: {_first_line(e)})") from None
    return _check_payload(obj, path)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def _check_payload(obj, path: str) -> dict:
    if not (isinstance(obj, dict) and obj.get("format") == _FORMAT):
        raise ValueError(f"{path!r} was not written by accelprune.save")
    version = obj.get("version")
    if not isinstance(version, int) or version > _VERSION:
        raise ValueError(f"{path!r} has format version {version}; this accelprune reads up to "
                         f"{_VERSION}")
    if version < 2:
        raise ValueError(f"{path!r} is an accelprune 0.1 file (a pickled module)")
    ok = (isinstance(obj.get("meta"), dict) and isinstance(obj.get("state_dict"), dict)
          and isinstance(obj.get("nonpersistent"), dict) and isinstance(obj.get("sha256"), str)
          and all(isinstance(t, torch.Tensor)
                  for section in ("state_dict", "nonpersistent") for t in obj[section].values()))
    if not ok:
        raise ValueError(f"{path!r} is malformed: missing or mistyped entries")
    try:
        digest = _digest(obj)
    except Exception as e:
        raise ValueError(f"{path!r} is corrupted: cannot hash its contents ({e})") from None
    if digest != obj["sha256"]:
        raise ValueError(f"{path!r} is corrupted: its SHA-256 digest does not match its contents "
                         "(the file was modified or damaged after it was written)")
    return obj


def _load_pickled(path: str, model, map_location) -> nn.Module:
    """accelprune 0.1's format: ``{"format", "version": 1, "model": module}`` (unsafe)."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except (AttributeError, ImportError) as e:
        raise ValueError(
            f"cannot load {path!r}: the model's class is not importable here ({e}); "
            "define it in an importable module, not in a script's __main__") from e
    if not (isinstance(obj, dict) and obj.get("format") == _FORMAT
            and isinstance(obj.get("model"), nn.Module)):
        raise ValueError(f"{path!r} was not written by accelprune.save")
    if model is None:
        return obj["model"]
    apply_payload(model, _payload(obj["model"], None), where=repr(path))
    return model


def apply_payload(model: nn.Module, payload: dict, where: str = "the file") -> None:
    """Take out the blocks the saved model had skipped, reshape ``model`` to the saved widths and
    load the saved tensors. All checks run first; on any failure ``model`` is left as it was."""
    meta, state, extra = payload["meta"], payload["state_dict"], payload["nonpersistent"]
    swaps = _skip_blocks(model, meta.get("skipped_blocks") or {}, where)
    undo = []
    try:
        undo += _follow_fusion(model, meta["modules"], state)
        plan = _reshape_plan(model, meta, state, extra, where)
        for m, attr, value in plan["attrs"]:
            undo.append(("attr", m, attr, getattr(m, attr)))
            setattr(m, attr, value)
        for p, like in plan["params"]:
            undo.append(("param", p, p.data))
            p.data = torch.empty(like.shape, dtype=like.dtype, device=p.device)
        for m, bname, like in plan["buffers"]:
            old = m._buffers[bname]
            undo.append(("buffer", m, bname, old))
            m._buffers[bname] = torch.empty(like.shape, dtype=like.dtype, device=old.device)
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
            for m, bname, t in plan["extra"]:
                m._buffers[bname].copy_(t)
    except BaseException:
        for item in reversed(undo):
            if item[0] == "attr":
                setattr(item[1], item[2], item[3])
            elif item[0] == "param":
                item[1].data = item[2]
            elif item[0] == "module":
                item[1]._modules[item[2]] = item[3]
            elif item[0] == "bias":
                item[1].register_parameter("bias", None)
            else:
                item[1]._buffers[item[2]] = item[3]
        for parent, child, block in reversed(swaps):
            parent._modules[child] = block
        raise
    frozen = set(meta.get("frozen", ()))
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    model.train(bool(meta.get("training", False)))


def _skip_blocks(model: nn.Module, skipped: dict, where: str) -> list:
    """Put a :class:`SkippedBlock` where the saved model had one (a block that
    :func:`accelprune.prune_layers` removed); returns (parent, child name, block taken out) for
    each swap, to undo them. Nothing is swapped unless every entry is valid."""
    if not isinstance(skipped, dict):
        raise ValueError(f"cannot load {where}: its list of skipped blocks is malformed")
    modules = dict(model.named_modules())
    swaps = []
    for name, spec in skipped.items():
        ok = (isinstance(name, str) and name != "" and isinstance(spec, dict)
              and isinstance(spec.get("replaced"), str)
              and isinstance(spec.get("input_name"), (str, type(None)))
              and isinstance(spec.get("output_length"), (int, type(None))))
        if not ok:
            raise ValueError(f"cannot load {where}: skipped block {name!r} is malformed")
        if name not in modules:
            raise ValueError(f"cannot load {where}: the file skips block {name!r}, which the "
                             "model lacks; pass a fresh instance of the saved architecture")
        if isinstance(modules[name], SkippedBlock):
            continue  # already taken out (a model pruned the same way)
        parent_name, _, child = name.rpartition(".")
        swaps.append((modules[parent_name], child, spec))
    done = []
    for parent, child, spec in swaps:
        done.append((parent, child, parent._modules[child]))
        parent._modules[child] = SkippedBlock(spec["replaced"], spec["input_name"],
                                              spec["output_length"])
    return done


_IDENTITY = _type_name(nn.Identity())


def _follow_fusion(model: nn.Module, records: dict, state: dict) -> list:
    """Where the file's model had conv -> BatchNorm pairs folded (:func:`accelprune.fuse_conv_bn`)
    and ``model`` still has them, make ``model`` the same: each such BatchNorm becomes an
    ``nn.Identity`` and its conv, if it has no bias, gains one (the file's values are loaded
    into it later). Only pairs that ``fuse_conv_bn`` itself finds in ``model`` are followed, so a
    BatchNorm or a bias the file lacks for any other reason is still refused by name. Changes
    only torch's own modules (nothing from the file runs); returns their undo items."""
    modules = dict(model.named_modules())
    folded = {name for name, m in modules.items()
              if isinstance(m, BATCHNORM_TYPES)
              and (records.get(name) or {}).get("type") == _IDENTITY}
    if not folded:
        return []
    try:
        pairs = [(conv, bn) for conv, bn in find_conv_bn_pairs(model) if bn in folded]
    except ValueError:  # not traceable: the structure check below names the difference
        return []
    undo = []
    for conv_name, bn_name in pairs:
        parent_name, _, child = bn_name.rpartition(".")
        parent = modules[parent_name]
        undo.append(("module", parent, child, modules[bn_name]))
        parent._modules[child] = nn.Identity()
        conv, bias = modules[conv_name], state.get(f"{conv_name}.bias")
        if conv.bias is None and isinstance(bias, torch.Tensor):
            undo.append(("bias", conv))
            conv.bias = nn.Parameter(torch.empty(bias.shape, dtype=bias.dtype,
                                                 device=conv.weight.device))
    return undo


def _reshape_plan(model, meta, state, extra, where) -> dict:
    """What to change in ``model`` (attributes, tensor shapes and dtypes), or a ValueError when
    its structure differs from the file's."""
    records = meta["modules"]
    modules = dict(model.named_modules(remove_duplicate=False))
    missing, unexpected = sorted(set(records) - set(modules)), sorted(set(modules) - set(records))
    if missing or unexpected:
        what = (f"the file has module {missing[0]!r} that the model lacks" if missing
                else f"the model has module {unexpected[0]!r} that the file lacks")
        raise ValueError(f"cannot load {where} into {type(model).__name__}: {what}; pass a fresh "
                         "instance of the saved architecture")
    attrs = []
    for name, m in modules.items():
        rec = records[name]
        if rec["type"] != _type_name(m):
            raise ValueError(f"cannot load {where}: module {name!r} is {_type_name(m)} in the "
                             f"model but {rec['type']} in the file")
        for attr, value in rec["attrs"].items():
            current = getattr(m, attr, None)
            current = tuple(current) if isinstance(current, list) else current
            saved = tuple(value) if isinstance(value, list) else value
            if current == saved:
                continue
            if attr not in WIDTH_ATTRS:
                raise ValueError(f"cannot load {where}: module {name!r} has {attr}={current!r} "
                                 f"in the model but {saved!r} in the file; pass a fresh instance "
                                 "of the saved architecture")
            attrs.append((m, attr, saved if not isinstance(current, list) else list(saved)))
    expected = set(model.state_dict().keys())
    if expected != set(state):
        gone, new = sorted(expected - set(state)), sorted(set(state) - expected)
        what = f"lacks {gone[0]!r}" if gone else f"has an unexpected {new[0]!r}"
        raise ValueError(f"cannot load {where}: the file {what} for this model")
    params, buffers, seen, extra_plan = [], [], set(), []
    for prefix, m in modules.items():
        for pname, p in m._parameters.items():
            key = f"{prefix}.{pname}" if prefix else pname
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            like = state[key]
            if p.shape != like.shape or p.dtype != like.dtype:
                params.append((p, like))
        for bname, b in m._buffers.items():
            key = f"{prefix}.{bname}" if prefix else bname
            if b is None:
                continue
            if bname in m._non_persistent_buffers_set:
                if key not in extra:
                    raise ValueError(f"cannot load {where}: the file lacks buffer {key!r}")
                like = extra[key]
                extra_plan.append((m, bname, like))
            else:
                like = state[key]
            if b.shape != like.shape or b.dtype != like.dtype:
                buffers.append((m, bname, like))
    return {"attrs": attrs, "params": params, "buffers": buffers, "extra": extra_plan}

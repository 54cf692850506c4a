"""Save and load whole (pruned) models: ``accelprune.save(model, path)``, ``accelprune.load(path)``.

A pruned model no longer matches its class's constructor (its layers are narrower), so a
``state_dict`` alone cannot rebuild it; the whole module is pickled instead. Loading therefore
needs ``torch.load(..., weights_only=False)`` (since torch 2.6 the default is ``True``, which
refuses modules); :func:`load` does that for the user. Like any pickle, only load files you
trust, and the model's class must be importable where it is loaded (torchvision,
``accelprune.models``, or your own module — not a class defined in a script's ``__main__``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["save", "load"]

_FORMAT = "accelprune.model"
_VERSION = 1


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (architecture and weights) to ``path``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    torch.save({"format": _FORMAT, "version": _VERSION, "model": model}, path)


def load(path: str | os.PathLike, *, map_location="cpu") -> nn.Module:
    """The model written by :func:`save` (on ``map_location``, CPU by default).

    Only load files you trust: this unpickles Python objects.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except (AttributeError, ImportError) as e:
        raise ValueError(
            f"cannot load {os.fspath(path)!r}: the model's class is not importable here ({e}); "
            f"define it in an importable module, not in a script's __main__"
        ) from e
    if not (
        isinstance(obj, dict)
        and obj.get("format") == _FORMAT
        and isinstance(obj.get("model"), nn.Module)
    ):
        raise ValueError(f"{os.fspath(path)!r} was not written by accelprune.save")
    if obj.get("version", 0) > _VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} has format version {obj['version']}; this accelprune reads "
            f"up to {_VERSION}"
        )
    return obj["model"]

"""Constructors of model architectures that a saved file may name, and nothing else.

A file written by :func:`accelprune.save` may say how to build a fresh instance of its
architecture: ``{"name": "torchvision:resnet18", "kwargs": {"num_classes": 10}}``. Only the
sources in :data:`SOURCES` are known, each through its library's own builder (never
``trust_remote_code``), and arguments that would fetch weights from elsewhere are refused: the
file is data, so what it names must not reach further than building a randomly initialised model.
"""

from __future__ import annotations

import contextlib
import os
import sys

from torch import nn
from torch.nn.modules import module as torch_module

__all__ = ["SOURCES", "available_memory", "build", "check_spec", "infer", "size_limits",
           "spec_from_arguments"]

# Constructor sources load() knows; anything else in a file is refused.
SOURCES = ("torchvision", "accelprune", "timm", "transformers")
# Constructor arguments that would download or read weights: never passed on from a file.
_FORBIDDEN_KWARGS = frozenset({"weights", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                               "checkpoint_path", "weights_backbone", "trust_remote_code"})


def spec_from_arguments(model, constructor, kwargs) -> dict | None:
    """The constructor entry for :func:`accelprune.save`'s arguments: a name and its keyword
    arguments, a Hugging Face config dict, or None (then inferred, see :func:`infer`)."""
    if isinstance(constructor, dict):  # a Hugging Face config dict
        if kwargs is not None:
            raise ValueError("constructor_kwargs goes with a constructor name, not a config dict")
        architectures = constructor.get("architectures") or [type(model).__name__]
        constructor, kwargs = f"transformers:{architectures[0]}", {"config": constructor}
    if constructor is None:
        if kwargs is not None:
            raise ValueError("constructor_kwargs needs a constructor")
        return infer(model)
    if not isinstance(constructor, str):
        raise TypeError("constructor must be a str like 'torchvision:resnet18' or a Hugging Face "
                        f"config dict, got {type(constructor).__name__}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError("constructor_kwargs must be a dict with str keys")
    spec = {"name": constructor, "kwargs": dict(kwargs)}
    check_spec(spec, "constructor")
    return spec


def infer(model) -> dict | None:
    """The constructor of models that say what they are; None for the rest."""
    from accelprune import models

    if type(model) is models.CifarResNet:
        return {"name": "accelprune:CifarResNet",
                "kwargs": {"blocks_per_stage": len(model.layer1),
                           "num_classes": model.fc.out_features,
                           "width": getattr(model, "_width", 16)}}
    if type(model) is models.VGGSmall:
        cfg = [m.out_channels if isinstance(m, nn.Conv2d) else "M" for m in model.features
               if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
        return {"name": "accelprune:VGGSmall",
                "kwargs": {"num_classes": model.classifier[-1].out_features, "cfg": cfg}}
    module = type(model).__module__
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if module.startswith("timm.") and isinstance(arch, str):
        kwargs = {}
        if isinstance(getattr(model, "num_classes", None), int):
            kwargs["num_classes"] = model.num_classes
        return {"name": f"timm:{arch}", "kwargs": kwargs}
    transformers = sys.modules.get("transformers")
    if (module.startswith("transformers.") and transformers is not None
            and getattr(transformers, type(model).__name__, None) is type(model)
            and hasattr(model, "config")):
        return {"name": f"transformers:{type(model).__name__}",
                "kwargs": {"config": model.config.to_dict()}}
    return None


def check_spec(spec, where: str) -> tuple[str, str, dict]:
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str)
            and isinstance(spec.get("kwargs"), dict)):
        raise ValueError(f"{where}: malformed constructor entry")
    source, _, arch = spec["name"].partition(":")
    if source not in SOURCES or not arch:
        raise ValueError(f"{where}: unknown constructor {spec['name']!r}; expected "
                         f"{' / '.join(s + ':NAME' for s in SOURCES)}")
    bad = sorted(_FORBIDDEN_KWARGS & set(spec["kwargs"]))
    if bad:
        raise ValueError(f"{where}: constructor argument {bad[0]!r} would load weights from "
                         "elsewhere; it is not allowed")
    return source, arch, spec["kwargs"]


def build(spec: dict, where: str = "constructor") -> nn.Module:
    """A fresh model from a constructor entry (``{"name": "torchvision:resnet18", "kwargs":
    {...}}``): only the libraries in :data:`SOURCES`, never pretrained weights."""
    source, arch, kwargs = check_spec(spec, where)
    kwargs = dict(kwargs)
    if source == "torchvision":
        import torchvision

        if arch not in torchvision.models.list_models():
            raise ValueError(f"{where}: torchvision has no model {arch!r}")
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    if source == "accelprune":
        from accelprune import models

        builder = getattr(models, arch, None) if arch in models.__all__ else None
        if builder is None or builder is models.BasicBlock:
            raise ValueError(f"{where}: accelprune.models has no model {arch!r}")
        return builder(**kwargs)
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError(f"{where}: the model is a timm model; pip install timm") from None
        if not timm.is_model(arch):
            raise ValueError(f"{where}: timm has no model {arch!r}")
        return timm.create_model(arch, pretrained=False, **kwargs)
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{where}: the model is a Hugging Face model; pip install "
                         "transformers") from None
    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{where}: transformers has no model class {arch!r}")
    config = kwargs.pop("config", None)
    if not isinstance(config, dict) or kwargs:
        raise ValueError(f"{where}: a transformers constructor takes exactly one argument, "
                         "config (a dict)")
    return cls(cls.config_class.from_dict(dict(config)))


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux: MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@contextlib.contextmanager
def size_limits(max_modules: int, max_bytes: int, where: str):
    """Stop a constructor as soon as the model it builds registers more than ``max_modules``
    submodules or ``max_bytes`` of parameters and buffers: a crafted file could name a
    constructor with huge arguments (``blocks_per_stage=10**7``) to exhaust memory. The checks
    run at registration, before the layers' initialisation writes to their tensors."""
    seen = {"modules": 0, "bytes": 0}

    def on_module(module, name, submodule):
        seen["modules"] += 1
        if seen["modules"] > max_modules:
            raise ValueError(f"{where}: the constructor builds more than {max_modules} modules, "
                             "far more than the saved model has")

    def on_tensor(module, name, tensor):
        if tensor is not None:
            seen["bytes"] += tensor.numel() * tensor.element_size()
            if seen["bytes"] > max_bytes:
                raise ValueError(f"{where}: the constructor builds more than "
                                 f"{max_bytes / 1e9:.1f} GB of weights, more than this machine "
                                 "can hold")

    handles = [torch_module.register_module_module_registration_hook(on_module),
               torch_module.register_module_parameter_registration_hook(on_tensor),
               torch_module.register_module_buffer_registration_hook(on_tensor)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()

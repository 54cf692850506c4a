"""Weight shapes of real models, for benchmarks that need only shapes (no weights downloaded)."""
from __future__ import annotations

import torch


def conv_weights(model_name: str, *, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of every Conv2d in a randomly initialised torchvision model."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, model_name)(weights=None)
    return [(n, m.weight.detach()) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d)]


"""What the pipelines need from torch.distributed: decide once, on rank 0, for every rank."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def on_rank0(compute: Callable[[], T], process_group=None) -> T:
    """``compute()`` on rank 0 of ``process_group`` only, its result broadcast to every rank.

    Without an initialised process group of more than one rank, simply ``compute()``. Used where
    ranks must agree exactly (REPrune's selections, C-SGD's clusters) even if their weights or
    random states have drifted apart.
    """
    if not (dist.is_available() and dist.is_initialized()
            and dist.get_world_size(process_group) > 1):
        return compute()
    box = [compute() if dist.get_rank(process_group) == 0 else None]
    src = 0 if process_group is None else dist.get_global_rank(process_group, 0)
    dist.broadcast_object_list(box, src=src, group=process_group)
    return box[0]

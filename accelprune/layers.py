"""Facts about single layers, computed in one place: which layers produce channels, which are
depthwise, how a grouped conv splits its channels, where a weight's output channels are.

Channel groups (:mod:`accelprune.graph`) build their own facts from these.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PRODUCER_TYPES", "BATCHNORM_TYPES", "NORM_TYPES", "is_depthwise", "is_norm",
           "normalises_over_channels", "conv_groups", "blocks_of", "out_channel_view"]

# Layers whose output channels a channel group removes: convolutions (transposed ones too) and
# Linear layers.
PRODUCER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
BATCHNORM_TYPES = nn.modules.batchnorm._BatchNorm
# Normalisation layers other than BatchNorm whose per-channel weights (γ, β) a channel group
# prunes: LayerNorm (torchvision's and timm's ConvNeXt LayerNorm2d are subclasses), GroupNorm,
# torch's RMSNorm. Norms from other libraries are recognised by class name (see is_norm).
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# Class names of norms defined outside torch (Hugging Face LlamaRMSNorm, T5LayerNorm, timm's
# RmsNorm / LayerNorm2d / LayerNormAct...): matched on the lower-cased name's ending.
_NORM_NAME_ENDINGS = ("rmsnorm", "layernorm", "layernorm2d", "groupnorm", "layernormact",
                      "rmsnorm2d", "layernormact2d")


def is_depthwise(m: nn.Module) -> bool:
    """A conv with one filter per input channel (groups == in == out > 1)."""
    return (isinstance(m, nn.modules.conv._ConvNd)
            and 1 < m.groups == m.in_channels == m.out_channels)


def is_norm(m: nn.Module) -> bool:
    """A LayerNorm / RMSNorm / GroupNorm (not a BatchNorm): a torch type of :data:`NORM_TYPES`,
    or a module from another library whose class name ends in one of theirs (Hugging Face's
    ``LlamaRMSNorm``, timm's ``RmsNorm``)."""
    if isinstance(m, NORM_TYPES):
        return True
    if isinstance(m, BATCHNORM_TYPES) or not isinstance(m, nn.Module):
        return False
    return type(m).__name__.lower().endswith(_NORM_NAME_ENDINGS)


def normalises_over_channels(m: nn.Module) -> bool:
    """True when the norm's output for one channel depends on the other channels of the pruned
    dimension: LayerNorm and RMSNorm (mean / variance over the channel dim, LayerNorm2d too) and
    GroupNorm with fewer groups than channels (statistics over each group's channels).

    Removing channels in front of such a norm changes the statistics of those that stay, so a
    fold that merges channels before it (C-SGD) is not exact. False for BatchNorm, InstanceNorm
    and GroupNorm with one channel per group (per-channel statistics), and for non-norm layers.
    """
    if isinstance(m, nn.GroupNorm):
        return m.num_groups < m.num_channels
    return is_norm(m)


def conv_groups(m: nn.Module) -> int:
    """How many independent blocks a grouped (not depthwise) conv splits its channels into; 1 for
    any other layer. A filter of block j only sees, and only feeds, channels of block j."""
    if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not is_depthwise(m):
        return int(m.groups)
    return 1


def blocks_of(modules, n_channels: int) -> int:
    """The finest split of ``n_channels`` that respects every grouped conv in ``modules``: the
    least common multiple of their group counts (convs with 2 and 3 groups: 6 blocks), or 1 when
    that does not divide the width (a grouped conv behind a concat splits a wider tensor, whose
    blocks are not this group's; the surgery check then refuses what it cannot do)."""
    blocks = 1
    for m in modules:
        blocks = math.lcm(blocks, conv_groups(m))
    return blocks if n_channels % blocks == 0 else 1


def out_channel_view(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a weight or its gradient) with output channels on dim 0: a transposed conv stores
    (in, out/groups, *kernel). Grouped transposed convs have no such view: ValueError."""
    if isinstance(m, nn.modules.conv._ConvNd) and m.transposed:
        if m.groups != 1:
            raise ValueError("grouped transposed convolutions have no per-output-channel filters; "
                             "pass the layer in ignored_layers")
        return t.transpose(0, 1)
    return t

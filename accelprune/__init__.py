"""accelprune: structured pruning for PyTorch with native, Numba and Triton hot paths.

Importing accelprune is cheap: the public names below are loaded on first use (PEP 562), so
``import accelprune`` or ``from accelprune.cluster import ward_linkage`` does not import torch,
Torch-Pruning (which imports timm and torchvision) or Triton, and never initialises CUDA.
``from accelprune import REPrune`` loads just what REPrune needs.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Every public name, by the submodule that defines it.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "attention": ("HeadGroup", "find_head_groups", "prune_heads"),
    "cluster": (
        "LayerCut", "cut_linkage", "cut_linkage_ref", "ward_cut_layer", "ward_cut_layer_ref",
        "ward_linkage", "ward_linkage_batched", "ward_linkage_batched_ref", "ward_linkage_ref",
    ),
    "coverage": ("CoverageResult", "max_coverage", "max_coverage_ref"),
    "csgd": ("CSGD", "CSGDReport", "fold_and_prune"),
    "depth": ("LayerPruneResult", "SkippedBlock", "find_blocks", "prune_layers"),
    "fusion": ("find_conv_bn_pairs", "fuse_conv_bn"),
    "graph": ("ChannelGroup", "ModelGraph", "prune_channels"),
    "importance": (
        "BNScaleImportance", "GradientImportance", "L1Importance", "L2Importance",
        "RandomImportance", "REPruneImportance", "TaylorImportance", "bn_l1_penalty_",
    ),
    "kernels": (
        "CSGDPlan", "csgd_transform_", "csgd_transform_dense_ref", "csgd_transform_ref",
        "filter_scores", "filter_scores_ref",
    ),
    "lottery": ("LotteryTicket", "iterative_magnitude_pruning"),
    "masks": ("gradient_magnitude_prune", "magnitude_prune", "make_permanent", "weight_sparsity"),
    "methods": ("METHODS",),
    "pruning": ("prune", "prune_to_macs", "prune_with", "sparsity_for_macs"),
    "reporting": ("Report", "measure_latency", "model_stats", "plot_importance", "report"),
    "reprune": ("REPrune", "REPruneReport"),
    "schedule": ("SCHEDULES", "SparsitySchedule", "sparsity_at"),
    "selection": ("cluster_filters", "layer_keep_counts", "reprune_select"),
    "semi_structured": ("NMReport", "is_nm_sparse", "nm_prune", "to_semi_structured"),
    "serialization": ("load", "save"),
    "training": ("recalibrate_bn",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["models", *_WHERE]


def __getattr__(name: str):
    if name == "models":  # resnet20, resnet56, vgg_small
        return importlib.import_module("accelprune.models")
    if name not in _WHERE:
        raise AttributeError(f"module 'accelprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"accelprune.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

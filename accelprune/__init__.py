"""accelprune: structured pruning for PyTorch with native, Numba and Triton hot paths.

Importing accelprune is cheap: it does not import Triton or initialise CUDA.
"""
from accelprune import models  # resnet20, resnet56, vgg_small
from accelprune.cluster import (
    cut_linkage,
    cut_linkage_ref,
    ward_linkage,
    ward_linkage_batched,
    ward_linkage_batched_ref,
    ward_linkage_ref,
)
from accelprune.coverage import CoverageResult, max_coverage, max_coverage_ref  # numba: lazily
from accelprune.csgd import CSGD, CSGDReport, fold_and_prune
from accelprune.depth import LayerPruneResult, SkippedBlock, find_blocks, prune_layers
from accelprune.fusion import find_conv_bn_pairs, fuse_conv_bn
from accelprune.graph import ChannelGroup, ModelGraph, prune_channels
from accelprune.importance import (
    BNScaleImportance,
    GradientImportance,
    L1Importance,
    L2Importance,
    RandomImportance,
    REPruneImportance,
    TaylorImportance,
    bn_l1_penalty_,
)
from accelprune.kernels import (  # Triton is imported lazily, on the first kernel launch
    CSGDPlan,
    csgd_transform_,
    csgd_transform_dense_ref,
    csgd_transform_ref,
    filter_scores,
    filter_scores_ref,
)
from accelprune.lottery import LotteryTicket, iterative_magnitude_pruning
from accelprune.masks import (
    gradient_magnitude_prune,
    magnitude_prune,
    make_permanent,
    weight_sparsity,
)
from accelprune.pruning import METHODS, prune, prune_to_macs, prune_with, sparsity_for_macs
from accelprune.reporting import Report, measure_latency, model_stats, plot_importance, report
from accelprune.reprune import REPrune, REPruneReport
from accelprune.schedule import SCHEDULES, SparsitySchedule, sparsity_at
from accelprune.selection import cluster_filters, layer_keep_counts, reprune_select
from accelprune.semi_structured import NMReport, is_nm_sparse, nm_prune, to_semi_structured
from accelprune.serialization import load, save

__version__ = "0.1.0"

__all__ = [
    "BNScaleImportance", "CSGD", "CSGDPlan", "CSGDReport", "ChannelGroup", "CoverageResult",
    "GradientImportance", "L1Importance", "L2Importance", "LotteryTicket", "METHODS",
    "ModelGraph", "REPrune", "REPruneImportance", "REPruneReport", "RandomImportance", "Report",
    "SCHEDULES", "SparsitySchedule", "TaylorImportance", "bn_l1_penalty_", "cluster_filters",
    "csgd_transform_", "csgd_transform_dense_ref", "csgd_transform_ref", "cut_linkage",
    "cut_linkage_ref", "filter_scores", "filter_scores_ref", "find_conv_bn_pairs",
    "fold_and_prune", "fuse_conv_bn", "gradient_magnitude_prune", "iterative_magnitude_pruning",
    "layer_keep_counts", "load", "magnitude_prune", "make_permanent", "max_coverage",
    "max_coverage_ref", "measure_latency", "model_stats", "models", "prune", "prune_channels",
    "prune_to_macs", "prune_with", "report", "reprune_select", "save", "sparsity_at",
    "sparsity_for_macs", "ward_linkage", "ward_linkage_batched", "ward_linkage_batched_ref",
    "ward_linkage_ref", "weight_sparsity",
    "LayerPruneResult", "SkippedBlock", "find_blocks", "prune_layers", "NMReport", "is_nm_sparse",
    "nm_prune", "to_semi_structured", "plot_importance",
]

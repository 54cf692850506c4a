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
from accelprune.csgd import CSGD, CSGDReport, cluster_filters
from accelprune.fusion import find_conv_bn_pairs, fuse_conv_bn
from accelprune.graph import ChannelGroup, ModelGraph, fold_and_prune, prune_channels
from accelprune.importance import (
    BNScaleImportance,
    GradientImportance,
    L1Importance,
    L2Importance,
    RandomImportance,
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
from accelprune.pruning import prune
from accelprune.reporting import Report, measure_latency, model_stats, report
from accelprune.reprune import REPruneImportance, layer_keep_counts, reprune_select
from accelprune.reprune_pipeline import REPrune, REPruneReport
from accelprune.schedule import SCHEDULES, SparsitySchedule, sparsity_at
from accelprune.serialization import load, save

__version__ = "0.1.0"

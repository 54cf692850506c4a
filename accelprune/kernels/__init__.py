"""Batched GPU kernels (Triton) with their torch references beside them.

* :func:`filter_scores` / :func:`filter_scores_ref`: per-output-channel importance scores of many
  tensors in one launch (l1, l2, abs, taylor);
* :func:`csgd_transform_` / :func:`csgd_transform_ref` / :func:`csgd_transform_dense_ref`: the
  Centripetal SGD gradient transform, fused over all params, with :class:`CSGDPlan` to
  preprocess the clusters once;
* :func:`nm_keep_mask` / :func:`nm_keep_mask_ref`: N:M (e.g. 2:4) keep masks of many layers'
  scores in one launch.

Importing this package does not import Triton or touch CUDA; the kernels are loaded on first use.
"""
from accelprune.kernels.csgd import (
    CSGDPlan,
    csgd_transform_,
    csgd_transform_dense_ref,
    csgd_transform_ref,
)
from accelprune.kernels.importance import SCORE_KINDS, filter_scores, filter_scores_ref
from accelprune.kernels.nm import nm_keep_mask, nm_keep_mask_ref

__all__ = [
    "SCORE_KINDS",
    "filter_scores",
    "filter_scores_ref",
    "CSGDPlan",
    "csgd_transform_",
    "csgd_transform_ref",
    "csgd_transform_dense_ref",
    "nm_keep_mask",
    "nm_keep_mask_ref",
]

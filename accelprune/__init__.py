"""accelprune: structured pruning for PyTorch with native, Numba and Triton hot paths.

Importing accelprune is cheap: it does not import Triton or initialise CUDA.
"""
from accelprune.cluster import (
    cut_linkage,
    cut_linkage_ref,
    ward_linkage,
    ward_linkage_batched,
    ward_linkage_batched_ref,
    ward_linkage_ref,
)

__version__ = "0.1.0"

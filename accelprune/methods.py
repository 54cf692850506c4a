"""The names of accelprune's pruning methods, importable without torch: the command line lists
them in ``--help`` before anything heavy is loaded."""

__all__ = ["CRITERIA", "METHODS"]

CRITERIA = ("l1", "l2", "bn", "taylor", "gradient", "random")
"""Channel importance criteria by name (:data:`accelprune.importance.IMPORTANCES` maps each to
its class), scored per channel by :func:`accelprune.prune`."""

METHODS = (*CRITERIA, "reprune", "csgd")
"""Every method by name: the criteria, REPrune, and C-SGD's cluster-and-fold (without
centripetal training: lossy; train with :class:`accelprune.CSGD` for lossless folding)."""

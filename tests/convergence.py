"""Forcing C-SGD's clusters to converge in tests: what centripetal training ends at, at once."""
import numpy as np
import torch

from accelprune import CSGD
from accelprune.csgd_heads import head_params


def collapse_clusters(csgd: CSGD) -> None:
    """Every member of a cluster becomes a copy of its cluster's kept channel (or head unit), in
    every tensor C-SGD pulls together: the producers' rows, BatchNorm parameters and running
    statistics, and the q/k/v rows of clustered heads."""
    with torch.no_grad():
        for g, c in zip(csgd.groups, csgd.clusters, strict=True):
            source = torch.from_numpy(c.kept[c.labels])  # each row's cluster representative
            for name in list(g.producers) + list(g.bns):
                m = csgd.graph.module(name)
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(m, attr, None)
                    if isinstance(t, torch.Tensor):
                        t.copy_(t[source.to(t.device)])
        for g, c in zip(csgd.head_groups, csgd.head_clusters, strict=True):
            kept = c.kept[c.labels]  # each unit's cluster representative
            for role, m, attr, _ in head_params(g):
                t = getattr(m, attr)
                source = np.arange(t.shape[0])
                table = g.unit_row_table(role)
                source[table] = table[kept]
                t.copy_(t[torch.from_numpy(source).to(t.device)])

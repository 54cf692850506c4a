"""C-SGD under DistributedDataParallel (two CPU processes, gloo).

N steps of DDP training on two half batches must equal N steps of single-process training on the
whole batch, and every rank must end with the same pruned model. Rank 1's replica is perturbed
before CSGD is built: its own k-means would find other clusters, so the test fails unless the
clusters are rank 0's (broadcast). BatchNorm runs in eval mode while training (running
statistics fixed, γ and β trained): train-mode BN would normalise each rank's half batch on its
own, which single-process training on the whole batch cannot reproduce.
"""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 4
BATCH = 8  # per step, over all ranks
SIZE = 16  # input height and width


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 3, SIZE, SIZE, generator=gen),
             torch.randint(0, 10, (BATCH,), generator=gen)) for _ in range(STEPS)]


def _setup(perturb: bool):
    from accelprune import CSGD
    from accelprune.models import resnet20

    torch.manual_seed(0)
    model = resnet20()
    if perturb:  # a drifted replica: other weights, so other clusters if it decided alone
        with torch.no_grad():
            gen = torch.Generator().manual_seed(99)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
    example = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    csgd = CSGD(model, example, 0.5, centripetal_strength=0.5, weight_decay=1e-3)
    return model, csgd


def _train(model: nn.Module, csgd, step_model: nn.Module, shard) -> None:
    """SGD with momentum, C-SGD through the optimizer hook; ``shard`` picks this process's rows."""
    optimizer = torch.optim.SGD(csgd.param_groups(), lr=0.05, momentum=0.9)
    csgd.register_hook(optimizer)
    model.eval()  # BN on running statistics: per-sample computation, see the module docstring
    for x, y in _batches():
        optimizer.zero_grad()
        nn.functional.cross_entropy(step_model(x[shard]), y[shard]).backward()
        optimizer.step()


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    from accelprune.selection import cluster_filters

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        model, csgd = _setup(perturb=rank == 1)
        first = csgd.clusters[0]  # what this replica's own k-means would give its first group
        features = torch.cat([csgd.graph.module(p).weight.detach().flatten(1)
                              for p in first.producers], dim=1)
        alone = cluster_filters(features, first.n_clusters, seed=csgd.seed)
        ddp = nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's params
        half = BATCH // WORLD
        _train(model, csgd, ddp, slice(rank * half, (rank + 1) * half))
        trained = _snapshot(model)
        report = csgd.prune()  # every rank prunes its replica with the shared clusters
        torch.save({"labels": [c.labels for c in csgd.clusters], "alone": alone,
                    "trained": trained, "pruned": _snapshot(model), "report": report.to_dict()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_training_equals_single_process_and_ranks_prune_identically(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    # clusters: rank 0's everywhere, although rank 1 alone would have chosen others
    for a, b in zip(ranks[0]["labels"], ranks[1]["labels"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(ranks[0]["alone"], ranks[1]["alone"])
    np.testing.assert_array_equal(ranks[0]["labels"][0], ranks[0]["alone"])

    # single process on the whole batches
    model, csgd = _setup(perturb=False)
    for a, b in zip(csgd.clusters, ranks[0]["labels"], strict=True):
        np.testing.assert_array_equal(a.labels, b)
    _train(model, csgd, model, slice(None))
    single_trained = _snapshot(model)
    csgd.prune()
    single_pruned = _snapshot(model)

    untouched = _snapshot(_setup(perturb=False)[0])
    assert any(not torch.equal(single_trained[k], untouched[k]) for k in untouched)  # it trained
    for name, value in single_trained.items():
        for r in ranks:
            torch.testing.assert_close(r["trained"][name], value, rtol=1e-5, atol=1e-6)
    # identical pruned models: bit for bit across ranks, to float tolerance against one process
    assert ranks[0]["pruned"].keys() == ranks[1]["pruned"].keys() == single_pruned.keys()
    for name, value in single_pruned.items():
        assert torch.equal(ranks[0]["pruned"][name], ranks[1]["pruned"][name]), name
        torch.testing.assert_close(ranks[0]["pruned"][name], value, rtol=1e-5, atol=1e-6)
    assert ranks[0]["report"] == ranks[1]["report"]
    assert ranks[0]["report"]["params_after"] < ranks[0]["report"]["params_before"]


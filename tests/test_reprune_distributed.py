"""REPrune under torch.distributed: every rank ends an event with rank 0's model.

Two CPU processes (gloo). Rank 1's weights are deliberately perturbed, as if its copy had
drifted: without the broadcast it would select other filters and the ranks' models would no
longer match.
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    from accelprune import REPrune, reprune_select
    from accelprune.models import resnet20

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = resnet20()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.1, 1.0, generator=torch.Generator().manual_seed(1))
            if rank == 1:  # a drifted replica: different weights and γ
                gen = torch.Generator().manual_seed(99)
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        pruner = REPrune(model, x, 0.5)
        first = pruner.groups[0]
        # what this replica would keep in its first layer if it decided alone
        local = sorted(reprune_select(pruner.graph.module(first.producers[0]).weight, 8).tolist())
        pruner.prune()
        kept = {r.name: r.kept_indices for r in pruner.events[-1].layers}
        widths = {n: tuple(p.shape) for n, p in model.named_parameters()}
        torch.save({"kept": kept, "widths": widths, "local": local}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_applies_rank0_selection(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert results[0]["kept"] == results[1]["kept"]
    assert results[0]["widths"] == results[1]["widths"]
    assert any(len(v) < 16 for v in results[0]["kept"].values())  # the event did prune
    assert results[0]["local"] != results[1]["local"]  # and alone, the replicas would disagree

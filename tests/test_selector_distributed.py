"""The cross-worker cache mode with two real processes (gloo over 127.0.0.1)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from selector import INVALID_NAN_REAL_GRAD, GradientCache
from tests.conftest import free_port

WORLD = 2
SHAPES = [(3, 4), (4,), (5,)]


def rank_gradients(rank: int, step: int) -> list[torch.Tensor | None]:
    """Different gradients on each rank; on rank 1 the last parameter gets none at even steps."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    grads: list[torch.Tensor | None] = [torch.randn(s, generator=generator) for s in SHAPES]
    if rank == 1 and step % 2 == 0:
        grads[-1] = None
    return grads


def make_params() -> list[torch.Tensor]:
    return [nn.Parameter(torch.zeros(s)) for s in SHAPES]


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        caches = {sync: GradientCache(make_params(), mode="momentum", momentum=0.1, sync=sync)
                  for sync in ("all_reduce", "per_worker")}
        reasons = []
        for step in range(4):
            for sync, cache in caches.items():
                grads = rank_gradients(rank, step)
                if step == 2 and rank == 0:  # a NaN on one rank only
                    grads[0] = grads[0].clone()
                    grads[0][0, 0] = float("nan")
                reason = cache.update(grads)
                if sync == "all_reduce":
                    reasons.append(reason)
        flat = GradientCache(make_params(), mode="average", sync="all_reduce")
        flat.update(torch.full((flat.numel,), float(rank + 1)))  # mean over ranks = 1.5
        torch.save({
            "all_reduce": caches["all_reduce"].state_dict(),
            "per_worker": caches["per_worker"].state_dict(),
            "reasons": [r or "" for r in reasons],
            "flat_average": flat.state_dict(),
        }, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_mode_leaves_identical_caches_on_both_ranks(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    synced = [s["all_reduce"] for s in states]
    assert torch.equal(synced[0]["buffer"], synced[1]["buffer"])
    # Step 2 had a NaN on rank 0 only: both ranks skipped it.
    assert [s["reasons"] for s in states] == [["", "", INVALID_NAN_REAL_GRAD, ""]] * 2
    assert synced[0]["num_updates"] == synced[1]["num_updates"] == 3

    # Same values as one cache fed the mean gradient of the two ranks (None → zeros).
    expected = GradientCache(make_params(), mode="momentum", momentum=0.1)
    for step in (0, 1, 3):
        per_rank = [[torch.zeros(s) if g is None else g for g, s in
                     zip(rank_gradients(rank, step), SHAPES)] for rank in range(WORLD)]
        expected.update([(a + b) / 2 for a, b in zip(*per_rank)])
    torch.testing.assert_close(synced[0]["buffer"], expected.buffer)

    # The reference behaviour keeps one cache per worker: they differ.
    separate = [s["per_worker"] for s in states]
    assert not torch.allclose(separate[0]["buffer"], separate[1]["buffer"])
    assert separate[0]["num_updates"] == 3 and separate[1]["num_updates"] == 4

    flat = [s["flat_average"]["buffer"] for s in states]
    assert torch.equal(flat[0], flat[1]) and torch.all(flat[0] == 1.5)

"""The trainer under DistributedDataParallel (2 CPU processes, gloo on 127.0.0.1).

What a Ray Train worker does after ``ray.train.torch.prepare_model``: each rank wraps the same
initial model in DDP, trains on its own candidates, and the ranks' weights stay identical because
every training backward goes through the wrapper (scoring gradients do not).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from test_trainer import candidates_from_real
        from trainer.datasets import LvisDataset
        from trainer.factory import build_trainer

        ds = LvisDataset(data, "train.json", max_images=32)
        for mode in ("batch", "instance"):
            selection = {"granularity": mode, "real_batch_size": 2}
            if mode == "instance":
                selection.update(method="composite", quality_gates={"mask_score": 0.3})
            trainer = build_trainer(ds, training={"batch_size": 2, "device": "cpu"},
                                    selection=selection, seed=0, rank=rank)
            trainer.backend.wrap(lambda m: torch.nn.parallel.DistributedDataParallel(m))
            rows = candidates_from_real(ds, 6, seed=10 + rank, prefix=f"r{rank}_")
            result = trainer.train_on_candidates(rows)
            trainer.train_real_step()
            flat = torch.cat([p.detach().reshape(-1)
                              for p in trainer.backend.trainable_parameters()])
            selector = trainer.selector
            basis = torch.zeros(0)
            if mode == "batch":
                cache = selector.cache.buffer.clone()
            else:  # the sketched class caches and their input bases
                state = selector.caches.state_dict()
                cache = torch.cat([t.reshape(-1) for layers in state["caches"]
                                   for triple in layers for t in triple])
                basis = torch.cat([v.reshape(-1) for v in state["basis"]["bases"]])
            torch.save({"params": flat, "decisions": result.decisions, "cache": cache,
                        "basis": basis}, os.path.join(out, f"{mode}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_stay_in_sync_and_decide_per_worker(builtin_data: Path, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(builtin_data), str(tmp_path)), nprocs=2,
             join=True)
    for mode in ("batch", "instance"):
        r0 = torch.load(tmp_path / f"{mode}_rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{mode}_rank1.pt", weights_only=True)
        assert torch.equal(r0["params"], r1["params"]), mode  # DDP kept replicas identical
        assert [d["rank"] for d in r0["decisions"]] == [0] * 6
        assert [d["rank"] for d in r1["decisions"]] == [1] * 6
        # Per-worker caches (the reference's behaviour): each rank folded in its own batches.
        assert not torch.equal(r0["cache"], r1["cache"]), mode
    # ... over one input basis: bit-identical on both ranks, so the caches are all-reducible.
    r0 = torch.load(tmp_path / "instance_rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "instance_rank1.pt", weights_only=True)
    assert r0["basis"].numel() > 0 and torch.equal(r0["basis"], r1["basis"])

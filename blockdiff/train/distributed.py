"""Multi-process training through torchrun: DDP, or FSDP (fully_shard) for models that do not
fit one device. Single-process runs use none of this and need no process group."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init(device: str) -> Dist:
    """Read torchrun's environment; start a process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def wrap(module: nn.Module, d: Dist, parallel: str) -> nn.Module:
    """DDP replicates and all-reduces gradients; FSDP shards weights, gradients and optimizer
    state per decoder layer (each layer gathered just in time)."""
    if not d.active:
        return module
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in module.model.layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()

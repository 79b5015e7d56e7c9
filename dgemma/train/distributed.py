"""Training on several processes: torch.distributed with DistributedDataParallel, or FSDP2 (`fully_shard`).

Launched by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT); a plain `python`
run is one process and none of this is used. gloo on the CPU, nccl on CUDA.

How a step is split (numbers reused in trainer.py and objective.py):
  1. Every rank draws the same global batch from its own copy of the data source (same seed, same state), so
     the data state is the same everywhere: rank 0's checkpoint holds it, and it resumes on any number of ranks.
  2. The objective draws the random numbers (noise level, canvas, corruption, self-conditioning) for the whole
     global batch on every rank, as one process draws them, and runs the model on rank r's rows only.
  3. Each rank's loss is scaled so that the mean over ranks is the one-process loss; DDP (all-reduce) or FSDP
     (reduce-scatter) average the gradients, so every rank takes the one-process update.
  4. Rank 0 alone writes metrics, checkpoints and exports. Under FSDP the full tensors are gathered from the
     shards (DTensor.full_tensor) first, so a checkpoint has one layout whatever wrote it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .objective import block_diffusion_loss


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wait(self) -> None:
        """Every rank arrives before any goes on: after work only rank 0 does (the last checkpoint, the plot, an
        export), so no rank tears its process group down while rank 0 still writes (a gloo rank that did could
        abort on exit: "terminate called without an active exception", seen once in a clean-clone CI run)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Distributed()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def init_from_env(device_type: str, fsdp: bool = False) -> Distributed:
    """Join the process group torchrun describes; one process (SINGLE, or its FSDP twin) without torchrun."""
    import torch.distributed as dist

    if not launched_by_torchrun():
        return Distributed(fsdp=fsdp)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank(), fsdp)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class LossModule(nn.Module):
    """The objective as a module: DDP and FSDP do their work in forward hooks, so the step must be one forward.
    Under FSDP this is the root, whose forward gathers the parameters outside the layers (embedding, norms)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, cfg, generator, shard: tuple[int, int]):
        return block_diffusion_loss(self.model, batch, cfg, generator, shard)


def wrap(model: nn.Module, d: Distributed) -> nn.Module:
    """The module a step calls: the LossModule, under DDP or fully_shard when there are several ranks. FSDP
    shards each layer, then the root (shards the model's parameters in place: build the optimizer after this)."""
    loss_module = LossModule(model)
    if not d.active:
        return loss_module
    if d.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        return fully_shard(loss_module)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(loss_module, forward_sync_buffers=False)  # buffers: RoPE tables, equal everywhere


def mean_over_ranks(values: list[float], d: Distributed, device) -> list[float]:
    """The mean of each value over the ranks (one all-reduce); the values themselves with one rank."""
    if not d.active:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / d.world_size).tolist()


def full_tensor(t):
    """A whole tensor from an FSDP shard (a collective: every rank calls it); other values as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like):
    """`full` cut the way the DTensor `like` is (every rank calls it with the same tensor); `full` itself when
    `like` is a plain tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)  # every rank holds the same full tensor: no scatter needed


def broadcast_object(obj, d: Distributed):
    """Rank 0's object on every rank (torch.distributed's broadcast_object_list); obj itself with one rank."""
    if not d.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

"""The process's place in a run: one process without any distributed set-up, or a rank of torchrun's.

Under torchrun (WORLD_SIZE > 1 in the environment) the process group is NCCL on CUDA and gloo on
the CPU, each rank on its LOCAL_RANK's GPU; the model is sharded with FSDP2 (`fully_shard` on every
block, then on the root, which holds the embedding, the final norm and the head).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def start(device: str | torch.device | None = None) -> Runtime:
    """Joins torchrun's process group when there is one; device None: CUDA when available."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world_size == 1:
        return Runtime(0, 1, wanted)
    local_rank = int(os.environ["LOCAL_RANK"])
    if wanted.type == "cuda":
        wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo", device_id=wanted if wanted.type == "cuda" else None)
    return Runtime(dist.get_rank(), dist.get_world_size(), wanted)


def stop(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(model: torch.nn.Module, runtime: Runtime, compile: bool) -> torch.nn.Module:
    """Places the model: on one process .to(device) (and torch.compile of the whole model); under
    torchrun fully_shard per block and the root (each block compiled first, as torchtitan does:
    whole-model graphs would break at FSDP's hooks)."""
    if not runtime.distributed:
        model.to(runtime.device)
        if compile:
            model.compile()  # in place: parameter names (and checkpoints) stay those of the plain model
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    for block in model.blocks:
        if compile:
            block.compile()
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def all_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The sum over ranks (in place), for the logged loss and the agreed stop flag."""
    if runtime.distributed:
        dist.all_reduce(values)
    return values


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()

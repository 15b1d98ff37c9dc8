"""Several processes on one training run (``torchrun --nproc-per-node N``), with
torch.distributed: each process takes an equal, contiguous share of every global batch,
its loss is its share of the global batch's loss, and the gradients are summed over the
processes before the optimizer step. Every process then holds the same weights, equal to
those of one process on the whole batch (up to float rounding), so a checkpoint written by
the first process resumes under any number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's place among ``world`` processes (rank 0 writes files and logs)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, rows: int) -> slice:
        """This process's rows of a global batch of ``rows`` (a multiple of ``world``)."""
        size = rows // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the processes (a new tensor; no gradient)."""
        total = value.detach().clone()
        if self.world > 1:
            dist.all_reduce(total)
        return total

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The global batch's rows (every process's ``local``, in rank order), with this
        process's own rows still attached to its graph: a loss over all rows then gives
        each process the gradient of its rows, and the summed gradients are the loss's."""
        if self.world == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[self.rank] = local
        return torch.cat(parts)

    def sum_gradients(self, parameters) -> None:
        """Sum the gradients of ``parameters`` over the processes, in one flat buffer."""
        if self.world == 1:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def start(device: str) -> tuple[Processes, torch.device]:
    """The processes of this run and this process's device: under torchrun (WORLD_SIZE > 1)
    the process group is started (NCCL on CUDA, gloo on CPU) and each process takes the GPU
    of its LOCAL_RANK; otherwise one process on ``device``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch_device = torch.device(device)
    if world == 1:
        return Processes(), torch_device
    if torch_device.type == "cuda":
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(torch_device)
    dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size()), torch_device


def stop(processes: Processes) -> None:
    if processes.world > 1 and dist.is_initialized():
        dist.destroy_process_group()

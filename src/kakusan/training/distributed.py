"""Multi-process training on PyTorch's own engine: launch ``kakusan train`` under ``torchrun`` and each
process finds its rank here. NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU.

    torchrun --standalone --nproc_per_node 8 -m kakusan.cli train --data cifar10 --batch-size 1024 ...

``--batch-size`` stays the *global* batch: every process draws the same global batch (and its noise) from
the shared seed and keeps its slice, so a run on N processes follows the single-process run with the same
batch (up to the summation order of the gradient all-reduce). Rank 0 alone writes logs, grids and
checkpoints; every process can resume from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls) -> "DistInfo":
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as e:
            raise ConfigError(f"bad torchrun environment ({e})") from None
        return cls(rank, world, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        from ..diffusion import resolve_device

        dev = resolve_device(name)
        if self.world > 1 and dev.type == "cuda":
            if torch.cuda.device_count() <= self.local_rank:
                raise ConfigError(f"process {self.rank} wants cuda:{self.local_rank}, but only "
                                  f"{torch.cuda.device_count()} GPU(s) are visible")
            dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
        return dev

    def init_process_group(self, device: torch.device) -> None:
        if self.world == 1 or dist.is_initialized():
            return
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.owns_group = True

    def slice(self, n: int) -> slice:
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, x: torch.Tensor) -> float:
        """The average of a scalar over the processes (itself when alone)."""
        if self.world > 1:
            x = x.detach().float().clone()
            dist.all_reduce(x)
            x /= self.world
        return x.item()

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on any (e.g. the wall-time budget, measured on each)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def shutdown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

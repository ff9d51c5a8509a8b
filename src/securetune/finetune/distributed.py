"""Processes under torchrun: joining the group, wrapping the model (DDP or FSDP2), skipping the
all-reduce between micro-batches, and the per-group gradient norms and clipping."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from securetune.precision import job_device
from securetune.settings import TrainConfig


@dataclass(frozen=True)
class Dist:
    """This process's place under torchrun (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process, so gradients and losses are reduced across them."""
        return self.world > 1

    @property
    def device(self) -> torch.device:
        """This rank's GPU, or the CPU when there is none (`precision.job_device`)."""
        return job_device(self.local_rank)


def init_distributed() -> Dist:
    """Join the torchrun process group (nccl on GPUs, gloo on CPU); a no-op when run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    env = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo")
    return env


def rank0_decides(flag: bool, env: Dist) -> bool:
    """Rank 0's `flag` on every rank (one broadcast), so the processes act on one decision."""
    if not env.active:
        return flag
    decision = torch.tensor([int(flag)], device=env.device)
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def leave_process_group(env: Dist) -> None:
    """Wait for every rank, then leave the group (a no-op when run alone)."""
    if env.active:
        dist.barrier()
        dist.destroy_process_group()


def wrap_for_processes(model: torch.nn.Module, cfg: TrainConfig, env: Dist) -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` per decoder layer, then the root), under torchrun.

    Both keep the parameters' names (FSDP2 swaps each parameter for a DTensor in place), so the
    name-based groups are built from the unwrapped model after wrapping, the same as alone.
    """
    if not env.active:
        return model
    if cfg.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.local_rank] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(model)
    return model


def sync_context(
    wrapped: torch.nn.Module, env: Dist, sync: bool
) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if not env.active:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    wrapped.set_requires_gradient_sync(sync)  # FSDP2
    return contextlib.nullcontext()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def group_squared_norms(param_groups: list[dict], sharded: bool) -> torch.Tensor:
    """Squared L2 norm of each group's gradient (summed over the shards under FSDP)."""
    squares = []
    for group in param_groups:
        grads = [_local(p.grad) for p in group["params"] if p.grad is not None]
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
        squares.append(torch.stack(norms).square().sum() if norms else torch.zeros(()))
    total = torch.stack(squares).to(torch.float64)
    if sharded:
        dist.all_reduce(total)
    return total


def clip_gradients(param_groups: list[dict], squares: torch.Tensor, max_norm: float) -> None:
    """Scale the live gradients so their joint norm is at most `max_norm`, as torch's
    `clip_grad_norm_` does, reusing the groups' norms instead of computing them again."""
    live: list[torch.Tensor] = []
    total = 0.0
    for group, square in zip(param_groups, squares.tolist(), strict=True):
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if grads:  # a held group (SWAT before the switch) has none and does not count
            live += grads
            total += square
    coef = max_norm / (math.sqrt(total) + 1e-6)
    if live and coef < 1.0:
        torch._foreach_mul_(live, coef)

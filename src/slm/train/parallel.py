"""Data parallelism on PyTorch's own engine, kept outside the model code.

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK; absent means
one process) and starts the process group: NCCL on CUDA, gloo on CPU. `parallelize()` then
wraps a model:

- ddp:  `DistributedDataParallel`: every rank holds everything, gradients are all-reduced.
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block is its own
        sharding unit and the root holds the embeddings, final norm and output; parameters,
        gradients and AdamW state are sharded over the ranks and gathered block by block.

Both average gradients over ranks, so with the loss of each micro-batch divided by the
accumulation steps, a step's gradient is the mean over the whole global batch whatever
the split between ranks and accumulation.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from slm.errors import SlmError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SlmError(f"--device {name!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlmError(f"--device {name}: CUDA is not available on this machine")
    return device


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join torchrun's process group if there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """The module to call for forward/backward. For fsdp the model is sharded in place (same object);
    for ddp a wrapper is returned; on one process the model itself."""
    if not info.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    raise SlmError(f"unknown parallel mode {mode!r} (ddp or fsdp)")


def no_grad_sync(engine: nn.Module, mode: str, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-batches but the last."""
    if mode == "ddp" and hasattr(engine, "no_sync") and not sync:
        return engine.no_sync()
    if mode == "fsdp" and hasattr(engine, "set_requires_gradient_sync"):
        engine.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few floats over ranks (fp64, so a mean of losses is exact enough to compare runs)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, info: DistInfo) -> float:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()

"""Small helpers over torch.distributed (which Accelerate uses underneath)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether a torch.distributed process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this is rank 0."""
    return get_rank() == 0


def all_reduce_sum_(tensors: list[Tensor]) -> None:
    """Sum each tensor in place over all processes (a no-op in one process).

    Tensors are reduced in the given order, which must be the same on every rank.
    Float tensors are packed into one flat buffer per dtype to save round trips.
    """
    if not is_distributed() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_equal(values: list[int], device: torch.device | str = "cpu") -> bool:
    """Whether every process passed the same integers (True in one process).

    One all-reduce of ``(v, -v)`` with MAX gives ``max(v)`` and ``-min(v)``; they agree iff all do.
    Values must fit in int64.
    """
    if not is_distributed():
        return True
    t = torch.tensor(values, dtype=torch.int64, device=device)
    both = torch.cat([t, -t])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return bool(torch.equal(both[: t.numel()], -both[t.numel() :]))


def barrier() -> None:
    """Wait for every process (a no-op in one process)."""
    if is_distributed():
        dist.barrier()

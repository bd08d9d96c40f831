"""torch.distributed helpers for ``torchrun``: each rank evaluates a share of the shards, rank 0
writes the results.

Started with ``torchrun --nproc_per_node N -m lkfast.eval ...`` (or ``python -m
torch.distributed.run``), the environment holds RANK/WORLD_SIZE/LOCAL_RANK and ``init()`` joins the
process group (NCCL on CUDA, gloo on the CPU). Without those variables everything here is a
one-process no-op, so the same code path serves both.
"""
from __future__ import annotations

import os
from typing import Any, List

import torch
import torch.distributed as dist


def launched_with_torchrun() -> bool:
    """True when RANK and WORLD_SIZE are in the environment (torchrun sets both)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str) -> None:
    """Join the process group torchrun describes (no-op for one process or when already joined).

    device: the evaluation device; "cuda" picks NCCL and binds this rank to GPU LOCAL_RANK,
    anything else uses gloo."""
    if not launched_with_torchrun() or dist.is_initialized():
        return
    if int(os.environ["WORLD_SIZE"]) == 1:
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> str:
    """The device this rank uses: "cuda" becomes "cuda:LOCAL_RANK" under torchrun."""
    if device == "cuda" and launched_with_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small plans and results)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank (tensors are sent as CPU tensors)."""
    if not active():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if active():
        dist.destroy_process_group()

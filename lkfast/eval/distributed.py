"""torch.distributed helpers for ``torchrun``: each rank evaluates a share of the shards, rank 0
writes the results.

Started with ``torchrun --nproc_per_node N -m lkfast.eval ...`` (or ``python -m
torch.distributed.run``), the environment holds RANK/WORLD_SIZE/LOCAL_RANK and ``init()`` joins the
process group. Without those variables everything here is a one-process no-op, so the same code path
serves both.

The ranks exchange only pickled objects (plans, cached results, records on the CPU), so the group is
gloo's on every device: NCCL would send them through GPU memory and abort a rank that waits longer
than its watchdog's 10 minutes, which a rank does whenever the others still compute the shards of a
task it has finished (one TAIG shard takes longer than that). A rank waits up to ``TIMEOUT``.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, List

import torch
import torch.distributed as dist


def launched_with_torchrun() -> bool:
    """True when RANK and WORLD_SIZE are in the environment (torchrun sets both)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# how long a rank waits for the others in one exchange: the slowest rank's remaining shards of a task
TIMEOUT = datetime.timedelta(hours=48)


def init(device: str) -> None:
    """Join the process group torchrun describes (no-op for one process or when already joined):
    gloo on every device (see the module's docstring); with device "cuda" this rank's GPU is
    ``local_device``'s, made the current one. Joined through ``lkfast.train.join_process_group``, so
    that ``shutdown`` frees the group (see there)."""
    if not launched_with_torchrun() or dist.is_initialized():
        return
    if int(os.environ["WORLD_SIZE"]) == 1:
        return
    if device == "cuda":
        torch.cuda.set_device(local_device(device))
    from lkfast.train import join_process_group

    join_process_group("gloo", timeout=TIMEOUT)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process is rank 0: of the group once joined, and before that (the embedded default
    prepares its data and models before ``init``) the process torchrun started as RANK 0, so that what
    one process must do then is done once (the default took --out's lock on every rank: all but one
    stopped, saying another run was writing there)."""
    if not active() and launched_with_torchrun():
        return int(os.environ["RANK"]) == 0
    return rank() == 0


def local_device(device: str) -> str:
    """The device this rank uses (``lkfast.train.process_device``'s rule): under torchrun with more
    than one process "cuda" becomes "cuda:LOCAL_RANK" (modulo the GPUs this process sees) and
    "cuda:N" is refused (ValueError); otherwise the device as given."""
    from lkfast.train import process_device

    world = int(os.environ["WORLD_SIZE"]) if launched_with_torchrun() else 1
    return str(process_device(device, world))


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

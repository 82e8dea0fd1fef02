"""Sharding sensitivity measurements over `torch.distributed` ranks (torchrun, or your own launcher).

    torchrun --nproc-per-node 4 -m mxfx sensitivity mypkg.models:build --mode isolated --out r.json

Each rank measures every `world_size`-th work item (a (site, candidate) pair) and the results are
gathered with `all_gather_object`, so every rank returns the same report, rows in the same order
as one process would give. A process group that is already initialized is used as it is; without
one, a group is initialized (once per process, destroyed at exit) when the torchrun environment
variables say there are several ranks (`WORLD_SIZE` > 1 with `RANK`, `MASTER_ADDR`, `MASTER_PORT`):
gloo on CPU, nccl when CUDA is available. Otherwise everything runs in this process.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env_world_size() -> int:
    if not all(name in os.environ for name in _ENV):
        return 1
    return int(os.environ["WORLD_SIZE"])


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """(rank, world_size) for a sharded run; initializes a group from the environment if needed
    (kept for later calls and destroyed at interpreter exit)."""
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    if not dist.is_available() or _env_world_size() <= 1:
        yield 0, 1
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    dist.init_process_group(backend)
    # Kept for the process's lifetime (destroyed at exit), not per call: re-initializing on the
    # same MASTER_PORT can meet the previous group's rendezvous keys and fail to connect.
    atexit.register(_destroy)
    log.info("initialized a %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    yield dist.get_rank(), dist.get_world_size()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], rank: int, world_size: int) -> list[tuple[int, T]]:
    """This rank's share of `items` as (index, item): every world_size-th, starting at `rank`."""
    return [(index, item) for index, item in enumerate(items) if index % world_size == rank]


def gather(results: dict[int, Any], world_size: int) -> dict[int, Any]:
    """Merge every rank's {work item index: result} (every rank receives the merged dict)."""
    if world_size == 1:
        return dict(results)
    parts: list[dict[int, Any] | None] = [None] * world_size
    dist.all_gather_object(parts, results)
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()

"""Data-parallel training under torchrun (torch.distributed), or a single process without it.

    torchrun --nproc_per_node=2 train.py ...      # N processes, one per GPU (or CPU workers: gloo)

Every process builds the same model and data and walks the same seeded batch order. Each step the
global batch (and the noise drawn for it) is identical on all ranks; rank r trains on rows
r, r + N, r + 2N, ... of it, and DistributedDataParallel averages the gradients. So N processes
make the same updates as one process with the same batch size, up to float summation order.
Rank 0 alone writes files and prints progress; the others wait at barriers.

Without torchrun (no WORLD_SIZE in the environment) every helper here is a no-op.
"""

import os

import torch
import torch.distributed as dist

from disp.support.errors import DispError


def init(device: str) -> str:
    """Join the process group if launched by torchrun; return the device this rank should use."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if torch.device(device).type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise DispError(f"torchrun started rank {local_rank} but only {torch.cuda.device_count()} GPUs are "
                            f"visible; lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return f"cuda:{local_rank}"
    if torch.device(device).type != "cpu":
        raise DispError(f"multi-process training supports cuda and cpu, not {device}")
    dist.init_process_group("gloo")
    return device


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shard(n: int) -> slice:
    """This rank's rows of a global batch of n rows."""
    return slice(rank(), n, world())


def sum_across(tensor):
    """In-place sum over ranks (each rank filled its own rows, zeros elsewhere)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def gather_lists(items: list, n: int) -> list:
    """Each rank holds the results of its shard(n) rows; return all n results in order, on every rank."""
    if not dist.is_initialized():
        return items
    parts = [None] * world()
    dist.all_gather_object(parts, items)
    out = [None] * n
    for r, part in enumerate(parts):
        out[r::world()] = part
    return out


def wrap(module, device: str):
    """DistributedDataParallel around the training module when running under torchrun."""
    if not dist.is_initialized():
        return module
    ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def close():
    if dist.is_initialized():
        dist.destroy_process_group()

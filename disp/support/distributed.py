"""Data-parallel training under torchrun (torch.distributed), or a single process without it.

    torchrun --nproc_per_node=2 train.py ...      # N processes, one per GPU (or CPU workers: gloo)

Every process builds the same model and data and walks the same seeded batch order. Each step the
global batch (and the noise drawn for it) is identical on all ranks; rank r trains on rows
r, r + N, r + 2N, ... of it (`my_rows`), and `average_gradients` averages the gradients after
backward (what DistributedDataParallel does, in one all-reduce per parameter). So N processes make
the same updates as one process with the same batch size, up to float summation order.
`run_sharded` splits inference work (saliency, regeneration) over the ranks. Rank 0 alone writes
files and prints progress; after training the ranks `leave` together and rank 0 measures alone.

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


def my_rows(n: int) -> slice:
    """This rank's rows of a global batch of n rows (all of them in one process)."""
    return slice(rank(), n, world())


def mean_across(tensor):
    """The mean of a scalar tensor over ranks (itself in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= world()
    return tensor


def average_gradients(params):
    """After backward: every rank's gradients become the mean over ranks (as DDP would make them)."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world()


def run_sharded(fn, items: list):
    """fn(items) computed in shares: rank r runs fn on its contiguous share of the items, and every
    rank gets all results back in order (a list, or a tensor concatenated along dim 0)."""
    if not dist.is_initialized():
        return fn(items)
    per = -(-len(items) // world())
    mine = fn(items[rank() * per:(rank() + 1) * per])
    if isinstance(mine, torch.Tensor):
        mine = mine.cpu()
    parts = [None] * world()
    dist.all_gather_object(parts, mine)
    if isinstance(mine, torch.Tensor):
        return torch.cat(parts)
    return [x for part in parts for x in part]


def leave() -> bool:
    """After training: every rank leaves the process group at the same moment (a barrier, then the
    group is destroyed on all ranks together; a rank that tore it down while another still used it
    could abort). Returns True on rank 0, which goes on alone to measure and write."""
    main = is_main()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return main

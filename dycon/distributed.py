"""Data parallelism for the trainer: process group, batch sharding, global sums.

Launched with ``torchrun --nproc_per_node K -m dycon.train ...`` every process (rank) trains
the same model on its share of each global batch. The design goal is that K processes compute
exactly what one process computes on the whole global batch (to float rounding):

- every loss is written as ratios of batch sums (``dycon.losses``); the sums are
  added over the ranks with one differentiable ``all_reduce`` per step, so every rank holds the
  global loss. Its backward all-reduces the gradient of each sum, so each rank back-propagates
  K times its share of the global gradient, and DistributedDataParallel's averaging over the K
  ranks leaves exactly the global gradient;
- batch norm statistics are global too (``dycon.networks.convert_sync_batchnorm``);
- the per-volume randomness (crop, augmentation, teacher noise) is keyed by the volume's slot in
  the global batch, not by the rank, so it does not depend on how the batch is split.

Dropout masks are drawn per rank, so with dropout > 0 a K-process run matches a one-process run
in distribution, not bit for bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device_type: str) -> Context:
    """Join the process group that torchrun describes in the environment (a single process
    without it): NCCL between GPUs, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def derived_seed(*key: int) -> int:
    """A 63-bit seed that depends on every part of ``key`` (NumPy's SeedSequence mixing): the
    trainer keys each random draw by the seed, the batch number and the volume's slot or rank."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0] >> 1)


def shutdown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_divisible(ctx: Context, batch_size: int, labeled_bs: int) -> None:
    """Every rank gets the same numbers of labelled and unlabelled volumes."""
    unlabeled_bs = batch_size - labeled_bs
    if labeled_bs % ctx.world_size or unlabeled_bs % ctx.world_size:
        raise ValueError(f"{ctx.world_size} processes: train.labeled_bs ({labeled_bs}) and the unlabelled share "
                         f"of train.batch_size ({unlabeled_bs}) must both be divisible by the number of processes")


def shard(batch: list, labeled_bs: int, ctx: Context) -> list:
    """This rank's part of a global batch ``labelled + unlabelled``: a slice of each stream."""
    if not ctx.distributed:
        return batch
    lab, unl = batch[:labeled_bs], batch[labeled_bs:]
    lab_n, unl_n = len(lab) // ctx.world_size, len(unl) // ctx.world_size
    return lab[ctx.rank * lab_n:(ctx.rank + 1) * lab_n] + unl[ctx.rank * unl_n:(ctx.rank + 1) * unl_n]


def global_slots(batch_size: int, labeled_bs: int, ctx: Context) -> list[int]:
    """Positions in the global batch of this rank's volumes (the order ``shard`` returns)."""
    return shard(list(range(batch_size)), labeled_bs, ctx)


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Wraps the global two-stream batch sampler: every rank walks the same global batches and
    loads only its slice, so the sampler state (batches drawn) is the same on every rank."""

    def __init__(self, sampler, labeled_bs: int, ctx: Context):
        self.sampler, self.labeled_bs, self.ctx = sampler, labeled_bs, ctx

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            yield shard(batch, self.labeled_bs, self.ctx)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all ranks, differentiable (the backward sums the gradients over the
    ranks) and traceable by torch.compile: PyTorch's functional all-reduce."""
    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def sum_over_ranks(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """``all_sum`` with several processes, ``x`` itself with one."""
    return all_sum(x) if ctx.distributed else x


def sum_values(values: list[float], ctx: Context) -> list[float]:
    """Sum plain numbers over the ranks (validation scores, counts); no gradient."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()

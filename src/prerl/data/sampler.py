"""A sampler that shards by rank itself and resumes mid-epoch (trainers run with
``use_distributed_sampler: false``, so Lightning does not wrap it).

Each epoch's order is a permutation seeded by (seed, epoch), identical on every rank, of which
rank r takes every world-th index. ``skip_batches`` drops the batches a resumed run has already
trained on, so the data stream after a resume is the stream an uninterrupted run would see.
Every rank gets the same number of items (sharded forward passes are collective): training drops
the tail, validation repeats the first items to fill the last round, as ``DistributedSampler`` does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch shuffle, split over ranks, that can start part-way through an epoch.

    Args:
        num_items: dataset length.
        batch_size: per-rank batch size (only used to convert skipped batches to items).
        seed: shuffle seed.
        shuffle: False keeps dataset order (still sharded).
        pad: fill the last round by repeating items instead of dropping the tail (validation).
        rank, world_size: this process's shard; None reads them from ``torch.distributed`` when
            the sampler is iterated (after the process group exists).
    Lightning calls ``set_epoch`` at every epoch start.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        pad: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.num_items = num_items
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._skip = {}  # epoch -> batches to skip at the start of that epoch

    def _rank_world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank or 0, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, epoch: int, batches: int) -> None:
        """Start ``epoch`` after its first ``batches`` batches (on every rank)."""
        self._skip = {epoch: batches}

    def _indices(self) -> list[int]:
        rank, world = self._rank_world()
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_items)
        total = len(self) * world
        if total > self.num_items:
            order = torch.cat([order, order[: total - self.num_items]])
        return order[rank:total:world].tolist()

    def __iter__(self):
        indices = self._indices()
        skip = self._skip.pop(self.epoch, 0) * self.batch_size
        return iter(indices[skip:])

    def __len__(self) -> int:
        world = self._rank_world()[1]
        return -(-self.num_items // world) if self.pad else self.num_items // world

"""Distributed, resumable epoch sampler that yields *global sample indices*."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Per-epoch permutation shared by all ranks; rank r takes ``perm[r::world_size]``.

    Yields ``epoch * dataset_len + perm[j]``, so datasets (which use ``g % len`` as the item and ``g`` for the
    per-sample seed) see different augmentations every epoch. The permutation comes from
    ``torch.Generator().manual_seed(seed + epoch)`` and is truncated to a multiple of ``world_size`` so every rank
    gets the same number of samples. ``set_start(k)`` skips the first k samples of this rank's share (mid-epoch
    resume); ``set_epoch`` resets it to 0, so call ``set_start`` after ``set_epoch``.
    """

    def __init__(self, dataset_len: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be > 0, got {dataset_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if dataset_len < world_size:
            raise ValueError(f"dataset_len {dataset_len} < world_size {world_size}: ranks would get no samples")
        self.dataset_len = int(dataset_len)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    @property
    def num_per_rank(self) -> int:
        """Samples per rank in a full epoch (same every epoch)."""
        return self.dataset_len // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (permutation and index offset) and reset the start offset to 0."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, k: int) -> None:
        """Skip the first ``k`` samples of this rank's share of the current epoch."""
        if not 0 <= k <= self.num_per_rank:
            raise ValueError(f"start must be in [0, {self.num_per_rank}], got {k}")
        self.start = int(k)

    def _rank_indices(self) -> torch.Tensor:
        n = self.dataset_len
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            perm = torch.arange(n)
        perm = perm[: self.num_per_rank * self.world_size]
        return perm[self.rank :: self.world_size][self.start :] + self.epoch * n

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices().tolist())

    def __len__(self) -> int:
        return self.num_per_rank - self.start

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


def epoch_batches(dataset, sampler: EpochSampler, batch_size: int, start_batch: int, *, num_workers: int,
                  skips=None, stream=None) -> Iterator[dict]:  # fmt: skip
    """Loader batches of `dataset` forever, epoch after epoch, from batch `start_batch` (counted over all epochs) on:
    what pre-training and fine-tuning iterate (a mid-epoch resume loads no skipped data).

    The workers' base seed comes from (sampler seed, epoch, rank), never from the global torch RNG: drawn from it, a
    resumed run's global RNG would run one draw off the uninterrupted run's (drop path and mixup draw from it). File
    datasets decode in the workers (`file_worker_init`, `collate_clips`); `skips` (a SkipLog) strips, logs and counts
    the files they skipped; `stream` (DALI) turns each epoch's loader of decode requests into clips."""
    from torch.utils.data import DataLoader

    from .video import FileClips, collate_clips, file_worker_init

    per_epoch = sampler.num_per_rank // batch_size
    if per_epoch == 0:
        raise ValueError(f"a batch of {batch_size} is larger than this rank's share of the dataset "
                         f"({sampler.num_per_rank} samples)")  # fmt: skip
    epoch, start = divmod(start_batch, per_epoch)
    files = isinstance(dataset, FileClips)
    while True:
        sampler.set_epoch(epoch)
        sampler.set_start(start * batch_size)
        loader = DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
            # torch's worker loop already runs one thread per worker; file workers also tune malloc
            worker_init_fn=file_worker_init if files and num_workers else None,
            prefetch_factor=4 if num_workers else None, persistent_workers=False,
            collate_fn=collate_clips if files else None,
            generator=torch.Generator().manual_seed((sampler.seed * 1_000_003 + epoch) * 1009 + sampler.rank),
        )  # fmt: skip
        if stream is not None:
            loader = stream(loader)
        yield from loader if skips is None else skips.track(loader, epoch)
        epoch, start = epoch + 1, 0

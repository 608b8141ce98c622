"""The pre-training task (AMD, DMAE, (Video)MAE) that `Trainer` runs (amd_fast/train.py hands it `pretrain_task`):
the student, the frozen teacher its objective needs, the masks, the data and the step's FLOP count.

A task gives the loop what it trains (`model`, `objective(batch) -> (loss, parts)`, `param_groups`), the
micro-batches from a step on (`batches`), how its weights are saved and read back (`model_state`,
`own_model_state`), and optionally an evaluation; the loop (amd_fast/trainer.py) does the rest.
"""

from __future__ import annotations

import functools
import logging

import torch

from amd_fast.build import build_mask_generator, build_objective, build_student, build_teacher, compile_blocks
from amd_fast.config import Config
from amd_fast.data import (
    DaliClips,
    EpochSampler,
    FileClips,
    SkipLog,
    dataset_for,
    epoch_batches,
    resolve_loader,
)
from amd_fast.flops import step_flops
from amd_fast.objectives import OBJECTIVES
from amd_fast.optim import param_groups

log = logging.getLogger(__name__)


class PretrainTask:
    def __init__(self, cfg: Config, device: torch.device, rank: int, world_size: int, *, teacher=None,
                 with_data: bool = True, partition=None):  # fmt: skip
        """teacher: an already-built FrozenTeacher (benchmarks); with_data=False: no dataset (benchmarks feed the
        loop's `train_step` themselves); partition: the engine's ZeRO-3 sharding of the teacher (teacher.zero3)."""
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        d = cfg.data
        self.model = build_student(
            cfg.model, cfg.decoder, cfg.objective, cfg.teacher.model, img_size=d.input_size, num_frames=d.num_frames
        ).to(device)
        self.teacher = teacher
        if OBJECTIVES[cfg.objective.name].needs_teacher and teacher is None:
            self.teacher = build_teacher(cfg.teacher, cfg.objective.teacher_layers, device, img_size=d.input_size,
                                         num_frames=d.num_frames, partition=partition)  # fmt: skip
        if cfg.train.compile:
            compile_blocks(self.model, None if self.teacher is None else self.teacher.encoder)
        self.objective = build_objective(cfg.objective, self.model, self.teacher)
        self.masks = build_mask_generator(cfg.mask, cfg.objective.name, self.model.encoder.grid)
        self.dataset = self.sampler = self.skips = None
        if with_data:
            self._build_data()
        self.flops = step_flops(self.model, self.teacher, self.masks.counts, cfg.objective.name, d.batch_size)
        self.tokens_per_clip = self.model.encoder.num_patches

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self.model, weight_decay)

    def model_state(self) -> dict:
        return self.model.state_dict()

    def own_model_state(self, state: dict) -> dict:
        return state

    def describe(self) -> str:
        # ds_numel: a ZeRO-3 partitioned parameter's full size (its numel() is this rank's share)
        n_teacher = 0 if self.teacher is None else sum(getattr(p, "ds_numel", p.numel())
                                                        for p in self.teacher.encoder.parameters())  # fmt: skip
        return (f"student {sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M trainable params, teacher "
                f"{'none' if self.teacher is None else f'{n_teacher / 1e6:.1f}M'}; "
                f"{self.flops.total / 1e9:.1f} GFLOP per micro-batch step")  # fmt: skip

    def evaluate(self, trainer) -> dict | None:
        """With train.eval_probe, at the last step: amd_fast/report.py on rank 0 (the others wait). Otherwise
        pre-training is judged afterwards (amd_fast/probe.py, finetune.py)."""
        if not self.cfg.train.eval_probe or trainer.step < self.cfg.train.steps:
            return None
        res = None
        if self.rank == 0:
            if trainer.last_saved is None:
                log.warning("no end-of-run evaluation: this run wrote no checkpoint")
            else:
                from amd_fast.report import end_of_run

                step, path = trainer.last_saved
                res = end_of_run(self.cfg, path, trainer.out_dir, step, self.device)
        trainer.engine.barrier()
        return res

    def eval_due(self, step: int) -> bool:
        return False

    # ------------------------------------------------------------------------------------------
    # data

    def _build_data(self) -> None:
        d, t = self.cfg.data, self.cfg.train
        dali_on = resolve_loader(d.loader, d.dataset, self.device)  # "gpu" / "cpu": the DALI pipeline decodes
        # One seed for all ranks: every sample is seeded by its global index, which ranks never share,
        # so augmentation and masks differ per rank and do not depend on the number of ranks.
        self.dataset = dataset_for(d, split="train", seed=t.seed, train=True, mask_fn=self.masks, defer_decode=dali_on)
        # File datasets: each loader item is one decoded file giving num_sample clips; data.batch_size counts
        # clips (as the references' batch_size * num_sample), so the loader batches batch_size / num_sample files.
        self.files_per_batch = d.batch_size // d.num_sample
        self.skips = SkipLog(self.dataset.describe) if isinstance(self.dataset, FileClips) else None
        self.dali = None if dali_on is None else DaliClips(
            num_sample=d.num_sample, input_size=d.input_size, max_batch=self.files_per_batch, device=dali_on,
            device_id=self.device.index if dali_on == "gpu" else None, describe=self.dataset.describe,
        )  # fmt: skip
        self.sampler = EpochSampler(len(self.dataset), seed=t.seed, rank=self.rank, world_size=self.world_size)
        self.batches_per_epoch = self.sampler.num_per_rank // self.files_per_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"data.batch_size={d.batch_size} is larger than this rank's share of the dataset "
                f"({self.sampler.num_per_rank} samples)"
            )

    def batches(self, step: int):
        """Micro-batches forever, from optimizer step `step` on (mid-epoch resume loads no skipped data)."""
        # the workers send decode requests when DALI is on: its pipeline makes the clips, one batch ahead
        stream = None if self.dali is None else self.dali.stream
        for batch in epoch_batches(self.dataset, self.sampler, self.files_per_batch, step * self.cfg.optim.accum_steps,
                                   num_workers=self.cfg.data.num_workers, skips=self.skips, stream=stream):  # fmt: skip
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def pretrain_task(cfg, device, rank, world_size, *, teacher=None, with_data=True):
    """PretrainTask, with the engine's ZeRO-3 teacher sharding when teacher.zero3 asks for it."""
    partition = None
    if cfg.teacher.zero3:
        from amd_fast.engine import partition_teacher, uses_deepspeed

        if not uses_deepspeed(cfg.dist, world_size):
            raise ValueError("teacher.zero3=true shards the teacher over DeepSpeed ranks: launch with deepspeed / "
                             "torchrun on several ranks, or set dist.engine=deepspeed")  # fmt: skip
        partition = functools.partial(partition_teacher, backend=cfg.dist.backend)
    return PretrainTask(cfg, device, rank, world_size, teacher=teacher, with_data=with_data, partition=partition)

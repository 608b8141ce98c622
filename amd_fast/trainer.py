"""The training loop: `Trainer.train()` -> `train_step()` -> `forward_backward()`.

Everything the loop needs is built here from the config sections; parallelism is applied from outside by
`self.engine` (amd_fast/engine.py: one plain process, or DeepSpeed ZeRO over the student only), which owns
backward, clipping, the optimizer step, metric reduction across ranks and checkpoint I/O.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from amd_fast import checkpoint as ckpt
from amd_fast.attention import select_backend
from amd_fast.build import build_mask_generator, build_objective, build_student, build_teacher
from amd_fast.config import Config, from_dict, to_dict
from amd_fast.data import (
    DaliClips,
    EpochSampler,
    FileClips,
    SkipLog,
    build_dataset,
    collate_clips,
    file_worker_init,
    resolve_loader,
)
from amd_fast.device import autocast_dtype, default_device, peak_memory_bytes
from amd_fast.engine import (
    consolidate,
    find_resume,
    is_ds_checkpoint,
    list_ds_checkpoints,
    make_engine,
    partition_teacher,
    uses_deepspeed,
    verify_ds_checkpoint,
)
from amd_fast.flops import step_flops
from amd_fast.models import checkpoint_io
from amd_fast.optim import build_optimizer, lr_at, scaled_lrs

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The run went unhealthy (non-finite or spiking losses for too many steps in a row) and was stopped."""


SPIKE_WINDOW = 100  # healthy steps whose median loss a spike is judged against
SPIKE_MIN_HISTORY = 10  # the guard starts once this many healthy steps are known


def _worker_init(_):
    # each loader worker decodes / augments on one thread; the main process keeps the others for GEMMs
    torch.set_num_threads(1)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        device: torch.device | None = None,
        rank: int = 0,
        world_size: int = 1,
        *,
        teacher=None,
        with_data: bool = True,
    ):
        """teacher: an already-built FrozenTeacher (benchmarks); with_data=False: no dataset (benchmarks
        feed `train_step` themselves)."""
        self.cfg = cfg
        self.device = device or default_device()
        self.rank, self.world_size = rank, world_size
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        # every RNG the run may draw from, per rank (loader workers get theirs from torch's, per worker)
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed + rank)
        random.seed(cfg.train.seed + rank)
        d, t = cfg.data, cfg.train
        self.out_dir = Path(t.output_dir)
        if rank == 0:  # a used folder is only reused when told; stale temporary files go
            ckpt.prepare_output_dir(self.out_dir, t.resume, t.overwrite)
            ckpt.run_id(self.out_dir)
        checkpoint_io.trust(t.unsafe_pickle)

        img_size, num_frames = d.input_size, d.num_frames
        # the precision the student runs in, decided (and logged) before anything is built for it
        self.autocast = autocast_dtype(t.autocast, self.device)
        # attention resolves per device and dtype when it first runs; a forced backend that cannot run on this
        # device in this precision fails here, before the data and the teacher are loaded
        select_backend(cfg.model.attn_backend, self.device, self.autocast or torch.float32)
        self.model = build_student(
            cfg.model, cfg.decoder, cfg.objective, cfg.teacher.model, img_size=img_size, num_frames=num_frames
        ).to(self.device)
        self.teacher = teacher
        if cfg.objective.name in ("amd", "dmae") and teacher is None:
            partition = None
            if cfg.teacher.zero3:
                if not uses_deepspeed(cfg.dist, world_size):
                    raise ValueError("teacher.zero3=true shards the teacher over DeepSpeed ranks: launch with "
                                     "deepspeed / torchrun on several ranks, or set dist.engine=deepspeed")  # fmt: skip
                partition = functools.partial(partition_teacher, backend=cfg.dist.backend)
            self.teacher = build_teacher(
                cfg.teacher, cfg.objective.teacher_layers, self.device, img_size=img_size, num_frames=num_frames,
                partition=partition,
            )  # fmt: skip
        self.objective = build_objective(cfg.objective, self.model, self.teacher)
        self.masks = build_mask_generator(cfg.mask, cfg.objective.name, self.model.encoder.grid)

        self.dataset = self.sampler = self.skips = None
        self.batches_per_epoch = 0
        if with_data:
            self._build_data()

        self.global_batch = d.batch_size * cfg.optim.accum_steps * world_size
        self.lr, self.min_lr, self.warmup_lr = scaled_lrs(cfg.optim, self.global_batch)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.lr, self.device)
        o = cfg.optim
        # only the student goes into the engine; the teacher stays outside (replicated, or ZeRO-3 on its own)
        self.engine = make_engine(
            cfg.dist, self.model, self.optimizer, self.device, world_size,
            micro_batch=d.batch_size, accum_steps=o.accum_steps, clip_grad=o.clip_grad, autocast=self.autocast,
        )  # fmt: skip
        self.engine.barrier()  # rank 0 has prepared the folder and its run.json
        self.run_id = ckpt.run_id(self.out_dir)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.spikes_in_row = 0
        self.trouble_from: int | None = None  # the weights version (step) whose loss first went bad, while it lasts
        self.healthy_losses = collections.deque(maxlen=SPIKE_WINDOW)
        self.flops = step_flops(self.model, self.teacher, self.masks.counts, cfg.objective.name, d.batch_size)
        # ds_numel: a ZeRO-3 partitioned parameter's full size (its numel() is this rank's share)
        n_teacher = 0 if self.teacher is None else sum(getattr(p, "ds_numel", p.numel())
                                                        for p in self.teacher.encoder.parameters())  # fmt: skip
        log.info(
            "model: student %.1fM trainable params, teacher %s; global batch %d (micro %d x accum %d x ranks %d); "
            "lr %.3g; %.1f GFLOP per micro-batch step; autocast %s",
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            "none" if self.teacher is None else f"{n_teacher / 1e6:.1f}M",
            self.global_batch, d.batch_size, cfg.optim.accum_steps, world_size, self.lr,
            self.flops.total / 1e9, self.autocast,
        )  # fmt: skip
        if t.resume:
            self.resume(t.resume)
        if self.rank == 0:  # rows logged past the step this run starts from are logged again: each step once
            ckpt.truncate_metrics(self.out_dir / "metrics.jsonl", self.step)

    # ------------------------------------------------------------------------------------------
    # data

    def _build_data(self) -> None:
        d, t = self.cfg.data, self.cfg.train
        dali_on = resolve_loader(d.loader, d.dataset, self.device)  # "gpu" / "cpu": the DALI pipeline decodes
        # One seed for all ranks: every sample is seeded by its global index, which ranks never share,
        # so augmentation and masks differ per rank and do not depend on the number of ranks.
        self.dataset = build_dataset(
            d.dataset, root=d.root, split="train", input_size=d.input_size, num_frames=d.num_frames,
            seed=t.seed, train=True, mask_fn=self.masks, size=d.size, list_file=d.list_file, prefix=d.prefix,
            sampling=d.sampling, frame_stride=d.frame_stride, num_sample=d.num_sample, decoder=d.decoder,
            min_crop_scale=d.min_crop_scale, invert_prob=d.invert_prob, defer_decode=dali_on,
        )  # fmt: skip
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

    def _loader(self, epoch: int, start_batch: int):
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start_batch * self.files_per_batch)
        nw = self.cfg.data.num_workers
        init = file_worker_init if self.skips is not None else _worker_init
        loader = DataLoader(
            self.dataset, batch_size=self.files_per_batch, sampler=self.sampler, num_workers=nw,
            drop_last=True, worker_init_fn=init if nw else None, persistent_workers=False,
            prefetch_factor=4 if nw else None, collate_fn=collate_clips if self.skips is not None else None,
            # the workers' base seed (their torch / numpy / random seeds) from the run seed, the epoch and the rank:
            # drawn from the global RNG instead, a resumed run's global RNG would run one draw off the
            # uninterrupted run's (drop path draws from it)
            generator=torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + epoch) * 1009 + self.rank),
        )  # fmt: skip
        if self.dali is not None:  # the workers sent decode requests: the DALI pipeline makes the clips here
            loader = self.dali.stream(loader)  # one batch decoding ahead of the one trained on
        # Skipped files ride along with the batches from the workers; SkipLog strips, logs and counts them here.
        return loader if self.skips is None else self.skips.track(loader, epoch)

    def batches(self):
        """Micro-batches forever, starting where `self.step` says (mid-epoch resume loads no skipped data)."""
        consumed = self.step * self.cfg.optim.accum_steps
        epoch, start = divmod(consumed, self.batches_per_epoch)
        while True:
            for batch in self._loader(epoch, start):
                yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------------------------------
    # one step

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            loss, parts = self.engine.forward(self.objective, batch)
        self.engine.backward(loss)
        return loss.detach(), parts

    def train_step(self, micro_batches) -> dict[str, torch.Tensor] | None:
        """One optimizer step over `accum_steps` micro-batches. Returns detached loss parts, or None if skipped."""
        lr = lr_at(self.step, self.cfg.train.steps, self.cfg.train.warmup_steps, self.lr, self.min_lr, self.warmup_lr)
        self.engine.set_lr(lr)
        total, sums = None, {}
        for batch in micro_batches:
            loss, parts = self.forward_backward(batch)
            total = loss if total is None else total + loss
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v
        n = len(micro_batches)
        finite = self.engine.step(total)  # clip, step; skipped if the loss or the gradient norm is not finite
        version = self.step  # the weights this step's loss was computed with
        self.step += 1
        if not finite:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
            self._trouble(version)
            log.warning(
                "step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step, self.nonfinite_in_row
            )
            if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
                self._stop(f"{self.nonfinite_in_row} non-finite steps in a row (last at step {self.step})")
            return None
        self.nonfinite_in_row = 0
        out = {"loss": total / n, **{k: v / n for k, v in sums.items()}, "lr": torch.tensor(lr)}
        self._spike_guard(out["loss"], version)
        return out

    # ------------------------------------------------------------------------------------------
    # run health: no checkpoint is written from an unhealthy run, and a stop names the last good one

    def _spike_guard(self, loss: torch.Tensor, version: int) -> None:
        """A loss above train.spike_factor x the median of the last healthy steps is a spike; train.spike_steps of
        them in a row stop the run as a non-finite streak does."""
        t = self.cfg.train
        if t.spike_factor <= 0:
            return
        # Host sync, once per step (the engine's finiteness check already made one); a mean over ranks, so that
        # every rank agrees on the run's health (and so on whether to save).
        value = self.engine.mean_over_ranks(loss.detach().float())
        hist = self.healthy_losses
        if len(hist) >= SPIKE_MIN_HISTORY and value > t.spike_factor * statistics.median(hist):
            self.spikes_in_row += 1
            self._trouble(version)
            log.warning("step %d: loss %.4g is above %g x the median of the last %d healthy steps (%.4g) (%d in a row)",
                        self.step, value, t.spike_factor, len(hist), statistics.median(hist),
                        self.spikes_in_row)  # fmt: skip
            if self.spikes_in_row >= t.spike_steps:
                self._stop(f"{self.spikes_in_row} loss spikes in a row (last at step {self.step}: {value:.4g})")
            return
        self.spikes_in_row = 0
        if math.isfinite(value):
            hist.append(value)
        if self.nonfinite_in_row == 0:
            self.trouble_from = None

    def _trouble(self, version: int) -> None:
        if self.trouble_from is None:
            self.trouble_from = version

    def _stop(self, what: str) -> None:
        """Checkpoints of weights at or after the trouble began are set aside (rank 0), so `--resume auto` takes
        the newest one before it; the message names it."""
        bad = self.trouble_from if self.trouble_from is not None else self.step
        if self.rank == 0:
            found = ckpt.list_checkpoints(self.out_dir) + list_ds_checkpoints(self.out_dir)
            ckpt.set_aside_unhealthy([p for s, p in found if s >= bad])
        self.engine.barrier()
        good = find_resume(self.out_dir)
        where = f"{good}; --resume auto continues from it" if good else "none (no checkpoint was written before it)"
        raise NonFiniteLossError(
            f"{what}; stopping. The trouble began with the weights of step {bad}. The newest checkpoint from before "
            f"it: {where}. Lower optim.base_lr, set optim.clip_grad, or check the input data."
        )

    # ------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> Path | None:
        t = self.cfg.train
        if self.step >= t.steps:
            log.info("nothing to do: step %d >= train.steps %d", self.step, t.steps)
            return find_resume(self.out_dir)
        writer = self._tb_writer() if self.rank == 0 and t.tensorboard else None
        metrics_file = open(self.out_dir / "metrics.jsonl", "a") if self.rank == 0 else None
        bar = self._progress_bar()
        it = self.batches()
        accum = self.cfg.optim.accum_steps
        window = {"sums": {}, "n": 0, "t0": time.perf_counter(), "data": 0.0, "steps": 0}
        last_path = None
        try:
            while self.step < t.steps:
                t_wait = time.perf_counter()
                micro = [next(it) for _ in range(accum)]
                window["data"] += time.perf_counter() - t_wait
                out = self.train_step(micro)
                window["steps"] += 1
                if out is not None:
                    for k, v in out.items():
                        window["sums"][k] = window["sums"].get(k, 0) + v
                    window["n"] += 1
                if bar is not None:
                    bar.update(1)
                if self.step % t.log_interval == 0 or self.step == t.steps:
                    self._log(window, writer, metrics_file, bar)
                    window = {"sums": {}, "n": 0, "t0": time.perf_counter(), "data": 0.0, "steps": 0}
                if self.step % t.save_interval == 0 or self.step == t.steps:
                    if self.trouble_from is None:
                        last_path = self.save()
                    else:  # never a checkpoint from an unhealthy run
                        log.warning("step %d: no checkpoint written: the run is unhealthy since step %d", self.step,
                                    self.trouble_from)  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            if metrics_file is not None:
                metrics_file.close()
        return last_path

    def _log(self, window, writer, metrics_file, bar) -> None:
        dt = time.perf_counter() - window["t0"]
        steps = window["steps"]
        clips = steps * self.cfg.data.batch_size * self.cfg.optim.accum_steps * self.world_size
        rec = {"step": self.step}
        rec.update(self.engine.reduce_metrics(window["sums"], window["n"]))  # the one host sync of the interval
        rec.update(
            clips_per_s=clips / dt,
            tokens_per_s=clips * self.model.encoder.num_patches / dt,
            gflops_per_s=steps * self.cfg.optim.accum_steps * self.flops.total / dt / 1e9,
            data_wait=window["data"] / dt,
            peak_mem_gib=self.engine.peak_memory_max(peak_memory_bytes(self.device)) / 2**30,  # max over ranks
            skipped=self.nonfinite_total,
        )
        if self.skips is not None:
            rec["bad_files"] = self.skips.total
        parts = " ".join(f"{k} {rec[k]:.4f}" for k in ("rec", "dir", "gen", "dist") if k in rec)
        msg = (
            f"step {self.step}/{self.cfg.train.steps} | loss {rec.get('loss', float('nan')):.4f} ({parts}) | "
            f"lr {rec.get('lr', 0):.2e} | {rec['clips_per_s']:.1f} clips/s | {rec['tokens_per_s']:.0f} tok/s | "
            f"{rec['gflops_per_s']:.0f} GFLOP/s | data wait {100 * rec['data_wait']:.0f}% | "
            f"peak mem {rec['peak_mem_gib']:.2f} GiB"
        )
        if self.skips is not None and self.skips.total:
            msg += f" | {self.skips.total} bad files skipped"
        if bar is not None:
            bar.write(msg)
        else:
            log.info(msg)
        if self.skips is not None and self.step == self.cfg.train.steps:
            log.info("run data summary: %s", self.skips.summary())
        if metrics_file is not None:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
        if writer is not None:
            for k, v in rec.items():
                if k != "step":
                    writer.add_scalar(f"train/{k}", v, self.step)
            writer.flush()

    def _tb_writer(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out_dir / "tensorboard"))

    def _progress_bar(self):
        if not self.cfg.train.progress or self.rank != 0:
            return None
        from tqdm import tqdm

        if not sys.stderr.isatty():
            return None  # in a log file the log lines are the progress report
        return tqdm(total=self.cfg.train.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "nonfinite_total": self.nonfinite_total,
            "rng": ckpt.rng_state(),
            "engine": self.engine.state_dict(),
            "config": to_dict(self.cfg),
            "meta": {"world_size": self.world_size, "objective": self.cfg.objective.name, "run_id": self.run_id},
        }

    def save(self) -> Path | None:
        if self.engine.kind == "deepspeed":  # every rank writes its shard; meta.json marks it complete
            state = {
                "step": self.step,
                "nonfinite_total": self.nonfinite_total,
                "config": to_dict(self.cfg),
                "meta": {"world_size": self.world_size, "objective": self.cfg.objective.name, "run_id": self.run_id},
            }
            path = self.engine.save(self.out_dir, self.step, state, self.cfg.train.keep_checkpoints, self.run_id)
            log.info("saved %s", path)
            return path
        if self.rank != 0:
            return None
        path = ckpt.save_checkpoint(self.state_dict(), self.out_dir, self.step, self.run_id,
                                    self.cfg.train.keep_checkpoints)  # fmt: skip
        log.info("saved %s", path)
        return path

    def resume(self, where: str) -> None:
        path = find_resume(self.out_dir) if where == "auto" else Path(where)
        if path is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", self.out_dir)
            return
        self._resume_from(path)

    def _resume_from(self, path: Path) -> None:
        why = verify_ds_checkpoint(path) if is_ds_checkpoint(path) else ckpt.verify_file(path)
        if why is not None and (is_ds_checkpoint(path) or ckpt.read_record(path) is not None):
            raise ckpt.CheckpointError(f"{path}: {why}")
        if is_ds_checkpoint(path) and self.engine.kind == "deepspeed" and self.engine.same_world(path):
            state = self.engine.load(path)  # sharded, as saved: weights, optimizer, this rank's RNG
            self.step = state["step"]
            self.nonfinite_total = state.get("nonfinite_total", 0)
            log.info("resumed from %s at step %d", path, self.step)
            return
        if is_ds_checkpoint(path):  # saved on another number of ranks: consolidate the shards first
            state = consolidate(path)
        else:
            state = ckpt.load_file(path)
        if self.engine.kind == "deepspeed":
            self.engine.load_full(state)
            self.step = state["step"]
            self.nonfinite_total = state.get("nonfinite_total", 0)
            log.info("resumed from %s onto %d ranks (resharded) at step %d", path, self.world_size, self.step)
            return
        saved_cfg = from_dict(state["config"])
        if to_dict(saved_cfg)["model"] != to_dict(self.cfg)["model"]:
            log.warning("resuming %s saved with a different model config", path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.engine.load_state_dict(state.get("engine", {}))
        self.step = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        ckpt.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, self.step)


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

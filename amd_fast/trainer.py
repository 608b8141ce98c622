"""The training loop, one for every task: `Trainer.train()` -> `train_step()` -> `forward_backward()`.

A task supplies the model, its objective `(loss, parts)`, the micro-batches, its parameter groups and optionally
an evaluation. The entry point hands the loop the task's builder (pre-training: `pretraining.pretrain_task`;
fine-tuning: `finetune.ClassifyTask`): the loop never imports a task, and builds it once the run's seeds are set
(so that its initial weights do not depend on who builds it). The loop owns the rest: seeds, the output folder,
precision, the optimizer and its schedule, the run's health (non-finite and spiking losses), logging
(metrics.jsonl, TensorBoard, progress) and when to save. Parallelism is applied from outside by `self.engine`
(amd_fast/engine.py: one plain process, or DeepSpeed ZeRO), which owns backward, clipping, the optimizer step,
metric reduction across ranks and checkpoint files; the loop never asks which.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from amd_fast import checkpoint as ckpt
from amd_fast.attention import select_backend
from amd_fast.cli import evaluates_only
from amd_fast.config import to_dict
from amd_fast.device import autocast_dtype, default_device, peak_memory_bytes
from amd_fast.engine import make_engine
from amd_fast.models import checkpoint_io
from amd_fast.optim import build_optimizer, lr_at, scaled_lrs

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The run went unhealthy (non-finite or spiking losses for too many steps in a row) and was stopped."""


SPIKE_WINDOW = 100  # healthy steps whose median loss a spike is judged against (saved in every checkpoint)


class Trainer:
    def __init__(self, cfg, build_task, device: torch.device | None = None, rank: int = 0, world_size: int = 1,
                 **task_kw):  # fmt: skip
        """cfg: a config root (`Config` for pre-training, `FinetuneRunConfig` for fine-tuning). build_task(cfg,
        device, rank, world_size, **task_kw) -> the task: `pretraining.pretrain_task` (task_kw: `teacher=` an
        already-built FrozenTeacher, `with_data=False` for benchmarks that feed `train_step` themselves) or
        `finetune.ClassifyTask`."""
        self.cfg = cfg
        self.device = device or default_device()
        self.rank, self.world_size = rank, world_size
        t, d, o = cfg.train, cfg.data, cfg.optim
        if t.threads:
            torch.set_num_threads(t.threads)
        # every RNG the run may draw from, per rank (loader workers get theirs from the loader's generator)
        torch.manual_seed(t.seed)
        np.random.seed(t.seed + rank)
        random.seed(t.seed + rank)
        self.out_dir = Path(t.output_dir)
        self.eval_only = evaluates_only(cfg)
        if rank == 0 and not self.eval_only:  # a used folder is only reused when told; stale temporary files go
            # (its teacher/ folder is not looked at: train.py checked the whole folder before its teacher stage ran)
            ckpt.prepare_output_dir(self.out_dir, t.resume, t.overwrite, nested=())
            ckpt.run_id(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_io.trust(t.unsafe_pickle)
        # the precision the model runs in, decided (and logged) before anything is built for it
        self.autocast = autocast_dtype(t.autocast, self.device)
        # attention resolves per device, dtype and shape when it first runs; a forced backend that cannot run on
        # this device in this precision fails here, before the data and the teacher are loaded
        if cfg.model.attn_backend != "auto":
            select_backend(cfg.model.attn_backend, self.device, self.autocast or torch.float32)

        self.task = build_task(cfg, self.device, rank, world_size, **task_kw)
        self.model = self.task.model
        self.global_batch = d.batch_size * o.accum_steps * world_size
        self.lr, self.min_lr, self.warmup_lr = scaled_lrs(o, self.global_batch)
        self.optimizer = build_optimizer(self.task.param_groups(o.weight_decay), o, self.lr, self.device)
        # only the model goes into the engine (a pre-training teacher stays outside: replicated, or ZeRO-3 alone)
        self.engine = make_engine(
            cfg.dist, self.model, self.optimizer, self.device, world_size, micro_batch=d.batch_size,
            accum_steps=o.accum_steps, clip_grad=o.clip_grad, autocast=self.autocast,
            model_state=self.task.model_state, own_model_state=self.task.own_model_state,
        )  # fmt: skip
        self.engine.barrier()  # rank 0 has prepared the folder and its run.json
        self.run_id = ckpt.run_id(self.out_dir)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.spikes_in_row = 0
        self.trouble_from: int | None = None  # the weights version (step) whose loss first went bad, while it lasts
        self.healthy_losses = collections.deque(maxlen=SPIKE_WINDOW)
        self.evaluation: dict | None = None
        self.last_saved: tuple[int, Path] | None = None  # (step, path) of the newest checkpoint this run wrote
        log.info("%s; global batch %d (micro %d x accum %d x ranks %d); lr %.3g; autocast %s", self.task.describe(),
                 self.global_batch, d.batch_size, o.accum_steps, world_size, self.lr, self.autocast)  # fmt: skip
        if t.resume and not self.eval_only:
            self.resume(t.resume)
        if self.rank == 0 and not self.eval_only:  # rows logged past the starting step are logged again: once each
            ckpt.truncate_metrics(self.out_dir / "metrics.jsonl", self.step)

    # what the task holds, read (and, for the objective, replaced: tests wrap it) through the trainer
    objective = property(lambda self: self.task.objective, lambda self, f: setattr(self.task, "objective", f))
    masks = property(lambda self: self.task.masks)
    teacher = property(lambda self: self.task.teacher)
    dataset = property(lambda self: self.task.dataset)
    skips = property(lambda self: self.task.skips)
    flops = property(lambda self: self.task.flops)

    def batches(self):
        """Micro-batches forever, starting where `self.step` says (mid-epoch resume loads no skipped data)."""
        return self.task.batches(self.step)

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
        self.engine.set_lr(lr)  # per group at its `lr_scale` (fine-tuning's layer-wise decay)
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
        them in a row stop the run as a non-finite streak does. Judged from the second step on: against the run's
        first losses until SPIKE_WINDOW are known, and after a resume against the checkpoint's history (a run that
        explodes in its first steps, or is resumed at a rate that blows it up, is caught at once)."""
        t = self.cfg.train
        if t.spike_factor <= 0:
            return
        # Host sync, once per step (the engine's finiteness check already made one); a mean over ranks, so that
        # every rank agrees on the run's health (and so on whether to save).
        value = self.engine.mean_over_ranks(loss.detach().float())
        hist = self.healthy_losses
        if hist and value > t.spike_factor * statistics.median(hist):
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
            found = ckpt.list_checkpoints(self.out_dir) + ckpt.list_ds_checkpoints(self.out_dir)
            ckpt.set_aside_unhealthy([p for s, p in found if s >= bad])
        self.engine.barrier()
        good = ckpt.find_resume(self.out_dir)
        where = (
            f"{good}; --resume auto continues from it"
            if good
            else "none (no checkpoint was written before it); --overwrite starts over (this run is moved aside)"
        )
        raise NonFiniteLossError(
            f"{what}; stopping. The trouble began with the weights of step {bad}. The newest checkpoint from before "
            f"it: {where}. Lower optim.base_lr, set optim.clip_grad, or check the input data."
        )

    # ------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> Path | None:
        """Train to train.steps (evaluating when the task asks), then evaluate once more if the task evaluates
        (the result in `self.evaluation`). Returns the newest checkpoint."""
        t = self.cfg.train
        if self.step >= t.steps:
            log.info("nothing to do: step %d >= train.steps %d", self.step, t.steps)
            return ckpt.find_resume(self.out_dir)
        writer = self._tb_writer(purge=True) if self.rank == 0 and t.tensorboard else None
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
                if self.task.eval_due(self.step) and self.step != t.steps:
                    self.evaluate()
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
        self.evaluate()
        return last_path

    def evaluate(self) -> dict | None:
        """The task's evaluation at this step (None if it has none); kept in `self.evaluation`, its figures written
        to metrics.jsonl and TensorBoard as `eval/<name>` (rank 0)."""
        self.evaluation = self.task.evaluate(self)
        if self.rank == 0 and self.evaluation and not self.eval_only:
            self._log_eval(self.evaluation)
        return self.evaluation

    def _log_eval(self, res: dict) -> None:
        figures = {f"eval/{k}": float(v) for k, v in res.items() if k != "step" and isinstance(v, (int, float))}
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": self.step, **figures}) + "\n")
        if self.cfg.train.tensorboard:
            writer = self._tb_writer()
            for k, v in figures.items():
                writer.add_scalar(k, v, self.step)
            writer.close()

    def _log(self, window, writer, metrics_file, bar) -> None:
        dt = time.perf_counter() - window["t0"]
        steps = window["steps"]
        clips = steps * self.cfg.data.batch_size * self.cfg.optim.accum_steps * self.world_size
        rec = {"step": self.step}
        rec.update(self.engine.reduce_metrics(window["sums"], window["n"]))  # the one host sync of the interval
        rec["clips_per_s"] = clips / dt
        flops, tokens = getattr(self.task, "flops", None), getattr(self.task, "tokens_per_clip", None)
        if tokens:
            rec["tokens_per_s"] = clips * tokens / dt
        if flops is not None:
            rec["gflops_per_s"] = steps * self.cfg.optim.accum_steps * flops.total / dt / 1e9
        rec.update(
            data_wait=window["data"] / dt,
            peak_mem_gib=self.engine.peak_memory_max(peak_memory_bytes(self.device)) / 2**30,  # max over ranks
            skipped=self.nonfinite_total,
        )
        skips = self.task.skips
        if skips is not None:
            rec["bad_files"] = skips.total
        shown = ("loss", "lr", "step", "clips_per_s", "tokens_per_s", "gflops_per_s", "data_wait", "peak_mem_gib",
                 "skipped", "bad_files")  # fmt: skip
        parts = " ".join(f"{k} {v:.4f}" for k, v in rec.items() if k not in shown)
        msg = (
            f"step {self.step}/{self.cfg.train.steps} | loss {rec.get('loss', float('nan')):.4f} ({parts}) | "
            f"lr {rec.get('lr', 0):.2e} | {rec['clips_per_s']:.1f} clips/s"
        )
        if "tokens_per_s" in rec:
            msg += f" | {rec['tokens_per_s']:.0f} tok/s"
        if "gflops_per_s" in rec:
            msg += f" | {rec['gflops_per_s']:.0f} GFLOP/s"
        msg += f" | data wait {100 * rec['data_wait']:.0f}% | peak mem {rec['peak_mem_gib']:.2f} GiB"
        if skips is not None and skips.total:
            msg += f" | {skips.total} bad files skipped"
        if bar is not None:
            bar.write(msg)
        else:
            log.info(msg)
        if skips is not None and self.step == self.cfg.train.steps:
            log.info("run data summary: %s", skips.summary())
        if metrics_file is not None:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
        if writer is not None:
            for k, v in rec.items():
                if k != "step":
                    writer.add_scalar(f"train/{k}", v, self.step)
            writer.flush()

    def _tb_writer(self, purge: bool = False):
        """purge: the loop's writer, at a start in a folder with events (a resume, or a restart before the first
        checkpoint): TensorBoard then hides the points an interrupted attempt logged past this step (every step
        >= purge_step in the earlier event files), as `truncate_metrics` drops their rows."""
        from torch.utils.tensorboard import SummaryWriter

        folder = self.out_dir / "tensorboard"
        return SummaryWriter(str(folder), purge_step=self.step + 1 if purge and folder.exists() else None)

    def _progress_bar(self):
        if not self.cfg.train.progress or self.rank != 0:
            return None
        from tqdm import tqdm

        if not sys.stderr.isatty():
            return None  # in a log file the log lines are the progress report
        return tqdm(total=self.cfg.train.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    # ------------------------------------------------------------------------------------------
    # checkpoints: the engine writes and reads them; the loop says what and when

    def save(self) -> Path | None:
        state = {
            "step": self.step,
            "nonfinite_total": self.nonfinite_total,
            "health": {"healthy_losses": list(self.healthy_losses)},  # the spike guard's history: resumed with it
            "config": to_dict(self.cfg),
            "meta": {"world_size": self.world_size, "task": type(self.task).__name__, "run_id": self.run_id},
        }
        path = self.engine.save(self.out_dir, self.step, state, self.cfg.train.keep_checkpoints, self.run_id)
        if path is not None:
            log.info("saved %s", path)
            self.last_saved = (self.step, path)
        return path

    def resume(self, where: str) -> None:
        # `auto`: an error if the folder holds checkpoints but none can be used (a fresh start would overwrite them)
        path = ckpt.resume_point(self.out_dir) if where == "auto" else Path(where)
        if path is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", self.out_dir)
            return
        # verified (by resume_point already for `auto`); resharded when saved on another number of ranks
        state = self.engine.load(path, verified=where == "auto")
        self.step = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.healthy_losses.extend(state.get("health", {}).get("healthy_losses", ()))
        log.info("resumed from %s at step %d", path, self.step)

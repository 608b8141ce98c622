"""Fine-tune (or evaluate) a pre-trained encoder as a classifier (METHOD.md section 7).

    python amd_fast/finetune.py --config configs/finetune_tiny_video.yaml finetune.init=outputs/run/checkpoint-400.pt
    python amd_fast/finetune.py --config ... finetune.init=ft.pt finetune.eval_only=true finetune.test_crops=3
    deepspeed --num_gpus 8 amd_fast/finetune.py --config ... dist.deepspeed_config=zero2_bf16

Mean pooling + fc_norm + a linear head (init x1e-3), layer-wise LR decay, drop path, label smoothing,
mixup / cutmix, warmup + per-step cosine; multi-view testing (clips x crops, softmax averaged per video,
top-1 / top-5). `finetune.init` reads amd_fast checkpoints (files or DeepSpeed directories) and the official
VideoMAE / AMD / MAE layouts. Writes `<output_dir>/checkpoint-N.pt` (VideoMAE's fine-tune layout under `model`)
and `eval.json`. Out of memory? Lower `data.batch_size` and raise `optim.accum_steps`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # run as a script: make the package importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amd_fast import checkpoint as ckpt  # noqa: E402
from amd_fast.attention import select_backend  # noqa: E402
from amd_fast.config import ConfigError, FinetuneRunConfig, load_config, to_dict  # noqa: E402
from amd_fast.data import DATASETS, EpochSampler, FileClips, SkipLog, build_dataset, collate_clips, file_worker_init  # noqa: E402  # noqa: E402
from amd_fast.device import autocast_dtype, default_device, use_fused_adamw  # noqa: E402
from amd_fast.engine import dist_env, find_resume, is_ds_checkpoint, make_engine, weights_source  # noqa: E402
from amd_fast.models import checkpoint_io  # noqa: E402
from amd_fast.models.classifier import VideoClassifier, layer_decay_groups, load_classifier  # noqa: E402
from amd_fast.models.vit import build_encoder  # noqa: E402
from amd_fast.optim import lr_at, scaled_lrs  # noqa: E402
from amd_fast.trainer import setup_logging  # noqa: E402

log = logging.getLogger("amd_fast.finetune")


# ---------------------------------------------------------------------------------------------------------------
# mixup / cutmix with label smoothing (timm's Mixup in batch mode: the batch is mixed with its reverse)


def smooth_one_hot(labels_B: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels_B.shape[0], num_classes), off, device=labels_B.device).scatter_(
        1, labels_B[:, None], 1.0 - smoothing + off
    )


def mix_batch(video: torch.Tensor, labels_B: torch.Tensor, num_classes: int, f) -> tuple[torch.Tensor, torch.Tensor]:
    """(video [B, C, T, H, W], labels) -> (mixed video, soft targets [B, classes]). Cutmix cuts one H x W box
    through all frames. Draws from the global torch RNG (seeded and checkpointed with the run)."""
    target = smooth_one_hot(labels_B, num_classes, f.label_smoothing)
    if (f.mixup <= 0 and f.cutmix <= 0) or torch.rand(()) >= f.mix_prob:
        return video, target
    use_cutmix = f.cutmix > 0 and (f.mixup <= 0 or torch.rand(()) < f.switch_prob)
    alpha = f.cutmix if use_cutmix else f.mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    flipped = video.flip(0)
    if use_cutmix:
        H, W = video.shape[-2:]
        r = math.sqrt(1.0 - lam)
        cy, cx = int(torch.randint(0, H, ())), int(torch.randint(0, W, ()))
        y0, y1 = max(cy - int(H * r) // 2, 0), min(cy + int(H * r) // 2, H)
        x0, x1 = max(cx - int(W * r) // 2, 0), min(cx + int(W * r) // 2, W)
        video = video.clone()
        video[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually kept
    else:
        video = video * lam + flipped * (1.0 - lam)
    return video, target * lam + target.flip(0) * (1.0 - lam)


class ClassifyObjective:
    """The fine-tuning loss: soft-target cross-entropy on the (mixed) batch."""

    def __init__(self, model: VideoClassifier, cfg, num_classes: int):
        self.model, self.cfg, self.num_classes = model, cfg, num_classes

    def __call__(self, batch):
        video, target = mix_batch(batch["video"], batch["label"], self.num_classes, self.cfg)
        logits = self.model(video)
        loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return loss, {"ce": loss.detach()}


# ---------------------------------------------------------------------------------------------------------------


def num_classes_for(cfg: FinetuneRunConfig, dataset) -> int:
    if cfg.finetune.num_classes:
        return cfg.finetune.num_classes
    if cfg.data.dataset in DATASETS:
        return DATASETS[cfg.data.dataset]
    return max(e.label for e in dataset.entries) + 1  # file lists: labels 0..C-1


class Finetuner:
    """Fine-tuning loop: `train()` -> `train_step()`; `evaluate()` for multi-view testing."""

    def __init__(self, cfg: FinetuneRunConfig, device: torch.device | None = None, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.device = device or default_device()
        self.rank, self.world_size = rank, world_size
        d, f, t, o = cfg.data, cfg.finetune, cfg.train, cfg.optim
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        np.random.seed(t.seed + rank)
        random.seed(t.seed + rank)
        self.out_dir = Path(t.output_dir)
        if rank == 0 and not f.eval_only:  # a used folder is only reused when told; stale temporary files go
            ckpt.prepare_output_dir(self.out_dir, t.resume, t.overwrite)
            ckpt.run_id(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_io.trust(t.unsafe_pickle)

        common = dict(root=d.root, input_size=d.input_size, num_frames=d.num_frames, prefix=d.prefix,
                      sampling=d.sampling, frame_stride=d.frame_stride, decoder=d.decoder,
                      invert_prob=d.invert_prob)  # fmt: skip
        self.train_set = None
        if not f.eval_only:
            self.train_set = build_dataset(
                d.dataset,
                split="train",
                seed=t.seed,
                train=True,
                size=d.size,
                list_file=d.list_file,
                min_crop_scale=d.min_crop_scale,
                **common,
            )
        test_list = f.test_list or d.list_file
        test_root = f.test_root or d.root
        # the test clips are the same for every run (their own fixed seed), whatever train.seed is
        self.test_set = build_dataset(
            d.dataset, **{**common, "root": test_root}, split="test", seed=f.test_seed, train=False,
            size=f.eval_size, list_file=test_list, test_views=(f.test_clips, f.test_crops),
        )  # fmt: skip
        self.num_classes = num_classes_for(cfg, self.train_set or self.test_set)
        self.views = f.test_clips * f.test_crops

        encoder = build_encoder(cfg.model, img_size=d.input_size, num_frames=d.num_frames)
        self.model = VideoClassifier(encoder, self.num_classes, f.head_init_scale)
        if f.init:
            load_classifier(self.model, weights_source(f.init))
        self.model.to(self.device)
        self.objective = ClassifyObjective(self.model, f, self.num_classes)

        self.global_batch = d.batch_size * o.accum_steps * world_size
        self.lr, self.min_lr, self.warmup_lr = scaled_lrs(o, self.global_batch)
        groups = layer_decay_groups(self.model, o.weight_decay, f.layer_decay)
        self.autocast = autocast_dtype(t.autocast, self.device)
        select_backend(cfg.model.attn_backend, self.device, self.autocast or torch.float32)  # a forced one fails here
        fused = use_fused_adamw(o.fused, self.device)
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)
        self.engine = make_engine(
            cfg.dist, self.model, self.optimizer, self.device, world_size,
            micro_batch=d.batch_size, accum_steps=o.accum_steps, clip_grad=o.clip_grad, autocast=self.autocast,
        )  # fmt: skip
        self.step = 0
        self.skips = SkipLog(self.train_set.describe) if isinstance(self.train_set, FileClips) else None
        log.info(
            "finetune: %s, %d classes, %.2fM params, init %s; global batch %d, lr %.3g, layer decay %.2f, "
            "drop path %.2f, mixup %.2f / cutmix %.2f, smoothing %.2f; test %d x %d views",
            cfg.model.arch, self.num_classes, sum(p.numel() for p in self.model.parameters()) / 1e6,
            f.init or "none (scratch)", self.global_batch, self.lr, f.layer_decay, cfg.model.drop_path,
            f.mixup, f.cutmix, f.label_smoothing, f.test_clips, f.test_crops,
        )  # fmt: skip
        if t.resume and not f.eval_only:
            self.resume(t.resume)

    # -- data ------------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def batches(self):
        d = self.cfg.data
        n = len(self.train_set)
        sampler = EpochSampler(n, seed=self.cfg.train.seed, rank=self.rank, world_size=self.world_size)
        per_epoch = sampler.num_per_rank // d.batch_size
        if per_epoch == 0:
            raise ValueError(f"data.batch_size={d.batch_size} > this rank's {sampler.num_per_rank} training samples")
        epoch, start = divmod(self.step * self.cfg.optim.accum_steps, per_epoch)
        files = isinstance(self.train_set, FileClips)
        while True:
            sampler.set_epoch(epoch)
            sampler.set_start(start * d.batch_size)
            loader = DataLoader(
                self.train_set, batch_size=d.batch_size, sampler=sampler, num_workers=d.num_workers, drop_last=True,
                collate_fn=collate_clips if files else None, prefetch_factor=4 if d.num_workers else None,
                worker_init_fn=file_worker_init if d.num_workers and files else None,
                generator=torch.Generator(),  # the loader's base seed must not draw from the (checkpointed) global RNG
            )  # fmt: skip
            for batch in loader if self.skips is None else self.skips.track(loader, epoch):
                yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in ("video", "label")}
            epoch, start = epoch + 1, 0

    # -- training --------------------------------------------------------------------------------

    def train_step(self, micro_batches) -> torch.Tensor | None:
        t = self.cfg.train
        lr = lr_at(self.step, t.steps, t.warmup_steps, self.lr, self.min_lr, self.warmup_lr)
        self.engine.set_lr(lr)  # layer-wise decay: each group at its `lr_scale` of the schedule
        total = None
        for batch in micro_batches:
            with self._autocast():
                loss, _ = self.engine.forward(self.objective, batch)
            self.engine.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        finite = self.engine.step(total)
        self.step += 1
        if not finite:
            log.warning("step %d: non-finite loss or gradient, step skipped", self.step)
            return None
        return total / len(micro_batches)

    def train(self) -> dict:
        t, f = self.cfg.train, self.cfg.finetune
        if f.eval_only:
            return self.evaluate()
        it = self.batches()
        window, n, steps, t0, wait = 0.0, 0, 0, time.perf_counter(), 0.0
        while self.step < t.steps:
            tw = time.perf_counter()
            micro = [next(it) for _ in range(self.cfg.optim.accum_steps)]
            wait += time.perf_counter() - tw
            loss = self.train_step(micro)
            steps += 1
            if loss is not None:
                window, n = window + loss, n + 1
            if self.step % t.log_interval == 0 or self.step == t.steps:
                rec = self.engine.reduce_metrics({"loss": window}, n)  # the host sync of the interval
                dt = time.perf_counter() - t0
                log.info("finetune step %d/%d | loss %.4f | lr %.2e | %.1f clips/s | data wait %.0f%%", self.step,
                         t.steps, rec.get("loss", float("nan")), self.optimizer.param_groups[-1]["lr"],
                         steps * self.global_batch / dt, 100 * wait / dt)  # fmt: skip
                window, n, steps, t0, wait = 0.0, 0, 0, time.perf_counter(), 0.0
            if f.eval_interval and self.step % f.eval_interval == 0 and self.step != t.steps:
                self.evaluate()
            if self.step % t.save_interval == 0 or self.step == t.steps:
                self.save()
        result = self.evaluate()
        if self.skips is not None:
            log.info("run data summary: %s", self.skips.summary())
        return result

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Multi-view test: softmax per view, averaged per video; top-1 / top-5 over this rank's share, summed
        over ranks."""
        f = self.cfg.finetune
        ds = self.test_set
        files = isinstance(ds, FileClips)
        items_per_batch = max(1, f.eval_batch_size // self.views)
        # Every rank runs the same number of forwards (ZeRO-3 all-gathers weights collectively in each): the shards
        # are padded to equal length by wrapping around, and the padding rows are not counted.
        n, w = len(ds), self.world_size
        order = [self.rank + k * w for k in range(-(-n // w))]
        real = torch.tensor([i < n for i in order])
        loader = DataLoader(
            ds, batch_size=items_per_batch, sampler=[i % n for i in order], num_workers=self.cfg.data.num_workers,
            collate_fn=collate_clips if files else None, generator=torch.Generator(),
        )  # fmt: skip
        self.model.eval()
        c1 = c5 = count = 0
        skipped = seen = 0
        for batch in loader:
            video, labels = batch["video"], batch["label"]
            skipped += len(batch.get("skipped", ()))
            if video.dim() == 6:  # [B, V, C, T, H, W] (synthetic views)
                video = video.flatten(0, 1)
            elif files:  # clips of B items, V each, item after item
                labels = labels[:: self.views]
            with self._autocast():
                logits = self.engine.forward(self.model, video.to(self.device))  # in the engine: ZeRO-3 gathers
            probs = logits.float().softmax(-1).view(labels.shape[0], self.views, -1).mean(1)
            top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices.cpu()
            keep = real[seen : seen + labels.shape[0]]
            seen += labels.shape[0]
            c1 += int(((top[:, 0] == labels) & keep).sum())
            c5 += int(((top == labels[:, None]).any(-1) & keep).sum())
            count += int(keep.sum())
        self.model.train()
        sums = self.engine.reduce_metrics({"c1": torch.tensor(float(c1)), "c5": torch.tensor(float(c5)),
                                           "n": torch.tensor(float(count)), "skipped": torch.tensor(float(skipped))},
                                          1)  # fmt: skip
        res = {
            "step": self.step,
            "top1": 100.0 * sums["c1"] / sums["n"],
            "top5": 100.0 * sums["c5"] / sums["n"],
            "videos": int(round(sums["n"] * self.world_size)),
            "views": [f.test_clips, f.test_crops],
            "skipped_test_files": int(round(sums["skipped"] * self.world_size)),
        }
        log.info("eval step %d: top-1 %.2f top-5 %.2f over %d test items, %d x %d views",
                 self.step, res["top1"], res["top5"], res["videos"], f.test_clips, f.test_crops)  # fmt: skip
        if self.rank == 0:
            with open(self.out_dir / "eval.json", "a") as fh:
                fh.write(json.dumps(res) + "\n")
        return res

    # -- checkpoints -----------------------------------------------------------------------------

    def save(self) -> Path | None:
        state = {"step": self.step, "config": to_dict(self.cfg), "meta": {"kind": "finetune", "world": self.world_size}}
        rid = ckpt.run_id(self.out_dir)
        if self.engine.kind == "deepspeed":
            return self.engine.save(self.out_dir, self.step, state, self.cfg.train.keep_checkpoints, rid)
        if self.rank != 0:
            return None
        state.update(model=self.model.export_state_dict(), optimizer=self.optimizer.state_dict(), rng=ckpt.rng_state(),
                     engine=self.engine.state_dict())  # fmt: skip
        path = ckpt.save_checkpoint(state, self.out_dir, self.step, rid, self.cfg.train.keep_checkpoints)
        log.info("saved %s", path)
        return path

    def resume(self, where: str) -> None:
        path = find_resume(self.out_dir) if where == "auto" else Path(where)
        if path is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", self.out_dir)
            return
        if is_ds_checkpoint(path):
            if self.engine.kind != "deepspeed" or not self.engine.same_world(path):
                raise ValueError(f"{path}: a DeepSpeed fine-tune checkpoint resumes on the same number of ranks")
            self.step = self.engine.load(path)["step"]
        else:
            why = ckpt.verify_file(path)
            if why is not None and ckpt.read_record(path) is not None:
                raise ckpt.CheckpointError(f"{path}: {why}")
            state = ckpt.load_file(path)
            own = self.model.state_dict()
            self.model.load_state_dict({(k if k in own else "encoder." + k): v for k, v in state["model"].items()})
            self.optimizer.load_state_dict(state["optimizer"])
            self.engine.load_state_dict(state.get("engine", {}))
            ckpt.set_rng_state(state["rng"])
            self.step = state["step"]
        log.info("resumed from %s at step %d", path, self.step)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a preset in configs/ (default: configs/finetune_tiny_video.yaml)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in output_dir) or a path")
    p.add_argument("--eval-only", action="store_true", help="only evaluate finetune.init (a fine-tuned checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="output_dir holds a previous run: move it aside (<dir>.old-<time>) and start over")  # fmt: skip
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. finetune.init=... train.steps=500")
    return p.parse_args(argv)


DEFAULT_PRESET = Path(__file__).resolve().parents[1] / "configs" / "finetune_tiny_video.yaml"


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world_size, local_rank = dist_env()
    setup_logging(rank)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    if args.eval_only:
        overrides.append("finetune.eval_only=true")
    if args.overwrite:
        overrides.append("train.overwrite=true")
    try:
        cfg = load_config(args.config or DEFAULT_PRESET, overrides, root=FinetuneRunConfig)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    device = None
    if world_size > 1 and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    try:
        finetuner = Finetuner(cfg, device, rank, world_size)
    except checkpoint_io.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = finetuner.train()
    if rank == 0:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

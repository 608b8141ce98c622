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

import contextlib
import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # run as a script: make the package importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amd_fast import checkpoint as ckpt  # noqa: E402
from amd_fast.build import compile_blocks  # noqa: E402
from amd_fast.cli import command_line  # noqa: E402
from amd_fast.config import FinetuneRunConfig  # noqa: E402
from amd_fast.data import (  # noqa: E402
    DATASETS,
    EpochSampler,
    FileClips,
    SkipLog,
    collate_clips,
    dataset_for,
    epoch_batches,
)
from amd_fast.models.checkpoint_io import CheckpointError  # noqa: E402
from amd_fast.models.classifier import VideoClassifier, layer_decay_groups, load_classifier  # noqa: E402
from amd_fast.models.vit import build_encoder  # noqa: E402
from amd_fast.trainer import Trainer  # noqa: E402

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


class ClassifyTask:
    """Fine-tuning as a task of the training loop (amd_fast/trainer.py; `main` hands it over): a classifier on a
    pre-trained encoder, soft-target cross-entropy with mixup / cutmix, layer-wise LR decay, multi-view evaluation."""

    def __init__(self, cfg: FinetuneRunConfig, device: torch.device, rank: int, world_size: int):
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        d, f, t = cfg.data, cfg.finetune, cfg.train
        self.dataset = None if f.eval_only else dataset_for(d, split="train", seed=t.seed, train=True)
        # the test clips are the same for every run (their own fixed seed), whatever train.seed is
        self.test_set = dataset_for(d, split="test", seed=f.test_seed, train=False, root=f.test_root or d.root,
                                    list_file=f.test_list or d.list_file, size=f.eval_size,
                                    test_views=(f.test_clips, f.test_crops))  # fmt: skip
        self.num_classes = num_classes_for(cfg, self.dataset or self.test_set)
        self.views = f.test_clips * f.test_crops
        encoder = build_encoder(cfg.model, img_size=d.input_size, num_frames=d.num_frames)
        self.model = VideoClassifier(encoder, self.num_classes, f.head_init_scale)
        if f.init:  # a file (checked against its record when it has one) or a DeepSpeed directory
            load_classifier(self.model, ckpt.read_checkpoint(f.init))
        self.model.to(device)
        if t.compile:
            compile_blocks(self.model)
        self.objective = ClassifyObjective(self.model, f, self.num_classes)
        self.skips = SkipLog(self.dataset.describe) if isinstance(self.dataset, FileClips) else None
        self.flops, self.tokens_per_clip = None, encoder.num_patches

    def param_groups(self, weight_decay: float) -> list[dict]:
        return layer_decay_groups(self.model, weight_decay, self.cfg.finetune.layer_decay)

    def model_state(self) -> dict:
        return self.model.export_state_dict()  # VideoMAE's fine-tuned layout: official evaluators read it

    def own_model_state(self, state: dict) -> dict:
        own = self.model.state_dict()
        return {(k if k in own else "encoder." + k): v for k, v in state.items()}

    def describe(self) -> str:
        f, cfg = self.cfg.finetune, self.cfg
        return (f"finetune: {cfg.model.arch}, {self.num_classes} classes, "
                f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, init "
                f"{f.init or 'none (scratch)'}, layer decay {f.layer_decay:.2f}, drop path {cfg.model.drop_path:.2f}, "
                f"mixup {f.mixup:.2f} / cutmix {f.cutmix:.2f}, smoothing {f.label_smoothing:.2f}; test "
                f"{f.test_clips} x {f.test_crops} views")  # fmt: skip

    def eval_due(self, step: int) -> bool:
        return bool(self.cfg.finetune.eval_interval) and step % self.cfg.finetune.eval_interval == 0

    def batches(self, step: int):
        d = self.cfg.data
        sampler = EpochSampler(len(self.dataset), seed=self.cfg.train.seed, rank=self.rank, world_size=self.world_size)
        if sampler.num_per_rank < d.batch_size:
            raise ValueError(f"data.batch_size={d.batch_size} > this rank's {sampler.num_per_rank} training samples")
        for batch in epoch_batches(self.dataset, sampler, d.batch_size, step * self.cfg.optim.accum_steps,
                                   num_workers=d.num_workers, skips=self.skips):  # fmt: skip
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in ("video", "label")}

    @torch.no_grad()
    def evaluate(self, trainer) -> dict:
        """Multi-view test: softmax per view, averaged per video; top-1 / top-5 over this rank's share, summed
        over ranks; appended to <output_dir>/eval.json."""
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
        ac = trainer.autocast
        for batch in loader:
            video, labels = batch["video"], batch["label"]
            skipped += len(batch.get("skipped", ()))
            if video.dim() == 6:  # [B, V, C, T, H, W] (synthetic views)
                video = video.flatten(0, 1)
            elif files:  # clips of B items, V each, item after item
                labels = labels[:: self.views]
            with torch.autocast(self.device.type, dtype=ac) if ac else contextlib.nullcontext():
                logits = trainer.engine.forward(self.model, video.to(self.device))  # in the engine: ZeRO-3 gathers
            probs = logits.float().softmax(-1).view(labels.shape[0], self.views, -1).mean(1)
            top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices.cpu()
            keep = real[seen : seen + labels.shape[0]]
            seen += labels.shape[0]
            c1 += int(((top[:, 0] == labels) & keep).sum())
            c5 += int(((top == labels[:, None]).any(-1) & keep).sum())
            count += int(keep.sum())
        self.model.train()
        sums = trainer.engine.reduce_metrics({"c1": torch.tensor(float(c1)), "c5": torch.tensor(float(c5)),
                                              "n": torch.tensor(float(count)),
                                              "skipped": torch.tensor(float(skipped))}, 1)  # fmt: skip
        res = {
            "step": trainer.step,
            "top1": 100.0 * sums["c1"] / sums["n"],
            "top5": 100.0 * sums["c5"] / sums["n"],
            "videos": int(round(sums["n"] * self.world_size)),
            "views": [f.test_clips, f.test_crops],
            "skipped_test_files": int(round(sums["skipped"] * self.world_size)),
        }
        log.info("eval step %d: top-1 %.2f top-5 %.2f over %d test items, %d x %d views",
                 trainer.step, res["top1"], res["top5"], res["videos"], f.test_clips, f.test_crops)  # fmt: skip
        if self.rank == 0:
            with open(trainer.out_dir / "eval.json", "a") as fh:
                fh.write(json.dumps(res) + "\n")
        return res


DEFAULT_PRESET = Path(__file__).resolve().parents[1] / "configs" / "finetune_tiny_video.yaml"


def main(argv=None) -> int:
    flags = (("--eval-only", "finetune.eval_only=true", "only evaluate finetune.init (a fine-tuned checkpoint)"),)
    setup = command_line(argv, __doc__, DEFAULT_PRESET, root=FinetuneRunConfig, flags=flags)
    if isinstance(setup, int):
        return setup
    cfg, device, rank, world_size = setup
    try:
        trainer = Trainer(cfg, ClassifyTask, device, rank, world_size)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.finetune.eval_only:
        res = trainer.evaluate()
    else:
        trainer.train()
        res = trainer.evaluation
    trainer.engine.close()
    if rank == 0:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The end of a pre-training run (`train.eval_probe`): did the student learn something its random init did not have?

At the last step, on held-out clips (the probe's test split, eval transforms):
1. masked reconstruction: the student's loss and, for a teacher this run pre-trained, the teacher's, each next to
   the loss of predicting zeros with the same masks (the trivial solution a `norm_pix_loss` model starts from: a
   patch's standardized pixels have mean 0);
2. a linear probe (amd_fast/probe.py, its code and feature cache; the `probe` section's sizes, epochs and seeds) of
   the student, the same student at random init (seeded by train.seed), the raw pixels and the teacher;
3. a reconstruction PNG of the student (amd_fast/visualize.py).
One table is logged; the trainer writes the figures to metrics.jsonl and TensorBoard (`eval/...`).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from amd_fast.config import Config, ProbeRunConfig, TrainConfig
from amd_fast.models.checkpoint_io import CheckpointError
from amd_fast.models.vit import patchify
from amd_fast.objectives import reconstruction_target
from amd_fast.probe import PIXELS, probe_sets, run_probe
from amd_fast.visualize import load_pretrain_model, student_masks, visualize_checkpoint

log = logging.getLogger(__name__)

RECON_CLIPS = 256  # held-out clips for the reconstruction figures (the probe's first test items)


@torch.no_grad()
def masked_reconstruction(src: str | Path, video_BCTHW: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """A pre-training checkpoint on `video` with its own student masks (drawn from `seed`) -> (its reconstruction
    loss, the loss of predicting zeros), both as its objective computes them (mse over the decoded tokens)."""
    model, cfg, _ = load_pretrain_model(src)
    enc = model.encoder
    masks = student_masks(cfg, model, video_BCTHW.shape[0], seed)
    patches = patchify(video_BCTHW, enc.patch_size, enc.tubelet_size)
    x, _ = enc.forward_features(patches, masks["ids_vis_s"])
    pred = model.forward_decoder(x[:, enc.num_prefix :], masks["ids_vis_s"], masks["ids_dec"])
    target = reconstruction_target(patches, masks["ids_dec"], norm_pix=cfg.objective.norm_pix_loss)
    return float(F.mse_loss(pred.float(), target)), float(target.pow(2).mean())


def _probe_config(cfg: Config, model_cfg, init: str, out: Path) -> ProbeRunConfig:
    t = cfg.train
    probe = copy.deepcopy(cfg.probe)
    probe.init = init
    probe.cache_dir = probe.cache_dir or str(out / "features")
    train = TrainConfig(output_dir=str(out), seed=t.seed, threads=t.threads, autocast=t.autocast,
                        unsafe_pickle=list(t.unsafe_pickle))  # fmt: skip
    return ProbeRunConfig(model=copy.deepcopy(model_cfg), data=copy.deepcopy(cfg.data), probe=probe, train=train)


def end_of_run(cfg: Config, checkpoint: Path, out_dir: Path, step: int, device: torch.device | None = None) -> dict:
    """The report at the end of a pre-training run -> flat figures {name: number} plus "png" (a path)."""
    t0 = time.perf_counter()
    out = Path(out_dir) / "probe"
    teacher = cfg.teacher.checkpoint if cfg.teacher.checkpoint else None
    rows = []  # (label, key, reconstruction (loss, zeros) or None, probe result)

    # held-out clips: the probe's first test items
    pcfg = _probe_config(cfg, cfg.model, str(checkpoint), out)
    n_rec = min(RECON_CLIPS, cfg.probe.test_size) if cfg.probe.test_size else RECON_CLIPS
    test_set = probe_sets(pcfg, test_size=n_rec)[1]
    items = [test_set[i] for i in range(min(n_rec, len(test_set)))]
    video = torch.stack([it["video"][0] if isinstance(it["video"], list) else it["video"] for it in items])

    def recon(src):
        try:
            return masked_reconstruction(src, video)
        except CheckpointError as e:  # an official teacher file: an encoder without decoder or config
            log.info("no held-out reconstruction for %s: %s", src, e)
            return None

    name = cfg.objective.name
    rows.append((f"student ({name}, step {step})", "student", recon(checkpoint), run_probe(pcfg, device)))
    rows.append(("student at random init", "random", None, run_probe(_probe_config(cfg, cfg.model, "", out), device)))
    rows.append(("raw pixels", "pixels", None, run_probe(_probe_config(cfg, cfg.model, PIXELS, out), device)))
    if teacher:
        tcfg = _probe_config(cfg, cfg.teacher.model, teacher, out)
        rows.append((f"teacher ({Path(teacher).name})", "teacher", recon(teacher), run_probe(tcfg, device)))
    png = visualize_checkpoint(checkpoint, Path(out_dir) / f"recon-{step}.png", samples=4, frames=4, video=video)
    seconds = time.perf_counter() - t0

    figures: dict = {"seconds": seconds}
    for _, key, rec, pr in rows:
        figures[f"probe_{key}_top1"] = pr["top1_mean"]
        figures[f"probe_{key}_std"] = pr["top1_std"]
        if rec is not None:
            figures[f"rec_{key}"], figures[f"rec_{key}_zeros"] = rec
    p = cfg.probe
    lines = [
        f"end-of-run evaluation at step {step}, {seconds:.1f} s (held-out reconstruction: {len(video)} test clips; "
        f"linear probe: {rows[0][3]['train_items']} train / {rows[0][3]['test_items']} test clips, {p.epochs} "
        f"epochs, probe seeds {p.seeds}):",
        f"  {'encoder':<40} | {'masked rec (predicting zeros)':<32} | probe top-1",
    ]
    for label, _, rec, pr in rows:
        r = "-" if rec is None else f"{rec[0]:.4f} ({rec[1]:.4f}): {rec[0] / rec[1]:.2f}x"
        top1 = f"{pr['top1_mean']:.2f}" + (f" +- {pr['top1_std']:.2f}" if len(p.seeds) > 1 else "")
        lines.append(f"  {label:<40} | {r:<32} | {top1}")
    lines.append(f"  the student's reconstructions: {png}")
    for line in lines:
        log.info(line)
    return {**figures, "png": str(png)}

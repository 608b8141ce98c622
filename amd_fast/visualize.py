"""Reconstruction grids: input, mask and reconstruction of a pre-trained model, for images and video frames.

    python amd_fast/visualize.py outputs/tiny_video_amd/checkpoint-300.pt [--out recon.png] [--samples 4]

Shape legend: B samples, N tokens, K values per token (C * tubelet * p * p), M decoded tokens, C channels.

How the predicted patches become pixels. With `norm_pix_loss` (the default, as VideoMAE) the decoder predicts each
masked patch standardized by its own mean and std, which the model never sees. VideoMAE's visualization puts
each patch's *true* mean and std back in, so the picture carries ground truth in every masked patch (its
brightness and contrast) and flatters the model. Here the "reconstruction" column uses only what the model had:
the predicted standardized values scaled by the mean and std of the sample's *visible* pixels (per channel). The
flattering VideoMAE-style column is drawn beside it, labelled as such. A model trained with
`objective.norm_pix_loss=false` predicts pixels, and both columns are the prediction itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the package importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amd_fast import checkpoint as ckpt  # noqa: E402
from amd_fast.build import build_mask_generator, build_student  # noqa: E402
from amd_fast.config import from_dict  # noqa: E402
from amd_fast.data import IMAGENET_MEAN, IMAGENET_STD, dataset_for  # noqa: E402
from amd_fast.masks import collate_masks  # noqa: E402
from amd_fast.models.pretrain import PretrainModel  # noqa: E402
from amd_fast.models.vit import patchify  # noqa: E402


def unpatchify(tokens_BNCk: torch.Tensor, grid: tuple[int, int, int], p: int, u: int) -> torch.Tensor:
    """[B, N, C, u*p*p] (Conv3d kernel order) -> [B, C, T, H, W]; the inverse of `patchify`."""
    B, N, C, _ = tokens_BNCk.shape
    t, h, w = grid
    x = tokens_BNCk.reshape(B, t, h, w, C, u, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)  # B C t u h p w p
    return x.reshape(B, C, t * u, h * p, w * p)


@torch.no_grad()
def reconstruct(model: PretrainModel, video_BCTHW: torch.Tensor, masks: dict, norm_pix: bool = True) -> dict:
    """-> {"input", "masked", "recon", "recon_videomae"}: [B, C, T, H, W] in [0, 1].

    "recon": visible patches as they are, masked patches from the prediction de-normalized with statistics of the
    visible pixels only; "recon_videomae": the same with each patch's true mean / std (what VideoMAE's tool does).
    """
    model.eval()
    enc = model.encoder
    p, u, C = enc.patch_size, enc.tubelet_size, video_BCTHW.shape[1]
    patches = patchify(video_BCTHW, p, u)
    ids_vis, ids_dec = masks["ids_vis_s"], masks["ids_dec"]
    x, _ = enc.forward_features(patches, ids_vis)
    pred = model.forward_decoder(x[:, enc.num_prefix :], ids_vis, ids_dec)  # [B, M, K] in (u, p, p, C) order
    B, N, K = patches.shape
    mean = patches.new_tensor(IMAGENET_MEAN).view(1, 1, 3, 1)
    std = patches.new_tensor(IMAGENET_STD).view(1, 1, 3, 1)
    pix = patches.view(B, N, C, K // C) * std + mean  # [0, 1]
    pred = pred.view(B, -1, K // C, C).transpose(2, 3)  # [B, M, C, K/C]
    dec_idx = ids_dec[:, :, None, None].expand(-1, -1, C, K // C)
    true = pix.gather(1, dec_idx)
    if norm_pix:
        vis = pix.gather(1, ids_vis[:, :, None, None].expand(-1, -1, C, K // C))
        v_mean = vis.mean(dim=(1, 3), keepdim=True)  # per sample and channel, visible pixels only
        v_std = vis.std(dim=(1, 3), keepdim=True)
        honest = pred * v_std + v_mean
        flatter = pred * (true.var(-1, unbiased=True, keepdim=True).sqrt() + 1e-6) + true.mean(-1, keepdim=True)
    else:
        honest = flatter = pred
    vis_mask = torch.zeros(B, N, dtype=torch.bool)
    vis_mask.scatter_(1, ids_vis, True)
    masked = torch.where(vis_mask[:, :, None, None], pix, torch.full_like(pix, 0.5))

    def fill(values):
        return unpatchify(pix.scatter(1, dec_idx, values), enc.grid, p, u).clamp(0, 1)

    return {
        "input": unpatchify(pix, enc.grid, p, u).clamp(0, 1),
        "masked": unpatchify(masked, enc.grid, p, u),
        "recon": fill(honest),
        "recon_videomae": fill(flatter),
    }


COLUMNS = (("input", "input"), ("masked", "mask\n(grey: hidden)"), ("recon", "reconstruction\n(visible stats)"),
           ("recon_videomae", "VideoMAE-style\n(true patch stats)"))  # fmt: skip


def save_grid(out: dict, path: str | Path, frames: int = 4, title: str = "") -> Path:
    """One row per sample; per column the first `frames` frames side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    B, _, T = out["input"].shape[:3]
    ts = torch.linspace(0, T - 1, min(frames, T)).round().long().tolist()
    width = max(2.4, 1.1 * len(ts))  # per column: room for the title even for one frame
    fig, axes = plt.subplots(B, len(COLUMNS), figsize=(width * len(COLUMNS), 2.2 * B + 0.6), squeeze=False)
    for b in range(B):
        for c, (key, name) in enumerate(COLUMNS):
            strip = torch.cat([out[key][b, :, t] for t in ts], dim=-1)  # [C, H, W * frames]
            ax = axes[b][c]
            ax.imshow(strip.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_pretrain_model(src: str | Path) -> tuple[PretrainModel, object, dict]:
    """A pre-training checkpoint (file or DeepSpeed directory) -> (its PretrainModel in eval mode on the CPU, its
    Config, the checkpoint dict)."""
    state = ckpt.read_checkpoint(src)
    if "config" not in state:
        raise ckpt.CheckpointError(f"{src}: not an amd_fast pre-training checkpoint (it has no config)")
    cfg = from_dict(state["config"])
    d = cfg.data
    model = build_student(cfg.model, cfg.decoder, cfg.objective, cfg.teacher.model, img_size=d.input_size,
                          num_frames=d.num_frames)  # fmt: skip
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state


def student_masks(cfg, model: PretrainModel, samples: int, seed: int = 0) -> dict:
    """`samples` student masks (visible and decoded tokens at the config's student ratio), drawn from `seed`."""
    gen = build_mask_generator(cfg.mask, "mae", model.encoder.grid)
    g = torch.Generator().manual_seed(seed)
    return collate_masks([gen(g) for _ in range(samples)])


def visualize_checkpoint(src: str | Path, out_path: str | Path, samples: int = 4, frames: int = 4, seed: int = 0,
                         video: torch.Tensor | None = None):  # fmt: skip
    """A pre-training checkpoint (file or DeepSpeed directory) -> a PNG grid on test items of its own data (or on
    `video` [B, C, T, H, W], its first `samples` clips)."""
    model, cfg, state = load_pretrain_model(src)
    if video is None:
        ds = dataset_for(cfg.data, split="test", seed=seed, train=False, size=0)
        items = [ds[i] for i in range(samples)]
        video = torch.stack([it["video"][0] if isinstance(it["video"], list) else it["video"] for it in items])
    video = video[:samples]
    out = reconstruct(model, video, student_masks(cfg, model, len(video), seed), cfg.objective.norm_pix_loss)
    title = f"{Path(src).name}: {cfg.objective.name}, step {state.get('step', '?')}, mask {cfg.mask.student_ratio:.2f}"
    return save_grid(out, out_path, frames, title)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a pre-training checkpoint (checkpoint-N.pt or a DeepSpeed checkpoint-N/)")
    ap.add_argument("--out", default=None, help="PNG path (default: recon-<step>.png beside the checkpoint)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--frames", type=int, default=4, help="frames shown per video")
    ap.add_argument("--seed", type=int, default=0, help="which test items and masks")
    args = ap.parse_args(argv)
    src = Path(args.checkpoint)
    out = args.out or src.with_name(src.name.removesuffix(".pt").replace("checkpoint-", "recon-") + ".png")
    try:
        print(f"wrote {visualize_checkpoint(src, out, args.samples, args.frames, args.seed)}")
    except ckpt.CheckpointError as e:  # damaged, or not a checkpoint of tensors: one line, as training says it
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

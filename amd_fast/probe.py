"""Linear probing of a frozen encoder (METHOD.md section 7; none of the reference repos ships one).

    python amd_fast/probe.py --config configs/probe_tiny_video.yaml probe.init=outputs/tiny_video_amd/checkpoint-300.pt
    python amd_fast/probe.py --config configs/probe_tiny_image.yaml probe.init=pixels     # the raw-pixel floor

The encoder runs once over the train and test items (eval transforms, all tokens, its final norm, the mean over
tokens); the features are cached on disk, keyed by the checkpoint and the data settings. Then, per seed, a
BatchNorm without affine + linear head is trained on the cached features (AdamW, cosine) and scored top-1 on the
test features. `probe.init=pixels` probes the raw normalized pixels instead: the floor any encoder should beat.
Writes `<output_dir>/probe.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # run as a script: make the package importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amd_fast import checkpoint as ckpt  # noqa: E402
from amd_fast.cli import setup_logging  # noqa: E402
from amd_fast.config import ConfigError, ProbeRunConfig, load_config, to_dict  # noqa: E402
from amd_fast.data import DATASETS, FileClips, collate_clips, dataset_for  # noqa: E402
from amd_fast.device import autocast_dtype  # noqa: E402
from amd_fast.models.checkpoint_io import CheckpointError, load_encoder, trust  # noqa: E402
from amd_fast.models.vit import VisionTransformer, build_encoder  # noqa: E402

log = logging.getLogger("amd_fast.probe")

PIXELS = "pixels"


class LinearProbe(nn.Module):
    """MAE's linear probe head: BatchNorm1d(affine=False) -> Linear (init std 0.01, as MAE's)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, f_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(f_BD))


@torch.inference_mode()
def encoder_features(encoder: VisionTransformer | None, video_BCTHW: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, D]: mean over tokens of the final-normed encoder output (None: raw pixels)."""
    if encoder is None:
        return video_BCTHW.flatten(1)
    x = encoder(video_BCTHW)
    return x[:, encoder.num_prefix :].mean(dim=1)


@torch.inference_mode()
def extract(encoder: VisionTransformer | None, dataset, batch_size: int, num_workers: int = 0,
            autocast: torch.dtype | None = None, device: torch.device | None = None):  # fmt: skip
    """All items of `dataset` -> (features float32 [N, D], labels int64 [N]) on the CPU; the encoder (already on
    `device`, default the CPU) under autocast if given."""
    device = device or torch.device("cpu")
    files = isinstance(dataset, FileClips)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_clips if files else None)  # fmt: skip
    feats, labels = [], []
    for batch in loader:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            feats.append(encoder_features(encoder, batch["video"].to(device)).float().cpu())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def train_probe(train, test, num_classes: int, *, seed: int, epochs: int, lr: float, weight_decay: float,
                batch_size: int) -> dict:  # fmt: skip
    """One probe on cached features -> {"seed", "top1", "train_top1"}."""
    (xf, xl), (tf, tl) = train, test
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = LinearProbe(xf.shape[1], num_classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, xf.shape[0] // batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        perm = torch.randperm(xf.shape[0], generator=g)
        for j in range(steps_per_epoch):
            idx = perm[j * batch_size : (j + 1) * batch_size]
            for group in opt.param_groups:  # per-step cosine to 0
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(probe(xf[idx]), xl[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    probe.eval()
    with torch.no_grad():
        acc = float((probe(tf).argmax(-1) == tl).float().mean()) * 100
        train_acc = float((probe(xf).argmax(-1) == xl).float().mean()) * 100
    return {"seed": seed, "top1": acc, "train_top1": train_acc}


def _fingerprint(cfg: ProbeRunConfig) -> str:
    """Cache key: the checkpoint file (path, size, mtime), the model and the data settings."""
    p = cfg.probe
    src = p.init
    if p.init not in ("", PIXELS) and os.path.exists(p.init):
        st = os.stat(p.init)
        src = f"{os.path.abspath(p.init)}:{st.st_size}:{st.st_mtime_ns}"
    key = json.dumps([src, to_dict(cfg)["model"], to_dict(cfg)["data"], p.train_size, p.test_size, p.test_seed,
                      p.test_list, p.test_root, cfg.train.seed, cfg.train.autocast], sort_keys=True)  # fmt: skip
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def build_probe_encoder(cfg: ProbeRunConfig) -> VisionTransformer | None:
    p, d = cfg.probe, cfg.data
    if p.init == PIXELS:
        return None
    torch.manual_seed(cfg.train.seed)  # a random-init encoder is reproducible
    encoder = build_encoder(cfg.model, img_size=d.input_size, num_frames=d.num_frames)
    if p.init:
        load_encoder(encoder, ckpt.read_checkpoint(p.init), source=p.init)
    return encoder.eval()


def probe_sets(cfg: ProbeRunConfig, test_size: int | None = None):
    """(train, test) datasets of a probe, with eval transforms for both splits (no crop jitter: the probe measures
    the frozen features); test_size: another number of test items (the same first ones)."""
    p, d = cfg.probe, cfg.data
    train_set = dataset_for(d, split="train", seed=cfg.train.seed, train=False, size=p.train_size)
    test_set = dataset_for(d, split="test", seed=p.test_seed, train=False, root=p.test_root or d.root,
                           size=p.test_size if test_size is None else test_size,
                           list_file=p.test_list or d.list_file)  # fmt: skip
    return train_set, test_set


def features(cfg: ProbeRunConfig, device: torch.device | None = None) -> tuple[tuple, tuple, int]:
    """Cached (train, test) features and the class count; extracted (on `device`, default the CPU) and saved
    atomically on first use."""
    p, d = cfg.probe, cfg.data
    cache = Path(p.cache_dir or Path(cfg.train.output_dir) / "features") / f"{_fingerprint(cfg)}.pt"
    if cache.exists():
        blob = ckpt.load_file(cache)
        log.info("features from cache %s", cache)
    else:
        train_set, test_set = probe_sets(cfg)
        device = device or torch.device("cpu")
        encoder = build_probe_encoder(cfg)
        encoder = encoder if encoder is None else encoder.to(device)
        ac = autocast_dtype(cfg.train.autocast, device)
        t0 = time.perf_counter()
        tr = extract(encoder, train_set, p.batch_size, d.num_workers, ac, device)
        te = extract(encoder, test_set, p.batch_size, d.num_workers, ac, device)
        n = tr[0].shape[0] + te[0].shape[0]
        log.info("extracted %d x %d features in %.1f s (%.0f items/s)", n, tr[0].shape[1],
                 time.perf_counter() - t0, n / (time.perf_counter() - t0))  # fmt: skip
        classes = DATASETS.get(d.dataset) or int(max(tr[1].max(), te[1].max())) + 1
        blob = {"train": tr, "test": te, "num_classes": classes}
        ckpt.save_atomic(blob, cache)
    return tuple(blob["train"]), tuple(blob["test"]), int(blob["num_classes"])


def run_probe(cfg: ProbeRunConfig, device: torch.device | None = None) -> dict:
    """Features (cached) -> one probe per seed -> {"top1_mean", "top1_std", "runs", ...}, appended to probe.json.
    device: where the encoder extracts (default the CPU); the probes train on the CPU."""
    p = cfg.probe
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    trust(cfg.train.unsafe_pickle)  # the one switch that lets a listed file be unpickled
    train, test, classes = features(cfg, device)
    runs = [
        train_probe(
            train, test, classes, seed=s, epochs=p.epochs, lr=p.lr, weight_decay=p.weight_decay, batch_size=p.batch_size
        )  # fmt: skip
        for s in p.seeds
    ]
    accs = [r["top1"] for r in runs]
    res = {
        "init": p.init or "random",
        "top1_mean": statistics.fmean(accs),
        "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "runs": runs,
        "train_items": int(train[0].shape[0]),
        "test_items": int(test[0].shape[0]),
        "dim": int(train[0].shape[1]),
    }
    log.info("probe %s: top-1 %.2f +- %.2f over seeds %s (%d train / %d test items, %d-dim features)",
             res["init"], res["top1_mean"], res["top1_std"], p.seeds, res["train_items"], res["test_items"],
             res["dim"])  # fmt: skip
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "probe.json", "a") as fh:
        fh.write(json.dumps(res) + "\n")
    return res


DEFAULT_PRESET = Path(__file__).resolve().parents[1] / "configs" / "probe_tiny_video.yaml"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a preset in configs/ (default: configs/probe_tiny_video.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. probe.init=... probe.seeds=[0,1,2]")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config or DEFAULT_PRESET, args.overrides, root=ProbeRunConfig)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        res = run_probe(cfg)
    except CheckpointError as e:  # probe.init damaged, or not a checkpoint of tensors: one line, as training says it
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

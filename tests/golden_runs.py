"""The golden runs: short fixed-seed runs of the tiny presets, their per-step losses and a fine-tuned model's weights.

    python tests/golden_runs.py            # print the figures as JSON
    python tests/golden_runs.py --write    # (re)write tests/golden/tiny.json from this checkout

tests/test_golden.py compares a fresh run with tests/golden/tiny.json, as torchtitan checks its debug config's loss
curve: a change that should not alter the numbers (a refactor) must give the same losses. Exactly on the machine
the file was written on; across CPUs (other BLAS kernels) to 1e-5 relative (see the test).

Runs (real data: Debian's Fashion-MNIST; fp32, forced): the default job's path at test size (a mae teacher, then
AMD), DMAE and MAE on the tiny image preset, the video AMD preset shrunk, and 10 fine-tuning steps (weights'
checksums).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny.json"

SMALL = [
    "data.input_size=16", "data.size=64", "data.batch_size=8", "data.num_workers=0", "model.embed_dim=32",
    "model.depth=2", "model.num_heads=2", "decoder.embed_dim=16", "decoder.depth=1", "decoder.num_heads=2",
    "teacher.model.embed_dim=48", "teacher.model.depth=2", "teacher.model.num_heads=2",
    "teacher.pretrain_decoder.embed_dim=16", "teacher.pretrain_decoder.depth=1", "teacher.pretrain_decoder.num_heads=2",
    "objective.student_layers=[1,2]", "objective.teacher_layers=[1,2]", "train.warmup_steps=2", "train.log_interval=1",
    "train.tensorboard=false", "train.progress=false", "train.threads=1", "teacher.pretrain_steps=8", "train.steps=8",
    "train.save_interval=8", "train.autocast='off'", "teacher.dtype=float32", "train.eval_probe=false",
]  # fmt: skip
RUNS = {
    "image_amd": ("configs/tiny_image_amd.yaml", []),
    "image_dmae": ("configs/tiny_image_amd.yaml", ["objective.name=dmae"]),
    "image_mae": ("configs/tiny_image_amd.yaml", ["objective.name=mae"]),
    "video_amd": ("configs/tiny_video_amd.yaml", ["data.num_frames=4", "data.input_size=32"]),
}  # fmt: skip
FINETUNE = [
    "--config", "configs/finetune_tiny_image.yaml", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "data.input_size=16", "data.size=256", "data.batch_size=16", "data.num_workers=0", "finetune.eval_size=64",
    "train.steps=10", "train.warmup_steps=2", "train.log_interval=5", "train.save_interval=10", "train.autocast='off'",
    "train.tensorboard=false", "train.progress=false", "train.threads=1",
]  # fmt: skip
KEYS = ("loss", "rec", "dir", "gen", "dist")


def _losses(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: r[k] for k in KEYS if k in r} for r in rows]


def figures() -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from amd_fast.finetune import main as finetune_main
    from amd_fast.train import main as train_main

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (preset, extra) in RUNS.items():
            d = Path(tmp) / name
            assert train_main(["--config", str(ROOT / preset), *SMALL, *extra, f"train.output_dir={d}"]) == 0
            out[name] = _losses(d / "metrics.jsonl")
            if (d / "teacher").exists():
                out[name + "_teacher"] = _losses(d / "teacher" / "metrics.jsonl")
        d = Path(tmp) / "finetune"
        assert finetune_main([*FINETUNE, f"train.output_dir={d}"]) == 0
        state = torch.load(d / "checkpoint-10.pt", weights_only=True)["model"]
        out["finetune_weights"] = {k: float(v.double().sum()) for k, v in sorted(state.items())}
        h = hashlib.sha256()
        for _, v in sorted(state.items()):
            h.update(v.contiguous().numpy().tobytes())
        out["finetune_weights_sha256"] = h.hexdigest()
    out["cpu"] = cpu_model()
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    figs = figures()
    if "--write" in sys.argv:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(figs, indent=1) + "\n")
    print(json.dumps(figs))

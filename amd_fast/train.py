"""Pre-train a ViT with AMD, DMAE or (Video)MAE.

    python amd_fast/train.py --config configs/tiny_video_amd.yaml [section.field=value ...]

With `amd` / `dmae` and no `teacher.checkpoint`, a teacher is first pre-trained with `mae` on the
same data (teacher.pretrain_steps steps, under <output_dir>/teacher), then the student is distilled
from it. Out of memory? Lower `data.batch_size` and raise `optim.accum_steps` (the global batch, and
so the learning rate, stay the same).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amd_fast.build import teacher_pretrain_config  # noqa: E402
from amd_fast.config import ConfigError, load_config  # noqa: E402
from amd_fast.launch import ensure_allocator  # noqa: E402
from amd_fast.trainer import Trainer, setup_logging  # noqa: E402

log = logging.getLogger("amd_fast.train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a preset in configs/ (default: the built-in tiny AMD job)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in output_dir) or a path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=4 train.steps=100")
    return p.parse_args(argv)


DEFAULT_PRESET = Path(__file__).resolve().parents[1] / "configs" / "tiny_video_amd.yaml"


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    try:
        cfg = load_config(args.config or DEFAULT_PRESET, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if argv is None:  # a real command line (not a call from Python): it may be re-executed once, with LD_PRELOAD
        ensure_allocator(cfg.train.allocator)
    if cfg.objective.name in ("amd", "dmae") and not cfg.teacher.checkpoint:
        if cfg.teacher.pretrain_steps <= 0:
            print("config error: teacher.checkpoint is empty and teacher.pretrain_steps=0; give a teacher "
                  "checkpoint or a number of mae steps to pre-train one", file=sys.stderr)  # fmt: skip
            return 2
        log.info("no teacher.checkpoint: pre-training a teacher with mae for %d steps", cfg.teacher.pretrain_steps)
        teacher_path = Trainer(teacher_pretrain_config(cfg)).train()
        cfg.teacher.checkpoint = str(teacher_path)
    Trainer(cfg).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())

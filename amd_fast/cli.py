"""What every entry point (amd_fast/train.py, finetune.py, probe.py) does before its work: the launcher's rank, the
logging set-up, the command line (`--config`, the dotted overrides) and the output folder.

Below the loop (amd_fast/trainer.py) and the tasks: it imports neither, so each entry point builds its own task and
hands it to the loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from amd_fast import checkpoint as ckpt
from amd_fast.config import Config, ConfigError, load_config
from amd_fast.models import checkpoint_io


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by `deepspeed`, `torchrun` or MPI-style launchers; (0, 1, 0) alone."""
    env = os.environ
    rank = int(env.get("RANK", env.get("OMPI_COMM_WORLD_RANK", 0)))
    world = int(env.get("WORLD_SIZE", env.get("OMPI_COMM_WORLD_SIZE", 1)))
    local = int(env.get("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    return rank, world, local


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def evaluates_only(cfg) -> bool:
    """A fine-tuning config that only evaluates (finetune.eval_only): it writes no checkpoint or metrics."""
    return getattr(getattr(cfg, "finetune", None), "eval_only", False)


def command_line(argv, doc: str, default_preset: Path, root=Config, flags: tuple = ()):
    """What every training entry point does before training: parse `--config`, `--resume`, `--overwrite`, the
    entry point's own `flags` ((flag, override, help)) and the dotted overrides; take the rank from the launcher
    (`deepspeed` / `torchrun` set RANK / WORLD_SIZE / LOCAL_RANK); set up logging; load and check the config; prepare
    the output folder on rank 0 (a used one is only reused when told). -> (cfg, device, rank, world_size), or the
    exit code 2 after printing what is wrong."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"a preset in configs/ (default: configs/{default_preset.name})")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in output_dir) or a path")
    p.add_argument("--overwrite", action="store_true",
                   help="output_dir holds a previous run: move it aside (<dir>.old-<time>) and start over")  # fmt: skip
    for flag, _, help_text in flags:
        p.add_argument(flag, action="store_true", help=help_text)
    # the `deepspeed` launcher passes --local_rank; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=4 train.steps=100")
    args = p.parse_intermixed_args(argv)  # flags between the overrides too: `a.b=1 --overwrite c.d=2`
    rank, world_size, local_rank = dist_env()
    setup_logging(rank)
    overrides = list(args.overrides)
    overrides += [f"train.resume={args.resume}"] * bool(args.resume) + ["train.overwrite=true"] * args.overwrite
    overrides += [override for flag, override, _ in flags if getattr(args, flag.lstrip("-").replace("-", "_"))]
    try:
        cfg = load_config(args.config or default_preset, overrides, root=root)
        if rank == 0 and not evaluates_only(cfg):
            ckpt.prepare_output_dir(cfg.train.output_dir, cfg.train.resume, cfg.train.overwrite)
    except (ConfigError, checkpoint_io.CheckpointError) as e:
        print(f"{'config error' if isinstance(e, ConfigError) else 'error'}: {e}", file=sys.stderr)
        return 2
    cfg.train.overwrite = False  # done: the runs find the folder prepared
    device = None
    if world_size > 1 and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return cfg, device, rank, world_size

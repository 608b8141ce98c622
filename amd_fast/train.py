"""Pre-train a ViT with AMD, DMAE or (Video)MAE.

    python amd_fast/train.py --config configs/tiny_video_amd.yaml [section.field=value ...]

With `amd` / `dmae` and no `teacher.checkpoint`, a teacher is first pre-trained with `mae` on the
same data (teacher.pretrain_steps steps, under <output_dir>/teacher), then the student is distilled
from it. Out of memory? Lower `data.batch_size` and raise `optim.accum_steps` (the global batch, and
so the learning rate, stay the same), or shard with DeepSpeed ZeRO across ranks:

    deepspeed --num_gpus 8 amd_fast/train.py --config ... dist.deepspeed_config=zero2_bf16
    torchrun --nproc_per_node 8 amd_fast/train.py --config ...
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 amd_fast/train.py --config ...   # CPU ranks, gloo
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amd_fast import checkpoint as ckpt  # noqa: E402
from amd_fast.build import teacher_pretrain_config  # noqa: E402
from amd_fast.cli import command_line  # noqa: E402
from amd_fast.export import export_student  # noqa: E402
from amd_fast.launch import ensure_allocator  # noqa: E402
from amd_fast.models.checkpoint_io import CheckpointError  # noqa: E402
from amd_fast.objectives import OBJECTIVES  # noqa: E402
from amd_fast.pretraining import pretrain_task  # noqa: E402
from amd_fast.trainer import Trainer  # noqa: E402

log = logging.getLogger("amd_fast.train")


DEFAULT_PRESET = Path(__file__).resolve().parents[1] / "configs" / "tiny_video_amd.yaml"


def main(argv=None) -> int:
    setup = command_line(argv, __doc__, DEFAULT_PRESET)
    if isinstance(setup, int):
        return setup
    cfg, device, rank, world_size = setup
    if argv is None:  # a real command line (not a call from Python): it may be re-executed once, with LD_PRELOAD
        ensure_allocator(cfg.train.allocator)
    if OBJECTIVES[cfg.objective.name].needs_teacher and not cfg.teacher.checkpoint:
        if cfg.teacher.pretrain_steps <= 0:
            print("config error: teacher.checkpoint is empty and teacher.pretrain_steps=0; give a teacher "
                  "checkpoint or a number of mae steps to pre-train one", file=sys.stderr)  # fmt: skip
            return 2
        log.info("no teacher.checkpoint: pre-training a teacher with mae for %d steps", cfg.teacher.pretrain_steps)
        try:
            teacher_trainer = Trainer(teacher_pretrain_config(cfg), pretrain_task, device, rank, world_size)
        except CheckpointError as e:  # its folder's checkpoints all unusable, say
            print(f"error: {e}", file=sys.stderr)
            return 2
        teacher_path = teacher_trainer.train()
        if ckpt.is_ds_checkpoint(teacher_path):  # sharded: the teacher loader reads one file
            exported = teacher_path.with_name(teacher_path.name.replace("checkpoint-", "student-") + ".pt")
            if rank == 0:
                export_student(teacher_path, exported)
            teacher_trainer.engine.barrier()
            teacher_path = exported
        del teacher_trainer  # its engine's memory is freed before the student's is built
        cfg.teacher.checkpoint = str(teacher_path)
    try:
        trainer = Trainer(cfg, pretrain_task, device, rank, world_size)
    except CheckpointError as e:  # a damaged or untrusted file named by the config, or a folder in use
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.train()
    trainer.engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

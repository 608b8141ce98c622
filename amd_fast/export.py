"""Export a plain single-file student checkpoint from a training checkpoint.

    python amd_fast/export.py outputs/run/checkpoint-1000    [student.pt]   # a DeepSpeed (ZeRO) directory
    python amd_fast/export.py outputs/run/checkpoint-1000.pt [student.pt]   # a one-process checkpoint

The file holds the fp32 student weights under `model` in the VideoMAE / AMD pre-training layout (`encoder.*`,
`encoder.projection_heads.*`, `encoder_to_decoder`, `mask_token`, `decoder.*`, `generators.*`), plus `step`,
`config` and `meta`: what `amd_fast/models/checkpoint_io.py` (teachers, `model.init`, fine-tuning) and the
official VideoMAE-style loaders (weights under `model`) read. ZeRO shards are merged on the CPU; no process
group and no GPU are needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amd_fast import checkpoint as ckpt  # noqa: E402


def default_destination(src: str | Path) -> Path:
    src = Path(src)
    name = src.name.removesuffix(".pt").replace("checkpoint-", "student-")
    return src.with_name(f"{name}.pt")


def export_student(src: str | Path, dst: str | Path | None = None) -> Path:
    """Training checkpoint (file or DeepSpeed directory) -> `dst` with {"model", "step", "config", "meta"}, and its
    record `<dst>.json` (size, SHA-256: checked wherever amd_fast reads it; other loaders ignore it)."""
    state = ckpt.read_checkpoint(src)
    out = {
        "model": {k: v.float().contiguous() for k, v in state["model"].items()},
        "step": state["step"],
        "config": state["config"],
        "meta": {**state.get("meta", {}), "exported_from": str(src)},
    }
    path = ckpt.save_atomic(out, dst or default_destination(src))
    ckpt.write_record(path, step=state["step"])
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint-N/ (DeepSpeed) or checkpoint-N.pt (one process)")
    p.add_argument("output", nargs="?", default=None, help="default: student-N.pt beside the checkpoint")
    args = p.parse_args(argv)
    try:
        path = export_student(args.checkpoint, args.output)
    except ckpt.CheckpointError as e:  # damaged, or not a checkpoint of tensors: one line, as training says it
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in ckpt.read_checkpoint(path)["model"].values())
    print(f"wrote {path}: {n / 1e6:.2f}M student parameters (fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

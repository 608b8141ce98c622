"""Time one full training step (teacher forward, student forward, all losses, backward, optimizer step).

    python benchmarks/step.py                 # the paper's video config and the image config
    python benchmarks/step.py --case video --steps 8

Each case runs in a fresh subprocess (so its peak RSS is its own) that builds the models from the preset
(random weights: speed does not depend on them) and times `Trainer.train_step`, the code path training
runs. Reported: median s/step and spread, clips/s, model GFLOP per step (analytic, amd_fast/flops.py:
teacher forward once, student forward + backward as three forwards), achieved GFLOP/s, MFU against the
GEMM peak measured in the same run and in the dtype the student's GEMMs run in (right before and after each
case, the higher kept), and peak memory (RSS on a CPU, allocated GPU memory on --device cuda; column
peak_rss_gib). One CSV row per case is appended to benchmarks/results/step.csv (--csv: elsewhere).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amd_fast.launch import ALLOCATORS, allocator_in_use  # noqa: E402
from benchmarks.common import append_csv, gemm_peak_gflops, machine_info, median_spread, run_child  # noqa: E402

CASES = {
    # the paper's video config: ViT-B teacher, ViT-S student, 16x224x224, tubelet 2, rho_s .9, rho_t .75, batch 2
    "video": ("configs/video_vitb_to_vits_amd.yaml", ["data.batch_size=2"]),
    "image": ("configs/image_vitb_to_vits_amd.yaml", ["data.batch_size=8"]),
}


def case_config(name: str, overrides: list[str]):
    from amd_fast.config import load_config

    preset, extra = CASES[name]
    return load_config(ROOT / preset, extra + overrides + [f"train.output_dir=/tmp/amd_fast_bench_{name}"])


def run_case(name: str, steps: int, warmup: int, threads: int, overrides: list[str], device: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    from amd_fast.build import make_frozen_teacher
    from amd_fast.device import peak_memory_bytes
    from amd_fast.masks import collate_masks
    from amd_fast.models.vit import build_encoder
    from amd_fast.objectives import OBJECTIVES
    from amd_fast.trainer import Trainer

    preset = CASES[name][0]
    cfg = case_config(name, overrides)
    device = torch.device(device)
    d = cfg.data
    teacher = None
    if OBJECTIVES[cfg.objective.name].needs_teacher:  # random weights, in the precision teacher.dtype gives
        enc = build_encoder(cfg.teacher.model, img_size=d.input_size, num_frames=d.num_frames)
        teacher = make_frozen_teacher(enc.to(device), cfg.objective.teacher_layers, cfg.teacher.dtype, device)
    trainer = Trainer(cfg, device, teacher=teacher, with_data=False)
    g = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def batch():
        b = collate_masks([trainer.masks(g) for _ in range(d.batch_size)])
        b["video"] = torch.randn(d.batch_size, 3, d.num_frames, d.input_size, d.input_size, generator=g)
        return {k: v.to(device) for k, v in b.items()}

    times = []
    for i in range(warmup + steps):
        micro = [batch() for _ in range(cfg.optim.accum_steps)]
        sync()
        t0 = time.perf_counter()
        trainer.train_step(micro)
        sync()  # CUDA runs the step asynchronously: time until it has run
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    med, spread = median_spread(times)
    gflop = trainer.flops.total * cfg.optim.accum_steps / 1e9
    clips = d.batch_size * cfg.optim.accum_steps
    return {
        "case": name,
        "preset": preset,
        "batch": clips,
        "threads": threads,
        "s_per_step": med,
        "spread": spread,
        "clips_per_s": clips / med,
        "gflop_per_step": gflop,
        "teacher_gflop": trainer.flops.teacher * cfg.optim.accum_steps / 1e9,
        "gflops_per_s": gflop / med,
        "peak_rss_gib": peak_memory_bytes(device) / 2**30,
        "attn_backend": trainer.model.encoder.attn_backend,
    }


def peak_dtype(name: str, overrides: list[str], device: str):
    """The dtype of the student's GEMMs in this case (its autocast dtype, else fp32): the GEMM peak's dtype."""
    import torch

    from amd_fast.device import autocast_dtype

    return autocast_dtype(case_config(name, overrides).train.autocast, torch.device(device)) or torch.float32


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=[*CASES, "all"], default="all")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "step.csv"))
    p.add_argument(
        "--allocators", nargs="+", default=["default"], choices=["default", *ALLOCATORS],
        help="run each case under these malloc implementations (LD_PRELOAD), interleaved",
    )  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="run the whole set this many times, interleaved")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides applied to every case")
    args = p.parse_args()

    if args.child:  # one case, result as JSON on the last line
        print(json.dumps(run_case(args.case, args.steps, args.warmup, args.threads, args.overrides, args.device)))
        return
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = list(CASES) if args.case == "all" else [args.case]
    info = machine_info(args.device)
    for _, name, alloc in itertools.product(range(args.repeat), names, args.allocators):
        cmd = [sys.executable, __file__, "--child", "--case", name, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device,
               *args.overrides]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        env.pop("LD_PRELOAD", None)
        if alloc != "default":
            env["LD_PRELOAD"] = ALLOCATORS[alloc]
        else:
            alloc = allocator_in_use()
        # The GEMM peak is measured here, just before and just after the case, with the same threads, and the
        # higher one kept (a busy moment during one measurement must not flatter the MFU). Measuring it in
        # this process keeps its 100 MB of matrices out of the case's peak RSS.
        torch.set_num_threads(args.threads)
        gemm = dict(device=args.device, dtype=peak_dtype(name, args.overrides, args.device))
        peak = gemm_peak_gflops(**gemm)
        res = run_child(cmd, env, cwd=ROOT)
        peak = max(peak, gemm_peak_gflops(**gemm))
        res.update(gemm_peak_gflops=peak, mfu=res["gflops_per_s"] / peak)
        res["allocator"] = alloc
        print(
            f"{name} [{alloc}]: {res['s_per_step']:.3f} s/step (spread {res['spread']:.3f}), "
            f"{res['clips_per_s']:.2f} clips/s, "
            f"{res['gflop_per_step']:.1f} GFLOP/step (teacher {res['teacher_gflop']:.1f}), "
            f"{res['gflops_per_s']:.1f} GFLOP/s, GEMM peak {res['gemm_peak_gflops']:.1f} GFLOP/s, "
            f"MFU {res['mfu']:.3f}, peak {'GPU memory' if args.device.startswith('cuda') else 'RSS'} "
            f"{res['peak_rss_gib']:.2f} GiB"
        )
        append_csv(args.csv, {**info, **res, "overrides": " ".join(args.overrides)})
    print(f"appended to {args.csv}")


if __name__ == "__main__":
    main()

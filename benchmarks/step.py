"""Time one full training step (teacher forward, student forward, all losses, backward, optimizer step).

    python benchmarks/step.py                 # the paper's video config and the image config
    python benchmarks/step.py --case video --steps 8
    python benchmarks/step.py --case recipe --device cuda --kernels auto reference --profile   # the official recipe

Each case runs in a fresh subprocess (so its peak RSS is its own) that builds the models from the preset
(random weights: speed does not depend on them) and times `Trainer.train_step`, the code path training
runs. Reported: median s/step and spread, clips/s, model GFLOP per step (analytic, amd_fast/flops.py:
teacher forward once, student forward + backward as three forwards), achieved GFLOP/s, MFU against the
GEMM peak measured in the same run and in the dtype the student's GEMMs run in (right before and after each
case, the higher kept), and peak memory (RSS on a CPU, allocated GPU memory on --device cuda; column
peak_rss_gib). One CSV row per case is appended to benchmarks/results/step.csv (--csv: elsewhere).

--kernels auto reference times each case with objective.kernels=auto and =reference (kernels on / off), alternating,
each in its own child. --profile: after the timed steps, one more step under torch.profiler (CUDA activity on
--device cuda): the device's busy share of the step, the top kernels (ops on a CPU) by time, the number and time of
the copy / cast ops, peak memory; printed, the headline numbers in the CSV row's last columns.
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
from benchmarks.common import (  # noqa: E402
    append_csv,
    gemm_peak_gflops,
    machine_info,
    median_spread,
    profile_summary,
    run_child,
)

CASES = {
    # the paper's video config: ViT-B teacher, ViT-S student, 16x224x224, tubelet 2, rho_s .9, rho_t .75, batch 2
    "video": ("configs/video_vitb_to_vits_amd.yaml", ["data.batch_size=2"]),
    "image": ("configs/image_vitb_to_vits_amd.yaml", ["data.batch_size=8"]),
    # The official AMD scripts' recipe, per GPU: a ViT-L teacher aligned at blocks {12,24} to the ViT-S student's
    # {6,12}, batch 64 clips (their batch_size 16 x num_sample 4; num_sample only changes loading, not the step,
    # and needs a file dataset, so it stays 1 here), decoder depth 4, generator depth 2; the preset gives the
    # rest (16x224x224, tubelet 2, tube masks rho_s .9 / rho_t .75), the depths are restated so a preset change
    # cannot move them. Batch 64 is ~26 TFLOP a step: on a CPU give smaller overrides (data.batch_size=1 ...).
    "recipe": ("configs/video_vitb_to_vits_amd.yaml", [
        "data.batch_size=64", "teacher.model.arch=vit_large", "objective.teacher_layers=[12,24]",
        "objective.student_layers=[6,12]", "decoder.depth=4", "objective.generator_depth=2"]),
}  # fmt: skip


def case_config(name: str, overrides: list[str]):
    from amd_fast.config import load_config

    preset, extra = CASES[name]
    return load_config(ROOT / preset, extra + overrides + [f"train.output_dir=/tmp/amd_fast_bench_{name}"])


def run_case(name: str, steps: int, warmup: int, threads: int, overrides: list[str], device: str,
             profile: bool = False) -> dict:  # fmt: skip
    import torch

    torch.set_num_threads(threads)
    from amd_fast.build import make_frozen_teacher
    from amd_fast.device import peak_memory_bytes
    from amd_fast.masks import collate_masks
    from amd_fast.models.vit import build_encoder
    from amd_fast.objectives import OBJECTIVES
    from amd_fast.pretraining import pretrain_task
    from amd_fast.trainer import Trainer

    preset = CASES[name][0]
    cfg = case_config(name, overrides)
    device = torch.device(device)
    d = cfg.data
    teacher = None
    if OBJECTIVES[cfg.objective.name].needs_teacher:  # random weights, in the precision teacher.dtype gives
        enc = build_encoder(cfg.teacher.model, img_size=d.input_size, num_frames=d.num_frames)
        teacher = make_frozen_teacher(enc.to(device), cfg.objective.teacher_layers, cfg.teacher.dtype, device)
    trainer = Trainer(cfg, pretrain_task, device, teacher=teacher, with_data=False)
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
    prof = profile_step(trainer, [batch() for _ in range(cfg.optim.accum_steps)], med, sync) if profile else None
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
        "profile": prof,
    }


def profile_step(trainer, micro: list[dict], step_s: float, sync) -> dict:
    """One more training step under torch.profiler (CPU activity, and CUDA's on a GPU): its summary
    (benchmarks/common.py profile_summary), on CUDA against the timed steps' median `step_s`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        trainer.train_step(micro)
        sync()
    profiled_s = time.perf_counter() - t0
    out = profile_summary(prof.events(), step_s if cuda else profiled_s, cuda)
    out["profiled_step_s"] = profiled_s
    if cuda:  # the caching allocator's reserve is what an OOM runs into
        out["reserved_gib"] = torch.cuda.max_memory_reserved(trainer.device) / 2**30
    return out


def peak_dtype(name: str, overrides: list[str], device: str):
    """The dtype of the student's GEMMs in this case (its autocast dtype, else fp32): the GEMM peak's dtype."""
    import torch

    from amd_fast.device import autocast_dtype

    return autocast_dtype(case_config(name, overrides).train.autocast, torch.device(device)) or torch.float32


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=[*CASES, "all"], default="all",
                   help="all: video and image (recipe, batch 64 with a ViT-L teacher: only when named)")  # fmt: skip
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "step.csv"))
    p.add_argument(
        "--allocators", nargs="+", default=["default"], choices=["default", *ALLOCATORS],
        help="run each case under these malloc implementations (LD_PRELOAD), interleaved",
    )  # fmt: skip
    p.add_argument(
        "--kernels", nargs="+", default=[""], metavar="BACKEND",
        help="run each case with these objective.kernels settings, alternating (auto reference: kernels on and "
        "off); default: the preset's",
    )  # fmt: skip
    p.add_argument(
        "--profile", action="store_true",
        help="after the timed steps, profile one step (torch.profiler): busy share, top kernels, casts, memory",
    )  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="run the whole set this many times, interleaved")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides applied to every case (on OOM: data.batch_size=..)")
    args = p.parse_args()

    if args.child:  # one case, result as JSON on the last line
        res = run_case(args.case, args.steps, args.warmup, args.threads, args.overrides, args.device, args.profile)
        print(json.dumps(res))
        return
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = ["video", "image"] if args.case == "all" else [args.case]
    info = machine_info(args.device)
    after: dict = {}  # the GEMM peak measured after the last child, per dtype: the next child's "before"
    for _, name, alloc, kernels in itertools.product(range(args.repeat), names, args.allocators, args.kernels):
        overrides = [*args.overrides, *([f"objective.kernels={kernels}"] if kernels else [])]
        cmd = [sys.executable, __file__, "--child", "--case", name, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device,
               *(["--profile"] if args.profile else []), *overrides]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        env.pop("LD_PRELOAD", None)
        if alloc != "default":
            env["LD_PRELOAD"] = ALLOCATORS[alloc]
        else:
            alloc = allocator_in_use()
        # The GEMM peak is measured here, just before and just after the case, with the same threads, and the
        # higher one kept (a busy moment during one measurement must not flatter the MFU). Measuring it in
        # this process keeps its 100 MB of matrices out of the case's peak RSS. Back-to-back cases share the
        # measurement between them.
        torch.set_num_threads(args.threads)
        dtype = peak_dtype(name, overrides, args.device)
        gemm = dict(device=args.device, dtype=dtype)
        peak = after.pop(dtype, None) or gemm_peak_gflops(**gemm)
        res = run_child(cmd, env, cwd=ROOT)
        after[dtype] = gemm_peak_gflops(**gemm)
        peak = max(peak, after[dtype])
        prof = res.pop("profile")
        dtype_name = str(dtype).removeprefix("torch.")
        res.update(gemm_peak_gflops=peak, mfu=res["gflops_per_s"] / peak)
        res["allocator"] = alloc
        label = ", ".join([alloc, *([f"kernels={kernels}"] if kernels else [])])
        print(
            f"{name} [{label}]: {res['s_per_step']:.3f} s/step (spread {res['spread']:.3f}), "
            f"{res['clips_per_s']:.2f} clips/s, "
            f"{res['gflop_per_step']:.1f} GFLOP/step (teacher {res['teacher_gflop']:.1f}), "
            f"{res['gflops_per_s']:.1f} GFLOP/s, {dtype_name} GEMM peak {res['gemm_peak_gflops']:.1f} GFLOP/s, "
            f"MFU {res['mfu']:.3f}, peak {'GPU memory' if args.device.startswith('cuda') else 'RSS'} "
            f"{res['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
        if prof:
            print_profile(prof, args.device)
        append_csv(args.csv, {**info, **res, "overrides": " ".join(args.overrides), "kernels": kernels or "preset",
                              "gemm_dtype": dtype_name, **profile_columns(prof)})  # fmt: skip
    print(f"appended to {args.csv}")


def print_profile(prof: dict, device: str) -> None:
    """The profiled step, on lines starting `  profile` (scripts/gpu_check.py picks them up)."""
    cuda = device.startswith("cuda")
    what = "GPU kernels" if cuda else "ATen ops"
    step = "median step" if cuda else "profiled step"
    lines = [
        f"device busy {100 * prof['busy_share']:.0f}% of the step: {what} {1e3 * prof['busy_s']:.1f} ms of the "
        f"{1e3 * prof['step_s']:.1f} ms {step} (the profiled step took {1e3 * prof['profiled_step_s']:.1f} ms)",
        f"casts (aten::_to_copy): {prof['casts']}, {1e3 * prof['cast_s']:.2f} ms; other copies (aten::copy_): "
        f"{prof['copies']}, {1e3 * prof['copy_s']:.2f} ms {'on the GPU' if cuda else 'of CPU time'}",
    ]
    if "reserved_gib" in prof:
        lines.append(f"peak GPU memory reserved by the caching allocator: {prof['reserved_gib']:.2f} GiB")
    lines.append(f"top {'kernels' if cuda else 'ops (self time)'}: ms, share of busy time, calls")
    busy = prof["busy_s"] or float("inf")
    lines += [f"  {1e3 * t:9.2f} {100 * t / busy:5.1f}% {c:6d}  {n}" for n, t, c in prof["top"]]
    print("\n".join("  profile: " + ln for ln in lines), flush=True)  # flushed: a run cut short keeps it


def profile_columns(prof: dict | None) -> dict:
    """The profile's headline numbers as the CSV row's last columns (empty without --profile)."""
    keys = ("prof_busy_share", "prof_busy_ms", "prof_casts", "prof_cast_ms", "prof_copies", "prof_copy_ms", "prof_top")
    if not prof:
        return dict.fromkeys(keys, "")
    top = "; ".join(f"{n} {1e3 * t:.2f}ms" for n, t, _ in prof["top"][:3])
    ms = (1e3 * prof[k] for k in ("busy_s", "cast_s", "copy_s"))
    return dict(zip(keys, (prof["busy_share"], next(ms), prof["casts"], next(ms), prof["copies"], next(ms), top)))


if __name__ == "__main__":
    main()

"""Mask ratios vs speed: time the full training step, per phase, over a grid of teacher / student mask ratios.

    python benchmarks/mask_sweep.py                                   # paper video config, batch 2
    python benchmarks/mask_sweep.py --decoder-ratios 0 0.5 --teacher-dtype int8
    python benchmarks/mask_sweep.py --profile                         # + a torch.profiler trace of one point

Each grid point runs in a fresh process (its peak RSS is its own). Phases of one step: teacher forward,
student encoder forward, generators, decoder, losses (the remainder of the forward: targets, projection
heads, distances), backward, optimizer (clip + AdamW). Per point: median times, tokens per clip, model GFLOP
(analytic, amd_fast/flops.py), MFU against the fp32 GEMM peak measured in the same run, peak RSS. Writes
`<out>.csv` (rows appended, with machine / commit / date), `<out>.png` (step time and MFU vs visible
tokens, one line per phase) and prints a least-squares fit of step time against the student's and the
teacher's visible tokens with its R^2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_csv, gemm_peak_gflops, machine_info, run_child  # noqa: E402

PHASES = ("teacher", "encoder", "generators", "decoder", "losses", "backward", "optimizer")


def _timed(timers: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        timers[name] += time.perf_counter() - t0
        return out

    return wrapper


def run_point(args) -> dict:
    import statistics

    import torch

    torch.set_num_threads(args.threads)
    from amd_fast.build import make_frozen_teacher
    from amd_fast.config import load_config
    from amd_fast.device import peak_memory_bytes
    from amd_fast.masks import collate_masks
    from amd_fast.models.vit import build_encoder, patchify
    from amd_fast.pretraining import pretrain_task
    from amd_fast.trainer import Trainer

    overrides = [
        f"data.batch_size={args.batch}",
        f"mask.student_ratio={args.rho_s}",
        f"mask.teacher_ratio={args.rho_t}",
        f"mask.decoder_ratio={args.rho_d}",
        f"teacher.dtype={args.teacher_dtype}",
        "train.output_dir=/tmp/amd_fast_mask_sweep",
        *args.overrides,
    ]
    cfg = load_config(ROOT / args.preset, overrides)
    d = cfg.data
    cpu = torch.device("cpu")
    enc = build_encoder(cfg.teacher.model, img_size=d.input_size, num_frames=d.num_frames)
    exact_weights = Path(tempfile.mkdtemp()) / "teacher_fp32.pt"
    torch.save(enc.state_dict(), exact_weights)  # on disk, so the exact copy costs no RSS while timing
    teacher = make_frozen_teacher(enc, cfg.objective.teacher_layers, args.teacher_dtype, cpu)
    trainer = Trainer(cfg, pretrain_task, cpu, teacher=teacher, with_data=False)
    model, opt = trainer.model, trainer.optimizer
    g = torch.Generator().manual_seed(0)

    def make_batch():
        b = collate_masks([trainer.masks(g) for _ in range(d.batch_size)])
        b["video"] = torch.randn(d.batch_size, 3, d.num_frames, d.input_size, d.input_size, generator=g)
        return b

    def target_error() -> float:
        """Relative error a low-precision teacher puts on the alignment targets (0 for float32)."""
        exact_enc = build_encoder(cfg.teacher.model, img_size=d.input_size, num_frames=d.num_frames)
        exact_enc.load_state_dict(torch.load(exact_weights, weights_only=True))
        exact = make_frozen_teacher(exact_enc, cfg.objective.teacher_layers, "float32", cpu)
        probe = make_batch()
        ids_t = torch.cat((probe["ids_vis_s"], probe["ids_delta"]), dim=1)
        patches = patchify(probe["video"], exact_enc.patch_size, exact_enc.tubelet_size)
        ref, low = exact.features(patches, ids_t), teacher.features(patches, ids_t)
        return max(float((low[k] - ref[k]).norm() / ref[k].norm()) for k in ref)

    timers: dict[str, float] = defaultdict(float)
    teacher.features = _timed(timers, "teacher", teacher.features)
    model.encoder.forward_features = _timed(timers, "encoder", model.encoder.forward_features)
    model.forward_decoder = _timed(timers, "decoder", model.forward_decoder)
    if model.generators is not None:
        model.forward_generator = _timed(timers, "generators", model.forward_generator)

    def step(batch):
        # Trainer.train_step's work, split so that each phase is timed on its own (CPU ops are synchronous)
        t0 = time.perf_counter()
        loss, _ = trainer.objective(batch)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        timers["backward"] += t2 - t1
        timers["optimizer"] += t3 - t2
        timers["losses"] += (t1 - t0) - sum(timers[p] for p in ("teacher", "encoder", "generators", "decoder"))
        return t3 - t0

    per_step: dict[str, list[float]] = defaultdict(list)
    profile_top = ""
    for i in range(args.warmup + args.steps):
        batch = make_batch()
        timers.clear()
        if args.profile and i == args.warmup:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                total = step(batch)
            trace = Path(args.out).with_name(Path(args.out).name + "_trace.json")
            prof.export_chrome_trace(str(trace))
            profile_top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            profile_top += f"\ntrace (Chrome / Perfetto / TensorBoard format): {trace}"
        else:
            total = step(batch)
        if i >= args.warmup:
            per_step["step"].append(total)
            for p in PHASES:
                per_step[p].append(timers[p])
    peak_rss = peak_memory_bytes(cpu)  # before the target-error check loads a second teacher
    target_err = target_error() if args.teacher_dtype != "float32" else 0.0
    exact_weights.unlink()
    counts = trainer.masks.counts
    f = trainer.flops
    phase_flops = {"teacher": f.teacher, "encoder": f.encoder, "generators": f.generators, "decoder": f.decoder,
                   "losses": f.heads, "backward": f.backward, "optimizer": 0.0}  # fmt: skip
    row = {
        "rho_s": args.rho_s,
        "rho_t": args.rho_t,
        "rho_d": args.rho_d,
        "teacher_dtype": args.teacher_dtype,
        "batch": d.batch_size,
        "vis_s": counts["vis_s"],
        "vis_t": counts["vis_s"] + counts["delta"],
        "decoded": counts["dec"],
        "gflop": f.total / 1e9,
        "s_per_step": statistics.median(per_step["step"]),
        "peak_rss_gib": peak_rss / 2**30,
        "target_rel_err": target_err,
    }
    for p in PHASES:
        row[f"t_{p}"] = statistics.median(per_step[p])
        row[f"gflop_{p}"] = phase_flops[p] / 1e9
    return {"row": row, "profile": profile_top}


def fit(rows: list[dict]) -> tuple[list[float], float]:
    """Least squares: s/step = a + b * vis_s + c * vis_t (tokens per clip). Returns ([a, b, c], R^2)."""
    import numpy as np

    X = np.array([[1.0, r["vis_s"], r["vis_t"]] for r in rows])
    y = np.array([r["s_per_step"] for r in rows])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return coef.tolist(), r2


def plot(rows: list[dict], peak: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["vis_s"] + r["vis_t"])
    x = [r["vis_s"] + r["vis_t"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    a1.plot(x, [r["s_per_step"] for r in rows], "k-o", label="step", linewidth=2)
    for p in PHASES:
        a1.plot(x, [r[f"t_{p}"] for r in rows], "-o", label=p, markersize=3)
        if p not in ("optimizer",):
            a2.plot(x, [r[f"gflop_{p}"] / r[f"t_{p}"] / peak if r[f"t_{p}"] > 0 else 0 for r in rows], "-o",
                    label=p, markersize=3)  # fmt: skip
    a2.plot(x, [r["gflop"] / r["s_per_step"] / peak for r in rows], "k-o", label="step", linewidth=2)
    for r, xi in zip(rows, x):
        a1.annotate(f"{r['rho_s']}/{r['rho_t']}", (xi, r["s_per_step"]), fontsize=7, textcoords="offset points",
                    xytext=(0, 5))  # fmt: skip
    a1.set_xlabel("visible tokens per clip (student V_s + teacher V_t); labels rho_s/rho_t")
    a1.set_ylabel("seconds per step")
    a1.set_title(title)
    a2.set_xlabel("visible tokens per clip (student V_s + teacher V_t)")
    a2.set_ylabel(f"MFU (fp32 GEMM peak {peak:.0f} GFLOP/s)")
    a2.set_ylim(0, 1.2)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="configs/video_vitb_to_vits_amd.yaml")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--teacher-ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--student-ratios", type=float, nargs="+", default=[0.75, 0.9, 0.95])
    p.add_argument("--decoder-ratios", type=float, nargs="+", default=[0.0])
    p.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="torch.profiler trace of the first point, top operators")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mask_sweep"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rho-s", type=float, help=argparse.SUPPRESS)
    p.add_argument("--rho-t", type=float, help=argparse.SUPPRESS)
    p.add_argument("--rho-d", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides for every point")
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_point(args)))
        return

    info = machine_info()
    peak = gemm_peak_gflops()
    points = [(s, t, dr) for dr in args.decoder_ratios for t in args.teacher_ratios for s in args.student_ratios
              if t <= s]  # fmt: skip # AMD's teacher sees a superset of the student's tokens
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for i, (rs, rt, rd) in enumerate(points):
        cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--batch", str(args.batch),
               "--rho-s", str(rs), "--rho-t", str(rt), "--rho-d", str(rd), "--teacher-dtype", args.teacher_dtype,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--out", args.out, *(["--profile"] if args.profile and i == 0 else []), *args.overrides]  # fmt: skip
        res = run_child(cmd, env)
        r = res["row"]
        rows.append(r)
        phases = " ".join(f"{ph} {r[f't_{ph}']:.2f}" for ph in PHASES)
        print(f"rho_s {rs:.2f} rho_t {rt:.2f} rho_d {rd:.2f}: V_s {r['vis_s']:4d} V_t {r['vis_t']:4d} | "
              f"{r['s_per_step']:.3f} s/step [{phases}] | {r['gflop']:.0f} GFLOP | "
              f"RSS {r['peak_rss_gib']:.2f} GiB | target error {r['target_rel_err']:.4f}", flush=True)  # fmt: skip
        if res["profile"]:
            print(res["profile"])
    peak = max(peak, gemm_peak_gflops())  # the higher of before / after: noise must not flatter MFU
    (a, b, c), r2 = fit(rows) if len(rows) >= 3 else ([float("nan")] * 3, float("nan"))
    print(f"fit: s/step = {a:.3f} + {1000 * b:.3f} ms x V_s + {1000 * c:.3f} ms x V_t   (R^2 = {r2:.4f}, "
          f"{len(rows)} points, tokens per clip, batch {args.batch}); GEMM peak {peak:.1f} GFLOP/s")  # fmt: skip
    for r in rows:
        r["mfu"] = r["gflop"] / r["s_per_step"] / peak
        append_csv(args.out + ".csv", {**info, "preset": args.preset, "gemm_peak_gflops": peak, "fit_r2": r2, **r})
    plot(
        rows,
        peak,
        Path(args.out + ".png"),
        f"{Path(args.preset).stem}, batch {args.batch}, {args.teacher_dtype} teacher",
    )
    print(f"wrote {args.out}.csv and {args.out}.png")


if __name__ == "__main__":
    main()

"""Data-parallel scaling: steps/s and peak memory per rank, 1 process vs 2 ranks under DeepSpeed ZeRO 0-3.

    python benchmarks/scaling.py                        # the default job's preset (tiny_video_amd), CPU ranks
    python benchmarks/scaling.py --cases 1:local 2:zero2 --steps 20

Each case is one `torchrun` launch of this file in worker mode: every rank builds the Trainer from the preset
(random weights; the teacher outside the engine, as in training), feeds `Trainer.train_step` synthetic
micro-batches of the preset's size (weak scaling: the global batch grows with the ranks), and reports its
median s/step, peak RSS and what it holds (parameters, Adam moments). The cores are split evenly between
the ranks (`--threads` in all). One CSV row per case goes to benchmarks/results/scaling.csv.

On a CPU box the ranks share the same cores and memory bandwidth, so 2 ranks cannot be faster than 1
process with all the threads; what this run shows on CPU is the engine overhead per ZeRO stage and the
per-rank state each stage saves. On GPUs the same script (device cuda) measures real scaling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_csv, machine_info, median_spread  # noqa: E402

# RANKS:CONFIG[:THREADS_PER_RANK]; 1:local:1 is one process with the cores of one rank of a 2-rank case, the
# reference for the engine's per-rank overhead (and immune to the OpenMP slow-down of a busy shared box)
DEFAULT_CASES = ["1:local", "1:local:1", "2:zero0", "2:zero1", "2:zero2", "2:zero3"]


def worker(args) -> None:
    import torch

    from amd_fast.cli import dist_env
    from amd_fast.config import load_config
    from amd_fast.device import fast_dtype, peak_memory_bytes
    from amd_fast.masks import collate_masks
    from amd_fast.models.vit import build_encoder
    from amd_fast.objectives import FrozenTeacher
    from amd_fast.pretraining import pretrain_task
    from amd_fast.trainer import Trainer

    rank, world, local_rank = dist_env()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    threads = max(1, args.threads // world)
    torch.set_num_threads(threads)
    engine = "local" if args.config == "local" else "deepspeed"
    cfg = load_config(ROOT / args.preset, [
        f"train.output_dir={args.out}", "train.progress=false", "train.tensorboard=false", f"train.threads={threads}",
        f"dist.engine={engine}", f"dist.deepspeed_config={'zero2' if engine == 'local' else args.config}",
        *args.overrides,
    ])  # fmt: skip
    d = cfg.data
    enc = build_encoder(cfg.teacher.model, img_size=d.input_size, num_frames=d.num_frames)
    teacher = FrozenTeacher(enc.to(device), cfg.objective.teacher_layers, fast_dtype(device))
    trainer = Trainer(cfg, pretrain_task, device, rank, world, teacher=teacher, with_data=False)
    g = torch.Generator().manual_seed(1000 + rank)

    def batch():
        b = collate_masks([trainer.masks(g) for _ in range(d.batch_size)])
        b["video"] = torch.randn(d.batch_size, 3, d.num_frames, d.input_size, d.input_size, generator=g)
        return {k: v.to(device) for k, v in b.items()}

    times = []
    for i in range(args.warmup + args.steps):
        micro = [batch() for _ in range(cfg.optim.accum_steps)]
        t0 = time.perf_counter()
        trainer.train_step(micro)
        trainer.engine.barrier()  # time the slowest rank
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med, spread = median_spread(times)
    held = trainer.engine.shard_sizes()
    res = {"rank": rank, "s_per_step": med, "spread": spread, "peak_rss_gib": peak_memory_bytes(device)
           / 2**30, "threads": threads, "global_batch": trainer.global_batch, **held}  # fmt: skip
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(res))


# The paper's settings: ViT-S / ViT-B students (decoders 192 / 384 wide, 4 blocks), ViT-B / L / g teachers,
# 16x224x224 clips, tubelet 2, patch 16, two aligned layer pairs, generators of depth 2 at the teacher's width.
STUDENTS = {"ViT-S": ("vit_small", 192, 3), "ViT-B": ("vit_base", 384, 6)}
TEACHERS = {"ViT-B": dict(arch="vit_base"), "ViT-L": dict(arch="vit_large"),
            "ViT-g": dict(arch="custom", embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11)}  # fmt: skip


def memory_table(world_sizes=(8, 16, 32, 64)) -> str:
    """Per-rank model-state memory (GiB) per ZeRO stage, bf16 training with fp32 master weights and Adam moments
    (ZeRO paper, section 3: 2 bytes params + 2 grads + 12 optimizer per parameter = 16 B), for the student in the
    engine; the teacher's bf16 weights (2 B per parameter) are replicated on every rank on top of that.
    Activations are not included: at these model sizes they, not the model states, set the micro-batch."""
    from amd_fast.build import build_student
    from amd_fast.config import DecoderConfig, ModelConfig, ObjectiveConfig
    from amd_fast.models.vit import build_encoder, resolve_arch

    def count(module):
        return sum(p.numel() for p in module.parameters())

    gib = 2**30
    lines = ["| student / teacher | student params | teacher params | ranks | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 "
             "| + teacher (replicated) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    obj = ObjectiveConfig(name="amd", student_layers=[6, 12], teacher_layers=[6, 12])
    for (sname, (sarch, ddim, dheads)), (tname, tkw) in [(s, t) for s in STUDENTS.items() for t in TEACHERS.items()]:
        tcfg = ModelConfig(**tkw)
        student = build_student(ModelConfig(arch=sarch), DecoderConfig(ddim, 4, dheads), obj, tcfg,
                                img_size=224, num_frames=16)  # fmt: skip
        psi = count(student)
        del student
        # the teacher from a 1-block copy (ViT-g is 1B parameters): embedding + norm + depth x one block
        one = build_encoder(dataclasses.replace(tcfg, depth=1), img_size=224, num_frames=16)
        depth = resolve_arch(tcfg.arch, tcfg.embed_dim, tcfg.depth, tcfg.num_heads)[1]
        phi = count(one) + (depth - 1) * count(one.blocks[0])
        for n in world_sizes:
            z = [16 * psi, 4 * psi + 12 * psi / n, 2 * psi + 14 * psi / n, 16 * psi / n]
            lines.append(f"| {sname} / {tname} | {psi / 1e6:.0f}M | {phi / 1e6:.0f}M | {n} | "
                         + " | ".join(f"{b / gib:.2f}" for b in z) + f" | {2 * phi / gib:.2f} |")  # fmt: skip
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: str, args) -> list[dict]:
    nproc, config, *per_rank = case.split(":")
    threads = int(per_rank[0]) * int(nproc) if per_rank else args.threads
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", __file__, "--worker", "--config", config, "--out", out,
               "--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(threads), *args.overrides]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // int(nproc)))}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"case {case} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
        return [json.loads(Path(out, f"rank{i}.json").read_text()) for i in range(int(nproc))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cases",
        nargs="+",
        default=DEFAULT_CASES,
        help="RANKS:CONFIG[:THREADS_PER_RANK], CONFIG local or zero0..zero3",
    )
    p.add_argument("--preset", default="configs/tiny_video_amd.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores in all, split between the ranks")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "scaling.csv"))
    p.add_argument("--repeat", type=int, default=1, help="run the whole set this many times, interleaved")
    p.add_argument("--memory", action="store_true", help="print the computed per-rank memory table and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides applied to every case")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.memory:
        print(memory_table())
        return

    info = machine_info()
    print(f"{'case':>11} | {'steps/s':>7} | {'clips/s':>7} | {'peak RSS/rank GiB':>17} | {'params/rank':>11} | "
          f"{'Adam moments/rank':>17} | global batch")  # fmt: skip
    for case in [c for _ in range(args.repeat) for c in args.cases]:  # interleaved: a busy moment hits all cases
        ranks = run_case(case, args)
        s = max(r["s_per_step"] for r in ranks)  # every rank waits for the slowest at the barrier
        row = {
            "case": case, "preset": args.preset, "ranks": len(ranks), "threads_per_rank": ranks[0]["threads"],
            "global_batch": ranks[0]["global_batch"], "s_per_step": s,
            "spread": max(r["spread"] for r in ranks), "steps_per_s": 1 / s,
            "clips_per_s": ranks[0]["global_batch"] / s,
            "peak_rss_gib_per_rank": max(r["peak_rss_gib"] for r in ranks),
            "params_per_rank": max(r["params_local"] for r in ranks),
            "moments_per_rank": max(r["moments_local"] for r in ranks), "params_full": ranks[0]["params_full"],
            "overrides": " ".join(args.overrides),
        }  # fmt: skip
        print(f"{case:>11} | {row['steps_per_s']:7.2f} | {row['clips_per_s']:7.1f} | "
              f"{row['peak_rss_gib_per_rank']:17.2f} | {row['params_per_rank']:11d} | {row['moments_per_rank']:17d} | "
              f"{row['global_batch']}")  # fmt: skip
        append_csv(args.csv, {**info, **row})
    print(f"appended to {args.csv}")


if __name__ == "__main__":
    main()

"""The README's default job (`amd_fast/train.py`, no arguments but the seed and the folder), once per seed: its wall
time and its end-of-run evaluation (train.eval_probe), side by side.

    .venv/bin/python benchmarks/default_job.py                  # seeds 0 1 2, ~20 min on the 2-core CPU
    .venv/bin/python benchmarks/default_job.py --seeds 0 --extra train.autocast=bfloat16

Each seed is one fresh `amd_fast/train.py` process (`train.seed=S train.output_dir=<work>/seed-S --overwrite`):
the teacher's mae run, then AMD, then the evaluation. Per seed: wall time, the teacher's and the student's held-out
masked reconstruction next to predicting zeros, the probe top-1 of the student, the same student at random init,
the raw pixels and the teacher, the evaluation's cost. Appends to `<out>/default_job.csv` (machine, commit, date)
and writes `<out>/default_job.md`: the table, and the student's margin over random init against the seed spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_csv, machine_info  # noqa: E402

KEYS = ("probe_student_top1", "probe_random_top1", "probe_pixels_top1", "probe_teacher_top1", "rec_teacher",
        "rec_teacher_zeros", "rec_student", "rec_student_zeros", "seconds")  # fmt: skip


def run_seed(seed: int, work: Path, extra: list[str]) -> dict:
    out = work / f"seed-{seed}"
    cmd = [sys.executable, str(ROOT / "amd_fast" / "train.py"), f"train.seed={seed}", f"train.output_dir={out}",
           "train.progress=false", "--overwrite", *extra]  # fmt: skip
    t0 = time.perf_counter()
    log = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / f"seed-{seed}.log").write_text(log.stdout + log.stderr)
    if log.returncode != 0:
        raise SystemExit(f"seed {seed}: train.py exited {log.returncode}; see {work / f'seed-{seed}.log'}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ev = next(r for r in reversed(rows) if "eval/seconds" in r)
    last = next(r for r in reversed(rows) if "loss" in r)
    teacher = [json.loads(x) for x in (out / "teacher" / "metrics.jsonl").read_text().splitlines()]
    return {"seed": seed, "wall_s": round(wall, 1), "teacher_steps": teacher[-1]["step"], "student_steps": last["step"],
            "teacher_clips_per_s": round(statistics.fmean(r["clips_per_s"] for r in teacher), 1),
            "student_clips_per_s": round(statistics.fmean(r["clips_per_s"] for r in rows if "loss" in r), 1),
            "final_loss": round(last["loss"], 4), **{k: round(ev[f"eval/{k}"], 4) for k in KEYS if f"eval/{k}" in ev},
            "extra": " ".join(extra)}  # fmt: skip


def markdown(rows: list[dict], info: dict, command: str) -> str:
    lines = [f"Default job per seed (`{command}`), {info['date']}, commit {info['commit']}, {info['machine']}.", "",
             "| seed | wall s | teacher rec / zeros | student rec / zeros | probe: student | random init | "
             "raw pixels | teacher | eval s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['wall_s']:.0f} | {r['rec_teacher']:.4f} / {r['rec_teacher_zeros']:.4f} "
            f"({r['rec_teacher'] / r['rec_teacher_zeros']:.2f}x) | {r['rec_student']:.4f} / "
            f"{r['rec_student_zeros']:.4f} ({r['rec_student'] / r['rec_student_zeros']:.2f}x) | "
            f"{r['probe_student_top1']:.2f} | {r['probe_random_top1']:.2f} | {r['probe_pixels_top1']:.2f} | "
            f"{r['probe_teacher_top1']:.2f} | {r['seconds']:.0f} |"
        )
    if len(rows) > 1:
        s, z = [r["probe_student_top1"] for r in rows], [r["probe_random_top1"] for r in rows]
        margin, spread = statistics.fmean(s) - statistics.fmean(z), max(statistics.stdev(s), statistics.stdev(z))
        lines += ["", f"- student {statistics.fmean(s):.2f} +- {statistics.stdev(s):.2f}, random init "
                      f"{statistics.fmean(z):.2f} +- {statistics.stdev(z):.2f} over seeds {[r['seed'] for r in rows]}: "
                      f"margin {margin:+.2f} points, larger seed std {spread:.2f}; smallest per-seed margin "
                      f"{min(a - b for a, b in zip(s, z)):+.2f}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every seed")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "default_job"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, work, args.extra))
        print(json.dumps(rows[-1]), flush=True)
        append_csv(out / "default_job.csv", {**info, **rows[-1]})
    command = "python benchmarks/default_job.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "default_job.md").write_text(markdown(rows, info, command.strip()))
    print((out / "default_job.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Kill a training run with SIGKILL at random moments (inside checkpoint writes too), resume it each time, and
compare the result with an uninterrupted run.

    python benchmarks/kill_resume.py                 # 20 kills
    python benchmarks/kill_resume.py --kills 6 --out /tmp/kr

The run is the tiny image AMD job through `amd_fast/train.py` (a mae teacher is pre-trained first, then the
student: kills land in both), relaunched with `--resume auto` after every kill until it finishes. Kills come at a
random moment after the process starts, or (every third kill) the moment a checkpoint's temporary file appears in
the run's folder, i.e. during a write. At the end: the final checkpoints' weights and optimizer states must equal
the uninterrupted run's bit for bit, no temporary file may be left, and each metrics.jsonl must hold every step
once. Prints one JSON line with the figures; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train import TINY  # noqa: E402

STEPS = ["teacher.pretrain_steps=200", "train.steps=200", "train.save_interval=5", "train.log_interval=1",
         "train.threads=1"]  # fmt: skip


def command(out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, str(ROOT / "amd_fast" / "train.py"), "--config", str(ROOT / "configs/tiny_image_amd.yaml"),
           *TINY, *STEPS, f"train.output_dir={out}"]  # fmt: skip
    return cmd + (["--resume", "auto"] if resume else [])


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp-" in p.name]


def kill_during_write(proc: subprocess.Popen, out: Path, limit: float) -> bool:
    """Poll the folder; SIGKILL the moment a temporary file shows up. False if none did within `limit` s."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit and proc.poll() is None:
        if temp_files(out):
            proc.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.0005)
    return False


def final_state(out: Path) -> dict:
    ckpts = sorted(out.glob("checkpoint-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return torch.load(ckpts[-1], map_location="cpu", weights_only=True)


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if torch.is_tensor(a[k]):
            if not torch.equal(a[k], b[k]):
                return False
        elif isinstance(a[k], dict):
            if not same(a[k], b[k]):
                return False
    return True


def metrics_once(path: Path, steps: int) -> bool:
    rows = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    return rows == list(range(1, steps + 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/amd_fast_kill_resume")
    args = p.parse_args()
    rng = random.Random(args.seed)
    base = Path(args.out)
    ref, out = base / "uninterrupted", base / "killed"
    for d in (ref, out):
        if d.exists():
            subprocess.run(["rm", "-rf", str(d)], check=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    t0 = time.perf_counter()
    subprocess.run(command(ref, False), cwd=ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0

    kills, in_writes, launches = 0, 0, 0
    while True:
        launches += 1
        proc = subprocess.Popen(command(out, True), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        if kills < args.kills:
            if kills % 3 == 2 and kill_during_write(proc, out, wall):
                in_writes += 1
            else:  # a random moment of the run (start-up, either stage, a write)
                try:
                    proc.wait(timeout=rng.uniform(0.1, 0.4) * wall)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
            code = proc.wait()
            if code == -signal.SIGKILL:
                kills += 1
                continue
            if code != 0:
                print(json.dumps({"error": f"launch {launches} exited {code}"}))
                return 1
        elif proc.wait() != 0:
            print(json.dumps({"error": f"launch {launches} exited {proc.returncode}"}))
            return 1
        if (out / "checkpoint-200.pt").exists():
            break

    res = {
        "kills": kills,
        "kills_in_writes": in_writes,
        "launches": launches,
        "uninterrupted_wall_s": round(wall, 1),
        "identical": all(same(final_state(ref / d), final_state(out / d)) for d in ("teacher", ".")),
        "temp_files": len(temp_files(out)),
        "metrics_each_step_once": all(metrics_once(out / d / "metrics.jsonl", 200) for d in ("teacher", ".")),
    }
    print(json.dumps(res))
    return 0 if res["identical"] and not res["temp_files"] and res["metrics_each_step_once"] else 1


if __name__ == "__main__":
    sys.exit(main())

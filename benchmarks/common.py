"""Shared benchmark harness: machine/commit/date stamp, GEMM peak, median and spread, CSV rows."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path


def machine_info(device=None) -> dict:
    """device: a CUDA device's name joins the `machine` field (the columns stay the same)."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()  # fmt: skip
        commit = (commit or "unknown") + ("-dirty" if dirty else "")
    except OSError:
        commit = "unknown"
    machine = f"{platform.node()} | {cpu} | {os.cpu_count()} cpus"
    if device is not None and torch.device(device).type == "cuda":
        machine += f" | {torch.cuda.get_device_name(torch.device(device))}"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": machine,
        "torch": torch.__version__,
    }


def gemm_peak_gflops(
    sizes=((2048, 2048, 2048), (4096, 1024, 4096), (3136, 768, 3072)), reps: int = 5, device="cpu", dtype=None
) -> float:
    """GEMM peak of this process's threads (or of a CUDA device, in `dtype`: fp32 by default): the best rate
    over a few large shapes. On CUDA an 8192-cube joins them, so the launch latency does not hide the peak."""
    import torch

    device, dtype = torch.device(device), dtype or torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sizes = (*sizes, (8192, 8192, 8192))
    best = 0.0
    for m, k, n in sizes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        a @ b  # warm-up
        sync()
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            sync()  # a kernel launch returns at once: time until the GEMM has run
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    if device.type == "cuda":
        del a, b
        torch.cuda.empty_cache()  # hand the matrices back: a benchmark child may run on the same GPU next
    return best


def median_spread(times: list[float]) -> tuple[float, float]:
    """Median, and spread as (max - min) / 2."""
    return statistics.median(times), (max(times) - min(times)) / 2


def run_child(cmd: list[str], env: dict, cwd=None) -> dict:
    """Run a benchmark child process; its last stdout line is a JSON result. On failure, show its stderr."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-4000:]}")
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def append_csv(path: str | Path, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new:
        with open(path) as f:
            header = next(csv.reader(f), [])
        if header != list(row):  # schema changed: start a new file beside the old one
            path = path.with_name(path.stem + f"-{len(row)}cols.csv")
            new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)

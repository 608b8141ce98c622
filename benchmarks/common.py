"""Shared benchmark harness: machine/commit/date stamp, GEMM peak, median and spread, a profiled step's summary,
CSV rows."""

from __future__ import annotations

import csv
import datetime
import io
import os
import platform
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path

# The CPU flags that decide a CPU's GEMM rates (AVX-512 fp32, AVX-512-BF16 dot products, AMX bf16 tiles): a
# figure names the CPU and which of them it has.
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine_info(device=None) -> dict:
    """The `machine` field names the CPU with its GEMM-relevant flags (CPU_FLAGS, those present) and, for a CUDA
    `device`, the GPU (the columns stay the same)."""
    import torch

    cpu, flags = platform.processor() or "unknown", None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if flags is not None:
        cpu += f" ({' '.join(f for f in CPU_FLAGS if f in flags) or 'no ' + '/'.join(CPU_FLAGS)})"
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
    """Append `row` under the file's header. New columns at the end of the old ones extend the header in place
    (the older rows are left short: csv.DictReader and pandas read their missing cells as empty); any other
    change of columns starts a new file beside the old one (`<stem>-<n>cols.csv`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(row) and list(row)[: len(header)] == header:
            with open(path, newline="") as f:  # the rows as they are, line endings included
                lines = f.readlines()
            head = io.StringIO()
            csv.writer(head).writerow(row)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                f.writelines([head.getvalue(), *lines[1:]])
            tmp.replace(path)
        elif header != list(row):  # schema changed: start a new file beside the old one
            path = path.with_name(path.stem + f"-{len(row)}cols.csv")
            new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


# ---------------------------------------------------------------------------------------------
# one profiled step


def profile_summary(events, step_s: float, cuda: bool, top: int = 10) -> dict:
    """Summary of one step profiled with torch.profiler (`events`: its `prof.events()`), against `step_s`, the
    step's wall time: on CUDA the unprofiled one (the profiler slows the host, not the device's kernels), on a
    CPU the profiled one (the profiler's overhead lands inside the ops it times).

    busy_s: the time the device is busy, the union of its kernels' intervals on CUDA (memcpy / memset included);
    on a CPU, of the ATen ops' intervals (the rest is Python and framework overhead). top: [(name, seconds,
    calls)] of the kernels (CUDA) or of the ops by self time (CPU), names shortened. casts: the aten::_to_copy calls
    (each a real dtype or device conversion, autocast's included: an aten::to that changes nothing returns its
    input and is not counted); copies: the other aten::copy_ calls (clone, contiguous, addmm's bias, ...); with
    their time, on the device on CUDA."""
    from torch.autograd import DeviceType

    us = 1e-6
    if cuda:
        # the kernels; record_function ranges mirrored onto the GPU timeline (user annotations) are not work
        busy = [e for e in events if e.device_type != DeviceType.CPU and not e.is_user_annotation]
        own = {id(e): e.time_range.elapsed_us() for e in busy}
    else:
        busy = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
        own = {id(e): e.self_cpu_time_total for e in busy}
    spans = sorted((e.time_range.start, e.time_range.end) for e in busy)
    busy_us, end = 0.0, float("-inf")
    for a, b in spans:  # the union of the intervals: overlapping ones (streams, threads, nesting) count once
        busy_us += max(0.0, b - max(a, end))
        end = max(end, b)
    per_name: dict = defaultdict(lambda: [0.0, 0])
    for e in busy:
        per_name[e.name][0] += own[id(e)]
        per_name[e.name][1] += 1
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    casts = [e for e in events if e.name == "aten::_to_copy"]
    copies = [
        e
        for e in events
        if e.name == "aten::copy_" and not (e.cpu_parent and e.cpu_parent.name in ("aten::_to_copy", "aten::copy_"))
    ]

    def total_s(evts):
        return sum(e.device_time_total if cuda else e.cpu_time_total for e in evts) * us

    return {
        "step_s": step_s,
        "busy_s": busy_us * us,
        "busy_share": busy_us * us / step_s,
        "top": [(short_name(n), t * us, c) for n, (t, c) in ranked],
        "casts": len(casts),
        "cast_s": total_s(casts),
        "copies": len(copies),
        "copy_s": total_s(copies),
    }


def short_name(name: str, width: int = 72) -> str:
    """A kernel's or op's name without `void`, its argument list and the commonest namespaces, cut to `width`."""
    s = name.removeprefix("void ")
    if s.endswith(")") and "(" in s:  # the argument list of a demangled kernel
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i] if i else s
                break
    for ns in ("(anonymous namespace)::", "at::native::", "at::", "c10::", "cutlass::", "std::"):
        s = s.replace(ns, "")
    return s if len(s) <= width else s[: width - 3] + "..."

"""Choices `auto` makes by measuring this machine once: the training precision (amd_fast/device.py), the attention
backend and the kernels' backends (amd_fast.kernels.backend). This module is a leaf (torch only): its callers hand
it their trials.

A CPU flag says what a CPU can do, not how fast it does it. Measured with torch 2.13 on 2 threads, the same flags
(AVX-512-BF16, no AMX) give bf16 GEMMs at 4.4x the fp32 rate on an AMD EPYC (family 26) and at half of it on an
Intel Xeon (family 6 model 207); SDPA's CPU flash kernel does not run on the bf16 units where the explicit
attention's GEMMs do. So each choice is a short trial of the real code, timed once per machine (CPU model and
flags, or GPU name; torch version) and cached as JSON under $AMD_FAST_CACHE/choices (default
~/.cache/amd_fast/choices), with the figures that decided it, which the log repeats.

- precision (device.py): a ViT-S block (width 384, 6 heads) on 392 tokens (the paper's teacher input), forward +
  backward, in fp32 and under bf16 autocast (its non-GEMM ops included; ~1 s in all); bf16 when it takes less
  than 1/1.1 of fp32's time;
- attention: each backend that can run, forward (+ backward when the call needs gradients) on random tensors of
  the call's shape class (query and key counts bucketed to powers of two, head width, batch x heads bucketed);
  the fastest. On CUDA the explicit `math` attention is not tried (its N x N matrix at a GPU's batch is GiBs);
- kernels: each backend of an op (Triton, the C++ / chunked twins, plain PyTorch) on the call's own inputs at
  their shape class, forward (+ backward); the fastest, so `auto` runs plain PyTorch where a kernel loses.

`AMD_FAST_FAKE_TIMINGS` (JSON: {"precision": {"float32": s, "bfloat16": s}, "attention": {backend: s},
"kernels": {backend: s}}) replaces the trials' timings, not the decision; the test suite sets it so that no test
depends on the CPU it runs on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


@functools.cache
def cpu_model_and_flags() -> tuple[str, tuple[str, ...]]:
    model, flags = "unknown", ()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    have = set(line.split(":", 1)[1].split())
                    flags = tuple(x for x in _FLAGS if x in have)
    except OSError:
        pass
    return model, flags


def machine(device: torch.device) -> str:
    """What a measurement is valid for: the CPU (model, flags) or the GPU, and the torch version."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} | torch {torch.__version__}"
    model, flags = cpu_model_and_flags()
    return f"{model} [{' '.join(flags)}] | torch {torch.__version__}"


def cache_dir() -> Path:
    root = os.environ.get("AMD_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "amd_fast"
    )
    return Path(root) / "choices"


_memo: dict[str, dict] = {}


def measured(what: str, device: torch.device, trial, decide) -> tuple[str, dict]:
    """`trial()` -> {option: [seconds per round]}, run once per machine and `what` (memoized; cached on disk when
    conclusive); `decide(timings)` -> the choice for one round's (or the best) timings. -> (choice, the record:
    timings, machine, cached, conclusive). Conclusive: every round makes the same choice, on a machine not busy with
    other work (1-minute load average under 3/4 of the CPUs). A shared machine's busy moment can flip a choice;
    then this process takes the choice of the best times and the next one measures again (a wrong verdict must not
    be kept for good)."""
    fake = os.environ.get("AMD_FAST_FAKE_TIMINGS")
    if fake:
        t = _rounds(json.loads(fake)[what.split("/")[0]])
        return _decided({"timings": t, "machine": "AMD_FAST_FAKE_TIMINGS", "cached": False}, decide)
    key = f"{machine(device)} | {what}"
    if key in _memo:
        return _memo[key]
    path = cache_dir() / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".json")
    try:
        res = json.loads(path.read_text())
        if res.get("key") == key:
            _memo[key] = _decided({**res, "timings": _rounds(res["timings"]), "cached": True}, decide)
            return _memo[key]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    load = os.getloadavg()[0]  # other work on the machine while it is timed: recorded, and a verdict not kept
    res = {"key": key, "machine": machine(device), "load": round(load, 2), "timings": trial()}
    choice, res = _decided({**res, "cached": False}, decide)
    busy = max(load, os.getloadavg()[0]) > 0.75 * (os.cpu_count() or 1)
    res["agree"], res["conclusive"] = res["conclusive"], res["conclusive"] and not busy
    if res["conclusive"]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({k: v for k, v in res.items() if k not in ("cached", "conclusive", "agree")}))
            tmp.replace(path)
        except OSError as exc:
            log.warning("measured choices: cannot write %s (%s); measured again in the next process", path, exc)
    _memo[key] = choice, res
    return _memo[key]


def _rounds(timings: dict) -> dict:
    return {n: list(v) if isinstance(v, (list, tuple)) else [v] for n, v in timings.items()}


def _decided(res: dict, decide) -> tuple[str, dict]:
    t = res["timings"]
    best = decide({n: min(v) for n, v in t.items()})
    per_round = {decide({n: v[i] for n, v in t.items()}) for i in range(min(map(len, t.values())))}
    return best, {**res, "conclusive": per_round == {best}}


def time_rounds(trials: dict, rounds: int = 3, sync=lambda: None) -> dict:
    """{option: call} -> {option: [seconds per round]}: each call warmed once, then timed once per round, the options
    interleaved within each round (a busy moment hits them alike)."""
    for fn in trials.values():
        fn()  # warm: allocations, oneDNN's kernel choice, lazy inits
    out: dict = {n: [] for n in trials}
    for _ in range(rounds):
        for n, fn in trials.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out[n].append(time.perf_counter() - t0)
    return out


def describe(res: dict) -> str:
    """The figures behind a choice, for the log: best ms per option, fastest first; how it was obtained."""
    best = {n: min(v) for n, v in res["timings"].items()}
    figs = ", ".join(f"{n} {s * 1e3:.2f} ms" for n, s in sorted(best.items(), key=lambda x: x[1]))
    if res.get("cached") or res.get("conclusive"):
        how = "cached" if res.get("cached") else "measured"
    else:
        why = "rounds disagree" if not res.get("agree", False) else f"machine busy, load {res.get('load')}"
        how = f"{why}: this run only, measured again next run"
    return f"{figs} ({how})"


def sync_of(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ---------------------------------------------------------------------------------------------
# the fastest of several ways to run one call


def fastest(what: str, device: torch.device, trials: dict) -> tuple[str, str]:
    """trials: {option: a zero-argument call}; timed in 3 interleaved rounds once per machine and `what` (the kind of
    call and its shape class) -> (the fastest option, the reason with the figures)."""
    best, res = measured(what, device, lambda: time_rounds(trials, sync=sync_of(device)),
                         lambda t: min((n for n in t if n in trials), key=t.get))  # fmt: skip
    return best, f"{what.split('/', 1)[-1]}: {describe(res)}"

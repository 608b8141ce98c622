"""One prepared check for the day a GPU is at hand (run it through scripts/gpu_check.sh).

    bash scripts/gpu_check.sh OUT                          # on the GPU machine: python3, no venv, no pip install
    PYTHON=.venv/bin/python bash scripts/gpu_check.sh OUT --cpu [--quick]   # the same parts on a CPU, small

Sized to the machine such checks get: one GPU, python3 with torch / triton / pytest / numpy / pyyaml
preinstalled, no network, 15 minutes of device time for the session (the machine's start included), so the one
command gets 9 (--budget 520). It runs from a checkout that was never pip-installed (amd_fast.ops loads the
top-level kernels/ as amd_fast.kernels; the native C++ twins are not built there, the PyTorch twins stand in).
Parts, in order, each in its own subprocesses with its own timeout (TIMEOUTS: on a GPU they fit in the budget
together, so no part can eat another's time), capped so the whole run ends within --budget seconds:

  1. environment      nvidia-smi, python / torch / CUDA / triton versions, the device, `import amd_fast.ops`
  2. kernel tests     tests/test_kernels.py's backend-vs-reference tests (fwd + every gradient, fp32 / bf16 / ...)
                      with the tensors on the device (AMD_FAST_TEST_DEVICE): Triton native on CUDA; on a CPU
                      Triton under TRITON_INTERPRET=1 and the chunked twin
  3. attention        amd_fast.attention's backends (sdpa, SDPA's own kernels on CUDA, flash_attn / xformers when
                      importable) against `math`, fp32 / bf16 / fp16, forward and backward
  4. training         train.py, tiny AMD preset, train.autocast=bfloat16, 30 steps: straight, and stopped at 15
                      then resumed (--resume auto) to 30; the two final checkpoints compared bit for bit
  5. kernels on/off   the tiny preset in fp32 from one seed with the kernels forced on (Triton on CUDA, the chunked
                      twin on a CPU: `auto` may measure plain PyTorch faster) and =reference (part 4's
                      teacher), 20 steps: every step's losses within tests/test_kernels_e2e.py's bound (a kernel
                      wrong on CUDA only shows here)
  6. benchmarks       benchmarks/step.py's `recipe` case (the official scripts' ViT-L -> ViT-S, batch 64) with the
                      kernels on and off, MFU against the bf16 GEMM peak, one step profiled (GPU busy share, top
                      kernels, casts, peak memory); benchmarks/kernels.py (their CSV rows go to OUT)
  7. deepspeed        ZeRO-2 and ZeRO-3 in bf16 on one device through train.py when deepspeed is importable
                      (--wheels DIR: install it offline first); SKIP otherwise

The training data is a small synthetic set in Fashion-MNIST's file format, written under --work (the GPU
machine has no dataset and no network): the check is about the code path and its numbers, not learning.

Writes five files into OUT and nothing else (a device run brings back only a few small files): report.md (one
section per part: PASS / FAIL / SKIP, its figures, the error tail of a failure; rewritten after every part, so
a run cut short still leaves one), gpu_check.log (every command with its whole output), kernel_tests.xml
(pytest's junit), and the benchmarks' CSV rows in step.csv and kernels.csv. The runs' checkpoints and the data
go to --work (a temporary directory, removed at the end). Exit status: 0 when every part passed or was
skipped, 1 when a part failed, 2 on bad arguments. The driver never imports torch: a broken install still
gets its report.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gzip
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("environment", "kernel tests", "attention", "training", "kernels on/off", "benchmarks", "deepspeed")

# Per-part timeouts (s), all of a part's commands together. GPU: they add up to less than the default --budget of
# 520 s (the session's 15 minutes of device time hold the machine's start and this one command), so a part that
# hangs loses only its own time and none can starve the recipe timing; the --budget deadline caps them further.
# Expected on the H200 (estimates: no run of this version there yet; torch imports, CUDA init and Triton's first
# compiles dominate), ~4.5 minutes in all: environment ~15 s, kernel tests ~60 s (Triton JIT, cold cache),
# attention ~10 s, training ~50 s (four train.py processes), kernels on/off ~25 s (two), benchmarks ~85 s
# (step.py ~55 s: two recipe children of ~25 s; kernels.py ~30 s), deepspeed ~50 s (two runs of ~25 s).
# CPU (--cpu, 2 shared cores, measured idle / loaded): 4-8, 21-41, 3-4, 17-67, 10-27, 27-61 and 17-23 s, 100-230 s
# in all; --quick (the test) ~1-2.5 minutes.
TIMEOUTS = {
    "gpu": {"environment": 25, "kernel tests": 140, "attention": 25, "training": 70, "kernels on/off": 40,
            "benchmarks": 140, "deepspeed": 75},
    "cpu": {"environment": 60, "kernel tests": 120, "attention": 60, "training": 180, "kernels on/off": 90,
            "benchmarks": 150, "deepspeed": 150},
}  # fmt: skip
STEP_BENCH_TIMEOUT = {"gpu": 95, "cpu": 90}  # of the benchmarks part's time: kernels.py gets the rest
# The recipe case at toy sizes on a CPU (seconds a step, not minutes): batch 1, 64x64, 4 frames, 64-wide models
# with the recipe's depths (teacher 24 blocks aligned at {12,24}, student 12, decoder 4, generators 2).
RECIPE_CPU = ["data.batch_size=1", "data.input_size=64", "data.num_frames=4", "model.embed_dim=64",
              "teacher.model.embed_dim=64", "decoder.embed_dim=32", "decoder.num_heads=2"]  # fmt: skip
# tests/test_kernels_e2e.py's bound on the losses of fp32 runs with the kernels on and off (pytest.approx): relative
# 1e-5 at the first step (the same weights: the fused loss's summation order only), 1e-4 after it (AdamW carries
# that difference forward), absolute 1e-6. Part 5 holds a real run to it.
ON_OFF_REL = (1e-5, 1e-4)
ON_OFF_ABS = 1e-6
NOT_LOSSES = {"step", "lr", "clips_per_s", "tokens_per_s", "gflops_per_s", "data_wait", "peak_mem_gib", "skipped",
              "bad_files"}  # fmt: skip

# The tiny runs of part 4. GPU: the tiny image preset as it is (batch 64, 32x32, 6-block 128-wide student),
# on the synthetic data. CPU: tests/test_train.py's toy sizes.
TRAIN_GPU = ["data.num_workers=1"]
TRAIN_CPU = [
    "data.input_size=16", "data.batch_size=8", "data.num_workers=0", "model.embed_dim=32", "model.depth=2",
    "model.num_heads=2", "decoder.embed_dim=16", "decoder.depth=1", "decoder.num_heads=2",
    "teacher.model.embed_dim=48", "teacher.model.depth=2", "teacher.model.num_heads=2",
    "teacher.pretrain_decoder.embed_dim=16", "teacher.pretrain_decoder.depth=1", "teacher.pretrain_decoder.num_heads=2",
    "objective.student_layers=[1,2]", "objective.teacher_layers=[1,2]", "train.threads=2",
]  # fmt: skip
TRAIN_COMMON = [
    "train.autocast=bfloat16", "train.tensorboard=false", "train.progress=false", "train.allocator=default",
    "train.log_interval=5", "train.warmup_steps=5", "optim.clip_grad=0.5", "train.eval_probe=false",
]  # fmt: skip


@dataclass
class Result:
    status: str  # PASS / FAIL / SKIP
    summary: str  # one line for the table
    figures: list[str] = field(default_factory=list)  # markdown lines
    error: str = ""  # the tail of the failing output
    seconds: float = 0.0


class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        # the runs' checkpoints and the data: not in OUT, which should come back small (a few files)
        self.work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.mode = "cpu" if args.cpu else "gpu"
        self.device = "cpu" if args.cpu else "cuda"
        self.py = sys.executable
        self.deadline = time.monotonic() + args.budget
        self.part_deadline = self.deadline
        self.results: dict[str, Result] = {}
        self.teacher: Path | None = None  # part 4's mae teacher, reused by part 6
        path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        self.env.pop("TRITON_INTERPRET", None)
        self.env.pop("AMD_FAST_TEST_DEVICE", None)
        self.log = open(self.out / "gpu_check.log", "a")
        self.started = datetime.datetime.now(datetime.timezone.utc)

    # ------------------------------------------------------------------------------------------
    # running things

    def run(self, cmd: list[str], env: dict | None = None, cap: float | None = None) -> tuple[int, str]:
        """Run a command within what is left of the part's time (and `cap` s; the whole process group is killed at
        the end of it): (rc, output). rc is 124 on a timeout. Everything goes to the log."""
        limit = max(0.0, min(self.part_deadline, self.deadline) - time.monotonic())
        limit = min(limit, cap) if cap else limit
        self._log(f"$ {' '.join(map(str, cmd))}   (timeout {limit:.0f} s)")
        if limit < 5:
            self._log("not started: out of time budget")
            return 124, "not started: the part's time (or the check's --budget) was used up"
        t0 = time.monotonic()
        with tempfile.TemporaryFile("w+") as buf:
            p = subprocess.Popen([str(c) for c in cmd], stdout=buf, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env=env or self.env, start_new_session=True)  # fmt: skip
            try:
                rc = p.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                try:  # the whole group: pytest / torch.compile workers / dataloader workers with it
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
                rc = 124
            buf.seek(0)
            output = buf.read()
        self._log(output.rstrip() + f"\n[rc {rc}, {time.monotonic() - t0:.1f} s]\n")
        if rc == 124:
            output += f"\n[timed out after {limit:.0f} s]"
        return rc, output

    def child(self, name: str, *args) -> tuple[int, str, dict | None]:
        """This script's `--child name` in a subprocess: (rc, output, the JSON of its last line or None)."""
        rc, out = self.run([self.py, __file__, "--child", name, *map(str, args)])
        return rc, out, _last_json(out)

    def _log(self, text: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        self.log.write(f"[{stamp}] {text}\n")
        self.log.flush()

    # ------------------------------------------------------------------------------------------
    # the parts

    def part_environment(self) -> Result:
        figs = []
        smi = shutil.which("nvidia-smi")
        if smi:
            q = "name,driver_version,memory.total,compute_cap"
            rc, out = self.run([smi, f"--query-gpu={q}", "--format=csv,noheader"])
            figs.append(f"- nvidia-smi: {out.strip() if rc == 0 else 'failed: ' + _tail(out, 3)}")
            rc, out = self.run([smi])
            cuda_line = next((ln for ln in out.splitlines() if "CUDA Version" in ln), "")
            if cuda_line:
                figs.append(f"- nvidia-smi header: `{' '.join(cuda_line.strip(' |').split())}`")
        else:
            figs.append("- nvidia-smi: not on PATH")
        # from another directory, so only PYTHONPATH (not the working directory) can make amd_fast importable
        rc, out, info = self.child("env", self.device)
        if info is None:
            return Result("FAIL", "the environment probe failed", figs, _tail(out))
        figs += [f"- {k}: {v}" for k, v in info.items()]
        if info.get("amd_fast.ops", "").startswith("FAILED"):
            return Result("FAIL", "`import amd_fast.ops` fails from a checkout", figs, info["amd_fast.ops"])
        if self.device == "cuda" and not info.get("cuda_available"):
            return Result("FAIL", "no CUDA device visible to torch", figs)
        name = info.get("device_name", "cpu")
        return Result("PASS", f"{name}, torch {info['torch']}, triton {info.get('triton')}", figs)

    def part_kernel_tests(self) -> Result:
        env = {**self.env}
        # every backend's reference test (fwd + each gradient, over dtypes and odd shapes); `compiled` is marked slow
        select = "matches_reference"
        if self.device == "cuda":  # the native twins are CPU code: on CUDA tensors they would run the chunked ones
            env["AMD_FAST_TEST_DEVICE"] = "cuda"
            select += " and not native"
        elif self.args.quick:  # the Triton interpreter on a few small cases
            select += " and triton and (mse-none-none or tokens)"
        junit = self.out / "kernel_tests.xml"
        junit.unlink(missing_ok=True)  # never read an earlier run's
        # -p amd_fast.ops: registers amd_fast.kernels before the test module imports it (no pip install here)
        cmd = [self.py, "-m", "pytest", "-p", "amd_fast.ops", "-p", "no:cacheprovider", "-q", "-rs",
               "tests/test_kernels.py", "-k", select, f"--junitxml={junit}"]  # fmt: skip
        rc, out = self.run(cmd, env=env)
        counts = _pytest_counts(out)
        per_backend = _junit_by_backend(junit)
        figs = [f"- `{' '.join(cmd[1:])}`" + (" with AMD_FAST_TEST_DEVICE=cuda" if self.device == "cuda" else
                                              " on CPU tensors (Triton under TRITON_INTERPRET=1)")]  # fmt: skip
        figs.append(f"- pytest: {', '.join(f'{v} {k}' for k, v in counts.items()) or 'no summary line'}")
        figs += [f"- {b}: " + ", ".join(f"{v} {k}" for k, v in c.items()) for b, c in sorted(per_backend.items())]
        if rc != 0:
            return Result("FAIL", f"pytest rc {rc}: {_pytest_line(out)}", figs, _tail(out, 40))
        if not per_backend.get("triton", {}).get("passed"):
            return Result("SKIP", "no Triton test ran (triton not importable?)", figs, _tail(out, 10))
        return Result("PASS", _pytest_line(out), figs)

    def part_attention(self) -> Result:
        rc, out, res = self.child("attention", self.device)
        if res is None:
            return Result("FAIL", f"the attention probe failed (rc {rc})", [], _tail(out))
        figs = [
            "| backend | dtype | q / kv shape | max err out | max err grads | math's own err | |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            if r["verdict"].startswith("SKIP"):
                continue
            figs.append(f"| {r['backend']} | {r['dtype']} | {r['shape']} | {_e(r.get('err_out'))} | "
                        f"{_e(r.get('err_grad'))} | {_e(r.get('err_math'))} | {r['verdict']} |")  # fmt: skip
        figs.append(
            "\nErrors are max |x - fp64 math| over the output (and dq, dk, dv); a backend passes when within "
            "3x math's own error at that dtype plus 2 ulps (the tests' rule).\n"
        )
        bad = [r for r in res["rows"] if r["verdict"].startswith("FAIL")]
        ran = [r for r in res["rows"] if r["verdict"] == "ok"]
        skips: dict = {}  # (backend, reason) -> dtypes
        for r in res["rows"]:
            if r["verdict"].startswith("SKIP"):
                skips.setdefault((r["backend"], r["verdict"][6:]), set()).add(r["dtype"])
        skipped = [f"{bk} ({', '.join(sorted(dts))}): {why}" for (bk, why), dts in sorted(skips.items())]
        summary = f"{len(ran)} ok, {len(bad)} failed" + (f"; skipped: {'; '.join(skipped)}" if skipped else "")
        figs += [f"- skipped: {s}" for s in skipped]
        if bad or rc != 0:
            return Result("FAIL", summary, figs, "\n".join(r["verdict"] for r in bad) or _tail(out))
        return Result("PASS", summary, figs)

    def part_training(self) -> Result:
        steps, stop = (10, 5) if self.args.quick else (30, 15)
        root = self.work / "train"
        if root.exists():
            shutil.rmtree(root)
        data = write_synthetic_fashion_mnist(self.work / "data" / "fashion-mnist", 512 if self.device == "cuda" else 64)
        teacher_steps = steps
        base = ["--config", "configs/tiny_image_amd.yaml", f"data.root={data}", "data.size=0", f"train.steps={steps}",
                f"train.save_interval={stop}", "train.keep_checkpoints=3", *TRAIN_COMMON,
                *(TRAIN_GPU if self.device == "cuda" else TRAIN_CPU)]  # fmt: skip
        figs = [f"- preset configs/tiny_image_amd.yaml on {self.device}, synthetic data ({data}), overrides: "
                f"`{' '.join(base[2:])}`"]  # fmt: skip
        train = [self.py, "amd_fast/train.py"]
        a, b = root / "straight", root / "resumed"
        # straight: train.py pre-trains the mae teacher first (the default path), then 30 AMD steps
        rc, out = self.run([*train, *base, f"train.output_dir={a}", f"teacher.pretrain_steps={teacher_steps}"])
        if rc != 0:
            return Result("FAIL", f"the straight run failed: {_error_line(out)}", figs, _tail(out, 40))
        teacher = self.teacher = a / "teacher" / f"checkpoint-{teacher_steps}.pt"
        same = [*base, f"teacher.checkpoint={teacher}"]
        rc, out, _ = self.child("train_stop", stop, *same, f"train.output_dir={b}")
        if rc != 0:
            return Result("FAIL", f"the run to be interrupted failed: {_error_line(out)}", figs, _tail(out, 40))
        rc, out = self.run([*train, *same, f"train.output_dir={b}", "--resume", "auto"])
        if rc != 0:
            return Result("FAIL", f"the resumed run failed: {_error_line(out)}", figs, _tail(out, 40))
        logged = [m.get("step") for m in _metrics(b / "metrics.jsonl")]  # both halves append to one file
        if logged != list(range(5, steps + 1, 5)):
            return Result("FAIL", f"the interrupted + resumed run logged steps {logged}: it did not resume at {stop}",
                          figs, _tail(out, 20))  # fmt: skip
        rc, out, cmp = self.child("compare", a / f"checkpoint-{steps}.pt", b / f"checkpoint-{steps}.pt")
        if cmp is None:
            return Result("FAIL", "comparing the checkpoints failed", figs, _tail(out))
        la, lb = _last_metrics(a / "metrics.jsonl"), _last_metrics(b / "metrics.jsonl")
        first = _first_metrics(a / "metrics.jsonl")
        keys = [k for k in ("loss", "rec", "dir", "gen") if k in la]
        figs.append(f"- straight run, first logged (step {first.get('step')}): "
                    + ", ".join(f"{k} {first.get(k, float('nan')):.5f}" for k in keys))  # fmt: skip
        figs.append(f"- final losses at step {steps}, straight: " + ", ".join(f"{k} {la[k]:.6f}" for k in keys))
        figs.append(f"- final losses at step {steps}, stopped at {stop} and resumed: "
                    + ", ".join(f"{k} {lb.get(k, float('nan')):.6f}" for k in keys))  # fmt: skip
        figs.append(f"- straight run: {la.get('clips_per_s', 0):.0f} clips/s, peak memory "
                    f"{la.get('peak_mem_gib', 0):.2f} GiB (last log interval)")  # fmt: skip
        figs.append(f"- checkpoint-{steps}, resumed vs straight: {cmp['tensors']} tensors (model, optimizer, engine), "
                    f"{cmp['differ']} differ, max |diff| {cmp['max_abs_diff']:.3g}; "
                    f"step and the rest equal: {cmp['rest_equal']}")  # fmt: skip
        finite = all(_finite(la.get(k)) for k in keys)
        if not finite:
            return Result("FAIL", "non-finite final loss", figs)
        if cmp["differ"] == 0 and cmp["rest_equal"]:
            return Result("PASS", f"resumed == straight bit for bit; final loss {la['loss']:.5f}", figs)
        # not bit-identical: is the device itself deterministic run to run? (CUDA atomics, e.g. scatter-adds, are
        # not.) Run the straight run again from the same teacher and compare the two straight runs.
        rc, out = self.run([*train, *same, f"train.output_dir={root / 'straight2'}"])
        if rc != 0:
            return Result("FAIL", "resumed != straight, and the repeat run failed", figs, _tail(out, 30))
        rc, out, rep = self.child("compare", a / f"checkpoint-{steps}.pt",
                                  root / "straight2" / f"checkpoint-{steps}.pt")  # fmt: skip
        if rep is None:
            return Result("FAIL", "comparing the repeat run failed", figs, _tail(out))
        figs.append(f"- a second straight run against the first: {rep['differ']} tensors differ, "
                    f"max |diff| {rep['max_abs_diff']:.3g}")  # fmt: skip
        if rep["differ"] and cmp["max_abs_diff"] <= 10 * rep["max_abs_diff"]:
            why = f"max diff {cmp['max_abs_diff']:.2g} vs {rep['max_abs_diff']:.2g}"
            return Result("PASS", f"not bit-identical, as two straight runs are not on this device ({why}); "
                          f"final loss {la['loss']:.5f}", figs)  # fmt: skip
        return Result("FAIL", f"resumed != straight (max diff {cmp['max_abs_diff']:.3g}) while two straight runs "
                      f"differ by {rep['max_abs_diff']:.3g}", figs)  # fmt: skip

    def part_kernels_on_off(self) -> Result:
        """The tiny preset in fp32 from one seed, objective.kernels=reference then forced on (on CUDA: the Triton
        kernels in a real run, which the CPU tests never see; forced, since `auto` may measure plain PyTorch
        faster and run it): every step's losses (train.log_interval=1) within tests/test_kernels_e2e.py's bound,
        ON_OFF_REL / ON_OFF_ABS."""
        on = "triton" if self.device == "cuda" else "chunked"
        steps = 8 if self.args.quick else 20
        root = self.work / "kernels_on_off"
        shutil.rmtree(root, ignore_errors=True)
        data = self.work / "data" / "fashion-mnist"
        if not data.exists():
            write_synthetic_fashion_mnist(data, 512 if self.device == "cuda" else 64)
        common = [o for o in TRAIN_COMMON if not o.startswith(("train.autocast=", "train.log_interval="))]
        base = ["--config", "configs/tiny_image_amd.yaml", f"data.root={data}", "data.size=0", *common,
                *(TRAIN_GPU if self.device == "cuda" else TRAIN_CPU), f"train.steps={steps}",
                f"train.save_interval={steps}", "train.log_interval=1", "train.autocast=off",
                "teacher.dtype=float32"]  # fmt: skip
        # part 4's teacher; without it (--parts), the reference run pre-trains one and the auto run loads it
        teacher = self.teacher if self.teacher and self.teacher.exists() else None
        figs = [f"- `train.py {' '.join(base[2:])}` with objective.kernels=reference, then ={on}; teacher: "
                f"{teacher or f'pre-trained {steps} steps by the reference run'}"]  # fmt: skip
        logs, chosen = {}, []
        for kernels in ("reference", on):
            out_dir = root / kernels
            extra = [f"teacher.checkpoint={teacher}"] if teacher else [f"teacher.pretrain_steps={steps}"]
            rc, out = self.run([self.py, "amd_fast/train.py", *base, *extra, f"objective.kernels={kernels}",
                                f"train.output_dir={out_dir}"])  # fmt: skip
            if rc != 0:
                return Result("FAIL", f"the kernels={kernels} run failed: {_error_line(out)}", figs, _tail(out, 40))
            teacher = teacher or out_dir / "teacher" / f"checkpoint-{steps}.pt"
            logs[kernels] = [m for m in _metrics(out_dir / "metrics.jsonl") if "loss" in m]
            if kernels == on:  # amd_fast.kernels logs what each op ran
                chosen = sorted(set(re.findall(r"kernels: (\w+ on \w+ \w+.* runs .*)", out)))
        figs += [f"- {on}: {c}" for c in chosen]
        ref, auto = logs["reference"], logs[on]
        if len(ref) != steps or [m["step"] for m in auto] != [m["step"] for m in ref]:
            return Result("FAIL", f"logged steps differ or are missing: reference {[m['step'] for m in ref]}, "
                          f"auto {[m['step'] for m in auto]}", figs)  # fmt: skip
        worst, bad = compare_losses(ref, auto)
        figs.append(f"- largest relative difference per loss, {on} vs reference: "
                    + ", ".join(f"{k} {r:.2e} (step {st})" for k, (r, st) in worst.items()))  # fmt: skip
        figs.append(f"- bound (tests/test_kernels_e2e.py): relative {ON_OFF_REL[0]:g} at step 1, {ON_OFF_REL[1]:g} "
                    f"after, absolute {ON_OFF_ABS:g}")  # fmt: skip
        figs.append(f"- final loss: reference {ref[-1]['loss']:.6f}, {on} {auto[-1]['loss']:.6f}")
        if bad:
            return Result("FAIL", f"{len(bad)} step losses beyond the bound, first: {bad[0]}", figs, "\n".join(bad))
        rel, st = max(worst.values())
        return Result("PASS", f"{steps} fp32 steps, every loss within the bound (max relative diff {rel:.1e}, "
                      f"step {st})", figs)  # fmt: skip

    def part_benchmarks(self) -> Result:
        # step.py: the recipe with the kernels on and off, alternating, each child profiling one step after its
        # timed ones; MFU against the GEMM peak measured in the same run, in the step's dtype (bf16 on CUDA)
        step = ["--case", "recipe", "--kernels", "auto", "reference", "--profile"]
        if self.device == "cuda":
            step += ["--steps", "5", "--warmup", "3", "--threads", "4"]
            # at the recipe's shapes in bf16 (what autocast hands the ops there); the first call of each Triton
            # shape tunes (a compile and a 25 ms benchmark per config), the warm-up calls absorb it
            kern = ["--batch", "recipe", "--dtype", "bfloat16", "--reps", "10", "--warmup", "3", "--threads", "4",
                    "--providers", "eager", "chunked", "triton"]  # fmt: skip
        else:
            step += ["--steps", "1" if self.args.quick else "3", "--warmup", "2", *RECIPE_CPU]
            kern = ["--batch", "paper", "--reps", "3", "--warmup", "1", "--no-memory",
                    "--providers", "eager", "chunked", "native"]  # fmt: skip
            if self.args.quick:
                kern += ["--op", "alignment_loss"]
        figs, errors, failed, step_lines = [], [], [], []
        for name, script, args in (("step", "benchmarks/step.py", step), ("kernels", "benchmarks/kernels.py", kern)):
            cmd = [self.py, script, "--device", self.device, "--csv", str(self.out / f"{name}.csv"), *args]
            rc, out = self.run(cmd, cap=STEP_BENCH_TIMEOUT[self.mode] if name == "step" else None)
            figs.append(f"\n`{' '.join(cmd[1:])}`" + (f" — FAILED (rc {rc})" if rc else "") + "\n")
            lines = [ln for ln in out.splitlines() if _is_figure(name, ln)]
            step_lines += [ln for ln in lines if "s/step" in ln] if name == "step" else []
            figs.append("```\n" + ("\n".join(lines) if lines else "(no figures printed)") + "\n```")
            if rc != 0:
                failed.append(name)
                errors.append(f"{script}:\n{_tail(out, 25)}")
        if self.device == "cuda":
            figs.append("\nkernels.py here leaves out the torch.compile providers (their inductor compiles would "
                        "not fit the budget): `python3 benchmarks/kernels.py --device cuda` gives the whole "
                        "table.")  # fmt: skip
        # "recipe [glibc, kernels=auto]: 0.123 s/step ... MFU 0.412, peak GPU memory 40.10 GiB"
        #   -> "kernels=auto 0.123 s/step, MFU 0.412, 40.10 GiB"
        pattern = r"(kernels=\w+)\]: ([\d.]+) s/step.*MFU ([\d.]+), peak .* ([\d.]+) GiB"
        heads = [f"{m[1]} {m[2]} s/step, MFU {m[3]}, {m[4]} GiB" for m in map(re.compile(pattern).search, step_lines)
                 if m]  # fmt: skip
        summary = "recipe: " + ("; ".join(heads) or "no timing")
        if failed:
            return Result("FAIL", f"{' and '.join(failed)} failed; {summary}", figs, "\n\n".join(errors))
        return Result("PASS", f"{summary}; kernels.py ran", figs)

    def wheel_env(self) -> tuple[dict, list[str]]:
        """--wheels DIR: its wheels that this interpreter can install (pip refuses a foreign tag, e.g. a cp312 wheel
        on 3.11, even with --no-deps --target, and then installs none), installed offline without resolving (pip
        would reach for torch) into a scratch directory under --work, which goes on PYTHONPATH after the checkout.
        Returns that environment (self.env without --wheels) and the report's lines."""
        env = dict(self.env)
        if not self.args.wheels:
            return env, []
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename

        ours = set(sys_tags())
        wheels = sorted(Path(self.args.wheels).resolve().glob("*.whl"))
        usable = [w for w in wheels if parse_wheel_filename(w.name)[3] & ours]
        target = self.work / "wheels-target"
        rc, out = self.run([self.py, "-m", "pip", "install", "--no-index", "--no-deps", "--target", target, *usable])
        figs = [f"- offline install of {len(usable)} of the {len(wheels)} wheels in {self.args.wheels} into "
                f"{target}: {'ok' if rc == 0 else f'rc {rc}: ' + _error_line(out)}"]  # fmt: skip
        if len(usable) < len(wheels):
            left = [w.name for w in wheels if w not in usable]
            figs.append(f"- left out (not for this interpreter): {', '.join(left)}")
        if rc == 0:
            env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(target)])  # after the checkout
        return env, figs

    def part_deepspeed(self) -> Result:
        env, figs = self.wheel_env()
        probe = "import os, deepspeed; print(deepspeed.__version__, 'from', os.path.dirname(deepspeed.__file__))"
        rc, out = self.run([self.py, "-c", probe], env=env)
        if rc != 0:
            why = _error_line(out) or "import failed"
            return Result("SKIP", f"deepspeed is not importable ({why})", figs + [
                "- To run this part on a machine without DeepSpeed, carry it as wheels and pass `--wheels DIR` "
                "(installed with `pip install --no-index --no-deps --target` into a scratch directory). "
                "DeepSpeed needs no compiled op here: amd_fast hands it PyTorch's fused AdamW, so nothing is "
                "JIT-built. Its PyPI release is a source archive: build the wheel where pip works, "
                "`pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w DIR`, and add the pure-Python or "
                "cp312 wheels of what that machine lacks (on the H200 image: hjson, pydantic, pydantic-core, "
                "annotated-types, typing-inspection; msgpack, ninja, psutil, py-cpuinfo, packaging and einops "
                "are there) with `pip download --no-deps --only-binary=:all: --python-version 3.12 "
                "--platform manylinux2014_x86_64 -d DIR NAME`.",
            ], _tail(out, 5))  # fmt: skip
        figs.append(f"- deepspeed {out.strip().splitlines()[-1]}")
        steps = 10 if self.device == "cuda" else 2 if self.args.quick else 4
        data = self.work / "data" / "fashion-mnist"
        if not data.exists():
            write_synthetic_fashion_mnist(data, 64)
        teacher = self.teacher if self.teacher and self.teacher.exists() else None
        base = ["--config", "configs/tiny_image_amd.yaml", f"data.root={data}", "data.size=0",
                *TRAIN_COMMON, *(TRAIN_GPU if self.device == "cuda" else TRAIN_CPU),
                f"train.steps={steps}", f"train.save_interval={steps}", "train.log_interval=1",
                "train.autocast=auto", "dist.engine=deepspeed"]  # fmt: skip
        base += [f"teacher.checkpoint={teacher}"] if teacher else ["teacher.pretrain_steps=2"]
        figs.append(f"- `train.py {' '.join(base)} dist.deepspeed_config=... train.output_dir=...` (one rank)")
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        if self.device == "cpu":
            env["DS_ACCELERATOR"] = "cpu"
        # bf16 is what a GPU run uses (configs/deepspeed/*_bf16.json: DeepSpeed's bf16 engine, fp32 master weights);
        # ZeRO-3 partitions the parameters too, a different code path from ZeRO-2's
        done, failed, errors = [], [], []
        for config, what in (("zero2_bf16", "ZeRO-2 bf16"), ("zero3_bf16", "ZeRO-3 bf16")):
            out_dir = self.work / f"deepspeed-{config}"
            env["MASTER_PORT"] = str(_free_port())
            rc, out = self.run([self.py, "amd_fast/train.py", *base, f"dist.deepspeed_config={config}",
                                f"train.output_dir={out_dir}"], env=env)  # fmt: skip
            last = _last_metrics(out_dir / "metrics.jsonl")
            if rc != 0 or not (out_dir / f"checkpoint-{steps}").is_dir():
                why = _error_line(out) if rc != 0 else f"no checkpoint-{steps} directory written"
                figs.append(f"- {what}: FAILED: {why}")
                failed.append(f"{what}: {why}")
                errors.append(f"{what}:\n{_tail(out, 30)}")
                continue
            engine = next((ln.split("engine: ", 1)[1] for ln in out.splitlines() if "engine: DeepSpeed" in ln), "?")
            loss = last.get("loss", float("nan"))
            figs.append(f"- {what}: {engine}; step {last.get('step')}: loss {loss:.5f}, "
                        f"{last.get('clips_per_s', 0):.0f} clips/s, "
                        f"peak memory {last.get('peak_mem_gib', 0):.2f} GiB")  # fmt: skip
            done.append(f"{what} loss {loss:.5f}")
        where = f"one {self.device} rank, {steps} steps"
        if failed:
            return Result("FAIL", f"{where}: " + "; ".join(done + [f"FAILED {f}" for f in failed]), figs,
                          "\n\n".join(errors))  # fmt: skip
        return Result("PASS", f"{where}: " + "; ".join(done), figs)

    # ------------------------------------------------------------------------------------------
    # the report

    def run_all(self) -> int:
        self._log(f"=== gpu_check {self.mode} mode, python {self.py}, out {self.out}")
        for part in PARTS:
            if self.args.parts and _key(part) not in self.args.parts:
                continue
            t0 = time.monotonic()
            if part != "environment" and self.results.get("environment", Result("PASS", "")).status == "FAIL" \
                    and self.device == "cuda":  # fmt: skip
                res = Result("SKIP", "the environment part failed (no usable CUDA device or amd_fast import)")
            elif self.deadline - time.monotonic() < 5:
                res = Result("SKIP", f"out of time: the check's --budget of {self.args.budget} s was used up")
            else:
                self._log(f"=== part: {part}")
                self.part_deadline = time.monotonic() + TIMEOUTS[self.mode][part]
                try:
                    res = getattr(self, "part_" + re.sub(r"\W", "_", part))()
                except Exception as e:  # a bug in this script: report it, go on with the next part
                    import traceback

                    res = Result("FAIL", f"the check itself failed: {e!r}", [], traceback.format_exc())
            res.seconds = time.monotonic() - t0
            self.results[part] = res
            self._log(f"=== {part}: {res.status} ({res.seconds:.1f} s): {res.summary}")
            self.write_report()
        self.write_report(final=True)
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        return 1 if any(r.status == "FAIL" for r in self.results.values()) else 0

    def write_report(self, final: bool = False) -> None:
        total = (datetime.datetime.now(datetime.timezone.utc) - self.started).total_seconds()
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip() or "unknown"  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()  # fmt: skip
        lines = [
            f"# GPU check ({self.mode} mode{', quick' if self.args.quick else ''})",
            "",
            f"{self.started.isoformat(timespec='seconds')}, commit {commit}{'-dirty' if dirty else ''}, "
            f"python `{self.py}`, {total:.0f} s{'' if final else ' so far (still running, or cut short)'}. "
            "Full output of every command: gpu_check.log.",
            "",
            "| part | status | time | summary |",
            "|---|---|---|---|",
        ]
        for i, part in enumerate(PARTS, 1):
            r = self.results.get(part)
            if r is None:
                lines.append(f"| {i}. {part} | NOT RUN | | {'left out (--parts)' if final else 'pending'} |")
            else:
                lines.append(f"| {i}. {part} | {r.status} | {r.seconds:.0f} s | {r.summary.replace('|', '/')} |")
        for i, part in enumerate(PARTS, 1):
            r = self.results.get(part)
            if r is None:
                continue
            lines += ["", f"## {i}. {part}: {r.status} ({r.seconds:.1f} s)", "", r.summary, ""]
            lines += r.figures
            if r.error:
                lines += ["", "Error tail:", "", "```", r.error.rstrip(), "```"]
        tmp = self.out / "report.md.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.out / "report.md")


# ---------------------------------------------------------------------------------------------
# the synthetic data


def write_synthetic_fashion_mnist(root: Path, n_train: int, n_test: int = 32, seed: int = 0) -> Path:
    """Fashion-MNIST's four gzipped idx files with `n` 28x28 images: per class a bright block of its own
    size and place on a dark, noisy ground (learnable, deterministic)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = [rng.randrange(10) for _ in range(n)]
        pixels = bytearray()
        for c in labels:
            top, left, h, w = 2 + c, 3 + (c * 7) % 12, 8 + c, 14 - c // 2
            jitter = rng.randrange(-2, 3)
            for y in range(28):
                for x in range(28):
                    inside = top + jitter <= y < top + jitter + h and left <= x < left + w
                    pixels.append(min(255, (170 if inside else 10) + rng.randrange(0, 60)))
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + bytes(pixels))
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + bytes(labels))
    return root


# ---------------------------------------------------------------------------------------------
# children: run in their own processes (`--child name ...`); each prints one JSON line last


def child_env(device: str) -> dict:
    import platform

    info: dict = {"python": platform.python_version()}
    import torch

    info["torch"] = torch.__version__
    info["torch CUDA"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        d = torch.device("cuda")
        p = torch.cuda.get_device_properties(d)
        info["device_name"] = torch.cuda.get_device_name(d)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(d)))
        info["memory_gib"] = round(p.total_memory / 2**30, 1)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - any failure to import is the finding
        info["triton"] = f"not importable ({type(e).__name__}: {e})"
    import importlib.util

    for mod in ("numpy", "yaml", "einops", "timm", "pytest", "tensorboard", "deepspeed", "flash_attn", "xformers"):
        info[mod] = "present" if importlib.util.find_spec(mod) else "absent"
    # the checkout's own import path: amd_fast.ops provides amd_fast.kernels when amd_fast is not pip-installed
    code = (
        "import amd_fast.ops, amd_fast.kernels as k, torch; from amd_fast.kernels import backend as b; "
        f"d = torch.device({device!r}); bf = torch.bfloat16; "
        "print(k.__file__, '| native twins:', 'built' if b.native_module() else 'not built', '| auto bf16 on', "
        "d.type, ':', b.resolve('alignment_loss', d, bf), '/', b.resolve('gather', d, bf))"
    )
    with tempfile.TemporaryDirectory() as elsewhere:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, timeout=120)
    info["amd_fast.ops"] = r.stdout.strip() if r.returncode == 0 else "FAILED: " + _tail(r.stderr, 5)
    return info


def child_attention(device: str) -> dict:
    import torch

    from amd_fast import attention as A

    dev = torch.device(device)
    if dev.type == "cuda":  # ViT-S image tokens (+CLS), ViT-S video tokens, a last block's few query rows
        shapes = [((2, 6, 197, 64), (2, 6, 197, 64)), ((2, 6, 1568, 64), (2, 6, 1568, 64)),
                  ((2, 6, 40, 64), (2, 6, 233, 64))]  # fmt: skip
    else:
        shapes = [((1, 2, 17, 16), (1, 2, 17, 16)), ((2, 3, 65, 32), (2, 3, 65, 32)), ((2, 2, 5, 16), (2, 2, 33, 16))]
    impls = {"sdpa": A.attention_sdpa, "flash_attn": A.attention_flash, "xformers": A.attention_xformers}
    sdpa_kernels = {}
    if dev.type == "cuda":  # which of SDPA's own kernels run, each forced
        from torch.nn.attention import SDPBackend

        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            if hasattr(SDPBackend, name):
                sdpa_kernels[f"sdpa[{name.split('_')[0].lower()}]"] = getattr(SDPBackend, name)

    def run(fn, q, k, v, g):
        q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out = fn(q, k, v)
        out.backward(g)
        return out.detach(), [q.grad, k.grad, v.grad]

    def err(a, b):
        return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))

    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        floor_eps = 2 * torch.finfo(dtype).eps
        for qs, ks in shapes:
            q64, k64, v64 = (torch.randn(s, generator=gen, dtype=torch.float64).to(dev) for s in (qs, ks, ks))
            g64 = torch.randn(qs, generator=gen, dtype=torch.float64).to(dev)
            ref_out, ref_grads = run(A.attention_math, q64, k64, v64, g64)
            q, k, v, g = (x.to(dtype) for x in (q64, k64, v64, g64))
            m_out, m_grads = run(A.attention_math, q, k, v, g)
            base_out, base_grad = err([m_out], [ref_out]), err(m_grads, ref_grads)
            scale_out = max(1.0, ref_out.abs().max().item())
            scale_grad = max(1.0, max(x.abs().max().item() for x in ref_grads))
            shape = f"{list(qs)} / {ks[2]}"
            cands = [(n, impls[n]) for n in ("sdpa", "flash_attn", "xformers")]
            cands += [(n, functools.partial(_with_sdpa_kernel, b)) for n, b in sdpa_kernels.items()]
            for name, fn in cands:
                row = {"backend": name, "dtype": str(dtype).removeprefix("torch."), "shape": shape,
                       "err_math": max(base_out, base_grad)}  # fmt: skip
                if name in ("flash_attn", "xformers"):
                    ok, why = A.backend_available(name, dev, dtype)
                    if not ok:
                        rows.append({**row, "verdict": f"SKIP: {why}"})
                        continue
                try:
                    out, grads = run(fn, q, k, v, g)
                except RuntimeError as e:
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    if name.startswith("sdpa["):  # one of SDPA's kernels, forced: it may not take this input
                        no_kernel = "No available kernel" in str(e) or "No viable backend" in str(e)
                        why = "no kernel for this dtype / shape" if no_kernel else msg[:120]
                        rows.append({**row, "verdict": f"SKIP: {why}"})
                    else:
                        rows.append({**row, "verdict": f"FAIL: {name} {dtype} {shape}: {msg[:200]}"})
                    continue
                e_out, e_grad = err([out], [ref_out]), err(grads, ref_grads)
                ok = e_out <= 3 * base_out + floor_eps * scale_out and e_grad <= 3 * base_grad + floor_eps * scale_grad
                verdict = "ok" if ok else (f"FAIL: {name} {dtype} {shape}: out {e_out:.3g} grads {e_grad:.3g} vs "
                                           f"math {base_out:.3g} / {base_grad:.3g}")  # fmt: skip
                rows.append({**row, "err_out": e_out, "err_grad": e_grad, "verdict": verdict})
    return {"rows": rows}


def _with_sdpa_kernel(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel

    from amd_fast.attention import attention_sdpa

    with sdpa_kernel([backend]):
        return attention_sdpa(q, k, v)


class _Stop(Exception):
    pass


def child_train_stop(stop: str, *argv: str) -> dict:
    """train.py's main() with its Trainer made to stop (as a kill would) once step `stop` is checkpointed."""
    from amd_fast import train
    from amd_fast.trainer import Trainer

    stop_at, real = int(stop), Trainer.train_step

    def train_step(self, micro):
        if self.step == stop_at:  # checkpoint-{stop} is written: the run dies before the next step
            raise _Stop
        return real(self, micro)

    Trainer.train_step = train_step
    try:
        rc = train.main(list(argv))
    except _Stop:
        return {"stopped_at": stop_at}
    raise SystemExit(f"the run ended (rc {rc}) without reaching step {stop_at}")


def child_compare(path_a: str, path_b: str) -> dict:
    """Two checkpoints: every tensor of model / optimizer / engine state compared bit for bit; the rest by value."""
    import torch

    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (path_a, path_b))
    tensors = differ = 0
    max_diff = 0.0
    rest_equal = True

    def walk(x, y):
        nonlocal tensors, differ, max_diff, rest_equal
        if isinstance(x, torch.Tensor):
            tensors += 1
            if not (isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)):
                differ += 1
                if isinstance(y, torch.Tensor) and x.shape == y.shape:
                    max_diff = max(max_diff, (x.double() - y.double()).abs().max().item() if x.numel() else 0.0)
                else:
                    max_diff = float("inf")
        elif isinstance(x, dict):
            if not isinstance(y, dict) or x.keys() != y.keys():
                rest_equal = False
                return
            for k in x:
                walk(x[k], y[k])
        elif isinstance(x, (list, tuple)):
            if not isinstance(y, (list, tuple)) or len(x) != len(y):
                rest_equal = False
                return
            for u, v in zip(x, y):
                walk(u, v)
        elif x != y:
            rest_equal = False

    for key in ("model", "optimizer", "engine", "step", "nonfinite_total"):
        walk(a.get(key), b.get(key))
    return {"tensors": tensors, "differ": differ, "max_abs_diff": max_diff, "rest_equal": rest_equal}


CHILDREN = {"env": child_env, "attention": child_attention, "train_stop": child_train_stop, "compare": child_compare}


# ---------------------------------------------------------------------------------------------
# helpers


def _last_json(out: str) -> dict | None:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _tail(text: str, n: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _error_line(out: str) -> str:
    """The last exception line of a traceback (`SomeError: message`), or the last line."""
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b.*", ln) or ln.startswith("config error"):
            return ln.strip()[:300]
    return lines[-1].strip()[:300] if lines else ""


def _pytest_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1].strip("= ") if lines else "no pytest summary"


def _pytest_counts(out: str) -> dict:
    return {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", _pytest_line(out))}


def _junit_by_backend(path: Path) -> dict:
    """{backend: {passed/failed/skipped: n}} from pytest's junit XML (the backend is a parameter in the test id)."""
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {}
    out: dict = {}
    for case in ET.parse(path).iter("testcase"):
        m = re.search(r"\[(.*)\]", case.get("name", ""))
        params = m.group(1).split("-") if m else []
        backend = next((p for p in params if p in ("triton", "chunked", "native", "reference", "compiled")), "other")
        state = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"  # fmt: skip
        out.setdefault(backend, {}).setdefault(state, 0)
        out[backend][state] += 1
    return out


def _is_figure(name: str, line: str) -> bool:
    if name == "step":  # a case's timing line and its profile's lines
        return "s/step" in line or line.startswith("  profile: ")
    return line.startswith(("providers:", "alignment_loss/", "gather/", "  "))


def _metrics(path: Path) -> list[dict]:
    try:
        return [json.loads(ln) for ln in open(path) if ln.strip()]
    except OSError:
        return []


def _last_metrics(path: Path) -> dict:
    m = _metrics(path)
    return m[-1] if m else {}


def _first_metrics(path: Path) -> dict:
    m = _metrics(path)
    return m[0] if m else {}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def _e(x) -> str:
    return "" if x is None else f"{x:.2e}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare_losses(ref: list[dict], other: list[dict]) -> tuple[dict, list[str]]:
    """Two runs' per-step metrics.jsonl records held to ON_OFF_REL / ON_OFF_ABS, loss by loss: ({loss: (largest
    relative difference, its step)}, a line for each value beyond the bound)."""
    worst: dict = {}
    bad = []
    for i, (a, b) in enumerate(zip(ref, other)):
        for k in (k for k in a if k not in NOT_LOSSES):
            diff = abs(b[k] - a[k])
            tol = max(ON_OFF_REL[0 if i == 0 else 1] * abs(a[k]), ON_OFF_ABS)
            worst[k] = max(worst.get(k, (0.0, 0)), (diff / abs(a[k]) if a[k] else diff, a["step"]))
            if not diff <= tol:  # a NaN fails too
                bad.append(
                    f"step {a['step']} {k}: reference {a[k]:.9g}, auto {b[k]:.9g}: |diff| {diff:.3g} > {tol:.3g}"
                )
    return worst, bad


def _key(part: str) -> str:
    """A part's name on the command line (--parts): its first word."""
    return re.split(r"[ /]", part)[0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the report's directory (created): report.md, gpu_check.log, the runs' outputs")
    p.add_argument("--cpu", action="store_true", help="run every part on the CPU, at small sizes")
    p.add_argument("--quick", action="store_true", help="with --cpu: fewer kernel tests, 10 training steps (the test)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds the whole check may take (default 520 on a GPU, 600 with --cpu); "
                   "each part's timeout is cut to what is left")  # fmt: skip
    p.add_argument("--parts", nargs="+", choices=[_key(x) for x in PARTS],
                   help="run only these parts (kernels: kernels on/off, kernel: kernel tests)")  # fmt: skip
    p.add_argument("--work", default="", help="where the runs and the data go (default: a temporary directory)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (default: removed at the end)")
    p.add_argument("--wheels", default="",
                   help="a directory of wheels to install deepspeed from, offline (part 7); wheels for another "
                   "Python or platform are left out")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick and not args.cpu:
        p.error("--quick goes with --cpu")
    if args.budget is None:
        args.budget = 600.0 if args.cpu else 520.0
    return args


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        print(json.dumps(CHILDREN[sys.argv[2]](*sys.argv[3:])), flush=True)
        return 0
    return Check(parse_args(argv)).run_all()


if __name__ == "__main__":
    sys.exit(main())

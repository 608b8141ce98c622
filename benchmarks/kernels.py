"""Speed and peak memory of each amd_fast kernel against PyTorch, forward and forward+backward.

    python benchmarks/kernels.py                      # both ops, the paper's shapes and 16x that batch
    python benchmarks/kernels.py --op alignment_loss --reps 30

Shapes (METHOD.md, video ViT-B teacher -> ViT-S student, 16x224x224, tubelet 2, rho_s .9, rho_t .75):
N = 1568 tokens, V_s = 160, Delta = 232, V_t = 392, 1408 student-masked; D_s 384, D_t 768, K = 1536 values per
patch; batch 2 ("paper") and 32 ("16x"); and the official scripts' recipe ("recipe": ViT-L teacher, D_t 1024, per-GPU
batch 64). --dtype bfloat16 gives every provider bf16 inputs (what autocast hands the ops in a bf16 run).

Providers: `eager` (the pure-PyTorch reference: F.linear + F.mse_loss; `torch.gather` with an expanded index),
`compiled` (torch.compile of that reference, inductor), `chunked` (the chunked PyTorch twin), `chunked_compiled`
(its row part through torch.compile; for the gather the same as `chunked`), `native` (the C++ twin, when built;
CPU only) and `triton` (CUDA only). --device (default: cuda when available) is where the tensors live;
--providers keeps a subset. Speed: all providers of a case are timed round-robin in one
process (the machine is shared: side by side, each round in a rotated order), median and spread
((max - min) / 2) over --reps rounds. Peak memory on a CPU: each provider in a fresh subprocess, the peak RSS of
one call above the RSS before it (VmHWM after clearing it, glibc told to mmap and return every block over 64 KiB,
so freed memory leaves RSS at once); on CUDA: in this process, the CUDA allocator's peak above its allocation
before the call. `extra` subtracts the gradients the call leaves behind (the same for every provider). One CSV
row per case and provider goes to benchmarks/results/kernels.csv (--csv: elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import amd_fast.ops  # noqa: E402,F401  (in a checkout that was never pip-installed, it provides amd_fast.kernels)
from benchmarks.common import append_csv, machine_info, median_spread  # noqa: E402

N_TOK, V_S, DELTA, N_MASKED, D_S, D_T, K = 1568, 160, 232, 1408, 384, 768, 1536
BATCHES = {"paper": (2, D_T), "16x": (32, D_T), "recipe": (64, 1024)}  # name -> (batch, teacher width)
DTYPES = {"float32", "bfloat16", "float16"}

# (op, case name, kind, shape parameters)
CASES = [
    # the fused loss: AMD's direct alignment (z read by the generator) and the loss-only case (DMAE, or AMD
    # without generators), B*V_s rows of D_s -> D_t
    ("alignment_loss", "loss_only", {"rows": V_S, "z": False}),
    ("alignment_loss", "with_z", {"rows": V_S, "z": True}),
    # gathers: patches at V_s (student input), at [V_s ; Delta] (teacher input), at the masked rows (targets),
    # and the position add of the decoder / generator inputs (x + E[ids], fused)
    ("gather", "patches_vs", {"n": N_TOK, "v": V_S, "d": K}),
    ("gather", "patches_vt", {"n": N_TOK, "v": V_S + DELTA, "d": K}),
    ("gather", "targets_masked", {"n": N_TOK, "v": N_MASKED, "d": K}),
    ("gather", "pos_add_vt", {"n": N_TOK, "v": V_S + DELTA, "d": "d_t", "pos": True}),
]


def build(op: str, params: dict, batch: int, provider: str, device: str, seed: int = 0, d_t: int = D_T,
          dtype: str = "float32"):  # fmt: skip
    """-> (fwd(), fwd_bwd(), grads_bytes): closures over fresh inputs on `device` (in `dtype`) for one provider."""
    import torch
    from amd_fast.kernels import alignment_loss_reference, fused_alignment_loss
    from amd_fast.kernels.gather import gather_rows, gather_tokens

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    D_T = d_t  # noqa: N806 (the case's teacher width)
    dev = device
    if op == "alignment_loss":
        B, V = batch, params["rows"]
        h = torch.randn(B, V, D_S, generator=g).to(dev, dt).requires_grad_()
        w = (torch.randn(D_T, D_S, generator=g) / D_S**0.5).to(dev, dt).requires_grad_()
        t_full = torch.randn(B, V + DELTA, D_T, generator=g).to(dev, dt)
        t = t_full[:, :V]  # AMD's target is t[:, :V_s] of the teacher's [V_s ; Delta] rows
        gz = (torch.randn(B, V, D_T, generator=g) * 1e-3).to(dev, dt)
        if provider in ("eager", "compiled"):
            ref = alignment_loss_reference
            if provider == "compiled":
                ref = torch.compile(alignment_loss_reference, dynamic=False)
            fn = lambda: ref(h, w, None, t)  # noqa: E731
        else:
            be = "compiled" if provider == "chunked_compiled" else provider
            fn = lambda: fused_alignment_loss(h, w, None, t, return_z=True, backend=be)  # noqa: E731
            if not params["z"]:
                fn = lambda: (fused_alignment_loss(h, w, None, t, backend=be), None)  # noqa: E731

        def fwd():
            with torch.no_grad():
                return fn()

        def fwd_bwd():
            loss, z = fn()
            if params["z"]:
                torch.autograd.backward([loss, z], [torch.ones_like(loss), gz])
            else:
                loss.backward()
            h.grad = w.grad = None

        grads = (h.numel() + w.numel()) * h.element_size()
        return fwd, fwd_bwd, grads

    provider = "chunked" if provider == "chunked_compiled" else provider  # a gather has nothing to fuse
    B, N, V, D = batch, params["n"], params["v"], params["d"]
    D = D_T if D == "d_t" else D
    ids = torch.stack([torch.randperm(N, generator=g)[:V] for _ in range(B)]).to(dev)
    if params.get("pos"):  # x [B, V, D] + table[ids]
        base = torch.randn(B, V, D, generator=g).to(dev, dt).requires_grad_()
        table = torch.randn(N, D, generator=g).to(dev, dt)

        def eager():
            return base + torch.gather(table.expand(B, N, D), 1, ids.unsqueeze(-1).expand(B, V, D))

        fn = eager if provider in ("eager", "compiled") else (lambda: gather_rows(table, ids, base, backend=provider))
        grads = base.numel() * base.element_size()
        x = base
    else:
        x = torch.randn(B, N, D, generator=g).to(dev, dt).requires_grad_()

        def eager():
            return torch.gather(x, 1, ids.unsqueeze(-1).expand(B, V, D))

        fn = eager if provider in ("eager", "compiled") else (lambda: gather_tokens(x, ids, backend=provider))
        grads = x.numel() * x.element_size()
    if provider == "compiled":
        fn = torch.compile(fn, dynamic=False)
    gout = torch.randn(B, V, D, generator=g).to(dev, dt)

    def fwd():
        with torch.no_grad():
            return fn()

    def fwd_bwd():
        fn().backward(gout)
        x.grad = None

    return fwd, fwd_bwd, grads


def providers(device: str) -> list[str]:
    import torch
    from amd_fast.kernels import backend

    out = ["eager", "compiled", "chunked", "chunked_compiled"]
    if backend.native_module() is not None and torch.device(device).type == "cpu":
        out.append("native")
    if torch.device(device).type == "cuda" and backend.triton_available():
        out.append("triton")
    return out


def time_case(op, params, batch, provs, reps, warmup, device, d_t=D_T, dtype="float32"):
    import torch

    fns = {p: build(op, params, batch, p, device, d_t=d_t, dtype=dtype) for p in provs}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    res = {}
    for mode in ("fwd", "fwd_bwd"):
        times = {p: [] for p in provs}
        for p in provs:
            for _ in range(warmup):
                fns[p][0 if mode == "fwd" else 1]()
        for r in range(reps):
            order = provs[r % len(provs) :] + provs[: r % len(provs)]
            for p in order:
                f = fns[p][0 if mode == "fwd" else 1]
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                times[p].append(time.perf_counter() - t0)
        for p in provs:
            res[(p, mode)] = median_spread(times[p])
    return res


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child(op, case, batch, provider, device="cpu", d_t=D_T, dtype="float32"):
    """One provider in this fresh process (CPU; on CUDA any process): peak memory above the start of one fwd call
    and one fwd+bwd call (RSS on a CPU, the CUDA allocator's on a GPU)."""
    import torch

    cuda = torch.device(device).type == "cuda"
    params = dict(next(c for c in CASES if c[0] == op and c[1] == case)[2])
    fwd, fwd_bwd, grads = build(op, params, batch, provider, device, d_t=d_t, dtype=dtype)
    out = {}
    for mode, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        f()
        f()  # warm: lazy inits, compilation, the allocator's first touches
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as cr:
                cr.write("5")  # reset VmHWM to the current RSS
            before = _rss("VmRSS:")
        res = f()
        del res
        if cuda:
            torch.cuda.synchronize()
            out[mode] = max(0, torch.cuda.max_memory_allocated() - before)
        else:
            out[mode] = max(0, _rss("VmHWM:") - before)
    out["grads"] = grads
    return out


def memory_case(op, case, batch, provider, threads, device, d_t=D_T, dtype="float32"):
    import torch

    if torch.device(device).type == "cuda":  # the allocator's own peak: no fresh process needed
        return memory_child(op, case, batch, provider, device, d_t, dtype)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": str(threads)}  # fmt: skip
    cmd = [sys.executable, __file__, "--mem-child", op, case, str(batch), provider, str(d_t), dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=["all", "alignment_loss", "gather"], default="all")
    p.add_argument("--batch", choices=["all", *BATCHES], default="all")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the per-provider memory subprocesses")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--providers", nargs="+", default=None, help="time only these (eager, the baseline, always runs)")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "kernels.csv"))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the inputs' dtype, every provider")
    p.add_argument("--mem-child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.mem_child:
        op, case, batch, provider, d_t, dtype = args.mem_child
        print(json.dumps(memory_child(op, case, int(batch), provider, d_t=int(d_t), dtype=dtype)))
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_info(device)
    provs = providers(device)
    if args.providers:
        provs = [pv for pv in provs if pv == "eager" or pv in args.providers]
    print(f"providers: {', '.join(provs)} on {device}, {args.dtype}; {args.threads} threads; {args.reps} rounds")
    for bname, (batch, d_t) in BATCHES.items():
        if args.batch not in ("all", bname):
            continue
        for op, case, params in CASES:
            if args.op not in ("all", op):
                continue
            reps = args.reps if bname == "paper" else max(5, args.reps // 2)  # 16x: ~16x longer calls
            res = time_case(op, params, batch, provs, reps, args.warmup, device, d_t, args.dtype)
            mem = {} if args.no_memory else {pv: memory_case(op, case, batch, pv, args.threads, device, d_t, args.dtype)
                                             for pv in provs}  # fmt: skip
            for mode in ("fwd", "fwd_bwd"):
                e_med = res[("eager", mode)][0]
                e_mem = mem.get("eager", {}).get(mode)
                line = [f"{op}/{case} {bname} (B={batch}, {args.dtype}) {mode}:"]
                for pv in provs:
                    med, spread = res[(pv, mode)]
                    m = mem.get(pv, {})
                    extra = max(0, m[mode] - m["grads"]) if m and mode == "fwd_bwd" else m.get(mode)
                    e_extra = (max(0, e_mem - mem["eager"]["grads"]) if mode == "fwd_bwd" else e_mem) if m else None
                    line.append(
                        f"  {pv:9s} {med * 1e3:8.3f} ms ±{spread * 1e3:6.3f}  x{e_med / med:5.2f} vs eager"
                        + (
                            f"  peak {m[mode] / 2**20:7.2f} MiB  extra {extra / 2**20:6.2f} MiB"
                            f" ({extra / max(1, e_extra):.2f}x eager)"
                            if m
                            else ""
                        )  # fmt: skip
                    )
                    append_csv(args.csv, {
                        **info, "op": op, "case": case, "batch": batch, "mode": mode, "provider": pv,
                        "threads": args.threads, "median_ms": med * 1e3, "spread_ms": spread * 1e3,
                        "speedup_vs_eager": e_med / med, "peak_mib": m[mode] / 2**20 if m else "",
                        "extra_mib": extra / 2**20 if m else "",
                        "extra_vs_eager": extra / max(1, e_extra) if m else "", "dtype": args.dtype, "d_t": d_t,
                    })  # fmt: skip
                print("\n".join(line), flush=True)
    print(f"appended to {args.csv}")


if __name__ == "__main__":
    main()

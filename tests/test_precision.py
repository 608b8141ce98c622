"""Every precision path, on any CPU: custom Functions under bf16 / fp16 autocast, backend dispatch for GPUs
(simulated), and short training runs with the precision forced.

Nothing here depends on the CPU it runs on: each test forces `train.autocast` / `teacher.dtype` (on a CPU
with AMX, `auto` would mean bf16; without it, fp32). CPU autocast runs the same casts as CUDA's for the ops
involved here (linear / matmul in the low dtype, the rest as given), so a Function that is wrong under CUDA
autocast for dtype reasons is wrong here too.
"""

import copy
import importlib.util
import json
import math

import pytest
import torch
from amd_fast.kernels import alignment_loss_reference, fused_alignment_loss
from amd_fast.kernels import backend as kb
from amd_fast.kernels.gather import gather_rows, gather_tokens
from test_kernels import BACKENDS, CONFIGS, _align_inputs, _close
from test_kernels_e2e import _run as _e2e_run
from test_train import TINY, read_metrics

from amd_fast import attention, device
from amd_fast.build import make_frozen_teacher
from amd_fast.data import dali
from amd_fast.models.vit import Mlp, VisionTransformer, mlp_recompute_gelu
from amd_fast.train import main

LOW = [torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------
# Custom Functions under autocast


def _mlp_run(mlp, x0, x_dtype, ac_dtype, recompute):
    m = copy.deepcopy(mlp)
    x = x0.detach().to(x_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=ac_dtype, enabled=ac_dtype is not None):
        if recompute:
            out = mlp_recompute_gelu(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias)
        else:
            out = m.fc2(m.act(m.fc1(x)))
    r = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
    (out.double() * r).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("ac_dtype", LOW)
@pytest.mark.parametrize("x_low", [False, True], ids=["x-fp32", "x-low"])
def test_mlp_recompute_under_autocast_matches_nn_linear(ac_dtype, x_low):
    """The recompute MLP (a custom Function) under autocast: same dtypes as nn.Linear's path (output in the autocast
    dtype, every gradient in its parameter's dtype), errors to fp64 within 3x of the nn.Linear path's own. An input
    already in the low dtype (mixed with fp32 weights) included. Before the fix: dtype error in its backward."""
    torch.manual_seed(0)
    mlp = Mlp(24, 96)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x0 = torch.randn(2, 7, 24)
    x_dtype = ac_dtype if x_low else torch.float32
    ref64 = _mlp_run(mlp.double(), x0.double(), torch.float64, None, recompute=False)
    mlp = mlp.float()
    eager = _mlp_run(mlp, x0, x_dtype, ac_dtype, recompute=False)
    ours = _mlp_run(mlp, x0, x_dtype, ac_dtype, recompute=True)
    names = ["out", "dx", "dw1", "db1", "dw2", "db2"]
    for name, o, e, r in zip(names, ours, eager, ref64):
        assert o.dtype == e.dtype, (name, o.dtype, e.dtype)
        _close(o, e, r, f"mlp {ac_dtype} {name}")
    assert ours[0].dtype == ac_dtype and all(g.dtype == torch.float32 for g in ours[2:])


def _align_run(inputs, cfg, mode, ac_dtype, backend, target_dtype):
    dist, pn, tn, _, _ = cfg
    h, w, b, lw, lb, t = [None if x is None else x.detach().float().requires_grad_(i != 5)
                          for i, x in enumerate(inputs)]  # fmt: skip
    t = t.to(target_dtype)
    args = dict(ln_weight=lw, ln_bias=lb, pred_norm=pn, target_norm=tn, distance=dist)
    with torch.autocast("cpu", dtype=ac_dtype):
        if backend == "torch":  # the math as plain PyTorch ops under autocast: what autocast itself does
            loss, z = alignment_loss_reference(h, w, b, t, **args)
        else:
            out = fused_alignment_loss(h, w, b, t, **args, return_z=mode == "z", chunk_size=16, backend=backend)
            loss, z = out if mode == "z" else (out, None)
        total = loss * 1.7
        if mode == "z":
            total = total + (z.float() * torch.linspace(-1, 1, z.numel()).view_as(z)).sum() * 0.01
    total.backward()
    grads = [x.grad for x in (h, w, b, lw, lb) if x is not None]
    return [loss.detach().float(), *grads, *([z.detach()] if mode == "z" else [])]


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("ac_dtype", LOW)
@pytest.mark.parametrize("mode", ["loss", "z"])
def test_alignment_loss_under_autocast(backend, ac_dtype, mode):
    """The fused loss under autocast, fp32 parameters and inputs, the teacher target in fp32 or in the low dtype
    (mixed): every backend within 3x of plain PyTorch's own autocast error to fp64; gradients in their parameters'
    dtypes; z in the autocast dtype. The native twin computes in fp32 inside (operands cast at its boundary)."""
    for cfg in (CONFIGS[0], CONFIGS[2]):  # AMD's (mse, no norms) and LayerNorm + smooth-l1 + bias
        inputs = _align_inputs(2, 37, 24, 40, cfg[3], cfg[4], strided=True)
        ref64 = _run64(inputs, cfg, mode)
        for target_dtype in (torch.float32, ac_dtype):
            torch_lp = _align_run(inputs, cfg, mode, ac_dtype, "torch", target_dtype)
            out = _align_run(inputs, cfg, mode, ac_dtype, backend, target_dtype)
            names = ["loss", "dh", "dw", "db", "dln_w", "dln_b"]
            names = [n for n, x in zip(names, [1, 1, 1, cfg[4], cfg[3], cfg[3]]) if x] + ["z"] * (mode == "z")
            for name, o, t_lp, r64 in zip(names, out, torch_lp, ref64):
                assert o.dtype == t_lp.dtype, (name, o.dtype, t_lp.dtype)
                _close_autocast(o, t_lp, r64, ac_dtype, f"{backend} {ac_dtype} target {target_dtype} {mode} {name}")


def _close_autocast(out, torch_lp, ref64, ac_dtype, what):
    """As test_kernels._close (within 3x of PyTorch's own error to fp64), with a floor of a quarter ulp of the
    autocast dtype at the result's magnitude: these results are means and sums of many bf16 / fp16-rounded
    products, whose rounding errors partly cancel, so PyTorch's own error on one scalar can be luckily small
    (measured: 2e-5 on a loss of 0.71 in bf16, where one bf16 ulp is 4e-3); a real bug is off by O(1)."""
    out, torch_lp, ref64 = out.double(), torch_lp.double(), ref64.double()
    err = (out - ref64).abs().max().item()
    base = (torch_lp - ref64).abs().max().item()
    floor = torch.finfo(ac_dtype).eps / 4 * max(1.0, ref64.abs().max().item())
    assert err <= 3 * base + floor, f"{what}: err {err:.3e} vs torch {base:.3e} (floor {floor:.1e})"


def _run64(inputs, cfg, mode):
    dist, pn, tn, _, _ = cfg
    h, w, b, lw, lb, t = [None if x is None else x.detach().double().requires_grad_(i != 5)
                          for i, x in enumerate(inputs)]  # fmt: skip
    loss, z = alignment_loss_reference(h, w, b, t, ln_weight=lw, ln_bias=lb, pred_norm=pn, target_norm=tn,
                                       distance=dist)  # fmt: skip
    total = loss * 1.7
    if mode == "z":
        total = total + (z * torch.linspace(-1, 1, z.numel(), dtype=torch.float64).view_as(z)).sum() * 0.01
    total.backward()
    grads = [x.grad for x in (h, w, b, lw, lb) if x is not None]
    return [loss.detach(), *grads, *([z.detach()] if mode == "z" else [])]


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("ac_dtype", LOW)
def test_gathers_under_autocast_with_mixed_dtypes(backend, ac_dtype):
    """What the models do under autocast: an fp32 position table gathered and added to low-precision projected
    tokens (`x + E[ids]`), and fp32 patches gathered with an fp32 table. Output in the wider dtype, as the
    reference's; each gradient in its own input's dtype; values as the reference's."""
    g = torch.Generator().manual_seed(0)
    B, N, V, D = 2, 9, 5, 33
    ids = torch.stack([torch.randperm(N, generator=g)[:V] for _ in range(B)])
    table0, base0 = torch.randn(N, D, generator=g), torch.randn(B, V, D, generator=g)
    x0 = torch.randn(B, N, D, generator=g)

    def run(name):
        table = table0.clone().requires_grad_()
        base = base0.to(ac_dtype).requires_grad_()
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=ac_dtype):
            rows = gather_rows(table, ids, base, backend=name)
            toks = gather_tokens(x, ids, table, backend=name)
        (rows.double().sum() * 1.5 + (toks.double() * 0.5).sum()).backward()
        return rows.detach(), toks.detach(), table.grad, base.grad, x.grad

    ref = run("reference")
    out = run(backend)
    for name, o, r in zip(["rows", "tokens", "dtable", "dbase", "dx"], out, ref):
        assert o.dtype == r.dtype, (name, o.dtype, r.dtype)
        torch.testing.assert_close(o, r, msg=name)
    assert out[0].dtype == torch.float32 and out[3].dtype == ac_dtype


# ---------------------------------------------------------------------------------------------
# Dispatch for the GPU choices. These test the choice, with CUDA and the optional modules simulated
# (monkeypatch): no GPU kernel runs here (scripts/gpu_check.sh runs them where a GPU is at hand).

CUDA = torch.device("cuda")


@pytest.fixture
def fake_modules(monkeypatch):
    """Pretend these optional modules are installed (find_spec answers for them), whatever is."""
    present = set()
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        if name in ("flash_attn", "xformers", "triton", "nvidia.dali"):
            return object() if name in present else None
        return real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return present


def test_attention_auto_picks_flash_then_xformers_then_sdpa_on_cuda(fake_modules):
    fake_modules.update({"flash_attn", "xformers"})
    for dt in (torch.bfloat16, torch.float16):
        assert attention.select_backend("auto", CUDA, dt) == "flash_attn"
    assert attention.select_backend("auto", CUDA, torch.float32) == "xformers"  # flash-attn takes fp16 / bf16 only
    fake_modules.discard("flash_attn")
    assert attention.select_backend("auto", CUDA, torch.bfloat16) == "xformers"
    fake_modules.discard("xformers")
    assert attention.select_backend("auto", CUDA, torch.bfloat16) == "sdpa"
    assert attention.select_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    fake_modules.add("flash_attn")
    assert attention.select_backend("flash_attn", CUDA, torch.bfloat16) == "flash_attn"
    with pytest.raises(RuntimeError, match="fp16/bf16"):
        attention.select_backend("flash_attn", CUDA, torch.float32)


def test_models_resolve_attention_for_the_dtype_they_run_in(monkeypatch):
    """A model holds the request (`auto`); the backend is resolved for the device, dtype and shape class of its
    first call of each kind (a bf16 teacher, an fp32 evaluation), not once at construction as if on a CPU in fp32."""
    seen = []
    real = attention.select_backend

    def spy(requested, dev, dtype, *shape_class):
        seen.append((requested, torch.device(dev).type, dtype))
        return real(requested, dev, dtype, *shape_class)

    monkeypatch.setattr(attention, "select_backend", spy)
    monkeypatch.setattr(attention, "_DISPATCH", {})
    vit = VisionTransformer(img_size=8, num_frames=1, patch_size=4, tubelet_size=1, embed_dim=16, depth=2,
                            num_heads=2, attn_backend="auto")  # fmt: skip
    assert vit.attn_backend == "auto" and not seen
    x = torch.randn(2, 3, 1, 8, 8)
    vit(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vit(x)
    vit(x)
    assert seen == [("auto", "cpu", torch.float32), ("auto", "cpu", torch.bfloat16)]  # once per dtype, all blocks
    with pytest.raises(ValueError, match="'fastest'"):
        VisionTransformer(img_size=8, num_frames=1, patch_size=4, tubelet_size=1, embed_dim=16, depth=1,
                          num_heads=2, attn_backend="fastest")  # fmt: skip


def test_kernels_pick_triton_on_cuda_and_a_twin_for_the_dtype_on_cpu(fake_modules, monkeypatch):
    monkeypatch.setattr(kb, "_selected", "auto")
    fake_modules.add("triton")
    for op in ("alignment_loss", "gather"):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            assert kb.resolve(op, CUDA, dt) == "triton"
    fake_modules.discard("triton")
    assert kb.resolve("alignment_loss", CUDA, torch.bfloat16) == "chunked"
    if kb.native_module() is not None:
        assert kb.resolve("alignment_loss", torch.device("cpu"), torch.float32) == "native"
        assert kb.resolve("gather", torch.device("cpu"), torch.bfloat16) == "native"
        # auto: bf16 operands run the chunked twin's bf16 GEMMs; forced native takes them (fp32 inside)
        assert kb.resolve("alignment_loss", torch.device("cpu"), torch.bfloat16) == "chunked"
        monkeypatch.setattr(kb, "_selected", "native")
        assert kb.resolve("alignment_loss", torch.device("cpu"), torch.bfloat16) == "native"
        assert kb.resolve("alignment_loss", CUDA, torch.bfloat16) == "chunked"  # native is CPU only


def test_dali_loader_is_auto_for_video_lists_on_cuda(monkeypatch):
    monkeypatch.setattr(dali, "available", lambda name: name == "dali")
    assert dali.resolve_loader("auto", "video_list", CUDA) == "gpu"
    assert dali.resolve_loader("auto", "video_list", torch.device("cpu")) is None
    assert dali.resolve_loader("auto", "moving_fashion_mnist", CUDA) is None
    assert dali.resolve_loader("torch", "video_list", CUDA) is None
    monkeypatch.setattr(dali, "available", lambda name: False)
    assert dali.resolve_loader("auto", "video_list", CUDA) is None


def test_precision_choices_on_cuda_and_by_measurement_on_cpu(monkeypatch):
    """teacher.dtype=auto and train.autocast=auto: bf16 on CUDA (fp16 where bf16 is missing); on a CPU, bf16
    where the measured block trial runs faster in bf16 (by BF16_MARGIN), fp32 / off where it does not; fused
    AdamW on CPU and CUDA. The timings are faked (AMD_FAST_FAKE_TIMINGS), both ways; the flags play no part."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.fast_dtype(CUDA) == torch.bfloat16 and device.autocast_dtype("auto", CUDA) == torch.bfloat16
    enc = VisionTransformer(img_size=8, num_frames=1, patch_size=4, tubelet_size=1, embed_dim=16, depth=2,
                            num_heads=2)  # fmt: skip
    teacher = make_frozen_teacher(copy.deepcopy(enc), [1, 2], "auto", CUDA)  # weights stay on the CPU: dtype only
    assert teacher.dtype == torch.bfloat16 and next(teacher.encoder.parameters()).dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device.autocast_dtype("auto", CUDA) == torch.float16
    with pytest.raises(ValueError, match="int8"):
        make_frozen_teacher(copy.deepcopy(enc), [1, 2], "int8", CUDA)
    cpu = torch.device("cpu")
    fake = {"attention": {"sdpa": 1.0, "math": 2.0}}
    monkeypatch.setenv("AMD_FAST_FAKE_TIMINGS", json.dumps({**fake, "precision": {"float32": 0.9, "bfloat16": 0.2}}))
    assert device.autocast_dtype("auto", cpu) == torch.bfloat16
    assert make_frozen_teacher(copy.deepcopy(enc), [1, 2], "auto", cpu).dtype == torch.bfloat16
    # slower, or faster by less than the margin: fp32
    for bf16 in (1.8, 0.85):
        timings = {**fake, "precision": {"float32": 0.9, "bfloat16": bf16}}
        monkeypatch.setenv("AMD_FAST_FAKE_TIMINGS", json.dumps(timings))
        assert device.autocast_dtype("auto", cpu) is None
        assert make_frozen_teacher(copy.deepcopy(enc), [1, 2], "auto", cpu).dtype == torch.float32
    assert device.autocast_dtype("off", CUDA) is None and device.autocast_dtype("float16", cpu) == torch.float16
    assert device.use_fused_adamw(True, CUDA) and device.use_fused_adamw(True, cpu)
    assert not device.use_fused_adamw(True, torch.device("mps")) and not device.use_fused_adamw(False, CUDA)


# ---------------------------------------------------------------------------------------------
# Training runs with the precision forced

# How far a low-precision run's logged losses may drift from the fp32 run's, relative. bf16 keeps 8 bits of
# mantissa (unit roundoff 2^-9 = 0.2%), fp16 11 (0.05%); the losses are means over thousands of elements whose
# rounding errors mostly cancel. Measured on the 2-core EPYC (no AMX): over the default job's 30 + 30 steps the
# largest bf16 deviation was 0.13% (fp16 0.02%); on 4-step video runs 0.1%. 1.5% (4 bf16 ulps) / 0.5% leave
# ~10x room for summation order on other CPUs and BLAS builds, while a precision bug (a part that stops
# learning, a loss rounded to bf16, an fp16 overflow) moves the dir / gen losses by far more within 30 steps
# (they halve over the run) or makes them non-finite.
TRACK = {"bfloat16": 1.5e-2, "float16": 5e-3}


def _assert_tracks(low, ref, rel, what):
    assert len(low) == len(ref) and low
    for i, (a, b) in enumerate(zip(low, ref)):
        for k in ("loss", "rec", "dir", "gen", "dist"):
            if k in b:
                assert math.isfinite(a[k]), (what, i, k)
                assert a[k] == pytest.approx(b[k], rel=rel), (what, i, k, a[k], b[k])


def test_bf16_default_job_tracks_fp32(tmp_path):
    """The default job's path (a mae teacher pre-trained, then AMD; Fashion-MNIST) with train.autocast=bfloat16
    against the same job in fp32: both learn, and every logged loss of the bf16 run is within TRACK of fp32's."""
    runs = {}
    for autocast in ("off", "bfloat16"):
        out = tmp_path / autocast
        args = [*TINY, f"train.output_dir={out}", "teacher.pretrain_steps=30", "train.steps=30",
                "train.save_interval=30", f"train.autocast={autocast}"]  # fmt: skip
        assert main(["--config", "configs/tiny_image_amd.yaml", *args]) == 0
        runs[autocast] = read_metrics(out / "teacher" / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    for which, (low, ref) in zip(("teacher", "student"), zip(runs["bfloat16"], runs["off"])):
        _assert_tracks(low, ref, TRACK["bfloat16"], which)
    student = runs["bfloat16"][1]
    for part in ("dir", "gen"):
        assert student[-1][part] < 0.7 * student[0][part]
    diff = max(abs(a[k] - b[k]) / abs(b[k]) for low, ref in zip(runs["bfloat16"], runs["off"])
               for a, b in zip(low, ref) for k in ("rec", "dir", "gen") if k in b)  # fmt: skip
    print(f"\nbf16 vs fp32, default job path: max relative loss difference {diff:.2e}; final student loss "
          f"{runs['bfloat16'][1][-1]['loss']:.4f} vs {runs['off'][1][-1]['loss']:.4f}")  # fmt: skip


@pytest.mark.parametrize("autocast", ["bfloat16", "float16"])
@pytest.mark.parametrize("objective", ["amd", "dmae", "mae"])
def test_short_video_runs_track_fp32(tmp_path, objective, autocast):
    """The three objectives on 16-frame video (tubelet 2) for 4 steps: the low-precision run's losses within
    TRACK of the fp32 run's, step by step (same weights, batches and masks)."""
    ref = _e2e_run(tmp_path / "fp32", "auto", objective, "off")
    low = _e2e_run(tmp_path / autocast, "auto", objective, autocast)
    _assert_tracks(low, ref, TRACK[autocast], f"{objective} {autocast}")


@pytest.mark.parametrize("autocast", ["off", "bfloat16"])
@pytest.mark.parametrize("teacher_dtype", ["bfloat16", "int8"])
def test_teacher_dtypes_give_the_fp32_teachers_targets(tmp_path, teacher_dtype, autocast):
    """teacher.dtype=bfloat16 / int8 against float32, the student in fp32 or bf16: the first step's alignment
    losses (same student weights and batch: only the targets differ) within 2% (bf16 teacher: 2^-9 rounding of
    its weights and activations through 2 blocks) / 10% (int8: per-tensor int8 weights and activations, a
    documented change of the math); the runs train (finite losses, 3 steps)."""
    ref = _e2e_run(tmp_path / "fp32", "auto", "amd", autocast, "float32", steps=3)
    low = _e2e_run(tmp_path / teacher_dtype, "auto", "amd", autocast, teacher_dtype, steps=3)
    tol = {"bfloat16": 2e-2, "int8": 1e-1}[teacher_dtype]
    assert all(math.isfinite(v) for r in low for v in r.values())
    for k in ("dir", "gen"):
        assert low[0][k] == pytest.approx(ref[0][k], rel=tol), (k, low[0][k], ref[0][k])

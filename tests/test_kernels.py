"""Every implementation of amd_fast.kernels against its pure-PyTorch reference, forward and every gradient.

Backends: `chunked` (PyTorch twin), `native` (C++ twin; skipped when the extension is not built), `triton`
(under TRITON_INTERPRET=1 on CPU tensors; natively on a GPU with AMD_FAST_TEST_DEVICE=cuda, as
scripts/gpu_check.sh runs it; skipped without triton). Tolerances follow flash-attention: a
result at precision p is judged by its distance to the fp64 reference, against PyTorch's own distance at p
(`err <= 3 * err_torch + a few ulps`). The Triton kernels here use no `tl.dot` (the GEMMs are torch's), so
bf16 runs through the interpreter with bf16 operands as such; the interpreter is slow, so its grid is small.
The interpreter skips what a GPU does around a launch: the `as_on_a_gpu` tests put Triton's autotuner back (over
the GPU configs, each launched several times on the live buffers) and fill torch.empty with NaN.
"""

import os
import subprocess
import sys

import pytest
import torch
from amd_fast.kernels import alignment_loss_reference, fused_alignment_loss
from amd_fast.kernels import backend as kb
from amd_fast.kernels.gather import gather_reference, gather_rows, gather_tokens

# AMD_FAST_TEST_DEVICE=cuda: the backend tests' tensors live on the GPU and Triton runs natively, over the full grid
DEVICE = torch.device(os.environ.get("AMD_FAST_TEST_DEVICE", "cpu"))
INTERPRETED = DEVICE.type == "cpu"
if INTERPRETED:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a Triton kernel is first launched (LazyKernel)

BACKENDS = [
    "chunked",
    pytest.param("native", marks=pytest.mark.skipif(kb.native_module() is None, reason="native extension not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not kb.triton_available(), reason="triton not installed")),
]


def _close(out, ref_lp, ref64, what, factor=3.0):
    """|out - ref64| <= factor * |ref_lp - ref64| + 2 ulps of the output's magnitude."""
    assert out.shape == ref64.shape, what
    floor = 2 * torch.finfo(torch.float32 if ref_lp.dtype == torch.float64 else ref_lp.dtype).eps
    out, ref_lp, ref64 = out.double(), ref_lp.double(), ref64.double()
    err = (out - ref64).abs().max().item() if out.numel() else 0.0
    base = (ref_lp - ref64).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item()) if out.numel() else 1.0
    msg = f"{what}: err {err:.3e} vs torch {base:.3e} (floor {floor * scale:.1e})"
    assert err <= factor * base + floor * scale, msg


# ---------------------------------------------------------------------------------------------
# Fused alignment loss

# (distance, pred_norm, target_norm, student LN, bias): AMD, DMAE, and the other options
CONFIGS = [
    ("mse", "none", "none", False, False),
    ("l1", "l2", "l2", False, True),
    ("smooth_l1", "none", "layernorm", True, True),
    ("mse", "l2", "layernorm", True, False),
]
SHAPES = [(1, 1, 5, 7), (2, 37, 24, 40), (3, 16, 33, 65)]  # (B, V, Ds, Dt): 1 token, odd, chunk 16 divides
CHUNK = 16


def _align_inputs(B, V, Ds, Dt, ln, bias, strided):
    g = torch.Generator().manual_seed(B * 1000 + V * 10 + Dt)
    h = torch.randn(B, V, Ds, generator=g, dtype=torch.float64)
    w = torch.randn(Dt, Ds, generator=g, dtype=torch.float64) / Ds**0.5
    b = torch.randn(Dt, generator=g, dtype=torch.float64) * 0.1 if bias else None
    lw = 1 + 0.1 * torch.randn(Ds, generator=g, dtype=torch.float64) if ln else None
    lb = 0.1 * torch.randn(Ds, generator=g, dtype=torch.float64) if ln else None
    t = torch.randn(B, V + 3 * strided, Dt, generator=g, dtype=torch.float64) * 1.5
    t = t[:, :V] if strided else t  # AMD aligns t[:, :V_s]: a row-strided view
    return h, w, b, lw, lb, t


def _run_align(fn, inputs, dtype, cfg, mode, **kw):
    dist, pn, tn, _, _ = cfg
    h, w, b, lw, lb, t = [None if x is None else x.detach().to(DEVICE, dtype).requires_grad_(i != 5)
                          for i, x in enumerate(inputs)]  # fmt: skip
    args = dict(ln_weight=lw, ln_bias=lb, pred_norm=pn, target_norm=tn, distance=dist)
    if fn is alignment_loss_reference:
        loss, z = fn(h, w, b, t, **args)
    else:
        out = fn(h, w, b, t, **args, return_z=mode == "z", recompute=mode == "recompute", **kw)
        loss, z = out if mode == "z" else (out, None)
    total = loss * 1.7  # a grad_output other than 1
    if mode == "z":  # a downstream reader of z (AMD's generator)
        r = torch.linspace(-1, 1, z.numel(), dtype=torch.float64).view_as(z).to(z.device, z.dtype)
        total = total + (z * r).sum() * 0.01
    total.backward()
    grads = [x.grad for x in (h, w, b, lw, lb) if x is not None]
    return [loss.detach(), *(grads if mode != "z" else [*grads, z.detach()])]


@pytest.mark.parametrize("backend", [*BACKENDS, pytest.param("compiled", marks=pytest.mark.slow)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(x) for x in c))
@pytest.mark.parametrize("mode", ["loss", "recompute", "z"])
def test_alignment_loss_matches_reference(backend, cfg, mode):
    slow = backend == "compiled" or (backend == "triton" and INTERPRETED)
    _check_alignment(backend, cfg, mode, SHAPES[:2] if slow else SHAPES)  # slow ones: fewer shapes


def _check_alignment(backend, cfg, mode, shapes):
    dtypes = {"chunked": [torch.float64, torch.float32, torch.bfloat16], "native": [torch.float64, torch.float32],
              "triton": [torch.float32, torch.bfloat16], "compiled": [torch.float32]}[backend]  # fmt: skip
    for shape in shapes:
        inputs = _align_inputs(*shape, cfg[3], cfg[4], strided=shape[1] > 1)
        ref64 = _run_align(alignment_loss_reference, inputs, torch.float64, cfg, mode)
        for dtype in dtypes:
            ref_lp = _run_align(alignment_loss_reference, inputs, dtype, cfg, mode)
            out = _run_align(fused_alignment_loss, inputs, dtype, cfg, mode, chunk_size=CHUNK, backend=backend)
            names = ["loss", "dh", "dw", "db", "dln_w", "dln_b"]
            names = [n for n, x in zip(names, [1, 1, 1, cfg[4], cfg[3], cfg[3]]) if x] + ["z"] * (mode == "z")
            for name, o, r_lp, r64 in zip(names, out, ref_lp, ref64):
                assert o.dtype == r_lp.dtype, (name, o.dtype, r_lp.dtype)
                _close(o, r_lp, r64, f"{backend} {dtype} {shape} {mode} {name}")


@pytest.mark.parametrize("cfg, mode", [(CONFIGS[0], "loss"), (CONFIGS[1], "z")])
def test_alignment_loss_compiled_twin(cfg, mode):
    """The `compiled` twin (row part through torch.compile) on two cases; its full grid is marked slow."""
    inputs = _align_inputs(2, 37, 24, 40, cfg[3], cfg[4], strided=True)
    ref64 = _run_align(alignment_loss_reference, inputs, torch.float64, cfg, mode)
    ref32 = _run_align(alignment_loss_reference, inputs, torch.float32, cfg, mode)
    out = _run_align(fused_alignment_loss, inputs, torch.float32, cfg, mode, chunk_size=CHUNK, backend="compiled")
    for i, (o, r32, r64) in enumerate(zip(out, ref32, ref64)):
        _close(o, r32, r64, f"compiled {mode} output {i}")


@pytest.mark.skipif(kb.native_module() is None, reason="native extension not built")
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(x) for x in c))
@pytest.mark.parametrize("mode", ["loss", "z"])
def test_native_threaded_gemms_match_reference(monkeypatch, threads, cfg, mode):
    """The native twin with each GEMM's rows split between threads running their own GEMMs (the loss-only pass:
    per chunk, a barrier before each thread's share of the weight gradient; the with-z path: mm_rows) against
    the reference, as the one-thread path is. Forced: at these sizes `auto` leaves the threading to the BLAS."""
    import amd_fast.kernels.alignment_loss as al

    monkeypatch.setattr(al, "NATIVE_THREADS", threads)
    for shape in SHAPES:
        inputs = _align_inputs(*shape, cfg[3], cfg[4], strided=shape[1] > 1)
        ref64 = _run_align(alignment_loss_reference, inputs, torch.float64, cfg, mode)
        for dtype in (torch.float64, torch.float32):
            ref_lp = _run_align(alignment_loss_reference, inputs, dtype, cfg, mode)
            out = _run_align(fused_alignment_loss, inputs, dtype, cfg, mode, chunk_size=CHUNK, backend="native")
            for i, (o, r_lp, r64) in enumerate(zip(out, ref_lp, ref64)):
                _close(o, r_lp, r64, f"native x{threads} {mode} {dtype} {shape} output {i}")


@pytest.mark.skipif(kb.native_module() is None, reason="native extension not built")
def test_native_threaded_gemms_fall_back_when_openmp_gives_fewer_threads():
    """OMP_THREAD_LIMIT=1: the 2-thread team comes up with one thread; the pass must notice and run on one."""
    code = (
        "import torch, amd_fast.kernels.alignment_loss as al\n"
        "from amd_fast.kernels import alignment_loss_reference as ref, fused_alignment_loss as f\n"
        "al.NATIVE_THREADS = 2\n"
        "g = torch.Generator().manual_seed(0)\n"
        "h = torch.randn(2, 37, 24, generator=g, requires_grad=True); w = torch.randn(40, 24, generator=g)\n"
        "t = torch.randn(2, 37, 40, generator=g)\n"
        "for z in (False, True):\n"
        "    out = f(h, w, None, t, return_z=z, chunk_size=16, backend='native')\n"
        "    loss = out[0] if z else out\n"
        "    gh, = torch.autograd.grad(loss, h)\n"
        "    r = ref(h, w, None, t)[0]\n"
        "    rh, = torch.autograd.grad(r, h)\n"
        "    torch.testing.assert_close(loss, r); torch.testing.assert_close(gh, rh)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.skipif(kb.native_module() is None, reason="native extension not built")
def test_native_with_z_takes_any_grad_z_layout():
    """The generator's gradient may arrive expanded (z.sum()) or zero outside a slice; 600 rows: auto threads."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 300, 24, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    t = torch.randn(2, 310, 40, generator=g)[:, :300]
    for reader in (lambda z: z.sum(), lambda z: z.sum(1).pow(2).sum(), lambda z: z[:, :5].sum()):
        loss, z = fused_alignment_loss(h, w, None, t, return_z=True, backend="native")
        got = torch.autograd.grad(loss + reader(z), (h, w))
        loss_r, z_r = alignment_loss_reference(h, w, None, t)
        want = torch.autograd.grad(loss_r + reader(z_r), (h, w))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(kb.native_module() is None, reason="native extension not built")
def test_native_mm_rows():
    m = kb.native_module()
    g = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(37, 9, generator=g), torch.randn(9, 5, generator=g), torch.randn(5, generator=g)
    for threads in (0, 1, 2, 3, 40):  # 40 > rows of the transposed case: capped, no empty slices written
        torch.testing.assert_close(m.mm_rows(a, b, bias, threads), torch.addmm(bias, a, b))
        torch.testing.assert_close(m.mm_rows(a.t(), a, None, threads), a.t() @ a)  # a transposed view
    with pytest.raises(RuntimeError, match="share one dtype"):
        m.mm_rows(a, b.double())


def test_alignment_loss_under_autocast_picks_a_twin_for_the_cast_dtype():
    """bf16 autocast: the op sees bf16 operands, which the native twin does not take; auto must resolve for them."""
    h, w, b, _, _, t = _align_inputs(2, 9, 8, 12, False, True, False)
    h, w, t = h.float().requires_grad_(), w.float().requires_grad_(), t.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_alignment_loss(h, w, b.float(), t)
        ref = alignment_loss_reference(h, w, b.float(), t)[0]
    loss.backward()
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-3)
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_alignment_loss_without_grad_and_weights_grad_only():
    h, w, b, _, _, t = _align_inputs(2, 9, 8, 12, False, True, False)
    with torch.no_grad():
        loss = fused_alignment_loss(h, w, b, t, backend="chunked", chunk_size=4)
    torch.testing.assert_close(loss, alignment_loss_reference(h, w, b, t)[0])
    w = w.clone().requires_grad_()
    fused_alignment_loss(h, w, None, t, backend="chunked", chunk_size=4).backward()  # h needs no grad
    w_ref = w.detach().clone().requires_grad_()
    alignment_loss_reference(h, w_ref, None, t)[0].backward()
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_alignment_loss_second_backward_is_refused_unless_recompute():
    h, w, _, _, _, t = _align_inputs(1, 5, 4, 6, False, False, False)
    h.requires_grad_()
    loss = fused_alignment_loss(h, w, None, t, backend="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute=True"):
        loss.backward()
    h.grad = None
    loss = fused_alignment_loss(h, w, None, t, backend="chunked", recompute=True)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first)


def test_alignment_loss_compiles_without_graph_break():
    h, w, b, _, _, t = _align_inputs(2, 7, 8, 12, False, True, False)
    h.requires_grad_()
    fn = torch.compile(lambda h, w, b, t: fused_alignment_loss(h, w, b, t, backend="chunked", chunk_size=4),
                       fullgraph=True, backend="aot_eager")  # fmt: skip
    loss = fn(h, w, b, t)
    loss.backward()
    ref = h.detach().clone().requires_grad_()
    ref_loss = alignment_loss_reference(ref, w, b, t)[0]
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(h.grad, ref.grad)


# ---------------------------------------------------------------------------------------------
# Gather / scatter

GATHER_SHAPES = [(1, 1, 1, 1), (2, 9, 5, 33), (3, 40, 37, 130)]  # (B, N, V, D)


def _ids(B, N, V, dtype, dup, g):
    ids = torch.stack([torch.randperm(N, generator=g)[:V] for _ in range(B)])
    if dup and V > 1:
        ids[:, -1] = ids[:, 0]  # repeated index: the backward must add, not overwrite
    return ids.to(dtype)


def _run_gather(kind, inputs, dtype, backend):
    x, pos, base, ids = inputs
    x = x.detach().to(DEVICE, dtype).requires_grad_()
    pos = None if pos is None else pos.detach().to(DEVICE, dtype).requires_grad_()
    base = None if base is None else base.detach().to(DEVICE, dtype).requires_grad_()
    ids = ids.to(DEVICE)
    if kind == "tokens":
        out = gather_tokens(x, ids, pos, backend=backend)
    else:
        out = gather_rows(x[0], ids, base, backend=backend)
    r = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out).to(out.device, dtype)
    (out * r).sum().backward()
    return [out.detach()] + [v.grad for v in (x, pos, base) if v is not None]


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("kind", ["tokens", "tokens+pos", "rows", "rows+base"])
def test_gather_matches_reference(backend, kind):
    _check_gather(backend, kind, GATHER_SHAPES[:2] if backend == "triton" and INTERPRETED else GATHER_SHAPES)


def _check_gather(backend, kind, shapes):
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + [torch.float64] * (backend != "triton")
    for B, N, V, D in shapes:
        for idx_dtype, dup in ((torch.int64, False), (torch.int32, True)):
            ids = _ids(B, N, V, idx_dtype, dup, g)
            x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
            pos = torch.randn(N, D, generator=g, dtype=torch.float64) if kind == "tokens+pos" else None
            base = torch.randn(B, V, D, generator=g, dtype=torch.float64) if kind == "rows+base" else None
            inputs = (x, pos, base, ids)
            k = kind.split("+")[0]
            ref64 = _run_gather(k, inputs, torch.float64, "reference")
            for dtype in dtypes:
                ref_lp = _run_gather(k, inputs, dtype, "reference")
                out = _run_gather(k, inputs, dtype, backend)
                for name, o, r_lp, r64 in zip(["out", "dx", "dpos/dbase"], out, ref_lp, ref64):
                    assert o.dtype == dtype, name
                    _close(o, r_lp, r64, f"{backend} {kind} {dtype} {(B, N, V, D)} {idx_dtype} {name}")


# ---------------------------------------------------------------------------------------------
# What a GPU does that the interpreter does not: autotuning on live buffers, uninitialized memory


# the stand-in runs Triton under the interpreter; on a GPU (AMD_FAST_TEST_DEVICE=cuda) the real tuner runs every test
STANDIN = pytest.mark.skipif(not (INTERPRETED and kb.triton_available()), reason="needs Triton's interpreter")


@pytest.fixture
def as_on_a_gpu():
    """Triton's autotuner over the GPU configs under the interpreter (each config launched 3 times on the live
    arguments before the real launch, as on a GPU), and torch.empty filled with NaN (a CUDA allocation is not
    zeroed; a CPU one often happens to be)."""
    from amd_fast.kernels.triton_utils import standin_tuner

    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with standin_tuner(launches=3):
            yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@STANDIN
@pytest.mark.parametrize("kind", ["tokens+pos", "rows+base"])
def test_triton_gather_right_under_autotuning(as_on_a_gpu, kind):
    """The scatter-add (backward) accumulates with atomics into a zeroed buffer: without reset_to_zero the first
    call per tuning key returns the sum of every benchmark launch."""
    _check_gather("triton", kind, GATHER_SHAPES[:2])


@STANDIN
@pytest.mark.parametrize("cfg, mode", [(CONFIGS[0], "loss"), (CONFIGS[3], "loss"), (CONFIGS[1], "z")],
                         ids=["mse-loss", "l2-ln-loss", "l1-z"])  # fmt: skip
def test_triton_alignment_loss_right_under_autotuning(as_on_a_gpu, cfg, mode):
    """The row pass writes the gradient over z (loss only) or adds it into the generator's (with z): without
    restore_value each benchmark launch reads the previous one's output."""
    _check_alignment("triton", cfg, mode, SHAPES[:2])


@STANDIN
def test_standin_tuner_tunes_and_launches_each_config():
    """The stand-in is not a no-op: inside it the kernels are Triton Autotuners that benchmark several configs."""
    from amd_fast.kernels import gather as kg
    from amd_fast.kernels.triton_utils import standin_tuner

    calls = []
    with standin_tuner(launches=2):
        x, ids = torch.randn(2, 9, 40), torch.tensor([[0, 3, 8], [2, 2, 1]])
        gather_tokens(x, ids, backend="triton")
        tuner, _ = kg._gather_jit._built["standin"]
        calls = list(tuner.configs_timings)
    assert type(tuner).__name__ == "Autotuner" and len(calls) >= 2, calls
    assert "standin" not in kg._gather_jit._built  # dropped on exit: no stale benchmark function


def test_gpu_launch_rules():
    """What the GPU tuner may choose from: gather tiles of 2K or 8K elements (64-row tiles for narrow rows), at most
    4 configs; row-pass warps with >= 4 elements a thread; rows bucketed to powers of two for the tuning key."""
    pytest.importorskip("triton")
    from amd_fast.kernels import alignment_loss as ka
    from amd_fast.kernels import gather as kg
    from amd_fast.kernels.triton_utils import next_pow2

    for D in (1, 5, 33, 130, 384, 768, 1024, 1536):
        block_d = min(next_pow2(D), 1024)
        tiles = kg._prune_tiles(kg._tile_gpu_configs(), block_d)
        assert 1 <= len(tiles) <= 4, (D, tiles)
        assert all(c.kwargs["BLOCK_R"] * block_d in (2048, 8192) or c.kwargs["BLOCK_R"] == 64 for c in tiles)
        warps = ka._prune_warps(ka._rows_gpu_configs(), next_pow2(D))
        assert warps and all(c.num_warps * 128 <= next_pow2(D) for c in warps) or len(warps) == 1
    assert [next_pow2(n) for n in (1, 2, 3, 157, 10048)] == [1, 2, 4, 256, 16384]


def test_gather_broadcast_base_and_bad_index():
    table = torch.randn(10, 6)
    ids = torch.tensor([[1, 3], [9, 0]])
    token = torch.randn(1, 1, 6)
    torch.testing.assert_close(gather_rows(table, ids, token, backend="chunked"), token + table[ids])
    if kb.native_module() is not None:
        with pytest.raises(RuntimeError, match="out of range"):
            gather_tokens(torch.randn(2, 4, 3), torch.tensor([[0, 4], [1, 2]]), backend="native")


def test_gather_compiles_without_graph_break():
    x = torch.randn(2, 9, 5, requires_grad=True)
    ids = torch.tensor([[0, 3, 8], [2, 2, 1]])
    pos = torch.randn(9, 5)
    out = torch.compile(lambda x: gather_tokens(x, ids, pos, backend="chunked"), fullgraph=True,
                        backend="aot_eager")(x)  # fmt: skip
    out.sum().backward()
    torch.testing.assert_close(out, gather_reference(x.detach().view(18, 5), ids, 9, pos))
    torch.testing.assert_close(x.grad.sum(), torch.tensor(3 * 2 * 5.0))


def test_backend_selection_is_forceable_and_checked():
    assert kb.selected() in kb.BACKENDS
    with pytest.raises(ValueError, match="allowed"):
        kb.select("cuda_magic")
    old = kb.selected()
    try:
        kb.select("reference")
        assert kb.resolve("gather", torch.device("cpu"), torch.float32) == "reference"
    finally:
        kb.select(old)
    expected = "native" if kb.native_module() is not None else "chunked"
    assert kb.resolve("alignment_loss", torch.device("cpu"), torch.float32) in (expected, kb.selected())


@pytest.mark.slow
def test_cmake_builds_the_same_native_module(tmp_path):
    """CMakeLists.txt builds the module setup.py builds (about 2 minutes of compiling)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake or a C++ compiler is missing")
    root = Path(__file__).resolve().parents[1]
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(root), "-B", str(tmp_path), f"-DCMAKE_PREFIX_PATH={prefix}",
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True, capture_output=True)  # fmt: skip
    subprocess.run(["cmake", "--build", str(tmp_path), "-j2"], check=True, capture_output=True)
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import _native; "
            "x = torch.arange(12.).view(6, 2); ids = torch.tensor([[2, 0], [1, 1]]); "
            "print(_native.gather_rows(x, ids, 3, None, None).flatten().tolist())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == str([4.0, 5.0, 0.0, 1.0, 8.0, 9.0, 8.0, 9.0])

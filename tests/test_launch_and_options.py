"""Launch settings (allocator re-exec) and the options that change the math (int8 teacher, decoder masking)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amd_fast.build import make_frozen_teacher
from amd_fast.launch import ALLOCATORS
from amd_fast.models.vit import VisionTransformer, patchify
from benchmarks.mask_sweep import fit

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_allocator_reexec_loads_the_library(tmp_path, name):
    if not Path(ALLOCATORS[name]).exists():
        pytest.skip(f"{ALLOCATORS[name]} not installed")
    script = tmp_path / "probe.py"
    lib = Path(ALLOCATORS[name]).name
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from amd_fast.launch import ensure_allocator\n"
        f"ensure_allocator({name!r})\n"
        f"print(open('/proc/self/maps').read().count({lib!r}) > 0)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stderr


def test_int8_teacher_targets_are_close_but_not_equal():
    torch.manual_seed(0)
    kw = dict(img_size=32, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=128, depth=2, num_heads=2)
    exact_enc, low_enc = VisionTransformer(**kw), VisionTransformer(**kw)
    low_enc.load_state_dict(exact_enc.state_dict())
    cpu = torch.device("cpu")
    exact = make_frozen_teacher(exact_enc, [1, 2], "float32", cpu)
    low = make_frozen_teacher(low_enc, [1, 2], "int8", cpu)
    patches = patchify(torch.randn(2, 3, 4, 32, 32), 8, 2)
    ids = torch.stack([torch.randperm(32)[:12].sort().values for _ in range(2)])
    ref, q = exact.features(patches, ids), low.features(patches, ids)
    for k in (1, 2):
        rel = float((q[k] - ref[k]).norm() / ref[k].norm())
        assert 0 < rel < 0.05, rel  # int8 changes the math a little, never silently nothing or garbage
    assert (
        "Linear" in type(low.encoder.blocks[0].mlp.fc1).__name__
        and type(low.encoder.blocks[0].mlp.fc1) is not torch.nn.Linear
    )


def test_sweep_fit_recovers_a_linear_law():
    rows = [{"vis_s": s, "vis_t": t, "s_per_step": 0.5 + 0.002 * s + 0.001 * t} for s, t in
            [(100, 200), (160, 392), (80, 800), (200, 400), (50, 100)]]  # fmt: skip
    (a, b, c), r2 = fit(rows)
    assert abs(a - 0.5) < 1e-9 and abs(b - 0.002) < 1e-12 and abs(c - 0.001) < 1e-12
    assert r2 == pytest.approx(1.0)

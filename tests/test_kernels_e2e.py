"""End to end: a short AMD / DMAE run with the kernels dispatched gives the losses of the same run with them off.

Same seed, same synthetic batches, `objective.kernels=auto` (on this CPU: the native twins when built, else
the chunked ones) against `reference` (plain PyTorch). The gathers are copies, so they are bit-identical;
the fused loss sums in another order (chunks, fp32 row sums), so the losses agree to fp32 rounding, which
the optimizer then carries forward a few steps.
"""

from pathlib import Path

import pytest
import torch
from amd_fast.kernels import backend as kb

from amd_fast.build import make_frozen_teacher
from amd_fast.config import load_config
from amd_fast.masks import collate_masks
from amd_fast.models.vit import build_encoder
from amd_fast.pretraining import pretrain_task
from amd_fast.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "decoder.embed_dim=32", "decoder.depth=1",
    "decoder.num_heads=2", "teacher.model.embed_dim=48", "teacher.model.depth=2", "teacher.model.num_heads=2",
    "objective.student_layers=[1,2]", "objective.teacher_layers=[1,2]", "data.batch_size=4",
    "train.warmup_steps=1", "train.tensorboard=false", "train.progress=false", "train.threads=2",
    "train.eval_probe=false",
]  # fmt: skip


def _run(tmp_path, kernels: str, objective: str, autocast: str = "off", teacher_dtype: str = "float32",
         steps: int = 4, more: tuple = ()) -> list[dict]:  # fmt: skip
    extra = ["objective.name=dmae", "objective.dmae_distance=l2"] if objective == "dmae" else []
    extra += ["objective.name=mae"] if objective == "mae" else []
    extra += [f"objective.kernels={kernels}", f"train.output_dir={tmp_path / kernels}", f"train.autocast={autocast}",
              f"train.steps={steps}", *more]  # fmt: skip
    cfg = load_config(ROOT / "configs/tiny_video_amd.yaml", SMALL + extra)
    torch.manual_seed(0)
    d = cfg.data
    enc = build_encoder(cfg.teacher.model, img_size=d.input_size, num_frames=d.num_frames)
    teacher = make_frozen_teacher(enc, cfg.objective.teacher_layers, teacher_dtype, torch.device("cpu"))
    trainer = Trainer(cfg, pretrain_task, torch.device("cpu"), teacher=teacher, with_data=False)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(cfg.train.steps):
        b = collate_masks([trainer.masks(g) for _ in range(d.batch_size)])
        b["video"] = torch.randn(d.batch_size, 3, d.num_frames, d.input_size, d.input_size, generator=g)
        out.append({k: v.item() for k, v in trainer.train_step([b]).items()})
    return out


@pytest.mark.parametrize("autocast", ["off", "bfloat16", "float16"])
@pytest.mark.parametrize("objective", ["amd", "dmae"])
def test_short_run_kernels_on_matches_off(tmp_path, objective, autocast):
    """In each precision. Under autocast both runs round the same GEMM operands (the kernels cast at their
    boundary as autocast casts F.linear's), so they differ by summation order as in fp32, plus the low dtype's
    rounding of the results that order changes: one bf16 / fp16 ulp-level difference in a gradient, which AdamW
    turns into at most ~lr in a weight; bounded here at 1% (bf16) / 0.2% (fp16) of each logged loss."""
    try:
        off = _run(tmp_path, "reference", objective, autocast)
        on = _run(tmp_path, "auto", objective, autocast)
        assert kb.resolve("alignment_loss", torch.device("cpu"), torch.float32) in ("native", "chunked")
    finally:
        kb.select("auto")
    low = {"off": 0.0, "bfloat16": 1e-2, "float16": 2e-3}[autocast]
    for step, (a, b) in enumerate(zip(off, on)):
        assert a.keys() == b.keys()
        for k in a:
            # step 0 runs the same weights: fp32 summation order only; later steps carry it through AdamW
            tol = max(low, 1e-5 if step == 0 else 1e-4)
            assert b[k] == pytest.approx(a[k], rel=tol, abs=1e-6), (objective, autocast, step, k, a[k], b[k])
    assert on[0]["rec"] == off[0]["rec"]  # the reconstruction path only gathers: bit-identical at step 0


def test_train_compile_gives_the_eager_losses(tmp_path):
    """train.compile (every block through inductor: student, decoder, generators, teacher) against eager, fp32,
    same seed and batches: inductor fuses and reorders fp32 sums, so the losses agree to fp32 rounding at step 0
    and within the kernels on/off bound after AdamW has carried it."""
    eager = _run(tmp_path / "eager", "auto", "amd", steps=3)
    compiled = _run(tmp_path / "compiled", "auto", "amd", steps=3, more=("train.compile=true",))
    for step, (a, b) in enumerate(zip(eager, compiled)):
        assert a.keys() == b.keys()
        for k in a:
            tol = 1e-5 if step == 0 else 1e-4
            assert b[k] == pytest.approx(a[k], rel=tol, abs=1e-6), (step, k, a[k], b[k])

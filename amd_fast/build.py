"""Builders: each takes its own config section(s) and returns one component."""

from __future__ import annotations

import copy
import logging
import warnings

import torch

from amd_fast import checkpoint as ckpt
from amd_fast.attention import select_backend
from amd_fast.config import Config, DecoderConfig, MaskConfig, ModelConfig, ObjectiveConfig
from amd_fast.device import fast_dtype_and_reason, log_choice
from amd_fast.masks import MaskGenerator
from amd_fast.models.checkpoint_io import load_encoder, load_pretrain
from amd_fast.models.pretrain import PretrainModel
from amd_fast.models.vit import Block, build_encoder, resolve_arch
from amd_fast.objectives import OBJECTIVES, FrozenTeacher

log = logging.getLogger(__name__)


def teacher_width(model_cfg: ModelConfig) -> int:
    return resolve_arch(model_cfg.arch, model_cfg.embed_dim, model_cfg.depth, model_cfg.num_heads)[0]


def build_student(
    model_cfg: ModelConfig,
    decoder_cfg: DecoderConfig,
    objective_cfg: ObjectiveConfig,
    teacher_model_cfg: ModelConfig | None,
    *,
    img_size: int,
    num_frames: int,
) -> PretrainModel:
    encoder = build_encoder(model_cfg, img_size=img_size, num_frames=num_frames)
    kw = {}
    spec = OBJECTIVES[objective_cfg.name]
    if spec.needs_teacher:
        kw = dict(
            teacher_dim=teacher_width(teacher_model_cfg),
            num_aligned=len(objective_cfg.student_layers),
            generator_depth=objective_cfg.generator_depth if spec.has_generators else 0,
            head_kind=spec.head_kind(objective_cfg),
        )
        if max(objective_cfg.student_layers) > encoder.depth:
            raise ValueError(
                f"objective.student_layers={objective_cfg.student_layers} exceeds the student depth {encoder.depth}"
            )
    model = PretrainModel(encoder, decoder_cfg.embed_dim, decoder_cfg.depth, decoder_cfg.num_heads, **kw)
    if model_cfg.init:  # a file (checked against its record when it has one) or a DeepSpeed directory
        load_pretrain(model, ckpt.read_checkpoint(model_cfg.init), source=model_cfg.init)
    return model


def build_teacher(teacher_cfg, teacher_layers: list[int], device: torch.device, *, img_size, num_frames,
                  partition=None):  # fmt: skip
    """partition: the engine's ZeRO-3 sharding of the teacher (teacher.zero3), or None (replicated)."""
    if not teacher_cfg.checkpoint:
        raise ValueError("teacher.checkpoint is empty: give a (Video)MAE checkpoint, or let train.py pre-train one")
    encoder = build_encoder(teacher_cfg.model, img_size=img_size, num_frames=num_frames)
    load_encoder(encoder, ckpt.read_checkpoint(teacher_cfg.checkpoint), source=teacher_cfg.checkpoint)
    teacher = make_frozen_teacher(encoder.to(device), teacher_layers, teacher_cfg.dtype, device, partition)
    select_backend(teacher_cfg.model.attn_backend, device, teacher.dtype)  # checked (and logged) for its dtype
    log.info("teacher: %s, runs in %s up to block %d%s", teacher_cfg.checkpoint, teacher_cfg.dtype,
             max(teacher_layers), ", ZeRO-3 partitioned" if partition else "")  # fmt: skip
    return teacher


def make_frozen_teacher(encoder, layers: list[int], setting: str, device: torch.device, partition=None):
    """Freeze an encoder as a teacher in the precision `setting` names (auto: decided by the device)."""
    if setting == "int8" and partition is not None:
        raise ValueError("teacher.dtype=int8 and teacher.zero3 do not combine (ZeRO-3 shards float weights)")
    if setting == "int8":
        if device.type != "cpu":
            raise ValueError("teacher.dtype=int8 is the CPU option (dynamic int8, VNNI); on GPUs use bfloat16")
        from torch.ao.quantization import quantize_dynamic

        # changes the math: int8 weights (per tensor) and dynamically quantized activations in every linear.
        # torch.ao's quantized tensors are deprecated in favour of torchao, which has no CPU dynamic-int8
        # path as fast on this machine yet; the warning is silenced here, where the choice is made.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
            encoder = quantize_dynamic(encoder.eval(), {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        log_choice(f"teacher on {device.type}", "int8", "teacher.dtype=int8: dynamic int8 linears (changes the math)")
        return FrozenTeacher(encoder, layers, torch.float32)
    if setting == "auto":
        dtype, why = fast_dtype_and_reason(device)
        why = f"auto: {why}"
    else:
        dtype, why = getattr(torch, setting), f"teacher.dtype={setting}"
    log_choice(f"teacher on {device.type}", dtype, why)
    return FrozenTeacher(encoder, layers, dtype, partition)


def compile_blocks(*modules) -> None:
    """train.compile: torch.compile every transformer block of these modules, in place (Module.compile: the state
    dict's names stay). Blocks of one kind share their compiled code (the weights are the graph's inputs)."""
    n = 0
    for module in modules:
        for m in module.modules() if module is not None else ():
            if isinstance(m, Block):
                m.compile()
                n += 1
    log_choice("train.compile", f"{n} blocks", "torch.compile (inductor), each block in place")


def build_mask_generator(mask_cfg: MaskConfig, objective: str, grid: tuple[int, int, int]) -> MaskGenerator:
    teacher_ratio = mask_cfg.teacher_ratio if OBJECTIVES[objective].uses_delta else None
    return MaskGenerator(grid, mask_cfg.kind, mask_cfg.student_ratio, teacher_ratio, mask_cfg.decoder_ratio)


def build_objective(objective_cfg: ObjectiveConfig, model: PretrainModel, teacher: FrozenTeacher | None):
    return OBJECTIVES[objective_cfg.name](model, objective_cfg, teacher)


def teacher_pretrain_config(cfg: Config) -> Config:
    """The `mae` run that makes a teacher when none is given: the teacher's architecture, its own decoder,
    the same data, written under <output_dir>/teacher and resumable like any run."""
    t = copy.deepcopy(cfg)
    t.model = copy.deepcopy(cfg.teacher.model)
    t.model.init = ""
    t.decoder = copy.deepcopy(cfg.teacher.pretrain_decoder)
    t.objective = ObjectiveConfig(name="mae", norm_pix_loss=cfg.objective.norm_pix_loss)
    t.mask = MaskConfig(kind=cfg.mask.kind, student_ratio=cfg.teacher.pretrain_mask_ratio, teacher_ratio=0.0)
    t.optim.base_lr = cfg.teacher.pretrain_lr
    t.optim.clip_grad = 0.0
    t.train.steps = cfg.teacher.pretrain_steps
    t.train.warmup_steps = max(1, cfg.teacher.pretrain_steps // 10)
    t.train.output_dir = f"{cfg.train.output_dir}/{ckpt.TEACHER_DIR}"
    t.train.save_interval = min(cfg.train.save_interval, cfg.teacher.pretrain_steps)
    t.train.resume = "auto"
    t.train.eval_probe = False  # the student's end-of-run evaluation probes the teacher too
    t.teacher.checkpoint = ""
    return t

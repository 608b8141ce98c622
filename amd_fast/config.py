"""Typed configuration: one small dataclass per component, YAML presets, dotted CLI overrides.

A preset is a YAML file whose top-level keys are the sections of `Config`. Overrides are
`section.field=value` strings (values parsed as YAML). Every unknown section or field and every
value outside a `Literal` fails at start with a message naming the field and the allowed values.
Each builder receives its own section, never the whole config.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Arch = Literal["vit_tiny", "vit_small", "vit_base", "vit_large", "custom"]
AttnBackend = Literal["auto", "flash_attn", "xformers", "sdpa", "math"]


class ConfigError(ValueError):
    """A config field or value is wrong; the message names the field and what is allowed."""


@dataclass
class ModelConfig:
    """A ViT encoder. Images are 1-frame videos with tubelet 1."""

    arch: Arch = "vit_small"
    embed_dim: int = 0  # 0: from arch (Ti/S/B/L = 192/384/768/1024)
    depth: int = 0  # 0: from arch (12/12/12/24)
    num_heads: int = 0  # 0: from arch (3/6/12/16)
    patch_size: int = 16
    tubelet_size: int = 2
    mlp_ratio: float = 4.0
    cls_token: bool = False  # VideoMAE has none; MAE image checkpoints have one
    drop_path: float = 0.0
    attn_backend: AttnBackend = "auto"
    init: str = ""  # checkpoint to initialize from (official VideoMAE / MAE / AMD layouts load as they are)


@dataclass
class DecoderConfig:
    embed_dim: int = 192  # [192 for ViT-S students, 384 for ViT-B]
    depth: int = 4
    num_heads: int = 3


@dataclass
class TeacherConfig:
    """The frozen teacher of `amd` / `dmae`. With no checkpoint, one is pre-trained with `mae` first."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="vit_base"))
    checkpoint: str = ""
    # auto: the fastest exact-enough precision the device has (bf16 on CUDA; on a CPU measured: amd_fast/measure.py).
    # int8 CHANGES THE MATH: dynamic int8 quantization of the teacher's linears (CPU, VNNI), ~2x faster teacher
    # forward with a small target error (benchmarks/mask_sweep.py reports it).
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = "auto"
    # DeepSpeed runs: partition the frozen teacher's weights over the ranks with ZeRO-3 (each rank holds 1/world,
    # a forward all-gathers them module by module) instead of replicating it -- for teachers too large to replicate
    zero3: bool = False
    # Used only when `checkpoint` is empty: the `mae` run that makes the teacher.
    pretrain_steps: int = 0
    pretrain_decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(embed_dim=192, depth=2, num_heads=3))
    pretrain_lr: float = 1.5e-4
    pretrain_mask_ratio: float = 0.9


@dataclass
class MaskConfig:
    kind: Literal["tube", "random"] = "tube"  # tube: one spatial pattern repeated over time (VideoMAE)
    student_ratio: float = 0.9  # rho_s
    teacher_ratio: float = 0.75  # rho_t (amd); dmae shares the student's mask
    decoder_ratio: float = 0.0  # VideoMAEv2 running-cell decoder masking; 0 = off (changes the math)


@dataclass
class ObjectiveConfig:
    name: Literal["amd", "dmae", "mae"] = "amd"
    student_layers: list[int] = field(default_factory=lambda: [6, 12])  # 1-indexed blocks
    teacher_layers: list[int] = field(default_factory=lambda: [6, 12])
    w_rec: float = 1.0
    w_dir: float = 1.0
    w_gen: float = 1.0
    distance: Literal["mse", "l1", "smooth_l1"] = "mse"
    generator_depth: int = 2
    dmae_distance: Literal["l1", "l2"] = "l1"
    dmae_head: Literal["linear", "mlp"] = "linear"
    norm_pix_loss: bool = True  # per-patch standardized targets, as VideoMAE
    # amd_fast.kernels backend for the gathers and the fused alignment loss: auto (Triton on CUDA, the fastest
    # CPU twin on CPU), or forced; `reference` is plain PyTorch (kernels off)
    kernels: Literal["auto", "reference", "chunked", "compiled", "native", "triton"] = "auto"


@dataclass
class DataConfig:
    # video_list: files named in list_file; image_folder: root/<class>/<image> (see amd_fast/data/lists.py)
    dataset: Literal["fashion_mnist", "moving_fashion_mnist", "video_list", "image_folder"] = "moving_fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    input_size: int = 224
    num_frames: int = 16
    batch_size: int = 8  # per-rank micro-batch, in clips (with num_sample k: batch_size / k files, k clips each)
    num_workers: int = 1
    size: int = 0  # 0: the whole split / list
    list_file: str = ""  # video_list: "path [label]" / "path start end label" lines, space- or comma-separated
    prefix: str = ""  # video_list: joined to relative paths ("": the list file's folder)
    sampling: Literal["dense", "segments"] = "dense"  # dense: T frames at frame_stride; segments: TSN (SSv2)
    frame_stride: int = 4  # [4 Kinetics, 2 SSv2-like motion data] (METHOD.md section 6)
    num_sample: int = 1  # repeated augmentation: k crops + masks per decoded clip [4 in the references]
    decoder: Literal["auto", "torchcodec", "decord", "pyav", "dali"] = "auto"  # auto: torchcodec > decord > pyav
    # video_list pre-training: torch (DataLoader workers decode with data.decoder) or dali (one DALI pipeline in the
    # training process decodes, crops and normalizes: NVDEC on CUDA; on CPU VP8/VP9/MJPEG only); auto: dali on CUDA
    loader: Literal["auto", "torch", "dali"] = "auto"
    # images: RandomResizedCrop keeps [min_crop_scale, 1] of the area [0.2: MAE pre-training; MAE fine-tunes at 0.08
    # with RandAugment over 100 epochs; a short fine-tune learns faster with milder crops]
    min_crop_scale: float = 0.2
    # moving_fashion_mnist: share of clips drawn dark-on-bright; 0.5 makes the motion classes nonlinear in the pixels
    # (bright-on-black translation / growth is linearly readable: a raw-pixel linear probe gets ~100%)
    invert_prob: float = 0.0
    # video_list: check each file once against a sequential decode (cached under ~/.cache/amd_fast); a file the
    # decoder gets wrong is decoded an exact way or skipped (amd_fast/data/decode_check.py). false: trust the decoder
    decode_check: bool = True


@dataclass
class OptimConfig:
    base_lr: float = 1.2e-3  # scaled by global_batch / 256
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip_grad: float = 0.02  # 0: off
    accum_steps: int = 1
    fused: bool = True


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    warmup_steps: int = 100
    seed: int = 0
    threads: int = 0  # 0: torch's default
    log_interval: int = 10
    save_interval: int = 500
    keep_checkpoints: int = 2
    output_dir: str = "outputs/run"
    resume: str = ""  # "auto": newest complete checkpoint in output_dir; or a path
    max_nonfinite_in_row: int = 5
    # loss spike guard: a loss above spike_factor x the median of the last 100 healthy steps is a spike; spike_steps
    # in a row stop the run like a non-finite streak (no checkpoint is written meanwhile). spike_factor 0: off
    spike_factor: float = 10.0
    spike_steps: int = 3
    overwrite: bool = False  # a used output_dir: move the old run aside (<dir>.old-<time>) and start over
    # checkpoint files you trust to be unpickled with weights_only=False. UNSAFE: unpickling runs code stored in the
    # file. Only for files that hold more than tensors and plain containers (official ones do not need it)
    unsafe_pickle: list[str] = field(default_factory=list)
    autocast: Literal["auto", "off", "bfloat16", "float16"] = "auto"
    # torch.compile each transformer block (student, decoder, generators, teacher; Module.compile, in place: the
    # checkpoints' names stay): inductor fuses the LayerNorm / GELU / residual / cast chains between the GEMMs.
    # The first steps pay the compiles (tens of seconds a block kind on a 2-core CPU)
    compile: bool = False
    # pre-training: at the end, on held-out clips, the student's masked reconstruction next to predicting zeros,
    # a linear probe (the `probe` section) of the student, the same student at random init, the raw pixels and the
    # teacher, and a reconstruction PNG (amd_fast/report.py)
    eval_probe: bool = False
    tensorboard: bool = True
    progress: bool = True
    # malloc for the process (re-exec with LD_PRELOAD): auto = the best measured one that is installed
    allocator: Literal["auto", "default", "jemalloc", "tcmalloc"] = "auto"


@dataclass
class DistConfig:
    """Data parallelism (amd_fast/engine.py). One plain process unless launched on several ranks by
    `deepspeed` or `torchrun` (WORLD_SIZE > 1), which selects DeepSpeed."""

    engine: Literal["auto", "local", "deepspeed"] = "auto"  # auto: deepspeed when WORLD_SIZE > 1
    # a name in configs/deepspeed/ (zero0..zero3, zero2_offload, zero2_bf16, zero3_bf16) or a path to a JSON;
    # its batch size, accumulation and clipping keys are filled from data/optim (a disagreement is an error)
    deepspeed_config: str = "zero2"
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU


@dataclass
class FinetuneConfig:
    """Classification fine-tuning / evaluation (METHOD.md section 7; amd_fast/finetune.py)."""

    init: str = ""  # pre-trained weights: amd_fast / VideoMAE / AMD / MAE files or a DeepSpeed directory; "": scratch
    num_classes: int = 0  # 0: from the dataset
    layer_decay: float = 0.75  # layer-wise LR decay: block i gets layer_decay ** (depth + 1 - (i + 1))
    label_smoothing: float = 0.1
    mixup: float = 0.8  # Beta(alpha, alpha) mixing; 0: off
    cutmix: float = 1.0  # Beta(alpha, alpha) box; 0: off
    mix_prob: float = 1.0  # probability of mixing a batch
    switch_prob: float = 0.5  # with both on: probability of cutmix instead of mixup
    head_init_scale: float = 1e-3  # VideoMAE scales the head's init by this
    test_clips: int = 1  # views per test video: clips x crops, softmax averaged per video
    test_crops: int = 1  # [Kinetics 5 x 3, SSv2 2 x 3]
    test_list: str = ""  # video_list: the test list ("": data.list_file); image_folder: see test_root
    test_root: str = ""  # fashion-mnist arrays or image_folder root of the test split ("": data.root)
    test_seed: int = 1234  # the test clips' seed (synthetic data), the same for every run
    eval_only: bool = False
    eval_interval: int = 0  # steps between evaluations; 0: at the end only
    eval_size: int = 0  # test items (0: the whole test split)
    eval_batch_size: int = 64


@dataclass
class FinetuneRunConfig:
    """The root of a fine-tuning config (`amd_fast/finetune.py --config ...`)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(drop_path=0.1))
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(base_lr=1e-3, min_lr=1e-6, betas=[0.9, 0.999], clip_grad=0.0)
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="outputs/finetune"))
    dist: DistConfig = field(default_factory=DistConfig)


@dataclass
class ProbeConfig:
    """Linear probing of a frozen encoder (amd_fast/probe.py): BatchNorm without affine + a linear head."""

    init: str = ""  # the encoder's checkpoint; "": random init; "pixels": the raw-pixel floor (no encoder)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one probe per seed on the cached features
    epochs: int = 30
    lr: float = 1e-3  # AdamW, cosine to 0 over the epochs
    weight_decay: float = 0.0
    batch_size: int = 256
    train_size: int = 0  # training items whose features are extracted (0: the whole split)
    test_size: int = 0
    test_seed: int = 1234  # the test clips' seed (synthetic data), the same for every run
    test_list: str = ""  # video_list: the test list ("": data.list_file)
    test_root: str = ""  # fashion-mnist arrays or image_folder root of the test split ("": data.root)
    cache_dir: str = ""  # "": <output_dir>/features; features are extracted once per checkpoint and data


@dataclass
class ProbeRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="outputs/probe"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    # the end-of-run probe's settings (train.eval_probe): short by default; probe.init is not read here (the run's
    # own encoders are probed)
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig(seeds=[0], train_size=2000, test_size=1000))


# ---------------------------------------------------------------------------------------------
# Ranges of the numeric fields, checked as each value is read (a list field: each of its items). Interval notation;
# `inf` is unbounded. tests/test_config.py checks that every numeric field has one.

_SEED = "[0, 4294967295]"  # numpy's seeds are 32-bit
RANGES = {
    "ModelConfig": {"embed_dim": "[0, inf)", "depth": "[0, inf)", "num_heads": "[0, inf)", "patch_size": "[1, inf)",
                    "tubelet_size": "[1, inf)", "mlp_ratio": "(0, inf)", "drop_path": "[0, 1)"},
    "DecoderConfig": {"embed_dim": "[1, inf)", "depth": "[1, inf)", "num_heads": "[1, inf)"},
    "TeacherConfig": {"pretrain_steps": "[0, inf)", "pretrain_lr": "(0, inf)", "pretrain_mask_ratio": "[0, 1)"},
    "MaskConfig": {"student_ratio": "[0, 1)", "teacher_ratio": "[0, 1)", "decoder_ratio": "[0, 1)"},
    "ObjectiveConfig": {"student_layers": "[1, inf)", "teacher_layers": "[1, inf)", "w_rec": "[0, inf)",
                        "w_dir": "[0, inf)", "w_gen": "[0, inf)", "generator_depth": "[0, inf)"},
    "DataConfig": {"input_size": "[1, inf)", "num_frames": "[1, inf)", "batch_size": "[1, inf)",
                   "num_workers": "[0, inf)", "size": "[0, inf)", "frame_stride": "[1, inf)", "num_sample": "[1, inf)",
                   "min_crop_scale": "(0, 1]", "invert_prob": "[0, 1]"},
    "OptimConfig": {"base_lr": "[0, inf)", "min_lr": "[0, inf)", "warmup_lr": "[0, inf)", "weight_decay": "[0, inf)",
                    "betas": "[0, 1)", "eps": "(0, inf)", "clip_grad": "[0, inf)", "accum_steps": "[1, inf)"},
    "TrainConfig": {"steps": "[0, inf)", "warmup_steps": "[0, inf)", "seed": _SEED, "threads": "[0, inf)",
                    "log_interval": "[1, inf)", "save_interval": "[1, inf)", "keep_checkpoints": "[0, inf)",
                    "max_nonfinite_in_row": "[1, inf)", "spike_factor": "[0, inf)", "spike_steps": "[1, inf)"},
    "FinetuneConfig": {"num_classes": "[0, inf)", "layer_decay": "(0, 1]", "label_smoothing": "[0, 1]",
                       "mixup": "[0, inf)", "cutmix": "[0, inf)", "mix_prob": "[0, 1]", "switch_prob": "[0, 1]",
                       "head_init_scale": "[0, inf)", "test_clips": "[1, inf)", "test_crops": "[1, inf)",
                       "test_seed": _SEED, "eval_interval": "[0, inf)", "eval_size": "[0, inf)",
                       "eval_batch_size": "[1, inf)"},
    "ProbeConfig": {"seeds": _SEED, "epochs": "[1, inf)", "lr": "(0, inf)", "weight_decay": "[0, inf)",
                    "batch_size": "[1, inf)", "train_size": "[0, inf)", "test_size": "[0, inf)", "test_seed": _SEED},
}  # fmt: skip


def _in_range(value: float, rng: str) -> bool:
    lo, hi = (float(x) for x in rng[1:-1].split(","))
    above = value > lo if rng[0] == "(" else value >= lo
    below = value < hi if rng[-1] == ")" else value <= hi
    return above and below


def _check_ranges(cls: type, obj, path: str) -> None:
    for name, rng in RANGES.get(cls.__name__, {}).items():
        value = getattr(obj, name)
        for i, v in enumerate(value) if isinstance(value, list) else [(None, value)]:
            if not _in_range(v, rng):
                where = f"{path}.{name}" if path else name
                where += f"[{i}]" if i is not None else ""
                raise ConfigError(f"{where}={v!r} is out of range: it must be in {rng}")


# ---------------------------------------------------------------------------------------------
# Loading and checking


# YAML 1.1 (PyYAML) reads these words as booleans. Typed bare on the command line they are kept as the words
# (`_parse_override`); in a preset file they arrive as booleans and are read back as the word a choice allows.
_BOOL_WORDS = {True: ("on", "yes", "true"), False: ("off", "no", "false")}


def _check_value(path: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and value not in allowed:
            value = next((w for w in _BOOL_WORDS[value] if w in allowed), value)
        if value not in allowed:
            hint = ""
            if isinstance(value, bool):  # a YAML boolean where a word was wanted
                hint = f" (YAML read {'/'.join(_BOOL_WORDS[value])} as the boolean {value}; quote the word you meant)"
            raise ConfigError(f"{path}={value!r} is not allowed{hint}; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(f"{path}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, str) and value.lower() in _BOOL_WORDS[True] + _BOOL_WORDS[False]:
            return value.lower() in _BOOL_WORDS[True]
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false (or on/off, yes/no), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def _from_dict(cls: type, data: dict, path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    obj = cls()
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"unknown field '{full}'; allowed fields: {', '.join(names)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            # merge into the section's defaults, so a preset can set only what it changes
            sub = getattr(obj, key)
            merged = {**dataclasses.asdict(sub), **value}
            setattr(obj, key, _from_dict(hints[key], merged, full))
        else:
            setattr(obj, key, _check_value(full, hints[key], value))
    _check_ranges(cls, obj, path)
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def _parse_override(raw: str) -> Any:
    """A command-line value as YAML (`4` int, `[1,2]` list, `2e-4` number), except that the words YAML 1.1
    reads as booleans stay words unless they are `true` / `false`: `train.autocast=off` means 'off'."""
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read the value {raw!r}: {e}") from None
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        return raw.strip()
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, root: type = Config):
    """Preset YAML (optional) + `a.b=value` overrides -> a checked `root` (`Config` or `FinetuneRunConfig`)."""
    tree: dict = {}
    if path:
        tree = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a preset must be a mapping of sections")
    for item in overrides or []:
        item = item.removeprefix("--")
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.field=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key, _parse_override(raw))
    cfg = _from_dict(root, tree)
    {Config: validate, FinetuneRunConfig: validate_finetune, ProbeRunConfig: validate_probe}[root](cfg)
    check_output_dir(cfg)  # here, at start: a config read back from a checkpoint (from_dict) names a past run's folder
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a type cannot express."""
    m = cfg.mask
    from amd_fast.objectives import OBJECTIVES  # what each objective needs is declared there

    spec = OBJECTIVES[cfg.objective.name]
    if spec.uses_delta and m.teacher_ratio > m.student_ratio:
        raise ConfigError(
            f"mask.teacher_ratio={m.teacher_ratio} must be <= mask.student_ratio={m.student_ratio}: "
            "AMD's teacher sees a superset of the student's tokens"
        )
    o = cfg.objective
    if spec.needs_teacher:
        if len(o.student_layers) != len(o.teacher_layers) or not o.student_layers:
            raise ConfigError(
                f"objective.student_layers={o.student_layers} and objective.teacher_layers={o.teacher_layers} "
                "must be non-empty and of equal length (one teacher layer per student layer)"
            )
        for name in ("patch_size", "tubelet_size"):
            s, t = getattr(cfg.model, name), getattr(cfg.teacher.model, name)
            if s != t:
                raise ConfigError(
                    f"model.{name}={s} and teacher.model.{name}={t} must match: "
                    "teacher and student read the same tokens"
                )
    if cfg.probe.init:
        raise ConfigError(
            f"probe.init={cfg.probe.init!r} is not read in pre-training: the end-of-run probe (train.eval_probe) "
            "probes this run's student, the same student at random init, the raw pixels and the teacher; "
            "probe another checkpoint with amd_fast/probe.py"
        )
    if cfg.train.eval_probe and not cfg.probe.seeds:
        raise ConfigError("probe.seeds is empty while train.eval_probe=true: give at least one seed")
    if not cfg.dist.deepspeed_config:
        raise ConfigError("dist.deepspeed_config is empty: give a name in configs/deepspeed/ (e.g. zero2) or a path")
    check_data(cfg)  # the teacher's tubelet is checked against the student's above
    d = cfg.data
    if d.batch_size % d.num_sample:
        raise ConfigError(
            f"data.num_sample={d.num_sample} must divide data.batch_size={d.batch_size} "
            "(the batch counts clips: batch_size / num_sample files, num_sample clips of each)"
        )
    if d.num_sample > 1 and d.dataset not in ("video_list", "image_folder"):
        raise ConfigError(f"data.num_sample={d.num_sample} needs data.dataset=video_list or image_folder")
    if d.loader == "dali" and d.dataset != "video_list":
        raise ConfigError(f"data.loader=dali decodes video files: it needs data.dataset=video_list, not {d.dataset!r}")


def validate_finetune(cfg: FinetuneRunConfig) -> None:
    f, d = cfg.finetune, cfg.data
    if d.loader == "dali":
        raise ConfigError("data.loader=dali is pre-training's loader; fine-tuning (test views) takes torch or auto")
    if f.init and not os.path.exists(f.init):
        raise ConfigError(f"finetune.init={f.init!r} does not exist (a checkpoint file or a DeepSpeed checkpoint-N/)")
    if f.test_clips > 1 and d.dataset != "video_list":
        raise ConfigError(
            f"finetune.test_clips={f.test_clips} needs data.dataset=video_list (temporal views of a decoded video); "
            f"{d.dataset} clips have a fixed length: use finetune.test_crops"
        )
    check_data(cfg)
    if d.num_sample != 1:
        raise ConfigError(f"data.num_sample={d.num_sample}: fine-tuning takes one crop per decoded clip (1)")


def check_data(cfg) -> None:
    """The data section against the model, for every config root (pre-training, fine-tuning, probing); its ranges
    are checked as it is read (RANGES)."""
    d = cfg.data
    if d.invert_prob and d.dataset != "moving_fashion_mnist":
        raise ConfigError(f"data.invert_prob={d.invert_prob} is for data.dataset=moving_fashion_mnist")
    if d.dataset in ("fashion_mnist", "image_folder") and (d.num_frames != 1 or cfg.model.tubelet_size != 1):
        raise ConfigError(
            f"data.dataset={d.dataset} is an image dataset: data.num_frames={d.num_frames} and "
            f"model.tubelet_size={cfg.model.tubelet_size} must both be 1"
        )
    if d.dataset == "video_list" and not d.list_file:
        raise ConfigError("data.dataset=video_list needs data.list_file (a 'path label' list of video files)")


def check_output_dir(cfg) -> None:
    """train.output_dir, for every config root: a folder the run can own. Pre-training writes the teacher it makes into
    `<output_dir>/teacher`: an empty one would put the run into the working folder and the teacher into /teacher."""
    d = cfg.train.output_dir
    full = os.path.abspath(d)
    if not d.strip():
        why = "is empty"
    elif os.path.dirname(full) == full:
        why = "is the filesystem root"
    elif os.path.exists(full) and not os.path.isdir(full):
        why = "is a file"
    else:
        return
    raise ConfigError(f"train.output_dir={d!r} {why}: give the folder this run writes into (created if missing)")


def validate_probe(cfg: ProbeRunConfig) -> None:
    check_data(cfg)
    p = cfg.probe
    if p.init not in ("", "pixels") and not os.path.exists(p.init):
        raise ConfigError(f"probe.init={p.init!r} does not exist; give a checkpoint, 'pixels' or '' (random init)")
    if not cfg.probe.seeds:
        raise ConfigError("probe.seeds is empty: give at least one seed")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg

"""Load the checkpoints users already have: VideoMAE / AMD fine-tune and pre-training files, MAE image files.

The key layouts are those of METHOD.md section 8, as the official code writes them:

- MCG-NJU/VideoMAE `modeling_finetune.py` (fine-tune / teacher: no prefix, Conv3d patch kernel
  `[D, C, tubelet, p, p]`, `attn.q_bias` / `attn.v_bias` and no key bias, then `norm.*`, or `fc_norm.*`
  with mean pooling, and `head.*`); `modeling_pretrain.py` (the encoder under `encoder.`, plus
  `encoder_to_decoder`, `mask_token`, `decoder.*`). MCG-NJU/AMD's `modeling_pretrain.py` adds
  `encoder.projection_heads.{k}` and `generators.{k}.blocks.{j}` (+ an unused `generators.{k}.norm`);
  its generator mask tokens live in a plain list, so they are never in the file. OpenGVLab/VideoMAEv2
  writes the same names.
- facebookresearch/mae `models_mae.py` / `models_vit.py` (timm names): Conv2d patch kernel `[D, 3, p, p]`,
  `cls_token`, a saved 2-D sine-cosine `pos_embed [1, 1 + N, D]` with a CLS row, full `attn.qkv.bias [3D]`,
  `norm.*`, and decoder keys `decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks`, ...

Every conversion is exact (same function as the original model) except two that are reported as such:
interpolating a saved position table to another grid, and dropping a CLS token the encoder has no place for.
Nothing is copied into the model unless the whole checkpoint checks out, so a failed load leaves it as it was.

Shape legend: D width, N tokens (= t*h*w), C channels, p patch size.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from amd_fast.models.vit import VisionTransformer

log = logging.getLogger(__name__)

LAYOUTS = ("videomae_finetune", "videomae_pretrain", "mae_image")
_WRAPPERS = ("model", "module", "state_dict")  # where the official scripts put the weights (VideoMAE: 'model|module')
_STRIP = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_MAE_DECODER = (
    "decoder_embed.",
    "decoder_blocks.",
    "decoder_norm.",
    "decoder_pred.",
    "decoder_pos_embed",
    "mask_token",
)
_PRETRAIN_PARTS = ("encoder_to_decoder.", "mask_token", "decoder.", "generators.")
_KEY_BIAS_NOTE = "qkv.bias -> q_bias, v_bias (key bias dropped: exact, softmax is invariant to it)"


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names the key, both shapes and the setting to change."""


@dataclass
class LoadReport:
    """What a load did. `loaded`/`missing` are model keys, `ignored` and `converted` checkpoint keys."""

    source: str = ""
    layout: str = ""
    loaded: list[str] = field(default_factory=list)  # model tensors filled from the checkpoint
    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint lacks: kept at their init
    ignored: list[str] = field(default_factory=list)  # checkpoint tensors not used
    converted: dict[str, str] = field(default_factory=dict)  # key -> what was done to it
    notes: list[str] = field(default_factory=list)  # why groups of keys were ignored or kept

    def summary(self) -> str:
        lines = [
            f"checkpoint {self.source} ({self.layout}): loaded {len(self.loaded)}, converted {len(self.converted)},"
            f" missing {len(self.missing)}, ignored {len(self.ignored)}"
        ]
        by_msg: dict[str, list[str]] = {}
        for key, msg in self.converted.items():
            by_msg.setdefault(msg, []).append(key)
        lines += [f"  converted {_group(keys, leaf=True)}: {msg}" for msg, keys in by_msg.items()]
        if self.missing:
            lines.append(f"  missing (kept at init): {_group(self.missing)}")
        if self.ignored:
            lines.append(f"  ignored: {_group(self.ignored)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _group(keys: list[str], leaf: bool = False) -> str:
    """Compact key list: block indices collapsed to '#', leaves to '*' -> 'decoder.blocks.#.* (24), head.* (2)'."""
    counts: Counter[str] = Counter()
    for key in keys:
        pat = re.sub(r"(?<=\.)\d+(?=\.|$)", "#", key)
        if not leaf:
            m = re.match(r"(.*?blocks\.#)\.", pat)
            parent = pat.rpartition(".")[0]
            pat = m.group(1) + ".*" if m else (parent + ".*" if parent and not parent.endswith("#") else pat)
        counts[pat] += 1
    return ", ".join(f"{p} ({n})" if n > 1 else p for p, n in counts.items())


# ---------------------------------------------------------------------------------------------------------------
# reading


_TRUSTED: set[str] = set()


def trust(paths) -> None:
    """Files the user has named in `train.unsafe_pickle`: the only ones ever unpickled with weights_only=False."""
    _TRUSTED.clear()
    _TRUSTED.update(os.path.realpath(p) for p in paths)


def _is_pickle(path: str | Path) -> bool:
    """Whether a file is torch.save's zip (a pickle and its tensors) or a pickle (protocol 2+ starts with the PROTO
    opcode, as torch.save's legacy format): only then can "more than tensors" be why weights_only refused it."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or (head[:1] == pickle.PROTO and len(head) > 1 and 2 <= head[1] <= 5)


def _reason(e: Exception) -> str:
    """Why torch.load failed, in one line. For a weights_only refusal, PyTorch's reason without its advice (which
    suggests weights_only=False)."""
    if not isinstance(e, pickle.UnpicklingError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}" if first else type(e).__name__
    lines = [line.strip() for line in str(e).split("WeightsUnpickler error:", 1)[-1].splitlines() if line.strip()]
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    reason = next((line for line in lines if not line.startswith(advice) and "weights_only" not in line), "")
    return reason.split(" Please use ", 1)[0].rstrip(".") or type(e).__name__


def torch_load(path: str | Path, map_location="cpu", extra_globals: tuple = ()):
    """Every checkpoint file amd_fast reads goes through here (official files, training checkpoints, DeepSpeed's
    shards), called by amd_fast/checkpoint.py's `read_checkpoint`, which checks a file's record first.
    weights_only=True always: tensors and plain containers, plus argparse.Namespace (the official scripts save their
    `args`) and the caller's `extra_globals` (data-holder classes). A pickle that needs more is refused, naming it,
    unless the user listed it in train.unsafe_pickle (which runs whatever code the file holds: for files you made or
    trust); a file that is no pickle at all is said to be none."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *extra_globals]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a refused pickle; random bytes, an empty or cut-short file, a folder, a text file, ...
        if os.path.isfile(path) and not _is_pickle(path):
            raise CheckpointError(
                f"{path}: not a checkpoint: neither a torch.save file nor a pickle ({_reason(e)})"
            ) from None
        if not isinstance(e, pickle.UnpicklingError):
            raise CheckpointError(f"{path}: cannot be read as a checkpoint ({_reason(e)})") from None
        if os.path.realpath(path) not in _TRUSTED:
            raise CheckpointError(
                f"{path}: not a checkpoint of tensors and plain containers ({_reason(e)}). If it is a checkpoint you "
                f"trust that stores other objects, list it in train.unsafe_pickle=[{path}] -- UNSAFE: unpickling "
                "runs code stored in the file."
            ) from None
        log.warning("%s: loading with weights_only=False, as train.unsafe_pickle asks (runs code in the file)", path)
        return torch.load(path, map_location=map_location, weights_only=False)


def read_state_dict(path_or_dict) -> dict[str, torch.Tensor]:
    """A checkpoint file (or an already-loaded dict) -> its weights, on CPU.

    The weights are taken from under `model`, `module` or `state_dict` (nested wrappers too), else the
    top level; non-tensor entries are dropped and a leading `module.` (DDP) or `_orig_mod.` (torch.compile)
    is stripped from every key.
    """
    obj = path_or_dict if isinstance(path_or_dict, Mapping) else torch_load(path_or_dict)
    while True:
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        for p in _STRIP:
            if key.startswith(p):
                key = key[len(p) :]
        state[key] = value
    if not state:
        raise CheckpointError(f"{_describe(path_or_dict)}: no tensors found (top-level keys: {list(obj)[:10]})")
    return state


def _describe(src) -> str:
    return str(src) if isinstance(src, (str, Path)) else "<dict>"


def _detect_prefix(state: Mapping[str, torch.Tensor]) -> str:
    return "encoder." if any(k.startswith("encoder.patch_embed.") for k in state) else ""


def _num_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
    ids = [int(m.group(1)) for k in state if (m := pat.match(k))]
    return max(ids) + 1 if ids else 0


def infer_encoder_config(state, prefix: str | None = None) -> dict:
    """What encoder a checkpoint holds, from its keys and shapes (to build a matching teacher, or explain a mismatch).

    Returns layout, prefix, embed_dim, depth, patch_size, tubelet_size, in_chans, cls_token, mlp_ratio,
    qkv_bias ('q_v' VideoMAE, 'qkv' MAE, 'none'), final_norm ('norm', 'fc_norm' or None), pos_embed_rows
    (saved table rows incl. CLS, or None) and num_heads. Head counts are not stored in checkpoints: the value is
    embed_dim // 64, which every standard ViT (Ti/S/B/L/H) uses.
    """
    if not (isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values())):
        state = read_state_dict(state)
    prefix = _detect_prefix(state) if prefix is None else prefix
    w = state.get(prefix + "patch_embed.proj.weight")
    if w is None or w.dim() not in (4, 5):
        raise CheckpointError(
            f"no ViT encoder found: '{prefix}patch_embed.proj.weight' is missing or not a conv kernel "
            f"(first keys: {list(state)[:8]})"
        )
    dim = w.shape[0]
    fc1 = state.get(prefix + "blocks.0.mlp.fc1.weight")
    if prefix + "blocks.0.attn.qkv.bias" in state:
        qkv_bias = "qkv"
    elif prefix + "blocks.0.attn.q_bias" in state:
        qkv_bias = "q_v"
    else:
        qkv_bias = "none"
    pos = state.get(prefix + "pos_embed")
    if prefix:
        layout = "videomae_pretrain"
    elif w.dim() == 4 or qkv_bias == "qkv":
        layout = "mae_image"
    else:
        layout = "videomae_finetune"
    return {
        "layout": layout,
        "prefix": prefix,
        "embed_dim": dim,
        "depth": _num_blocks(state, prefix),
        "num_heads": max(1, dim // 64),
        "patch_size": w.shape[-1],
        "tubelet_size": w.shape[2] if w.dim() == 5 else 1,
        "in_chans": w.shape[1],
        "cls_token": prefix + "cls_token" in state,
        "mlp_ratio": fc1.shape[0] / dim if fc1 is not None else None,
        "qkv_bias": qkv_bias,
        "final_norm": "norm" if prefix + "norm.weight" in state else ("fc_norm" if "fc_norm.weight" in state else None),
        "pos_embed_rows": pos.shape[-2] if pos is not None else None,
    }


# ---------------------------------------------------------------------------------------------------------------
# encoder


def _shape_error(key: str, ckpt_shape, model_shape, hints: list[str]) -> CheckpointError:
    why = "; ".join(hints) if hints else "no conversion explains the difference"
    return CheckpointError(f"{key}: checkpoint shape {list(ckpt_shape)} vs model {list(model_shape)}: {why}")


def _encoder_hints(cfg: dict, enc: VisionTransformer) -> list[str]:
    """Settings that differ between the checkpoint's encoder and the model, phrased as what to change."""
    also = " (teacher.model.* for the teacher)"
    hidden = enc.blocks[0].mlp.fc1.out_features if enc.depth else None
    hints = []
    if cfg["embed_dim"] != enc.embed_dim:
        hints.append(
            f"checkpoint width {cfg['embed_dim']} vs model {enc.embed_dim}: set model.arch / model.embed_dim{also}"
        )
    if cfg["depth"] != enc.depth:
        hints.append(f"checkpoint depth {cfg['depth']} vs model {enc.depth}: set model.arch / model.depth{also}")
    if cfg["patch_size"] != enc.patch_size:
        hints.append(f"checkpoint patch size {cfg['patch_size']} vs model {enc.patch_size}: set model.patch_size")
    if cfg["tubelet_size"] != enc.tubelet_size:
        kind = "an image checkpoint (Conv2d patch kernel)" if cfg["tubelet_size"] == 1 else "the checkpoint"
        hints.append(f"{kind} has tubelet {cfg['tubelet_size']} vs model {enc.tubelet_size}: set model.tubelet_size")
    if cfg["in_chans"] != enc.patch_embed.proj.in_channels:
        hints.append(f"checkpoint takes {cfg['in_chans']} input channels vs model {enc.patch_embed.proj.in_channels}")
    if cfg["mlp_ratio"] is not None and hidden and abs(cfg["mlp_ratio"] - hidden / enc.embed_dim) > 1e-6:
        hints.append(
            f"checkpoint MLP ratio {cfg['mlp_ratio']:g} vs model {hidden / enc.embed_dim:g}: set model.mlp_ratio"
        )
    if not cfg["cls_token"] and enc.cls_token is not None:
        hints.append("the checkpoint has no CLS token: set model.cls_token=false")
    return hints


def _fmt_grid(g: tuple[int, int, int]) -> str:
    return f"{g[1]}x{g[2]}" if g[0] == 1 else f"{g[0]}x{g[1]}x{g[2]}"


def _saved_grid(n: int, grid: tuple[int, int, int], pos_grid, key: str) -> tuple[int, int, int]:
    """The (t, h, w) grid of a saved table with n patch rows; only the row count is stored, so guess in this
    order: the model's grid, the model's t with a square frame, the model's frame with another t, one square frame."""
    if pos_grid is not None:
        pos_grid = tuple(int(x) for x in pos_grid)
        if math.prod(pos_grid) != n:
            raise CheckpointError(f"{key}: pos_grid={pos_grid} has {math.prod(pos_grid)} positions, the table {n}")
        return pos_grid
    t, h, w = grid
    if n == t * h * w:
        return grid
    if n % t == 0 and math.isqrt(n // t) ** 2 == n // t:
        return (t, math.isqrt(n // t), math.isqrt(n // t))
    if n % (h * w) == 0:
        return (n // (h * w), h, w)
    if math.isqrt(n) ** 2 == n:
        return (1, math.isqrt(n), math.isqrt(n))
    raise CheckpointError(
        f"{key}: cannot tell the (t, h, w) grid of a saved table with {n} positions for a model grid "
        f"{_fmt_grid(grid)}: pass pos_grid=(t, h, w)"
    )


def resize_pos_table(rows_ND: torch.Tensor, src: tuple[int, int, int], dst: tuple[int, int, int]) -> torch.Tensor:
    """[t*h*w, D] table on grid src -> [t'*h'*w', D] on grid dst.

    Same t: bicubic over (h, w), frame by frame, as MAE's and VideoMAE's `interpolate_pos_embed`
    (align_corners=False). Different t: trilinear over (t, h, w). Computed in fp32.
    """
    D = rows_ND.shape[-1]
    x = rows_ND.float().reshape(*src, D)
    if src[0] == dst[0]:
        x = F.interpolate(x.permute(0, 3, 1, 2), size=dst[1:], mode="bicubic", align_corners=False)
        return x.permute(0, 2, 3, 1).reshape(-1, D)
    x = F.interpolate(x.permute(3, 0, 1, 2).unsqueeze(0), size=dst, mode="trilinear", align_corners=False)
    return x[0].permute(1, 2, 3, 0).reshape(-1, D)


def _encoder_part(
    enc: VisionTransformer,
    state: dict[str, torch.Tensor],
    prefix: str,
    strict: bool,
    pos_grid,
    report: LoadReport,
    model_prefix: str,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Map the checkpoint's encoder onto `enc`. Returns (model tensor -> value to copy, checkpoint keys used);
    copies nothing. Keys under `projection_heads.` belong to the pre-training model and are left to the caller."""
    cfg = infer_encoder_config(state, prefix)
    report.layout = cfg["layout"]
    hints = _encoder_hints(cfg, enc)
    targets = {k: v for k, v in enc.state_dict(keep_vars=True).items() if not k.startswith("projection_heads.")}
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for name, param in targets.items():
        key = prefix + name
        if key in state:
            t = state[key]
            if name == "patch_embed.proj.weight" and t.dim() == 4 and param.dim() == 5 and param.shape[2] == 1:
                # Conv2d [D, C, p, p] over an image == Conv3d [D, C, 1, p, p] over a 1-frame clip.
                t = t.unsqueeze(2)
                report.converted[key] = "conv2d kernel [D, C, p, p] -> conv3d [D, C, 1, p, p]"
            if t.shape != param.shape:
                raise _shape_error(key, state[key].shape, param.shape, hints)
            new[name] = t
            used.add(key)
            continue
        blk, _, which = name.rpartition(".")
        if which in ("q_bias", "v_bias"):
            full = f"{prefix}{blk}.qkv.bias"
            D = param.shape[0]
            if full in state:
                b = state[full]
                if b.shape != (3 * D,):
                    raise _shape_error(full, b.shape, (3 * D,), hints)
                # MAE (timm) keeps a full qkv bias; ours, as VideoMAE's, has no key bias. Dropping it is exact:
                # for query i the logits are q_i . (k_j + b_k) = q_i . k_j + q_i . b_k, and q_i . b_k is the
                # same for every key j, so softmax over j (and therefore the output) does not change.
                new[name] = b[:D] if which == "q_bias" else b[2 * D :]
                used.add(full)
                report.converted[full] = _KEY_BIAS_NOTE
                continue
            if f"{prefix}{blk}.qkv.weight" in state:  # built with qkv_bias=False: no bias is a zero bias
                new[name] = torch.zeros_like(param)
                report.converted[model_prefix + name] = "no qkv bias in the checkpoint -> zero q_bias, v_bias (exact)"
                continue
        if name.startswith("norm.") and prefix + "fc_norm.weight" in state:
            report.missing.append(model_prefix + name)  # a layout that never has it: kept, not an error
            continue
        missing.append(name)

    # Position table: MAE saves one (2-D sincos, with a CLS row); VideoMAE re-makes its 1-D table, so the
    # model's own sincos table is kept when the file has none.
    pos_key = prefix + "pos_embed"
    if pos_key in state:
        saved = state[pos_key]
        table = saved[0] if saved.dim() == 3 and saved.shape[0] == 1 else saved
        n_cls = 1 if prefix + "cls_token" in state else 0
        if table.dim() != 2 or table.shape[1] != enc.embed_dim or table.shape[0] <= n_cls:
            shape = [1, n_cls + enc.num_patches, enc.embed_dim]
            raise _shape_error(pos_key, saved.shape, shape, hints)
        src = _saved_grid(table.shape[0] - n_cls, enc.grid, pos_grid, pos_key)
        rows = table[n_cls:]
        if src == enc.grid:
            new["pos_embed"], msg = rows, "copied into the pos_embed buffer (replaces the sincos table)"
        else:
            new["pos_embed"] = resize_pos_table(rows, src, enc.grid)
            how = "bicubic per frame" if src[0] == enc.grid[0] else "trilinear over (t, h, w)"
            msg = f"pos_embed interpolated {_fmt_grid(src)} -> {_fmt_grid(enc.grid)} ({how})"
        if n_cls and enc.cls_token is not None:
            new["cls_pos"], msg = table[:1].reshape(1, 1, -1), msg + "; CLS row -> cls_pos"
        elif n_cls:
            msg += "; CLS row dropped (the encoder has no CLS token)"
        report.converted[pos_key] = msg
        used.add(pos_key)

    if prefix + "cls_token" in state and enc.cls_token is None:
        report.notes.append(
            "cls_token ignored: the encoder has no CLS token (model.cls_token=false). The original model's patch "
            "tokens attended to it, so outputs differ from it; set model.cls_token=true to keep it"
        )

    # Checkpoint keys in the encoder's namespace that nothing used.
    local = [k[len(prefix) :] for k in state if k.startswith(prefix) and k not in used]
    extra_struct = [k for k in local if k.startswith(("blocks.", "patch_embed.", "norm."))]
    if any(k.startswith(("fc_norm.", "head.")) for k in local):
        report.notes.append("fc_norm.* / head.*: the fine-tuned classifier, not part of the encoder")
    if "norm.weight" in targets and prefix + "fc_norm.weight" in state and prefix + "norm.weight" not in state:
        report.notes.append("norm.* kept at init: a mean-pooling fine-tune file has fc_norm (applied after pooling)")
    if strict and (missing or extra_struct):
        what = []
        if missing:
            what.append(f"model keys missing from the checkpoint: {_group(missing)}")
        if extra_struct:
            what.append(f"checkpoint encoder keys the model has no place for: {_group(extra_struct)}")
        raise CheckpointError(
            f"{'; '.join(what)}{': ' + '; '.join(hints) if hints else ''} (strict=False loads the rest and keeps "
            "the missing ones at init)"
        )
    if extra_struct:
        report.notes.append(f"encoder keys without a place in the model ignored: {_group(extra_struct)}")
    report.missing += [model_prefix + k for k in missing]
    return new, used


def _copy(module: nn.Module, new: Mapping[str, torch.Tensor], report: LoadReport, model_prefix: str) -> None:
    """Copy after every check has passed; pos_embed / cls_pos are non-persistent buffers, reached directly."""
    targets = dict(module.named_parameters())
    targets.update(module.named_buffers())
    with torch.no_grad():
        for name, value in new.items():
            targets[name].copy_(value)
            report.loaded.append(model_prefix + name)


def load_encoder(
    encoder: VisionTransformer, src, *, prefix: str | None = None, strict: bool = True, pos_grid=None, source=None
) -> LoadReport:
    """Load a teacher (or a fine-tuning init) from a fine-tune, pre-training (`encoder.` prefix, auto-detected)
    or MAE image checkpoint. src: a path, a loaded checkpoint dict (amd_fast reads its files with
    `checkpoint.read_checkpoint`, which checks them) or a state dict; source: the file a dict came from (the report).

    Missing encoder keys raise unless strict=False (then they keep their init and are reported), except ones the
    layout never has (`norm.*` of a mean-pooling fine-tune file). pos_grid: the (t, h, w) grid of a saved position
    table, needed only when its row count alone does not tell (see `_saved_grid`).
    """
    state = read_state_dict(src)
    report = LoadReport(source=str(source or _describe(src)))
    prefix = _detect_prefix(state) if prefix is None else prefix
    new, used = _encoder_part(encoder, state, prefix, strict, pos_grid, report, model_prefix="")
    _copy(encoder, new, report, model_prefix="")
    report.ignored = [k for k in state if k not in used]
    if any(k.startswith(prefix + "projection_heads.") for k in report.ignored):
        report.notes.append("encoder.projection_heads.*: AMD's student-side projections, not encoder weights")
    if prefix and any(k.startswith(_PRETRAIN_PARTS) for k in report.ignored):
        report.notes.append("decoder / encoder_to_decoder / mask_token / generators: pre-training parts, not encoder")
    if not prefix and any(k.startswith(_MAE_DECODER) for k in report.ignored):
        report.notes.append("decoder_* / mask_token: the MAE pre-training decoder, not encoder weights")
    log.info(report.summary())
    return report


# ---------------------------------------------------------------------------------------------------------------
# pre-training model


def _pretrain_hints(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    hints = []
    e2d = state.get("encoder_to_decoder.weight")
    if e2d is not None and e2d.shape[0] != model.encoder_to_decoder.out_features:
        hints.append(
            f"checkpoint decoder width {e2d.shape[0]} vs model {model.encoder_to_decoder.out_features}: "
            "set decoder.embed_dim"
        )
    head = state.get("decoder.head.weight")
    if head is not None and head.shape[0] != model.decoder.head.out_features:
        hints.append(
            f"checkpoint decoder predicts {head.shape[0]} values per token vs model "
            f"{model.decoder.head.out_features}: patch_size / tubelet_size differ"
        )
    ph, mine = (
        state.get("encoder.projection_heads.0.weight"),
        model.state_dict().get("encoder.projection_heads.0.weight"),
    )
    if ph is not None and mine is not None and ph.shape[0] != mine.shape[0]:
        hints.append(f"checkpoint teacher width {ph.shape[0]} vs model {mine.shape[0]}: set teacher.model.arch")
    return hints


def load_pretrain(model: nn.Module, src, strict: bool = False, *, pos_grid=None, source=None) -> LoadReport:
    """Initialize a `PretrainModel` (the student) from a VideoMAE / AMD pre-training file: everything that matches.
    src, source: as `load_encoder`'s.

    The encoder part goes through `load_encoder`'s conversions. `generators.{k}.norm.*` is ignored (unused in AMD's
    reference); `generators.{k}.mask_token` is never in AMD's files and stays at its init (reported missing, never
    an error). A fine-tune or MAE file initializes only the encoder. strict=True raises on any other missing key.
    """
    state = read_state_dict(src)
    report = LoadReport(source=str(source or _describe(src)))
    prefix = _detect_prefix(state)
    new, used = _encoder_part(model.encoder, state, prefix, strict, pos_grid, report, model_prefix="encoder.")
    new = {"encoder." + k: v for k, v in new.items()}
    hints = _pretrain_hints(model, state)
    missing = []
    for name, param in model.state_dict(keep_vars=True).items():
        if name.startswith("encoder.") and not name.startswith("encoder.projection_heads."):
            continue  # done by _encoder_part
        if prefix and name in state:  # only a pre-training file has these parts (MAE's decoder is named apart)
            if state[name].shape != param.shape:
                raise _shape_error(name, state[name].shape, param.shape, hints)
            new[name] = state[name]
            used.add(name)
        elif re.fullmatch(r"generators\.\d+\.mask_token", name):
            report.missing.append(name)
        else:
            missing.append(name)
    report.ignored = [k for k in state if k not in used]
    if any(k.startswith("mask_token") or k.startswith("decoder_") for k in report.ignored) and not prefix:
        report.notes.append("decoder_* / mask_token: MAE's decoder (other names, a biased decoder_embed) not mapped")
    if any(re.match(r"generators\.\d+\.mask_token$", k) for k in report.missing):
        report.notes.append("generators.#.mask_token: not in AMD's files (kept in a plain list there): kept at init")
    if any(re.match(r"generators\.\d+\.norm\.", k) for k in report.ignored):
        report.notes.append("generators.#.norm.*: unused in AMD's reference (the generator output is not normed)")
    extra = [k for k in report.ignored if re.match(r"(decoder|generators\.\d+)\.blocks\.\d+\.", k)]
    if strict and (missing or extra):
        raise CheckpointError(
            f"model keys missing from the checkpoint: {_group(missing) or '-'}; checkpoint keys without a place in "
            f"the model: {_group(extra) or '-'}{': ' + '; '.join(hints) if hints else ''} (strict=False loads the rest)"
        )
    report.missing += missing
    _copy(model, new, report, model_prefix="")
    log.info(report.summary())
    return report

"""The fine-tuning classifier (METHOD.md section 7) and its checkpoint layout.

Shape legend: B batch (clips or views), N tokens, D width, C classes.

VideoMAE's fine-tuning model with mean pooling: the encoder's blocks, no final norm on the tokens, the mean over
tokens, `fc_norm` (LayerNorm), a linear `head` whose init is scaled by 1e-3. Its state dict is the VideoMAE / AMD
fine-tune layout (`patch_embed.*`, `blocks.*`, `fc_norm.*`, `head.*`), so official evaluation scripts read the
files amd_fast writes and amd_fast reads theirs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from amd_fast.models.checkpoint_io import LoadReport, load_encoder, read_state_dict
from amd_fast.models.vit import LN_EPS, VisionTransformer, no_weight_decay_names, patchify

log = logging.getLogger(__name__)


class VideoClassifier(nn.Module):
    """encoder blocks -> mean over tokens -> fc_norm -> head."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, head_init_scale: float = 1e-3):
        super().__init__()
        encoder.norm = nn.Identity()  # mean pooling: VideoMAE normalizes the pooled feature (fc_norm) instead
        self.encoder = encoder
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=LN_EPS)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)  # VideoMAE's init_scale: start near the uniform prediction

    def features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Pooled, normed feature [B, D] (what the head reads)."""
        enc = self.encoder
        x, _ = enc.forward_features(patchify(video_BCTHW, enc.patch_size, enc.tubelet_size))
        return self.fc_norm(x[:, enc.num_prefix :].mean(dim=1))

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(video_BCTHW))  # logits [B, C]

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The VideoMAE fine-tune layout: encoder keys without prefix, then fc_norm.* and head.*."""
        out = {k.removeprefix("encoder."): v for k, v in self.state_dict().items()}
        return {k: v for k, v in out.items() if not k.startswith("projection_heads.")}


def layer_id(name: str, depth: int) -> int:
    """BEiT / VideoMAE layer ids for layer-wise LR decay: embeddings 0, block i -> i + 1, the rest depth + 1."""
    name = name.removeprefix("encoder.")
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: VideoClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups per (layer, decay or not), each with `lr_scale` = layer_decay ** (depth + 1 - layer id).
    No weight decay where pre-training has none (`no_weight_decay_names`)."""
    depth = model.encoder.depth
    skip = no_weight_decay_names(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        no_decay = name in skip
        wd = 0.0 if no_decay else weight_decay
        g = groups.setdefault(
            (lid, no_decay), {"params": [], "weight_decay": wd, "lr_scale": layer_decay ** (depth + 1 - lid)}
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def load_classifier(model: VideoClassifier, src) -> LoadReport:
    """Initialize from a pre-training file (amd_fast, VideoMAE, AMD, MAE: the encoder) or a fine-tune file
    (VideoMAE / AMD / amd_fast: the encoder, and fc_norm / head where their shapes match)."""
    state = read_state_dict(src)
    # The pooled classifier has no token norm (VideoMAE drops it too, and starts fc_norm fresh).
    dropped = [k for k in state if k.removeprefix("encoder.").startswith("norm.")]
    state = {k: v for k, v in state.items() if k not in dropped}
    report = load_encoder(model.encoder, state)
    if dropped:
        log.info("%s: %s not used: mean pooling normalizes the pooled feature with fc_norm", report.source,
                 ", ".join(dropped))  # fmt: skip
    for part in ("fc_norm", "head"):
        mod = getattr(model, part)
        sub = {k.removeprefix(part + "."): v for k, v in state.items() if k.startswith(part + ".")}
        if not sub:
            continue
        if any(sub[k].shape != v.shape for k, v in mod.state_dict().items() if k in sub):
            log.warning("%s: %s shapes %s differ from the model's (another class count?): kept at init",
                        report.source, part, {k: tuple(v.shape) for k, v in sub.items()})  # fmt: skip
            continue
        mod.load_state_dict(sub)
        log.info("%s: loaded %s (%s)", report.source, part, ", ".join(sorted(sub)))
    return report

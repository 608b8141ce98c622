"""checkpoint_io against independent re-implementations of the official models (METHOD.md section 8).

The reference encoders below are written from the official code, not from amd_fast: VideoMAE's
(`modeling_finetune.py`: Conv3d tubelet embedding, q/v biases concatenated around a zero key bias, explicit
softmax attention, 1-D `get_sinusoid_encoding_table`) and MAE's (`models_mae.py`: Conv2d patch embedding,
CLS token, full timm qkv bias, saved 2-D `get_2d_sincos_pos_embed` table with a zero CLS row). Their weights are
random (not an init), the key bias included, so a wrong mapping or a non-exact conversion shows in the outputs.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amd_fast.models import checkpoint_io
from amd_fast.models.checkpoint_io import (
    CheckpointError,
    infer_encoder_config,
    load_encoder,
    load_pretrain,
    read_state_dict,
)
from amd_fast.models.pretrain import PretrainModel
from amd_fast.models.vit import VisionTransformer, patchify

D, DEPTH, HEADS, P, U = 32, 2, 2, 4, 2  # width, depth, heads, patch, tubelet of the tiny test encoders
ATOL = 1e-5

# ---------------------------------------------------------------------------------------------------------------
# reference implementations (official code, reduced to what a forward needs)


def ref_sinusoid_table(n_position: int, d_hid: int) -> torch.Tensor:
    """VideoMAE `get_sinusoid_encoding_table` -> [1, n_position, d_hid]."""

    def angle_vec(position):
        return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]

    table = np.array([angle_vec(i) for i in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float).unsqueeze(0)


def ref_2d_sincos(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """MAE `get_2d_sincos_pos_embed` -> [(1 +) grid_size**2, embed_dim]."""

    def sincos_1d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))  # w first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([sincos_1d(embed_dim // 2, grid[0]), sincos_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


class RefAttention(nn.Module):
    """timm / VideoMAE attention. full_bias: timm's `qkv.bias` (MAE); else VideoMAE's q_bias, v_bias."""

    def __init__(self, dim, num_heads, full_bias):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=full_bias)
        if not full_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        if self.qkv.bias is None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
            qkv = F.linear(x, self.qkv.weight, qkv_bias)
        else:
            qkv = self.qkv(x)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads, full_bias=False, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_heads, full_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.proj = conv

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefVideoMAE(nn.Module):
    """VideoMAE encoder. forward(video, mask) gathers the visible tokens as VideoMAE does: x[~mask]."""

    def __init__(self, img_size=16, num_frames=4, dim=D, depth=DEPTH, heads=HEADS, patch=P, tubelet=U):
        super().__init__()
        k = (tubelet, patch, patch)
        self.patch_embed = RefPatchEmbed(nn.Conv3d(3, dim, kernel_size=k, stride=k))
        n = (num_frames // tubelet) * (img_size // patch) ** 2
        self.pos_embed = ref_sinusoid_table(n, dim)  # a plain attribute: not saved, as in VideoMAE
        self.blocks = nn.ModuleList([RefBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, video, mask=None):
        """-> (final-normed output, raw output of every block)."""
        x = self.patch_embed(video) + self.pos_embed
        if mask is not None:
            x = x[~mask].reshape(x.shape[0], -1, x.shape[-1])
        feats = []
        for blk in self.blocks:
            x = blk(x)
            feats.append(x)
        return self.norm(x), feats


class RefMAE(nn.Module):
    """MAE image encoder (`forward_encoder`): ids_keep gathers the kept tokens, in MAE's shuffled order."""

    def __init__(self, img_size=16, dim=D, depth=DEPTH, heads=HEADS, patch=P):
        super().__init__()
        self.patch_embed = RefPatchEmbed(nn.Conv2d(3, dim, kernel_size=patch, stride=patch))
        grid = img_size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = torch.from_numpy(ref_2d_sincos(dim, grid, cls_token=True)).float().unsqueeze(0)
        self.pos_embed = nn.Parameter(table, requires_grad=False)  # saved, as in MAE
        self.blocks = nn.ModuleList([RefBlock(dim, heads, full_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, img, ids_keep=None):
        x = self.patch_embed(img) + self.pos_embed[:, 1:, :]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def randomize(module: nn.Module, skip=("pos_embed",)) -> nn.Module:
    """Random weights, not an init: LayerNorm scales near 1, everything else N(0, 0.2) (biases, key bias too)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in skip:
                continue
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    return module.eval()


def block_state(prefix: str, dim: int, heads: int = 1) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in randomize(RefBlock(dim, heads)).state_dict().items()}


def amd_decoder_state(enc_dim, dec_dim, out_dim, depth=2) -> dict[str, torch.Tensor]:
    """The non-encoder part of a VideoMAE / AMD pre-training file."""
    sd = {"encoder_to_decoder.weight": torch.randn(dec_dim, enc_dim), "mask_token": torch.randn(1, 1, dec_dim)}
    for i in range(depth):
        sd.update(block_state(f"decoder.blocks.{i}.", dec_dim))
    sd.update({"decoder.norm.weight": torch.rand(dec_dim) + 0.5, "decoder.norm.bias": torch.randn(dec_dim)})
    sd.update({"decoder.head.weight": torch.randn(out_dim, dec_dim), "decoder.head.bias": torch.randn(out_dim)})
    return sd


def mae_decoder_state(enc_dim, dec_dim=16, n=16, patch=P) -> dict[str, torch.Tensor]:
    sd = {"decoder_embed.weight": torch.randn(dec_dim, enc_dim), "decoder_embed.bias": torch.randn(dec_dim)}
    sd.update({"mask_token": torch.randn(1, 1, dec_dim), "decoder_pos_embed": torch.randn(1, 1 + n, dec_dim)})
    sd.update(
        {k.replace("decoder.blocks", "decoder_blocks"): v for k, v in block_state("decoder.blocks.0.", 16).items()}
    )
    sd.update({"decoder_norm.weight": torch.ones(dec_dim), "decoder_norm.bias": torch.zeros(dec_dim)})
    sd.update(
        {"decoder_pred.weight": torch.randn(3 * patch**2, dec_dim), "decoder_pred.bias": torch.randn(3 * patch**2)}
    )
    return sd


def ours(img_size=16, num_frames=4, dim=D, depth=DEPTH, tubelet=U, cls_token=False) -> VisionTransformer:
    return VisionTransformer(
        img_size=img_size,
        num_frames=num_frames,
        patch_size=P,
        tubelet_size=tubelet,
        embed_dim=dim,
        depth=depth,
        num_heads=HEADS,
        cls_token=cls_token,
    ).eval()


def save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# 1. VideoMAE layouts -> our encoder, same outputs


@pytest.mark.parametrize("layout", ["finetune", "pretrain", "module", "ddp_top_level"])
def test_videomae_layouts_match_reference(tmp_path, caplog, layout):
    ref = randomize(RefVideoMAE())
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    extra = {}
    if layout == "finetune":
        extra = {"head.weight": torch.randn(10, D), "head.bias": torch.randn(10)}
        # the official scripts also save their argparse namespace and the epoch next to the weights
        obj = {"model": {**sd, **extra}, "epoch": 3, "args": argparse.Namespace(model="vit_tiny", lr=1e-3)}
    elif layout == "pretrain":
        extra = amd_decoder_state(D, 16, 3 * U * P * P)
        obj = {"model": {**{"encoder." + k: v for k, v in sd.items()}, **extra}}
    elif layout == "module":
        obj = {"module": sd}
    else:
        obj = {"module." + k: v for k, v in sd.items()}
    path = save(tmp_path, obj)

    enc = ours()
    with caplog.at_level(logging.INFO, logger="amd_fast"):
        report = load_encoder(enc, path)
    assert "weights_only" not in caplog.text  # the Namespace is allow-listed: no unsafe fallback
    assert "loaded" in caplog.text and str(path) in caplog.text  # the summary is logged

    video = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc(video), ref(video)[0], atol=ATOL, rtol=0)
    assert sorted(report.loaded) == sorted(enc.state_dict())  # every encoder tensor came from the file
    assert report.missing == [] and report.converted == {}  # same names, no conversion needed
    assert sorted(report.ignored) == sorted(extra)
    expected_layout = {"pretrain": "videomae_pretrain"}.get(layout, "videomae_finetune")
    assert report.layout == expected_layout


# ---------------------------------------------------------------------------------------------------------------
# 2. MAE image layout with CLS


def test_mae_image_layout_matches_reference(tmp_path):
    ref = randomize(RefMAE())
    assert ref.blocks[0].attn.qkv.bias[D : 2 * D].abs().min() > 0  # a real key bias, which must not matter
    path = save(tmp_path, {"model": {**ref.state_dict(), **mae_decoder_state(D)}})

    enc = ours(num_frames=1, tubelet=1, cls_token=True)
    report = load_encoder(enc, path)
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc(img.unsqueeze(2)), ref(img), atol=ATOL, rtol=0)

    assert report.layout == "mae_image"
    assert "conv2d kernel" in report.converted["patch_embed.proj.weight"]
    assert report.converted["blocks.1.attn.qkv.bias"].startswith("qkv.bias -> q_bias, v_bias (key bias dropped")
    assert "CLS row -> cls_pos" in report.converted["pos_embed"]
    assert {"cls_token", "pos_embed", "cls_pos", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= set(report.loaded)
    assert report.missing == []
    assert set(report.ignored) == set(mae_decoder_state(D))  # the MAE decoder, nothing else
    torch.testing.assert_close(enc.pos_embed, torch.from_numpy(ref_2d_sincos(D, 4)).float())


def test_mae_into_encoder_without_cls_drops_it_with_a_note(tmp_path):
    ref = randomize(RefMAE())
    enc = ours(num_frames=1, tubelet=1, cls_token=False)
    report = load_encoder(enc, {"model": ref.state_dict()})
    assert "cls_token" in report.ignored
    assert any("cls_token ignored" in n for n in report.notes)
    assert "CLS row dropped" in report.converted["pos_embed"]
    torch.testing.assert_close(enc.pos_embed, ref.pos_embed[0, 1:])


# ---------------------------------------------------------------------------------------------------------------
# 3. Position tables saved for another grid


def test_pos_table_interpolated_to_bigger_image_grid(tmp_path):
    ref = randomize(RefMAE(img_size=16))
    with torch.no_grad():
        ref.pos_embed.normal_()  # random rows, CLS row included, so the exact mapping is visible
    saved = ref.pos_embed.detach().clone()
    enc = ours(img_size=32, num_frames=1, tubelet=1, cls_token=True)  # 8x8 grid
    report = load_encoder(enc, save(tmp_path, {"model": ref.state_dict()}))

    assert report.converted["pos_embed"].startswith("pos_embed interpolated 4x4 -> 8x8")
    grid = saved[0, 1:].reshape(1, 4, 4, D).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(enc.pos_embed, expected.permute(0, 2, 3, 1).reshape(64, D), atol=0, rtol=0)
    torch.testing.assert_close(enc.cls_pos, saved[:, :1])
    # end to end: the MAE model at 32x32 holding the interpolated table gives the same output
    big = RefMAE(img_size=32)
    big.load_state_dict({**ref.state_dict(), "pos_embed": torch.cat((saved[:, :1], enc.pos_embed[None]), dim=1)})
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(img.unsqueeze(2)), big.eval()(img), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("img_size", "num_frames", "mode"),
    [(32, 4, "bicubic"), (16, 8, "trilinear")],  # saved grid 2x4x4 -> 2x8x8 (per frame) / 4x4x4 (over t)
)
def test_video_pos_table_interpolated(img_size, num_frames, mode):
    ref = randomize(RefVideoMAE())
    table = torch.randn(1, 32, D)  # a learnable table of a 2x4x4 grid (use_learnable_pos_emb=True)
    enc = ours(img_size=img_size, num_frames=num_frames)
    report = load_encoder(enc, {"model": {**ref.state_dict(), "pos_embed": table}})
    rows = table[0].reshape(2, 4, 4, D)
    if mode == "bicubic":
        exp = F.interpolate(rows.permute(0, 3, 1, 2), size=(8, 8), mode="bicubic", align_corners=False)
        exp = exp.permute(0, 2, 3, 1).reshape(-1, D)
        assert "2x4x4 -> 2x8x8 (bicubic per frame)" in report.converted["pos_embed"]
    else:
        exp = F.interpolate(rows.permute(3, 0, 1, 2)[None], size=(4, 4, 4), mode="trilinear", align_corners=False)
        exp = exp[0].permute(1, 2, 3, 0).reshape(-1, D)
        assert "2x4x4 -> 4x4x4 (trilinear" in report.converted["pos_embed"]
    torch.testing.assert_close(enc.pos_embed, exp, atol=0, rtol=0)


def test_ambiguous_saved_grid_needs_pos_grid():
    ref = randomize(RefVideoMAE())
    state = {"model": {**ref.state_dict(), "pos_embed": torch.randn(1, 32, D)}}
    enc = ours(img_size=32, num_frames=8)  # 4x8x8: 32 saved rows could be 2x4x4, 8x2x2, ...
    with pytest.raises(CheckpointError, match="pos_grid"):
        load_encoder(enc, state)
    report = load_encoder(enc, state, pos_grid=(2, 4, 4))
    assert "2x4x4 -> 4x8x8 (trilinear" in report.converted["pos_embed"]


def test_without_saved_table_the_sincos_table_is_kept():
    enc = ours()
    before = enc.pos_embed.clone()
    load_encoder(enc, randomize(RefVideoMAE()).state_dict())
    torch.testing.assert_close(enc.pos_embed, before, atol=0, rtol=0)
    torch.testing.assert_close(enc.pos_embed, ref_sinusoid_table(32, D)[0])  # VideoMAE's own table


# ---------------------------------------------------------------------------------------------------------------
# 4. AMD pre-training file -> PretrainModel


def amd_pretrain_file(dec_dim=32, teacher_dim=48, num_aligned=2, gen_depth=2) -> dict[str, torch.Tensor]:
    """An AMD pre-training state, written from the official names (MCG-NJU/AMD models/modeling_pretrain.py)."""
    sd = {"encoder." + k: v for k, v in randomize(RefVideoMAE()).state_dict().items()}
    for k in range(num_aligned):
        sd[f"encoder.projection_heads.{k}.weight"] = torch.randn(teacher_dim, D)
    sd.update(amd_decoder_state(D, dec_dim, 3 * U * P * P))
    for k in range(num_aligned):
        for j in range(gen_depth):
            sd.update(block_state(f"generators.{k}.blocks.{j}.", teacher_dim))
        sd[f"generators.{k}.norm.weight"] = torch.rand(teacher_dim)  # unused by AMD's forward, but saved
        sd[f"generators.{k}.norm.bias"] = torch.randn(teacher_dim)
    return sd


def amd_model(dec_dim=32, teacher_dim=48) -> PretrainModel:
    return PretrainModel(ours(), dec_dim, 2, 2, teacher_dim=teacher_dim, num_aligned=2, generator_depth=2)


@pytest.mark.parametrize("strict", [False, True])
def test_amd_pretrain_file_into_pretrain_model(tmp_path, strict):
    sd = amd_pretrain_file()
    model = amd_model()
    tokens = [model.generators[k].mask_token.detach().clone() for k in range(2)]
    report = load_pretrain(model, save(tmp_path, {"model": sd}), strict=strict)

    mask_tokens = ["generators.0.mask_token", "generators.1.mask_token"]
    after = model.state_dict()
    for key, value in after.items():
        if key in mask_tokens:
            continue
        assert torch.equal(value, sd[key]), key
    for k in range(2):  # not in AMD's files: kept at init
        assert torch.equal(model.generators[k].mask_token, tokens[k])
    assert sorted(report.loaded) == sorted(k for k in after if k not in mask_tokens)
    assert report.missing == mask_tokens
    norms = [f"generators.{k}.norm.{w}" for k in range(2) for w in ("weight", "bias")]
    assert sorted(report.ignored) == sorted(norms)
    assert any("unused in AMD's reference" in n for n in report.notes)
    assert "generators.#.mask_token" in report.summary()


def test_pretrain_file_as_teacher_ignores_training_parts():
    sd = amd_pretrain_file()
    enc = ours()
    report = load_encoder(enc, sd)
    assert report.layout == "videomae_pretrain" and report.missing == []
    assert sorted(report.loaded) == sorted(enc.state_dict())
    assert {"encoder.projection_heads.0.weight", "encoder_to_decoder.weight", "generators.1.norm.bias"} <= set(
        report.ignored
    )


def test_load_pretrain_from_encoder_only_file_reports_the_rest_missing():
    ref = randomize(RefVideoMAE())
    model = amd_model()
    report = load_pretrain(model, {"model": ref.state_dict()})
    assert torch.equal(model.encoder.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)
    assert "encoder_to_decoder.weight" in report.missing and "decoder.head.weight" in report.missing
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrain(amd_model(), {"model": ref.state_dict()}, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# 5. Mismatches fail clearly, and leave the model as it was


def test_wrong_width_raises_with_both_shapes():
    ref = randomize(RefVideoMAE(dim=64))
    enc = ours(dim=32)
    before = snapshot(enc)
    with pytest.raises(ValueError) as err:
        load_encoder(enc, {"model": ref.state_dict()})
    msg = str(err.value)
    assert "[64, 3, 2, 4, 4]" in msg and "[32, 3, 2, 4, 4]" in msg
    assert "patch_embed.proj.weight" in msg and "width 64 vs model 32" in msg and "embed_dim" in msg
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_wrong_decoder_width_raises_with_hint():
    with pytest.raises(
        ValueError,
        match=r"checkpoint shape \[.*16\] vs model \[.*32\].*decoder width 16 vs model 32: set decoder.embed_dim",
    ):
        load_pretrain(amd_model(dec_dim=32), amd_pretrain_file(dec_dim=16))


def test_image_kernel_into_video_model_raises_with_tubelet_hint():
    with pytest.raises(ValueError, match=r"\[32, 3, 4, 4\] vs model \[32, 3, 2, 4, 4\].*tubelet"):
        load_encoder(ours(), randomize(RefMAE()).state_dict())


def test_missing_keys_raise_unless_not_strict():
    sd = randomize(RefVideoMAE()).state_dict()
    del sd["blocks.1.mlp.fc1.weight"]
    enc = ours()
    before = snapshot(enc)
    with pytest.raises(CheckpointError, match=r"blocks\.#\.\*"):
        load_encoder(enc, sd)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    report = load_encoder(enc, sd, strict=False)
    assert report.missing == ["blocks.1.mlp.fc1.weight"]
    assert torch.equal(enc.blocks[1].mlp.fc1.weight, before["blocks.1.mlp.fc1.weight"])
    assert torch.equal(enc.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


def test_deeper_checkpoint_raises_with_depth_hint():
    ref = randomize(RefVideoMAE(depth=3))
    with pytest.raises(CheckpointError, match="depth 3 vs model 2"):
        load_encoder(ours(), ref.state_dict())
    report = load_encoder(ours(), ref.state_dict(), strict=False)
    assert any("blocks.2" in k for k in report.ignored)


def test_cls_model_with_videomae_file_asks_for_cls_token_false():
    with pytest.raises(CheckpointError, match="cls_token=false"):
        load_encoder(ours(cls_token=True), randomize(RefVideoMAE()).state_dict())


# ---------------------------------------------------------------------------------------------------------------
# 6. Visible-token forward with loaded weights (the teacher's and a masked student's inference)


def test_visible_token_forward_matches_reference_videomae():
    ref = randomize(RefVideoMAE())
    enc = ours()
    load_encoder(enc, ref.state_dict())
    B, N, V = 3, 32, 11
    mask = torch.ones(B, N, dtype=torch.bool)  # VideoMAE convention: True = masked
    for b in range(B):
        mask[b, torch.randperm(N)[:V]] = False
    ids = torch.stack([(~mask[b]).nonzero().squeeze(1) for b in range(B)])
    video = torch.randn(B, 3, 4, 16, 16)
    with torch.no_grad():
        out, feats = enc.forward_features(patchify(video, P, U), ids, collect=(1, 2))
        ref_out, ref_feats = ref(video, mask)
        _, early = enc.forward_features(patchify(video, P, U), ids, collect=(1,), stop_after=1)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    for i in (1, 2):  # raw block outputs, as the AMD teacher reads them
        torch.testing.assert_close(feats[i], ref_feats[i - 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(early[1], ref_feats[0], atol=ATOL, rtol=0)


def test_visible_token_forward_matches_reference_mae_with_cls():
    ref = randomize(RefMAE())
    enc = ours(num_frames=1, tubelet=1, cls_token=True)
    load_encoder(enc, ref.state_dict())
    B, N, V = 3, 16, 5
    ids_keep = torch.argsort(torch.rand(B, N), dim=1)[:, :V]  # MAE's random_masking: shuffled order
    img = torch.randn(B, 3, 16, 16)
    with torch.no_grad():
        out, _ = enc.forward_features(patchify(img.unsqueeze(2), P, 1), ids_keep)
        torch.testing.assert_close(out, ref(img, ids_keep), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# other layouts and helpers


def test_mean_pooling_finetune_file_keeps_norm_at_init():
    ref = randomize(RefVideoMAE())
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("norm.")}
    sd.update({"fc_norm.weight": torch.rand(D), "fc_norm.bias": torch.randn(D), "head.weight": torch.randn(5, D)})
    enc = ours()
    report = load_encoder(enc, {"model": sd})  # strict: norm.* is not an error, the layout never has it
    assert sorted(report.missing) == ["norm.bias", "norm.weight"]
    assert {"fc_norm.weight", "fc_norm.bias", "head.weight"} == set(report.ignored)
    video = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        _, feats = enc.forward_features(patchify(video, P, U), collect=(2,))
        torch.testing.assert_close(feats[2], ref(video)[1][-1], atol=ATOL, rtol=0)


def test_checkpoint_without_qkv_bias_gets_zero_biases():
    sd = {k: v for k, v in randomize(RefVideoMAE()).state_dict().items() if not k.endswith(("q_bias", "v_bias"))}
    enc = ours()
    with torch.no_grad():
        for blk in enc.blocks:
            blk.attn.q_bias.fill_(1.0)
    report = load_encoder(enc, sd)
    assert all(
        torch.equal(b.attn.q_bias, torch.zeros(D)) and torch.equal(b.attn.v_bias, torch.zeros(D)) for b in enc.blocks
    )
    assert "zero q_bias, v_bias" in report.converted["blocks.0.attn.q_bias"]


class _Opaque:  # a pickled object weights_only refuses
    pass


def test_read_state_dict_wrappers_and_no_unsafe_fallback(tmp_path, caplog):
    """weights_only=True always: a file that holds other objects is refused, naming it and the per-file switch;
    only a file the user lists in train.unsafe_pickle is unpickled. Random bytes and a cut-short file are named."""
    w = torch.randn(3)
    assert read_state_dict({"state_dict": {"module._orig_mod.a": w, "step": 3}}) == {"a": w}
    assert read_state_dict({"model": {"module": {"a": w}}}) == {"a": w}
    assert read_state_dict({"module.a": w}) == {"a": w}
    path = save(tmp_path, {"model": {"a": w}, "extra": _Opaque()})
    with pytest.raises(CheckpointError, match=rf"{path}: not a checkpoint of tensors.*train.unsafe_pickle"):
        read_state_dict(path)
    try:
        checkpoint_io.trust([str(path)])
        with caplog.at_level(logging.WARNING, logger="amd_fast"):
            assert torch.equal(read_state_dict(path)["a"], w)
        assert "weights_only=False" in caplog.text
    finally:
        checkpoint_io.trust([])
    junk = tmp_path / "download.pth"
    junk.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(CheckpointError, match=rf"{junk}: "):
        read_state_dict(junk)
    ok = save(tmp_path, {"model": {"a": w}}, name="ok.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(ok.read_bytes()[: ok.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{cut}: cannot be read"):
        read_state_dict(cut)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda: {"model": randomize(RefVideoMAE()).state_dict()},
            {"layout": "videomae_finetune", "tubelet_size": 2, "cls_token": False, "qkv_bias": "q_v"},
        ),
        (
            amd_pretrain_file,
            {"layout": "videomae_pretrain", "tubelet_size": 2, "prefix": "encoder.", "final_norm": "norm"},
        ),
        (
            lambda: randomize(RefMAE()).state_dict(),
            {"layout": "mae_image", "tubelet_size": 1, "cls_token": True, "qkv_bias": "qkv", "pos_embed_rows": 17},
        ),
    ],
)
def test_infer_encoder_config(make, expected):
    cfg = infer_encoder_config(make())
    assert {k: cfg[k] for k in expected} == expected
    assert (cfg["embed_dim"], cfg["depth"], cfg["patch_size"], cfg["mlp_ratio"]) == (D, DEPTH, P, 4.0)

"""Each objective against a small hand-written computation of its formulas (METHOD.md sections 3-5).

The references here use boolean masks and full convolutions (the way the VideoMAE / AMD code does),
not the index gathers, patch-embedding of visible rows only and last-block row skipping of amd_fast.
"""

import pytest
import torch
import torch.nn.functional as F

from amd_fast.config import ObjectiveConfig
from amd_fast.masks import MaskGenerator, collate_masks
from amd_fast.models.pretrain import PretrainModel
from amd_fast.models.vit import VisionTransformer
from amd_fast.objectives import AMDObjective, DMAEObjective, FrozenTeacher, MAEObjective

MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1, 1)
P, U, T, S = 4, 2, 4, 16  # patch, tubelet, frames, size -> grid (2, 4, 4), N = 32


def _enc(dim, depth, heads):
    enc = VisionTransformer(img_size=S, num_frames=T, patch_size=P, tubelet_size=U, embed_dim=dim, depth=depth,
                            num_heads=heads, attn_backend="math").double()  # fmt: skip
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return enc


def _perturb(model):
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)  # non-trivial biases, tokens, norms
    return model


def ref_target(video, ids):
    """Per token: un-normalize, cut [tubelet, p, p, 3], standardize per channel (unbiased std)."""
    x = video * STD + MEAN
    h = w = S // P
    out = []
    for b in range(video.shape[0]):
        rows = []
        for n in ids[b].tolist():
            ti, r = divmod(n, h * w)
            hi, wi = divmod(r, w)
            patch = x[b, :, ti * U : (ti + 1) * U, hi * P : (hi + 1) * P, wi * P : (wi + 1) * P]
            patch = patch.permute(1, 2, 3, 0).reshape(-1, 3)
            patch = (patch - patch.mean(0)) / (patch.std(0, unbiased=True) + 1e-6)
            rows.append(patch.reshape(-1))
        out.append(torch.stack(rows))
    return torch.stack(out)


def ref_encode(enc, video, keep):
    """Conv3d over the whole clip, add positions, boolean-select the kept tokens; all block outputs."""
    tok = F.conv3d(video, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=(U, P, P))
    tok = tok.flatten(2).transpose(1, 2) + enc.pos_embed
    B, _, D = tok.shape
    x = tok[keep].view(B, -1, D)
    feats = {}
    for i, blk in enumerate(enc.blocks):
        x = blk(x)
        feats[i + 1] = x
    return enc.norm(x), feats


def ref_rec_loss(model, video, keep, enc_out):
    """VideoMAE decoder: [x_vis + pos_vis ; mask_token + pos_masked], all rows through every block."""
    B = video.shape[0]
    pos = model.decoder_pos_embed.expand(B, -1, -1)
    Dd = pos.shape[-1]
    x = torch.cat((model.encoder_to_decoder(enc_out) + pos[keep].view(B, -1, Dd),
                   model.mask_token + pos[~keep].view(B, -1, Dd)), dim=1)  # fmt: skip
    for blk in model.decoder.blocks:
        x = blk(x)
    n_masked = int((~keep[0]).sum())
    pred = model.decoder.head(model.decoder.norm(x[:, -n_masked:]))
    ids_masked = torch.stack([(~k).nonzero().squeeze(1) for k in keep])
    return ((pred - ref_target(video, ids_masked)) ** 2).mean()


def _batch(mg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = collate_masks([mg(g) for _ in range(B)])
    batch["video"] = torch.randn(B, 3, T, S, S, dtype=torch.float64)
    return batch


def _keep(ids, N=32):
    keep = torch.zeros(ids.shape[0], N, dtype=torch.bool)
    keep.scatter_(1, ids, True)
    return keep


def test_mae_objective_matches_formula():
    model = _perturb(PretrainModel(_enc(16, 2, 2), 8, 2, 2).double())
    obj = MAEObjective(model, ObjectiveConfig(name="mae"))
    batch = _batch(MaskGenerator((2, 4, 4), "tube", 0.75))
    loss, parts = obj(batch)
    keep = _keep(batch["ids_vis_s"])
    enc_out, _ = ref_encode(model.encoder, batch["video"], keep)
    ref = ref_rec_loss(model, batch["video"], keep, enc_out)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(parts["rec"], loss.detach())


@pytest.mark.parametrize("distance", ["mse", "l1"])
def test_amd_objective_matches_formula(distance):
    s_layers, t_layers = [1, 2], [2, 3]
    teacher_enc = _enc(24, 3, 2)
    model = _perturb(PretrainModel(_enc(16, 2, 2), 8, 2, 2, teacher_dim=24, num_aligned=2, generator_depth=2).double())
    cfg = ObjectiveConfig(name="amd", student_layers=s_layers, teacher_layers=t_layers, w_rec=1.0, w_dir=0.7,
                          w_gen=1.3, distance=distance)  # fmt: skip
    obj = AMDObjective(model, cfg, FrozenTeacher(teacher_enc, t_layers, torch.float64))
    batch = _batch(MaskGenerator((2, 4, 4), "tube", 0.75, 0.5))
    loss, parts = obj(batch)

    dist = (lambda a, b: ((a - b) ** 2).mean()) if distance == "mse" else (lambda a, b: (a - b).abs().mean())
    video, ids_s, ids_d = batch["video"], batch["ids_vis_s"], batch["ids_delta"]
    keep_s, keep_d = _keep(ids_s), _keep(ids_d)
    keep_t = keep_s | keep_d
    enc_out, h = ref_encode(model.encoder, video, keep_s)
    with torch.no_grad():
        _, tf = ref_encode(teacher_enc, video, keep_t)
    B = video.shape[0]
    # teacher rows are in ascending token order over V_t: split them into its V_s and Delta rows
    in_s = torch.stack([keep_s[b][keep_t[b]] for b in range(B)])
    l_dir = l_gen = 0.0
    for k, (ls, lt) in enumerate(zip(s_layers, t_layers)):
        t_vis = tf[lt][in_s].view(B, -1, 24)
        t_delta = tf[lt][~in_s].view(B, -1, 24)
        z = h[ls] @ model.encoder.projection_heads[k].weight.T
        l_dir = l_dir + dist(z, t_vis)
        gen = model.generators[k]
        E = model.teacher_pos_embed.expand(B, -1, -1)
        x = torch.cat((z + E[keep_s].view(B, -1, 24), gen.mask_token + E[keep_d].view(B, -1, 24)), dim=1)
        for blk in gen.blocks:
            x = blk(x)
        l_gen = l_gen + dist(x[:, ids_s.shape[1] :], t_delta)
    l_rec = ref_rec_loss(model, video, keep_s, enc_out)
    ref = l_rec + 0.7 * l_dir / 2 + 1.3 * l_gen / 2
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts["dir"], (l_dir / 2).detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts["gen"], (l_gen / 2).detach(), rtol=1e-10, atol=1e-12)


def test_amd_gradients_reach_generator_mask_tokens_and_not_the_teacher():
    teacher_enc = _enc(24, 2, 2)
    model = PretrainModel(_enc(16, 2, 2), 8, 1, 2, teacher_dim=24, num_aligned=1, generator_depth=2).double()
    cfg = ObjectiveConfig(name="amd", student_layers=[2], teacher_layers=[2])
    obj = AMDObjective(model, cfg, FrozenTeacher(teacher_enc, [2], torch.float64))
    loss, _ = obj(_batch(MaskGenerator((2, 4, 4), "tube", 0.75, 0.5)))
    loss.backward()
    assert model.generators[0].mask_token.grad.abs().sum() > 0  # the reference never trains it
    assert all(p.grad is None and not p.requires_grad for p in teacher_enc.parameters())
    assert not teacher_enc.training


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_dmae_objective_matches_formula(kind):
    teacher_enc = _enc(24, 3, 2)
    model = _perturb(PretrainModel(_enc(16, 2, 2), 8, 2, 2, teacher_dim=24, num_aligned=1, head_kind="linear").double())
    cfg = ObjectiveConfig(name="dmae", student_layers=[2], teacher_layers=[2], dmae_distance=kind)
    teacher = FrozenTeacher(teacher_enc, [2], torch.float64)
    obj = DMAEObjective(model, cfg, teacher)
    batch = _batch(MaskGenerator((2, 4, 4), "tube", 0.75))
    loss, parts = obj(batch)

    keep = _keep(batch["ids_vis_s"])
    enc_out, h = ref_encode(model.encoder, batch["video"], keep)
    with torch.no_grad():
        _, tf = ref_encode(teacher_enc, batch["video"], keep)  # same mask as the student
    head = model.encoder.projection_heads[0]
    z = h[2] @ head.weight.T + head.bias
    nz = z / z.norm(dim=-1, keepdim=True)
    nt = tf[2] / tf[2].norm(dim=-1, keepdim=True)
    l_dist = (nz - nt).abs().mean() if kind == "l1" else ((nz - nt) ** 2).mean()
    ref = ref_rec_loss(model, batch["video"], keep, enc_out) + l_dist
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts["dist"], l_dist.detach(), rtol=1e-10, atol=1e-12)


def test_teacher_stops_after_deepest_aligned_block():
    enc = _enc(24, 4, 2)
    calls = []
    for i, blk in enumerate(enc.blocks):
        blk.register_forward_hook(lambda *_, i=i: calls.append(i))
    teacher = FrozenTeacher(enc, [1, 2], torch.float64)
    teacher.features(torch.randn(1, 32, 3 * U * P * P, dtype=torch.float64), torch.arange(8).unsqueeze(0))
    assert calls == [0, 1]

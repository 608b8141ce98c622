"""Fine-tuning, linear probing, reconstruction grids and the study (issue: fine-tuning and AMD's claim)."""

import json
import math

import pytest
import torch

from amd_fast.build import build_mask_generator, build_student
from amd_fast.config import (
    Config,
    ConfigError,
    DecoderConfig,
    FinetuneRunConfig,
    MaskConfig,
    ModelConfig,
    ObjectiveConfig,
    ProbeRunConfig,
    load_config,
)
from amd_fast.data import build_dataset
from amd_fast.data.video import ClipSampler, view_crops
from amd_fast.finetune import ClassifyTask, mix_batch, smooth_one_hot
from amd_fast.finetune import main as finetune_main
from amd_fast.masks import collate_masks
from amd_fast.models.checkpoint_io import read_state_dict
from amd_fast.models.classifier import VideoClassifier, layer_decay_groups, load_classifier
from amd_fast.models.vit import build_encoder, patchify
from amd_fast.probe import LinearProbe, run_probe
from amd_fast.trainer import NonFiniteLossError, Trainer
from amd_fast.visualize import reconstruct, save_grid, unpatchify

TINY_IMG = {"arch": "custom", "embed_dim": 48, "depth": 2, "num_heads": 2, "patch_size": 7, "tubelet_size": 1}


def ft_config(tmp_path, *overrides):
    base = [
        *(f"model.{k}={v}" for k, v in TINY_IMG.items()),
        "data.dataset=fashion_mnist", "data.input_size=28", "data.num_frames=1", "data.batch_size=32",
        "data.num_workers=0", "data.size=2000", "finetune.eval_size=500", "finetune.eval_batch_size=250",
        "train.steps=60", "train.warmup_steps=6", "train.log_interval=20", "train.save_interval=60",
        f"train.output_dir={tmp_path}", "optim.base_lr=8e-3", "train.autocast=off",  # forced: never CPU-dependent
    ]  # fmt: skip
    return load_config(None, base + list(overrides), root=FinetuneRunConfig)


# ---------------------------------------------------------------------------------------------------------------
# pieces


def test_mix_batch_targets_are_distributions_and_cutmix_lambda_is_the_kept_area():
    class F:
        label_smoothing, mixup, cutmix, mix_prob, switch_prob = 0.1, 0.0, 1.0, 1.0, 0.5

    labels = torch.tensor([0, 1, 2, 3])
    plain = smooth_one_hot(labels, 5, 0.1)
    assert torch.allclose(plain.sum(-1), torch.ones(4)) and math.isclose(float(plain[0, 0]), 0.92, rel_tol=1e-6)
    video = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 3, 2, 16, 16).contiguous()
    torch.manual_seed(3)
    mixed, target = mix_batch(video, labels, 5, F)
    assert torch.allclose(target.sum(-1), torch.ones(4))
    # sample 0 is mixed with sample 3 (the batch reversed): its kept area is its weight on class 0
    kept = float((mixed[0] == 0).float().mean())
    lam = (float(target[0, 0]) - 0.02) / 0.9  # undo the smoothing
    assert kept < 1.0 and math.isclose(kept, lam, rel_tol=1e-5)
    assert torch.equal(mixed[:, :, 0], mixed[:, :, 1])  # one box through all frames

    F.mixup, F.cutmix = 0.8, 0.0
    mixed, target = mix_batch(video, labels, 5, F)
    lam = float(mixed[0, 0, 0, 0, 0]) / 3.0  # x0 * lam + x3 * (1 - lam) with x0 = 0, x3 = 3 -> 3 (1 - lam)
    assert math.isclose(float(target[0, 3]) - 0.02, 0.9 * lam, rel_tol=1e-4)


def test_layer_decay_scales_follow_depth():
    enc = build_encoder(ModelConfig(**TINY_IMG), img_size=28, num_frames=1)
    model = VideoClassifier(enc, 10)
    groups = layer_decay_groups(model, 0.05, 0.5)
    by_name = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = enc.depth  # 2: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, head 1
    assert by_name[id(named["encoder.patch_embed.proj.weight"])]["lr_scale"] == 0.5 ** (depth + 1)
    assert by_name[id(named["encoder.blocks.0.attn.qkv.weight"])]["lr_scale"] == 0.5**depth
    assert by_name[id(named["encoder.blocks.1.mlp.fc1.weight"])]["lr_scale"] == 0.5
    assert by_name[id(named["head.weight"])]["lr_scale"] == 1.0
    assert by_name[id(named["head.bias"])]["weight_decay"] == 0.0
    assert by_name[id(named["head.weight"])]["weight_decay"] == 0.05
    assert "encoder.norm.weight" not in named  # mean pooling: fc_norm replaces the token norm


def test_classifier_reads_pretraining_and_videomae_finetune_layouts(tmp_path):
    model_cfg = ModelConfig(**TINY_IMG)
    student = build_student(model_cfg, DecoderConfig(embed_dim=32, depth=1, num_heads=2), ObjectiveConfig(name="mae"),
                            None, img_size=28, num_frames=1)  # fmt: skip
    torch.save({"model": student.state_dict()}, tmp_path / "pre.pt")
    clf = VideoClassifier(build_encoder(model_cfg, img_size=28, num_frames=1), 10)
    load_classifier(clf, str(tmp_path / "pre.pt"))
    assert torch.equal(clf.encoder.blocks[1].attn.qkv.weight, student.encoder.blocks[1].attn.qkv.weight)
    # the fine-tune layout (what amd_fast writes, as VideoMAE's): a round trip gives the same logits
    with torch.no_grad():
        clf.head.weight.normal_()
        clf.fc_norm.bias.normal_()
    sd = clf.export_state_dict()
    assert "fc_norm.weight" in sd and "blocks.0.attn.q_bias" in sd and not any(k.startswith("encoder.") for k in sd)
    torch.save({"module": sd}, tmp_path / "ft.pt")
    again = VideoClassifier(build_encoder(model_cfg, img_size=28, num_frames=1), 10)
    load_classifier(again, str(tmp_path / "ft.pt"))
    x = torch.randn(2, 3, 1, 28, 28)
    clf.eval(), again.eval()
    assert torch.equal(clf(x), again(x))
    other = VideoClassifier(build_encoder(model_cfg, img_size=28, num_frames=1), 6)  # another class count
    load_classifier(other, str(tmp_path / "ft.pt"))
    assert torch.equal(other.fc_norm.weight, clf.fc_norm.weight) and other.head.weight.shape == (6, 48)


def test_test_views_sampling():
    dense = ClipSampler(4, 2, "dense")  # window 7
    assert dense.views(20, 1) == [[6, 8, 10, 12]]  # centered
    v = dense.views(20, 3)
    assert v[0][0] == 0 and v[-1][-1] == 19 and v[1] == [6, 8, 10, 12]
    seg = ClipSampler(4, 1, "segments").views(16, 2)  # segments of 4 frames, offsets 1 and 3 inside each
    assert seg == [[1, 5, 9, 13], [3, 7, 11, 15]]
    assert view_crops(48, 64, 3) == [(0, 0, 48, 48), (0, 8, 48, 48), (0, 16, 48, 48)]
    assert view_crops(40, 40, 1) == [(0, 0, 40, 40)]


def test_file_test_views_are_clips_times_crops(tmp_path):
    pytest.importorskip("av")
    from amd_fast.data.media import write_moving_clips
    from amd_fast.data.video import crop_resize_normalize

    lst = write_moving_clips(tmp_path / "clips", 2, codec="h264", num_frames=24, height=48, width=64, gop=8)
    kw = dict(split="test", input_size=32, num_frames=8, seed=0, train=False, list_file=str(lst), frame_stride=2)
    ds = build_dataset("video_list", **kw, test_views=(2, 3))
    item = ds[1]
    assert len(item["video"]) == 6 and item["label"].shape == (6,)
    frames = ds.decoder.read(ds.entries[1].path, lambda n: sum(ClipSampler(8, 2).views(n, 2), []))
    want = crop_resize_normalize(frames[8:], view_crops(48, 64, 3)[2], 32)  # clip 1, crop 2
    assert torch.equal(item["video"][5], want)
    moving = build_dataset("moving_fashion_mnist", split="test", input_size=32, num_frames=4, seed=0, train=False,
                           size=10, test_views=(1, 3))  # fmt: skip
    assert moving[0]["video"].shape == (3, 3, 4, 32, 32)
    assert not torch.equal(moving[0]["video"][0], moving[0]["video"][2])


def test_finetune_config_errors_name_the_field(tmp_path, capsys):
    with pytest.raises(ConfigError, match="finetune.test_clips=2"):
        ft_config(tmp_path, "data.dataset=moving_fashion_mnist", "data.num_frames=4", "model.tubelet_size=2",
                  "finetune.test_clips=2")  # fmt: skip
    with pytest.raises(ConfigError, match="finetune.layer_decay"):
        ft_config(tmp_path, "finetune.layer_decay=0")
    assert finetune_main(["finetune.mixup=-1", f"train.output_dir={tmp_path}"]) == 2
    assert "finetune.mixup=-1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# runs


@pytest.mark.parametrize("autocast", ["off", "bfloat16"])
def test_finetune_learns_and_resumes_bit_identically(tmp_path, autocast):
    def ft_config(path, *more):  # the module's, in this precision
        return globals()["ft_config"](path, *more, f"train.autocast={autocast}")

    learn = Trainer(ft_config(tmp_path / "learn", "finetune.mixup=0", "finetune.cutmix=0", "optim.base_lr=2e-2",
                              "train.steps=200", "train.save_interval=200", "data.batch_size=64"),
                    ClassifyTask)  # fmt: skip
    learn.train()
    res = learn.evaluation
    assert res["top1"] > 50.0, res  # 10 classes: chance is 10%
    assert json.loads((tmp_path / "learn" / "eval.json").read_text().splitlines()[-1])["top1"] == res["top1"]

    # with mixup / cutmix and drop path (all drawing from the global RNG): interrupted + resumed == uninterrupted
    full = Trainer(ft_config(tmp_path / "full", "finetune.mixup=0.8", "finetune.cutmix=1.0"), ClassifyTask)
    full.train()

    part = Trainer(ft_config(tmp_path / "part", "finetune.mixup=0.8", "finetune.cutmix=1.0", "train.steps=60",
                             "train.save_interval=25"), ClassifyTask)  # fmt: skip
    it = part.batches()
    for _ in range(25):  # the first 25 steps, then the process "dies" after its checkpoint
        part.train_step([next(it)])
    part.save()
    resumed = Trainer(
        ft_config(tmp_path / "part", "finetune.mixup=0.8", "finetune.cutmix=1.0", "train.resume=auto"), ClassifyTask
    )
    assert resumed.step == 25
    resumed.train()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k

    # eval-only on the fine-tuned file reproduces the result
    ckpt = tmp_path / "learn" / "checkpoint-200.pt"
    ev = Trainer(
        ft_config(tmp_path / "ev", f"finetune.init={ckpt}", "finetune.eval_only=true"), ClassifyTask
    ).evaluate()
    assert ev["top1"] == res["top1"]


@pytest.mark.parametrize("autocast", ["off", "bfloat16"])
def test_probe_pixels_and_encoder_with_feature_cache(tmp_path, caplog, autocast):
    def cfg(init, *extra):
        return load_config(None, [*(f"model.{k}={v}" for k, v in TINY_IMG.items()), "data.dataset=fashion_mnist",
                                  "data.input_size=28", "data.num_frames=1", "data.num_workers=0", f"probe.init={init}",
                                  "probe.train_size=2000", "probe.test_size=1000", "probe.epochs=10",
                                  f"train.output_dir={tmp_path}", f"train.autocast={autocast}", *extra],
                           root=ProbeRunConfig)  # fmt: skip

    pixels = run_probe(cfg("pixels"))
    assert pixels["top1_mean"] > 70.0 and len(pixels["runs"]) == 3  # logistic regression on 2000 images
    assert pixels["dim"] == 3 * 28 * 28
    rand = run_probe(cfg(""))
    assert 10.0 < rand["top1_mean"] and rand["dim"] == 48
    caplog.clear()
    again = run_probe(cfg(""))
    assert "features from cache" in caplog.text and again["top1_mean"] == rand["top1_mean"]
    head = LinearProbe(8, 3)
    assert head.bn.weight is None  # BatchNorm without affine


def test_reconstruction_uses_only_what_the_model_saw():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY_IMG, "patch_size": 4})
    model = build_student(cfg, DecoderConfig(embed_dim=32, depth=1, num_heads=2), ObjectiveConfig(name="mae"), None,
                          img_size=16, num_frames=1)  # fmt: skip
    gen = build_mask_generator(MaskConfig(kind="random", student_ratio=0.75), "mae", model.encoder.grid)
    masks = collate_masks([gen(torch.Generator().manual_seed(i)) for i in range(2)])
    video = torch.randn(2, 3, 1, 16, 16)
    out = reconstruct(model, video, masks)
    hidden = masks["ids_dec"][0, 0].item()
    # change a hidden patch of sample 0: the honest reconstruction cannot move, VideoMAE's (true stats) does
    r, c = divmod(hidden, 4)
    video2 = video.clone()
    hid = (0, slice(None), slice(None), slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4))
    video2[hid] = video2[hid] * 3 + 1
    out2 = reconstruct(model, video2, masks)
    assert torch.equal(out["recon"], out2["recon"])
    assert not torch.equal(out["recon_videomae"], out2["recon_videomae"])
    vis = masks["ids_vis_s"][0, 0].item()
    r, c = divmod(vis, 4)
    patch = (slice(None), slice(None), slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4))
    assert torch.equal(out["recon"][0][patch], out["input"][0][patch])  # visible patches are the input
    clip = torch.randn(2, 3, 4, 8, 12)
    tokens = patchify(clip, 4, 2).view(2, 2 * 2 * 3, 3, 2 * 4 * 4)
    assert torch.equal(unpatchify(tokens, (2, 2, 3), 4, 2), clip)


def test_visualize_and_study_quick_end_to_end(tmp_path):
    """The study's whole pipeline at the `quick` budget (teacher, 3 students x 2 seeds, probes, fine-tunes, the
    table, the plot, the grids): the numbers are meaningless at this size, the files and the verdict are checked."""
    from benchmarks.study import main as study_main

    assert study_main(["--budget", "quick", "--tasks", "image", "--seeds", "0", "1", "--out", str(tmp_path / "r"),
                       "--work", str(tmp_path / "w")]) == 0  # fmt: skip
    md = (tmp_path / "r" / "study-quick.md").read_text()
    assert "| image | student 128/6 | amd, 6 steps |" in md and "raw pixels" in md
    assert "the paper's ordering AMD > MAE" in md
    rows = (tmp_path / "r" / "study-quick.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 + 3 * 2  # header, pixels / teacher / random, 3 methods x 2 seeds
    for name in ("study-quick.png", "study-quick-recon-image-amd.png"):
        assert (tmp_path / "r" / name).stat().st_size > 1000
    ckpt = next((tmp_path / "w" / "quick" / "image" / "amd-s0").glob("checkpoint-*.pt"))
    sd = read_state_dict(str(ckpt))
    assert any(k.startswith("generators.") for k in sd)


def test_save_grid_writes_png(tmp_path):
    out = {k: torch.rand(2, 3, 4, 8, 8) for k in ("input", "masked", "recon", "recon_videomae")}
    p = save_grid(out, tmp_path / "g.png", frames=2)
    assert p.read_bytes()[:4] == b"\x89PNG"


def test_config_root_for_pretraining_unchanged():
    assert isinstance(load_config(None, ["train.steps=3"]), Config)


def test_inverted_clips_flip_polarity_only():
    """data.invert_prob: the same clip (garment, motion, crop) drawn dark-on-bright; 0 leaves the stream unchanged."""
    kw = dict(split="train", input_size=32, num_frames=4, seed=5, train=True, size=20)
    plain = build_dataset("moving_fashion_mnist", **kw)
    inv = build_dataset("moving_fashion_mnist", **kw, invert_prob=1.0)
    a, b = plain[3], inv[3]
    assert a["label"] == b["label"]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
    torch.testing.assert_close(b["video"] * std + mean, 1 - (a["video"] * std + mean), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="data.invert_prob"):
        bad = ["data.dataset=fashion_mnist", "data.num_frames=1", "model.tubelet_size=1", "objective.name=mae"]
        load_config(None, [*bad, "data.invert_prob=0.5"])


def test_a_missing_init_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="finetune.init='/no/such.pt' does not exist"):
        ft_config(tmp_path, "finetune.init=/no/such.pt")
    with pytest.raises(ConfigError, match="probe.init='/no/such.pt' does not exist"):
        load_config(None, ["probe.init=/no/such.pt"], root=ProbeRunConfig)


def test_finetune_has_the_loop_s_non_finite_guard(tmp_path):
    """Fine-tuning runs in the one training loop: a run whose loss goes NaN is stopped by the same guard, with the
    same message naming the last good checkpoint (and TensorBoard / metrics / progress come with it)."""
    trainer = Trainer(ft_config(tmp_path, "train.steps=30", "train.save_interval=5", "train.max_nonfinite_in_row=3",
                                "train.tensorboard=true", "train.log_interval=5"), ClassifyTask)  # fmt: skip
    real = trainer.objective
    trainer.objective = lambda b: (lambda lp: (lp[0] * (float("nan") if trainer.step >= 12 else 1.0), lp[1]))(real(b))
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite steps in a row .* weights of step 12\. The newest "
                       r"checkpoint from before it: .*checkpoint-10\.pt; --resume auto continues from it"):  # fmt: skip
        trainer.train()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 10]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

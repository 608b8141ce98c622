"""The end-of-run evaluation of a pre-training run (train.eval_probe, amd_fast/report.py)."""

import pytest
import torch

from amd_fast.build import teacher_pretrain_config
from amd_fast.config import ConfigError, load_config
from amd_fast.pretraining import pretrain_task
from amd_fast.report import masked_reconstruction
from amd_fast.train import main
from amd_fast.trainer import Trainer
from tests.test_train import TINY, read_metrics, tiny

# a probe small enough for a test: 96 train / 48 test images, 3 epochs
PROBE = ["train.eval_probe=true", "probe.train_size=96", "probe.test_size=48", "probe.epochs=3", "probe.batch_size=32"]


def test_default_job_path_ends_with_the_probe_table_metrics_and_png(tmp_path, caplog):
    """train.py's path (mae teacher, then AMD) with eval_probe: one table naming every encoder, the figures in
    metrics.jsonl and TensorBoard under eval/, the PNG written; the teacher's own run does not probe."""
    args = [*TINY, *PROBE, f"train.output_dir={tmp_path}", "train.tensorboard=true", "teacher.pretrain_steps=6",
            "train.steps=6", "train.save_interval=3"]  # fmt: skip
    with caplog.at_level("INFO"):
        assert main(["--config", "configs/tiny_image_amd.yaml", *args]) == 0
    text = caplog.text
    assert "end-of-run evaluation at step 6" in text
    for row in ("student (amd, step 6)", "student at random init", "raw pixels", "teacher (checkpoint-6.pt)"):
        assert row in text
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert last["step"] == 6 and "loss" not in last  # its own row, after the step's training row
    for key in ("student", "random", "pixels", "teacher"):
        assert 0 <= last[f"eval/probe_{key}_top1"] <= 100
    for key in ("student", "teacher"):  # both have decoders: masked reconstruction next to predicting zeros
        assert last[f"eval/rec_{key}"] > 0 and last[f"eval/rec_{key}_zeros"] > 0
    assert last["eval/seconds"] > 0
    assert (tmp_path / "recon-6.png").stat().st_size > 1000
    assert f"the student's reconstructions: {tmp_path / 'recon-6.png'}" in text
    teacher_rows = read_metrics(tmp_path / "teacher" / "metrics.jsonl")
    assert not any(k.startswith("eval/") for r in teacher_rows for k in r)
    assert not (tmp_path / "teacher" / "probe").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"eval/probe_student_top1", "eval/probe_random_top1", "eval/rec_teacher"} <= tags


def test_mae_run_probes_without_a_teacher_and_features_come_from_the_cache(tmp_path):
    """A mae run has no teacher row; its probe reuses probe.py's feature cache (a second evaluation of the same
    checkpoint extracts nothing and gives the same figures)."""
    trainer = Trainer(
        tiny(tmp_path, *PROBE, "objective.name=mae", "train.steps=4", "train.save_interval=4"), pretrain_task
    )
    trainer.train()
    res = trainer.evaluation
    assert "probe_teacher_top1" not in res and "rec_teacher" not in res
    assert {"probe_student_top1", "probe_random_top1", "probe_pixels_top1", "rec_student"} <= set(res)
    cached = sorted((tmp_path / "probe" / "features").glob("*.pt"))
    assert len(cached) == 3  # student, random init, pixels
    mtimes = [p.stat().st_mtime_ns for p in cached]
    again = trainer.evaluate()
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    assert again["probe_student_top1"] == res["probe_student_top1"]


def test_predicting_zeros_is_what_a_zero_decoder_scores(tmp_path):
    """The baseline column is the objective's loss of a model that predicts zeros: a checkpoint whose decoder head is
    zeroed scores exactly it, and a trained one scores something else."""
    path = Trainer(
        tiny(tmp_path, "objective.name=mae", "train.steps=4", "train.save_interval=4"), pretrain_task
    ).train()
    video = torch.randn(6, 3, 1, 16, 16)
    rec, zeros = masked_reconstruction(path, video)
    assert rec != pytest.approx(zeros)
    state = torch.load(path, weights_only=True)
    for k in ("decoder.head.weight", "decoder.head.bias"):
        state["model"][k].zero_()
    torch.save(state, tmp_path / "zero.pt")
    rec0, zeros0 = masked_reconstruction(tmp_path / "zero.pt", video)
    assert rec0 == pytest.approx(zeros0, rel=1e-6) and zeros0 == pytest.approx(zeros, rel=1e-6)


def test_eval_probe_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"probe.init='x.pt' is not read in pre-training"):
        tiny(tmp_path, "probe.init=x.pt")
    with pytest.raises(ConfigError, match=r"probe.seeds is empty while train.eval_probe=true"):
        tiny(tmp_path, "train.eval_probe=true", "probe.seeds=[]")
    assert teacher_pretrain_config(tiny(tmp_path, "train.eval_probe=true")).train.eval_probe is False


@pytest.mark.parametrize("preset", ["tiny_video_amd", "tiny_video_dmae", "tiny_video_mae", "tiny_image_amd"])
def test_tiny_presets_evaluate_at_the_end(preset):
    cfg = load_config(f"configs/{preset}.yaml")
    assert cfg.train.eval_probe and cfg.probe.seeds and 0 < cfg.probe.train_size <= 5000


def test_evaluation_rows_do_not_confuse_resume(tmp_path):
    """An eval row sits at the last step: a later resume cuts rows past its checkpoint, eval rows included."""
    out = tmp_path / "run"
    Trainer(tiny(out, *PROBE, "objective.name=mae", "train.steps=4", "train.save_interval=2"), pretrain_task).train()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 4] and "eval/probe_student_top1" in rows[-1]
    (out / "checkpoint-4.pt").unlink()
    (out / "checkpoint-4.pt.json").unlink()
    Trainer(
        tiny(out, "objective.name=mae", "train.steps=4", "train.save_interval=2", "train.resume=auto"), pretrain_task
    ).train()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [2, 4]

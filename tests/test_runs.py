"""Runs and checkpoints: nothing lost, nothing untrusted executed, no unusable checkpoint resumed from.

Each test is one case of the issue that asked for this (used output folders, damaged checkpoints, unhealthy runs,
untrusted files, ranges, stale temporary files, metrics and RNGs across a resume), on the tiny image preset."""

import json
import logging
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import TINY, read_metrics, tiny

from amd_fast import checkpoint as ckpt
from amd_fast.build import teacher_pretrain_config
from amd_fast.config import RANGES, Config, ConfigError, FinetuneRunConfig, ProbeRunConfig, load_config
from amd_fast.export import main as export_main
from amd_fast.finetune import main as finetune_main
from amd_fast.pretraining import pretrain_task
from amd_fast.probe import main as probe_main
from amd_fast.train import main
from amd_fast.trainer import NonFiniteLossError, Trainer
from amd_fast.visualize import main as visualize_main

ROOT = Path(__file__).resolve().parents[1]
MAE = ["objective.name=mae", "train.save_interval=2", "train.log_interval=1"]


def run(tmp_path, *more):
    return main([*TINY, f"train.output_dir={tmp_path}", *MAE, *more])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_inside_a_tensor(path: Path, n: int = 12) -> None:
    """Flip `n` bytes in the middle of the largest tensor of a torch.save file: it still loads (the zip entries are
    stored uncompressed and torch.load checks no CRC), with other values."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2  # past the local header
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# 1. a used output folder


def test_a_used_output_folder_is_never_written_over_by_accident(tmp_path, capsys):
    assert run(tmp_path, "train.steps=4") == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert run(tmp_path, "train.steps=2") == 2  # a second run, not told to resume: stops at start
    err = capsys.readouterr().err
    assert f"{tmp_path} holds a previous run (checkpoint-2.pt, checkpoint-4.pt, metrics.jsonl)" in err
    assert "--resume auto" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing touched

    assert run(tmp_path, "train.steps=6", "--resume", "auto") == 0  # told to continue: it does
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]

    # told to start over (the flag between overrides, as users type it): the old run is moved aside
    assert run(tmp_path, "--overwrite", "train.steps=2") == 0
    aside = [p for p in tmp_path.parent.iterdir() if p.name.startswith(f"{tmp_path.name}.old-")]
    assert len(aside) == 1 and (aside[0] / "checkpoint-6.pt").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_keep_n_deletes_only_this_runs_checkpoints(tmp_path):
    """A checkpoint recorded by another run, or with no record at all, is never pruned."""
    torch.save({"step": 1}, tmp_path / "checkpoint-1.pt")  # no record
    ckpt.save_checkpoint({"step": 3}, tmp_path, 3, "another-run", keep=1)
    for step in (2, 4, 6):
        ckpt.save_checkpoint({"step": step}, tmp_path, step, "this-run", keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 3, 4, 6]
    # nor one past the step just saved (a damaged one --resume auto skipped, written again when the run gets there),
    # and never the one just written: resumed from further back, keep 1
    ahead = tmp_path / "ahead"
    ckpt.save_checkpoint({"step": 8}, ahead, 8, "this-run", keep=1)
    ckpt.save_checkpoint({"step": 2}, ahead, 2, "this-run", keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(ahead)] == [2, 8]
    ckpt.save_checkpoint({"step": 4}, ahead, 4, "this-run", keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(ahead)] == [4, 8]


def test_a_start_never_destroys_a_previous_run(tmp_path, capsys):
    """Every checkpoint damaged, then --resume auto: the run stops at start naming each checkpoint and why it cannot
    be resumed from; nothing in the folder changes. --overwrite is the way to start over (the old run moved aside,
    whole). A checkpoint whose record was never written (the process was killed between the two) is an unfinished
    write, not a previous run's work: with nothing else there, --resume auto starts afresh."""
    out = tmp_path / "run"
    assert run(out, "train.steps=6") == 0  # checkpoints 4, 6 (keep 2); metrics rows 1-6
    newest, older = out / "checkpoint-6.pt", out / "checkpoint-4.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short
    flip_inside_a_tensor(older)
    before = snapshot(out)
    capsys.readouterr()
    assert run(out, "train.steps=8", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert f"error: {out} holds a previous run but none of its checkpoints can be resumed from:" in err
    assert "checkpoint-6.pt: size 1000 bytes, the record says" in err
    assert "checkpoint-4.pt: its SHA-256 does not match the record (damaged)" in err
    assert "--overwrite" in err and "Traceback" not in err
    assert snapshot(out) == before  # metrics, checkpoints, records: as they were

    assert run(out, "train.steps=2", "--overwrite") == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before

    early = tmp_path / "early"
    assert run(early, "train.steps=2") == 0
    ckpt.record_path(early / "checkpoint-2.pt").unlink()
    assert run(early, "train.steps=3", "--resume", "auto") == 0
    assert [r["step"] for r in read_metrics(early / "metrics.jsonl")] == [1, 2, 3]


def test_a_folder_holding_only_a_teacher_is_a_used_folder(tmp_path, capsys):
    """train.py pre-trains its teacher under <output_dir>/teacher: that folder is part of the run. A new run there
    (not told to resume) stops at start instead of finishing the old teacher at the new settings."""
    out = tmp_path / "run"
    Trainer(teacher_pretrain_config(tiny(out, "teacher.pretrain_steps=2")), pretrain_task).train()
    before = snapshot(out)
    capsys.readouterr()
    assert main([*TINY, f"train.output_dir={out}", "teacher.pretrain_steps=4", "train.steps=2"]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds a previous run (teacher/checkpoint-2.pt, teacher/metrics.jsonl)" in err
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# 2. resume verifies what it loads


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, caplog):
    assert run(tmp_path, "train.steps=6") == 0
    newest = tmp_path / "checkpoint-6.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut short
    with caplog.at_level(logging.WARNING, logger="amd_fast"):
        t = Trainer(tiny(tmp_path, *MAE, "train.steps=6", "train.resume=auto"), pretrain_task)
    assert t.step == 4
    assert f"not resuming from {newest}: size" in caplog.text and "cut short" in caplog.text
    # the same damage given as an explicit path: an error that names the file and why
    with pytest.raises(ckpt.CheckpointError, match=rf"{newest}: size \d+ bytes, the record says"):
        Trainer(tiny(tmp_path, *MAE, "train.steps=6", f"train.resume={newest}"), pretrain_task)
    # flipped bytes of the same size: the checksum
    good = tmp_path / "checkpoint-4.pt"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    good.write_bytes(bytes(data))
    assert ckpt.verify_file(good) == "its SHA-256 does not match the record (damaged)"


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A training checkpoint with its record (a mae run at the tiny teacher's width, 48), 12 bytes flipped inside
    a tensor: it loads, with wrong weights."""
    out = tmp_path_factory.mktemp("damaged")
    path = Trainer(tiny(out, *MAE, "train.steps=2", "model.embed_dim=48"), pretrain_task).train()
    flip_inside_a_tensor(path)
    return path


TINY_48 = ["model.arch=custom", "model.embed_dim=48", "model.depth=2", "model.num_heads=2", "model.patch_size=4",
           "model.tubelet_size=1", "data.dataset=fashion_mnist", "data.input_size=16", "data.num_frames=1",
           "data.num_workers=0", "data.invert_prob=0", "train.autocast=off", "train.progress=false",
           "train.tensorboard=false"]  # fmt: skip


@pytest.mark.parametrize("reader", ["teacher.checkpoint", "model.init", "finetune.init", "probe.init", "export",
                                    "visualize", "resume"])  # fmt: skip
def test_every_checkpoint_read_checks_the_record(tmp_path, capsys, damaged, reader):
    """Wherever a checkpoint with a record is read, its bytes are checked against it first: a mismatch is an error
    naming the file (one line, exit 2), never a run on damaged weights."""
    out = f"train.output_dir={tmp_path / 'out'}"
    capsys.readouterr()
    if reader in ("teacher.checkpoint", "model.init", "resume"):
        more = {"teacher.checkpoint": ["train.steps=1", f"teacher.checkpoint={damaged}"],
                "model.init": [*MAE, "model.embed_dim=48", "train.steps=1", f"model.init={damaged}"],
                "resume": [*MAE, "model.embed_dim=48", "train.steps=4", "--resume", str(damaged)]}[reader]  # fmt: skip
        code = main([*TINY, out, *more])
    elif reader == "finetune.init":
        code = finetune_main(["--config", str(ROOT / "configs/finetune_tiny_image.yaml"), *TINY_48, out,
                              "data.batch_size=8", "data.size=64", "finetune.eval_size=16", "train.steps=1",
                              f"finetune.init={damaged}"])  # fmt: skip
    elif reader == "probe.init":
        code = probe_main([*TINY_48, out, "probe.train_size=64", "probe.test_size=32", "probe.epochs=1",
                           "probe.seeds=[0]", f"probe.init={damaged}"])  # fmt: skip
    elif reader == "export":
        code = export_main([str(damaged), str(tmp_path / "student.pt")])
    else:
        code = visualize_main([str(damaged), "--out", str(tmp_path / "recon.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {damaged}: its SHA-256 does not match the record (damaged)" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# 3. checkpoints only from a healthy run


def _sabotaged(tmp_path, bad_from_version, kind, *more):
    """A run whose loss goes NaN (or x1e4) from the weights of step `bad_from_version` on."""
    trainer = Trainer(tiny(tmp_path, *MAE, "train.steps=20", "train.max_nonfinite_in_row=3", *more), pretrain_task)
    real = trainer.objective

    def objective(batch):
        loss, parts = real(batch)
        if trainer.step >= bad_from_version:
            loss = loss * (float("nan") if kind == "nan" else 1e4)
        return loss, parts

    trainer.objective = objective
    return trainer


@pytest.mark.parametrize("kind", ["nan", "spike"])
def test_an_unhealthy_run_stops_naming_the_last_good_checkpoint(tmp_path, kind):
    """Saves every 2 steps. The loss goes bad with the weights of step 12 (the last step's update blew them up,
    say): checkpoint-12 holds those weights, so it is set aside; none is written while the trouble lasts (14 was
    due); the stop names checkpoint-10, and --resume auto takes it. (The spike guard judges against the median of
    at least 10 healthy steps: the trouble starts after those.)"""
    trainer = _sabotaged(tmp_path, 12, kind, "train.spike_steps=3")
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    assert ("3 non-finite steps in a row" if kind == "nan" else "3 loss spikes in a row") in msg
    assert f"The trouble began with the weights of step 12. The newest checkpoint from before it: {tmp_path}" in msg
    assert msg.count("checkpoint-10.pt; --resume auto continues from it") == 1
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10]  # keep 2: 8 went when 12 was written
    assert (tmp_path / "checkpoint-12.pt.unhealthy").exists()
    assert Trainer(tiny(tmp_path, *MAE, "train.steps=20", "train.resume=auto"), pretrain_task).step == 10


def test_the_spike_guard_judges_from_the_first_steps_and_its_history_is_resumed(tmp_path):
    """No blind start: from the second step on a loss is judged against the run's first losses (the median of the
    healthy ones so far). The guard's history is in the checkpoint, so a resumed run judges its first step against
    the losses before the interruption, not against its own (exploded) first ones."""
    fresh = tmp_path / "fresh"
    trainer = _sabotaged(fresh, 2, "spike", "train.spike_steps=3")  # x1e4 from the weights of step 2 on
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    assert "3 loss spikes in a row (last at step 5" in msg
    assert "The trouble began with the weights of step 2. The newest checkpoint from before it: none" in msg
    assert ckpt.list_checkpoints(fresh) == [] and (fresh / "checkpoint-2.pt.unhealthy").exists()

    resumed = tmp_path / "resumed"
    first = Trainer(tiny(resumed, *MAE, "train.steps=4"), pretrain_task)
    first.train()
    trainer = _sabotaged(resumed, 4, "spike", "train.spike_steps=3", "train.resume=auto")
    assert trainer.step == 4 and list(trainer.healthy_losses) == list(first.healthy_losses)
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    assert "3 loss spikes in a row (last at step 7" in msg and "the weights of step 4" in msg
    assert msg.count("checkpoint-2.pt; --resume auto continues from it") == 1


def test_a_spike_that_passes_does_not_stop_the_run(tmp_path):
    trainer = Trainer(tiny(tmp_path, *MAE, "train.steps=16", "train.spike_steps=3"), pretrain_task)
    real = trainer.objective
    trainer.objective = lambda b: (lambda lp: (lp[0] * (1e4 if trainer.step in (12, 13) else 1), lp[1]))(real(b))
    trainer.train()
    assert trainer.step == 16 and trainer.trouble_from is None
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [12, 16]  # 14 was due while the spike lasted


# ---------------------------------------------------------------------------------------------
# 4. nothing untrusted is unpickled


def test_a_random_bytes_teacher_is_refused_naming_the_file(tmp_path, capsys, caplog):
    junk = tmp_path / "teacher.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with caplog.at_level(logging.INFO, logger="amd_fast"):
        code = main([*TINY, f"train.output_dir={tmp_path / 'run'}", f"teacher.checkpoint={junk}", "train.steps=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {junk}: ") and "Traceback" not in err
    assert "weights_only=False" not in caplog.text


class _Opaque:  # an object weights_only refuses
    pass


@pytest.mark.parametrize("tool", ["probe", "export", "visualize"])
def test_the_command_line_tools_refuse_an_untrusted_file_in_one_line(tmp_path, capsys, tool):
    """As training does: one line naming the file, exit 2. The unsafe-pickle hint only for a real pickle that holds
    more than tensors; a file that is no pickle at all is said to be none (and PyTorch's advice to retry with
    weights_only=False, which "will likely succeed", is never repeated)."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    opaque = tmp_path / "opaque.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Opaque()}, opaque)
    for path, is_pickle in ((junk, False), (opaque, True)):
        capsys.readouterr()
        if tool == "probe":
            code = probe_main([*TINY_48, f"train.output_dir={tmp_path / 'out'}", f"probe.init={path}"])
        elif tool == "export":
            code = export_main([str(path), str(tmp_path / "student.pt")])
        else:
            code = visualize_main([str(path), "--out", str(tmp_path / "recon.png")])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith(f"error: {path}: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert ("unsafe_pickle" in err) == is_pickle, err
        assert "likely succeed" not in err
    assert "not a checkpoint of tensors" in err and "_Opaque" in err


def test_tensorboard_holds_each_step_once_across_a_resume(tmp_path):
    """A resumed run purges the points the killed attempt logged past its checkpoint (SummaryWriter's purge_step),
    as metrics.jsonl drops their rows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run(tmp_path, "train.steps=5", "train.tensorboard=true") == 0  # checkpoints 4, 5; points 1-5
    for p in (tmp_path / "checkpoint-5.pt", ckpt.record_path(tmp_path / "checkpoint-5.pt")):
        p.unlink()  # as if killed after step 5 was logged, before its checkpoint was written
    assert run(tmp_path, "train.steps=8", "train.tensorboard=true", "--resume", "auto") == 0  # from 4: 5-8
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))


# ---------------------------------------------------------------------------------------------
# 5. ranges


def test_every_numeric_field_has_its_range_checked():
    import dataclasses
    import typing

    for root in (Config, FinetuneRunConfig, ProbeRunConfig):
        for section in dataclasses.fields(root):
            cls = typing.get_type_hints(root)[section.name]
            for f in dataclasses.fields(cls):
                tp = typing.get_type_hints(cls)[f.name]
                if tp in (int, float) or tp in (list[int], list[float]):
                    assert f.name in RANGES.get(cls.__name__, {}), f"{cls.__name__}.{f.name} has no range"
    for bad, msg in [("data.batch_size=0", r"data.batch_size=0 is out of range: it must be in \[1, inf\)"),
                     ("optim.betas=[0.9,1.5]", r"optim.betas\[1\]=1.5 is out of range"),
                     ("train.save_interval=0", "train.save_interval=0"), ("model.drop_path=1.0", "drop_path=1.0"),
                     ("optim.eps=0", "optim.eps=0.0")]:  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [bad])


# ---------------------------------------------------------------------------------------------
# 6. temporary files, metrics, RNGs


def test_stale_temp_files_go_and_metrics_hold_each_step_once(tmp_path):
    assert run(tmp_path, "train.steps=5") == 0  # checkpoints 2, 4; metrics rows 1-5
    stale = [tmp_path / f".checkpoint-6.pt{ckpt.TMP_MARK}4242", tmp_path / f".checkpoint-6.pt.json{ckpt.TMP_MARK}1"]
    for p in stale:
        p.write_bytes(b"half")
    assert run(tmp_path, "train.steps=8", "--resume", "auto") == 0  # resumes at 4: rows 5.. are logged again
    assert not any(p.exists() for p in stale)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 9))
    # killed before its first checkpoint: --resume auto starts fresh, and the rows of the lost steps go
    early = tmp_path / "early"
    early.mkdir()
    (early / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    assert run(early, "train.steps=3", "--resume", "auto") == 0
    assert [r["step"] for r in read_metrics(early / "metrics.jsonl")] == [1, 2, 3]


def test_numpy_and_python_rngs_are_seeded_and_resumed(tmp_path):
    """Seeded from train.seed per rank; saved in the checkpoint and restored: a resumed run draws what the
    uninterrupted one draws."""

    def drawing(trainer):  # an augmentation that draws from numpy and random each step
        real = trainer.objective
        trainer.objective = lambda b: (np.random.rand(), random.random(), real(b))[-1]
        return trainer

    Trainer(tiny(tmp_path / "a", *MAE, "train.steps=4"), pretrain_task)
    first = (np.random.rand(), random.random())
    Trainer(tiny(tmp_path / "b", *MAE, "train.steps=4"), pretrain_task)
    assert (np.random.rand(), random.random()) == first  # the same seed, the same draws
    drawing(Trainer(tiny(tmp_path / "straight", *MAE, "train.steps=4"), pretrain_task)).train()
    straight = (np.random.rand(), random.random())
    drawing(Trainer(tiny(tmp_path / "resumed", *MAE, "train.steps=2"), pretrain_task)).train()
    np.random.seed(123)
    random.seed(123)  # anything in between (another process, in real life)
    drawing(Trainer(tiny(tmp_path / "resumed", *MAE, "train.steps=4", "train.resume=auto"), pretrain_task)).train()
    assert (np.random.rand(), random.random()) == straight


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    """benchmarks/kill_resume.py at 6 kills (its own run uses 20): weights bit-identical, no temp file, each
    metrics step once."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kill_resume.py"), "--kills", "6", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["identical"] and res["temp_files"] == 0 and res["metrics_each_step_once"]

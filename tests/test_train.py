"""The trainer end to end on real data (Fashion-MNIST), at toy sizes."""

import json

import pytest
import torch

from amd_fast import checkpoint as ckpt
from amd_fast.config import load_config
from amd_fast.pretraining import pretrain_task
from amd_fast.train import main
from amd_fast.trainer import NonFiniteLossError, Trainer

TINY = [
    "data.dataset=fashion_mnist", "data.input_size=16", "data.num_frames=1", "data.size=64", "data.batch_size=8",
    "data.num_workers=0", "model.arch=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.patch_size=4", "model.tubelet_size=1", "decoder.embed_dim=16", "decoder.depth=1", "decoder.num_heads=2",
    "mask.kind=random", "mask.student_ratio=0.75", "mask.teacher_ratio=0.5", "optim.base_lr=0.02",
    "teacher.model.arch=custom", "teacher.model.embed_dim=48", "teacher.model.depth=2", "teacher.model.num_heads=2",
    "teacher.model.patch_size=4", "teacher.model.tubelet_size=1", "teacher.pretrain_decoder.embed_dim=16",
    "teacher.pretrain_decoder.depth=1", "teacher.pretrain_decoder.num_heads=2", "teacher.pretrain_lr=0.02",
    "objective.student_layers=[1,2]", "objective.teacher_layers=[1,2]", "train.warmup_steps=2",
    "train.log_interval=2", "train.tensorboard=false", "train.progress=false", "train.threads=1",
    # forced, never `auto`: auto is measured on the machine (bf16 on one CPU kind, fp32 on another), and no test
    # may depend on the CPU
    "train.autocast=off", "teacher.dtype=float32",
    # the tiny presets probe at the end (train.eval_probe): tests that do not test it turn it off; the default preset's
    # dark-on-bright clips (data.invert_prob) are for its moving garments
    "train.eval_probe=false", "data.invert_prob=0",
]  # fmt: skip


def tiny(tmp_path, *more):
    return load_config(None, TINY + [f"train.output_dir={tmp_path}", *more])


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


def test_default_job_path_trains_a_teacher_then_amd_and_losses_decrease(tmp_path):
    """train.py with no teacher checkpoint: mae teacher first, then AMD; logs, events, checkpoints."""
    args = [*TINY, f"train.output_dir={tmp_path}", "train.tensorboard=true", "teacher.pretrain_steps=30",
            "train.steps=30", "train.save_interval=10"]  # fmt: skip
    assert main(["--config", "configs/tiny_image_amd.yaml", *args]) == 0
    teacher_log = read_metrics(tmp_path / "teacher" / "metrics.jsonl")
    student_log = read_metrics(tmp_path / "metrics.jsonl")
    assert (tmp_path / "teacher" / "checkpoint-30.pt").exists() and (tmp_path / "checkpoint-30.pt").exists()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # real data, real learning: the early losses are clearly above the late ones
    assert teacher_log[-1]["rec"] < 0.9 * teacher_log[0]["rec"]
    for part in ("dir", "gen"):
        assert student_log[-1][part] < 0.7 * student_log[0][part]
    for key in ("clips_per_s", "tokens_per_s", "data_wait", "peak_mem_gib", "lr"):
        assert student_log[-1][key] > 0
    state = torch.load(tmp_path / "checkpoint-30.pt", weights_only=True)
    assert state["step"] == 30 and "generators.0.mask_token" in state["model"]


def _teacher(tmp_path):
    """A small mae teacher checkpoint (the path train.py takes when none is given)."""
    cfg = tiny(tmp_path / "teacher", "objective.name=mae", "train.steps=2", "train.save_interval=2",
               "model.embed_dim=48")  # fmt: skip
    return str(Trainer(cfg, pretrain_task).train())


@pytest.mark.parametrize(
    "objective,autocast",
    [("amd", "off"), ("mae", "off"), ("amd", "bfloat16"), ("mae", "bfloat16"), ("amd", "float16")],
)
def test_resume_mid_epoch_is_bit_identical(tmp_path, objective, autocast):
    """10 steps straight vs 5 steps, a crash at step 7, and a resume: the same weights, bit for bit, in each
    precision (fp16: the loss scaler's state is in the checkpoint). 64 samples / batch 8 = 8 steps per epoch,
    so the interruption is mid-epoch and the run crosses one."""
    teacher = _teacher(tmp_path) if objective == "amd" else ""
    common = [f"objective.name={objective}", f"teacher.checkpoint={teacher}", "train.steps=10",
              "train.save_interval=5", "optim.clip_grad=0.5", f"train.autocast={autocast}"]  # fmt: skip
    straight = Trainer(tiny(tmp_path / "a", *common), pretrain_task)
    straight.train()
    rng_straight = torch.get_rng_state()  # drop path, say, draws from it: a resume must leave it as it was

    first = Trainer(tiny(tmp_path / "b", *common), pretrain_task)
    real_step = first.train_step

    def crash_at_7(micro):
        if first.step == 7:
            raise KeyboardInterrupt  # killed mid-run: steps 6-7 are lost, checkpoint-5 is complete
        return real_step(micro)

    first.train_step = crash_at_7
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [5]

    resumed = Trainer(tiny(tmp_path / "b", *common, "train.resume=auto"), pretrain_task)
    assert resumed.step == 5
    resumed.train()
    assert torch.equal(torch.get_rng_state(), rng_straight)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
    cfg = tiny(tmp_path, "objective.name=mae", "train.steps=6", "train.max_nonfinite_in_row=3")
    trainer = Trainer(cfg, pretrain_task)
    real = trainer.objective
    bad_steps = {2, 3}

    def sometimes_nan(batch):
        loss, parts = real(batch)
        return (loss * float("nan"), parts) if trainer.step in bad_steps else (loss, parts)

    trainer.objective = sometimes_nan
    before = {}

    def snapshot_then_step(micro, _step=trainer.train_step):
        if trainer.step == 2:
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        out = _step(micro)
        if trainer.step == 3:  # the skipped step changed nothing
            assert out is None
            assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
        return out

    trainer.train_step = snapshot_then_step
    trainer.train()
    assert trainer.nonfinite_total == 2 and trainer.step == 6

    bad_steps.update(range(100))
    trainer.cfg.train.steps = 20
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        trainer.train()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    ckpt.save_checkpoint({"step": 1}, tmp_path, 1, "run", keep=2)

    def torn_write(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", torn_write)
    with pytest.raises(OSError):
        ckpt.save_checkpoint({"step": 2}, tmp_path, 2, "run", keep=2)
    monkeypatch.undo()
    assert ckpt.find_resume(tmp_path) == tmp_path / "checkpoint-1.pt"
    assert torch.load(ckpt.find_resume(tmp_path), weights_only=True) == {"step": 1}


@pytest.mark.parametrize("autocast", ["off", "bfloat16"])
def test_gradient_accumulation_matches_the_big_batch(tmp_path, autocast):
    """accum 2 x micro 4 accumulates the gradient of micro 8 (same samples, same masks; mean losses), then takes
    the same step. fp32: to summation order. bf16: the weight gradients are bf16 GEMMs over 4 rows twice instead
    of 8 rows once, each rounded to bf16 (2^-9 relative) before the fp32 sum: within 2% of the tensor's largest
    entry (a few roundings, with cancellation in the small entries)."""
    more = ["objective.name=mae", "train.steps=1", f"train.autocast={autocast}"]
    big = Trainer(tiny(tmp_path / "big", *more), pretrain_task)
    small = Trainer(tiny(tmp_path / "small", *more, "data.batch_size=4", "optim.accum_steps=2"), pretrain_task)
    assert big.global_batch == small.global_batch == 8 and big.lr == small.lr
    batch = next(big.batches())
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    big.forward_backward(batch)
    for h in halves:
        small.forward_backward(h)
    for (k, a), b in zip(big.model.named_parameters(), small.model.parameters()):
        if autocast == "off":
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=k)
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0.02 * a.grad.abs().max().item(), msg=k)
    big.engine.step(torch.zeros(()))
    small.engine.step(torch.zeros(()))
    if autocast == "off":  # AdamW's first step is ~lr * sign(g): bf16's flips of tiny entries would show here
        for (k, a), b in zip(big.model.state_dict().items(), small.model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)

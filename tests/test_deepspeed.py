"""DeepSpeed ZeRO on 2 CPU ranks (gloo) through the real entry point (`torchrun` / `deepspeed` + train.py).

A 2-rank run with micro-batch 8 sees exactly the samples (and masks) of a 1-process run with batch 16: rank r
reads perm[r::2] of the same epoch permutation, and every sample is seeded by its global index. So the two must
give the same losses and weights up to fp32 summation order.
"""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")  # the `deepspeed` extra (scripts/setup.sh installs it)

from test_runs import flip_inside_a_tensor  # noqa: E402
from test_train import TINY, read_metrics, tiny  # noqa: E402

from amd_fast.checkpoint import META, CheckpointError, consolidate, list_ds_checkpoints  # noqa: E402
from amd_fast.config import ConfigError, DistConfig  # noqa: E402
from amd_fast.engine import deepspeed_config, uses_deepspeed  # noqa: E402
from amd_fast.export import export_student  # noqa: E402
from amd_fast.finetune import ClassifyTask  # noqa: E402
from amd_fast.pretraining import pretrain_task  # noqa: E402
from amd_fast.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, out: Path, *overrides: str, launcher: str = "torchrun", script: str = "amd_fast/train.py",
           base: tuple = tuple(TINY)) -> str:  # fmt: skip
    """Run `script` (train.py with the tiny preset) on `nproc` CPU ranks; returns the output (asserting success)."""
    args = [script, *base, f"train.output_dir={out}", *overrides]
    port = str(_free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", str(nproc), "--master_port", port]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = r.stdout + r.stderr
    assert r.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = tiny(out, "objective.name=mae", "train.steps=2", "train.save_interval=2", "model.embed_dim=48")
    return str(Trainer(cfg, pretrain_task).train())


def common(teacher, steps):
    return [f"teacher.checkpoint={teacher}", f"train.steps={steps}", "train.log_interval=1", "optim.clip_grad=0.5"]


@pytest.fixture(scope="module")
def single(teacher, tmp_path_factory):
    """The 1-process reference: batch 16 = 2 ranks x micro-batch 8."""
    out = tmp_path_factory.mktemp("single")
    trainer = Trainer(tiny(out, *common(teacher, 6), "train.save_interval=6", "data.batch_size=16"), pretrain_task)
    trainer.train()
    return read_metrics(out / "metrics.jsonl"), trainer.model.state_dict()


@pytest.mark.parametrize(
    "config,micro,accum,launcher",
    [("zero2", 8, 1, "torchrun"), ("zero3", 4, 2, "deepspeed"), ("zero2_offload", 8, 1, "torchrun")],
    ids=["zero2", "zero3-accum2", "zero2-offload"],
)
def test_zero_on_2_ranks_matches_one_process(tmp_path, teacher, single, config, micro, accum, launcher):
    """Global batch 16 both ways: 2 ranks x micro-batch 8, or 2 ranks x 4 x accumulation 2 (the same samples).
    zero2_offload: ZeRO-2 with the fp32 master weights, Adam moments and step in host memory; the same arithmetic."""
    stage = json.loads((ROOT / "configs" / "deepspeed" / f"{config}.json").read_text())["zero_optimization"]["stage"]
    launch(2, tmp_path, *common(teacher, 6), "train.save_interval=6", f"dist.deepspeed_config={config}",
           f"data.batch_size={micro}", f"optim.accum_steps={accum}", launcher=launcher)  # fmt: skip
    ref_log, ref_model = single
    log = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in log] == [r["step"] for r in ref_log] == list(range(1, 7))
    for a, b in zip(log, ref_log):
        for k in ("loss", "rec", "dir", "gen"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), (a["step"], k)
    rel = max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(log, ref_log) for k in ("loss", "rec", "dir", "gen"))
    print(f"\n{config}, 2 ranks vs 1 process: max relative loss difference {rel:.1e} over 6 steps; "
          f"final loss {log[-1]['loss']:.6f} vs {ref_log[-1]['loss']:.6f}")  # fmt: skip

    state = consolidate(tmp_path / "checkpoint-6")
    assert state["model"].keys() == ref_model.keys()
    for k, v in ref_model.items():
        torch.testing.assert_close(state["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    diff = max((state["model"][k] - v).abs().max().item() for k, v in ref_model.items())
    print(f"max |weight difference| after 6 steps {diff:.1e}")

    # what each rank holds: half the Adam moments (ZeRO-3: half the parameters too), up to alignment padding
    shards = [json.loads((tmp_path / "checkpoint-6" / f"shard-rank{r}.json").read_text()) for r in range(2)]
    full = shards[0]["params_full"]
    assert full == sum(v.numel() for v in ref_model.values())  # the student only: the teacher is not in the engine
    for s in shards:
        print(f"{config} rank {s['rank']}: moments {s['moments_local']} of {2 * full}, "
              f"params {s['params_local']} of {full}")  # fmt: skip
        assert abs(s["moments_local"] - full) <= 64  # exp_avg + exp_avg_sq of half the parameters
        assert s["params_local"] == (pytest.approx(full / 2, abs=64) if stage == 3 else full)


def bf16_args(teacher):
    return [*common(teacher, 4), "train.save_interval=4"]


@pytest.fixture(scope="module")
def single_bf16(teacher, tmp_path_factory):
    """The 1-process bf16 reference: batch 16, bf16 autocast (fp32 weights and AdamW, bf16 GEMMs), 4 steps."""
    out = tmp_path_factory.mktemp("single_bf16")
    trainer = Trainer(tiny(out, *bf16_args(teacher), "train.autocast=bfloat16", "data.batch_size=16"), pretrain_task)
    trainer.train()
    return read_metrics(out / "metrics.jsonl"), trainer.model.state_dict()


def assert_tracks_bf16(run_dir, single_bf16, what, rel_forward, rel_trained):
    """Every logged loss finite and close to the reference's: steps 1-2 within rel_forward (they read the initial
    weights: step 1's warmup lr is 6e-8), steps 3-4, after real updates, within rel_trained. The consolidated fp32
    master weights within 5% of each tensor's largest value (4 Adam steps move a weight by ~4 x lr)."""
    ref_log, ref_model = single_bf16
    log = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in log] == [r["step"] for r in ref_log] == [1, 2, 3, 4]
    for a, b in zip(log, ref_log):
        rel = rel_forward if a["step"] <= 2 else rel_trained
        for k in ("loss", "rec", "dir", "gen"):
            assert math.isfinite(a[k]) and a[k] == pytest.approx(b[k], rel=rel), (what, a["step"], k, a[k], b[k])
    state = consolidate(run_dir / "checkpoint-4")
    assert state["model"].keys() == ref_model.keys()
    for k, v in ref_model.items():
        torch.testing.assert_close(state["model"][k], v, rtol=0, atol=0.05 * max(1.0, v.abs().max().item()), msg=k)
    diffs = [max(abs(a[k] - b[k]) / abs(b[k]) for k in ("loss", "rec", "dir", "gen")) for a, b in zip(log, ref_log)]
    w = max((state["model"][k] - v).abs().max().item() for k, v in ref_model.items())
    print(f"\n{what} vs 1 process bf16 autocast: max relative loss difference per step "
          f"{' '.join(f'{d:.1e}' for d in diffs)}; max |weight difference| {w:.1e}")  # fmt: skip
    return log


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_2_ranks_in_bf16_tracks_one_process(tmp_path, teacher, single_bf16, stage):
    """bf16 autocast on 2 ZeRO ranks (the DeepSpeed engine under torch.autocast, fp32 master weights): the losses
    of one bf16 process at the same global batch within 1.5% (tests/test_precision.py says why that bound), and
    the consolidated weights close to it. The two differ by bf16 rounding of per-rank vs whole-batch GEMMs."""
    launch(2, tmp_path, *bf16_args(teacher), "train.autocast=bfloat16", f"dist.deepspeed_config=zero{stage}",
           "data.batch_size=8")  # fmt: skip
    assert_tracks_bf16(tmp_path, single_bf16, f"ZeRO-{stage} under bf16 autocast", 1.5e-2, 1.5e-2)


@pytest.mark.parametrize("config", ["zero2_bf16", "zero3_bf16"])
def test_bf16_deepspeed_configs_on_2_ranks_track_one_process(tmp_path, teacher, single_bf16, config):
    """The shipped bf16 JSONs (DeepSpeed's bf16 mode, autocast off) against one bf16 autocast process.

    DeepSpeed casts the student's parameters to bf16 (fp32 master weights and AdamW stay); the batch, the position
    tables and the teacher's targets stay fp32 and the model casts them to its weights' dtype at its entry. The
    autocast run is the nearest one-process reference: the same fp32 optimizer, the same bf16 rounding of every GEMM
    operand (weights included), and losses in fp32 against fp32 targets in both (mse promotes a bf16 prediction).
    What DeepSpeed rounds to bf16 on top: the activations (residual stream, LayerNorm, softmax), the gradients, and
    the parameters autocast keeps fp32 (LayerNorm gains and biases, mask tokens). Steps 1-2 run the initial weights:
    forward rounding only, within the 1.5% bound of the autocast runs (tests/test_precision.py; measured 7e-4).
    After real updates the runs part further: near 1 (the LayerNorm gains) bf16's spacing is 2^-7 = 7.8e-3, 12x the
    first update (lr 6.25e-4), so the bf16 copy does not move while the fp32 one does, and Adam's early, nearly
    sign-like steps take the other direction where a gradient is within bf16 rounding of zero. Measured on a
    2-core Xeon: 1.0e-2 at step 3 (gen), weights within 2e-3; bound 3%. That still catches what a dtype bug does
    here: a part that stops learning (dir and gen fall 15-25% over these 4 steps, checked) or a non-finite loss."""
    launch(2, tmp_path, *bf16_args(teacher), f"dist.deepspeed_config={config}", "data.batch_size=8")
    log = assert_tracks_bf16(tmp_path, single_bf16, config, 1.5e-2, 3e-2)
    for part in ("dir", "gen"):
        assert log[-1][part] < 0.9 * log[0][part], (part, log[0][part], log[-1][part])


@pytest.mark.parametrize("teacher_dtype", ["float32", "bfloat16"])
def test_model_takes_fp32_inputs_with_deepspeeds_bf16_weights(tmp_path, teacher, teacher_dtype):
    """DeepSpeed's bf16 mode in one process, without launching: it casts the parameters only (deepspeed/runtime/
    engine.py, `_cast_module_mixed_precision`; buffers keep their dtype), and the batch stays fp32. The objective
    runs, its loss and parts are fp32 (fp32 targets), the gradients bf16 and finite, and the loss is within bf16
    rounding (TRACK's 1.5%) of the same weights in fp32."""
    trainer = Trainer(tiny(tmp_path, *common(teacher, 1), f"teacher.dtype={teacher_dtype}"), pretrain_task)
    batch = next(trainer.batches())
    ref, _ = trainer.objective(batch)
    for p in trainer.model.parameters():
        p.data = p.data.to(torch.bfloat16)  # as DeepSpeed does: the position tables stay fp32 buffers
    loss, parts = trainer.objective(batch)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values()), parts
    assert loss.item() == pytest.approx(ref.item(), rel=1.5e-2)
    loss.backward()
    for name, p in trainer.model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), name


def test_resume_on_2_ranks_and_on_1(tmp_path, teacher):
    """An uninterrupted 2-rank run vs the same run restarted from its step-5 checkpoint (what a crash after step 5
    leaves), on 2 ranks (bit-identical) and on 1 process with the same global batch (fp32 tolerance)."""
    args = [*common(teacher, 10), "train.save_interval=5", "dist.deepspeed_config=zero2"]
    launch(2, tmp_path / "a", *args)
    assert [s for s, _ in list_ds_checkpoints(tmp_path / "a")] == [5, 10]
    for run in ("b", "c"):
        shutil.copytree(tmp_path / "a" / "checkpoint-5", tmp_path / run / "checkpoint-5")

    out = launch(2, tmp_path / "b", *args, "train.resume=auto")
    assert "resumed from" in out and "at step 5" in out
    a, b = consolidate(tmp_path / "a" / "checkpoint-10"), consolidate(tmp_path / "b" / "checkpoint-10")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, sa in a["optimizer"]["state"].items():
        assert torch.equal(sa["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"]), i

    one = Trainer(tiny(tmp_path / "c", *common(teacher, 10), "train.save_interval=5", "data.batch_size=16",
                       "train.resume=auto"), pretrain_task)  # fmt: skip
    assert type(one.engine).__name__ == "LocalEngine" and one.step == 5
    one.train()
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(v, a["model"][k], rtol=1e-4, atol=1e-6, msg=k)
    diff = max((v - a["model"][k]).abs().max().item() for k, v in one.model.state_dict().items())
    print(f"\nsaved on 2 ranks, resumed on 1: max |weight difference| at step 10 vs uninterrupted 2 ranks {diff:.1e}")

    # the exported single file reads back through the official-layout loader
    from amd_fast.models.checkpoint_io import load_pretrain

    path = export_student(tmp_path / "a" / "checkpoint-10", tmp_path / "student.pt")
    fresh = Trainer(tiny(tmp_path / "d", *common(teacher, 1)), pretrain_task, with_data=False)
    load_pretrain(fresh.model, str(path))
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, a["model"][k]), k


def test_a_deepspeed_directory_is_read_wherever_a_file_is(tmp_path):
    """A 2-rank ZeRO-2 run's checkpoint directory given as teacher.checkpoint or model.init (where a file is read):
    consolidated, as probe.init, finetune.init, export and visualize take it; its files are checked against
    meta.json first (sizes and SHA-256), so a damaged shard is named."""
    launch(2, tmp_path / "t", "objective.name=mae", "model.embed_dim=48", "train.steps=2", "train.save_interval=2",
           "dist.deepspeed_config=zero2")  # fmt: skip
    d = tmp_path / "t" / "checkpoint-2"
    full = consolidate(d)["model"]
    student = Trainer(tiny(tmp_path / "s", f"teacher.checkpoint={d}", "train.steps=1"), pretrain_task, with_data=False)
    for k, v in student.teacher.encoder.state_dict().items():
        assert torch.equal(v, full[f"encoder.{k}"]), k
    init = Trainer(tiny(tmp_path / "i", "objective.name=mae", "model.embed_dim=48", f"model.init={d}"), pretrain_task,
                   with_data=False)  # fmt: skip
    for k, v in init.model.state_dict().items():
        assert torch.equal(v, full[k]), k

    shard = max(d.glob("*optim_states.pt"), key=lambda p: p.stat().st_size)  # the fp32 weights and Adam moments
    flip_inside_a_tensor(shard)
    with pytest.raises(CheckpointError, match=rf"{d}: {shard.name}: its SHA-256 does not match {META}"):
        Trainer(tiny(tmp_path / "s2", f"teacher.checkpoint={d}", "train.steps=1"), pretrain_task, with_data=False)


def test_deepspeed_json_must_agree_with_the_amd_fast_config(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=4 disagrees with optim.accum_steps=2"):
        deepspeed_config(str(cfg), micro_batch=8, accum_steps=2, world_size=2, clip_grad=1.0)
    cfg.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match=r"train_batch_size=64 disagrees with the global batch .*=32"):
        deepspeed_config(str(cfg), micro_batch=8, accum_steps=2, world_size=2, clip_grad=1.0)
    ds = deepspeed_config("zero3", micro_batch=8, accum_steps=2, world_size=2, clip_grad=0.5)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (32, 2, 0.5)
    with pytest.raises(ConfigError, match="zero9"):
        deepspeed_config("zero9", micro_batch=8, accum_steps=1, world_size=1, clip_grad=0.0)
    with pytest.raises(ConfigError, match="dist.engine=local but the launcher started 2 ranks"):
        uses_deepspeed(DistConfig(engine="local"), 2)
    assert uses_deepspeed(DistConfig(), 2) and not uses_deepspeed(DistConfig(), 1)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_2_ranks_with_zero3(tmp_path, teacher):
    """The other direction: a 1-process checkpoint (batch 16) continued on 2 ZeRO-3 ranks (micro-batch 8)."""
    args = [*common(teacher, 4), "train.save_interval=2", "train.keep_checkpoints=3"]
    one = Trainer(tiny(tmp_path / "one", *args, "data.batch_size=16"), pretrain_task)
    one.train()
    (tmp_path / "two").mkdir()
    for name in ("checkpoint-2.pt", "checkpoint-2.pt.json"):  # the checkpoint and its record (without it: unverified)
        shutil.copy(tmp_path / "one" / name, tmp_path / "two" / name)
    out = launch(2, tmp_path / "two", *args, "dist.deepspeed_config=zero3", "train.resume=auto")
    assert "checkpoint-2.pt: resharded onto 2 ranks" in out  # engine.load_checkpoint logs it
    two = consolidate(tmp_path / "two" / "checkpoint-4")
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)


NONFINITE_WORKER = """
import sys
import torch
from test_train import TINY
from amd_fast.config import load_config
from amd_fast.cli import dist_env
from amd_fast.pretraining import pretrain_task
from amd_fast.trainer import Trainer

rank, world, _ = dist_env()
cfg = load_config(None, TINY + [f"train.output_dir={sys.argv[1]}", "objective.name=mae", "train.steps=5",
                                "train.save_interval=100", "dist.deepspeed_config=zero2", "optim.clip_grad=0.5"])
trainer = Trainer(cfg, pretrain_task, torch.device("cpu"), rank, world)
real = trainer.objective

def objective(batch):  # a NaN loss on rank 1 only, at the third step
    loss, parts = real(batch)
    return (loss * float("nan"), parts) if (trainer.step == 2 and rank == 1) else (loss, parts)

trainer.objective = objective
outs = []
step = trainer.train_step
trainer.train_step = lambda micro: outs.append(step(micro)) or outs[-1]
trainer.train()
print(f"rank {rank}: skipped {[i + 1 for i, o in enumerate(outs) if o is None]} total {trainer.nonfinite_total}")
"""


def test_a_non_finite_step_on_one_rank_is_skipped_on_all(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(NONFINITE_WORKER)
    port = str(_free_port())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(worker),
           str(tmp_path / "out")]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    for rank in (0, 1):
        assert f"rank {rank}: skipped [3] total 1" in r.stdout


def test_finetune_on_2_ranks_matches_one_process(tmp_path):
    """`deepspeed amd_fast/finetune.py` with ZeRO-2: 2 ranks x micro-batch 16 == 1 process x 32 (no mixup and no
    drop path, which draw per rank), and the test accuracy is summed over the ranks' shards."""
    from amd_fast.config import FinetuneRunConfig, load_config

    base = ("--config", str(ROOT / "configs" / "finetune_tiny_image.yaml"), "model.embed_dim=48", "model.depth=2",
            "model.patch_size=7", "data.input_size=28", "data.size=512", "data.num_workers=0", "model.drop_path=0",
            "finetune.mixup=0", "finetune.cutmix=0", "finetune.eval_size=200", "train.steps=4", "train.log_interval=2",
            "train.save_interval=4", "train.autocast=off")  # fmt: skip
    out = launch(2, tmp_path / "ds", "data.batch_size=16", "dist.deepspeed_config=zero2", launcher="deepspeed",
                 script="amd_fast/finetune.py", base=base)  # fmt: skip
    assert "ZeRO stage 2, 2 ranks" in out
    ds_eval = json.loads((tmp_path / "ds" / "eval.json").read_text().splitlines()[-1])
    assert ds_eval["videos"] == 200

    cfg = load_config(base[1], [*base[2:], "data.batch_size=32", f"train.output_dir={tmp_path / 'one'}"],
                      root=FinetuneRunConfig)  # fmt: skip
    single = Trainer(cfg, ClassifyTask)
    single.train()
    one_eval = single.evaluation
    state = consolidate(tmp_path / "ds" / "checkpoint-4")
    ref = single.model.state_dict()
    assert state["model"].keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(state["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert ds_eval["top1"] == pytest.approx(one_eval["top1"], abs=0.5)  # 200 items: at most one may flip

    # saved on 2 ranks, resumed on 1 (the DeepSpeed shards consolidated, weights and Adam moments): 2 more steps
    # match an uninterrupted one-process run of 6 steps at the same global batch
    shutil.copytree(tmp_path / "ds" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    six = [*base[2:], "data.batch_size=32", "train.steps=6", "train.save_interval=6"]
    resumed = Trainer(load_config(base[1], [*six, f"train.output_dir={tmp_path / 'resumed'}", "train.resume=auto"],
                                  root=FinetuneRunConfig), ClassifyTask)  # fmt: skip
    assert resumed.step == 4
    resumed.train()
    straight = Trainer(
        load_config(base[1], [*six, f"train.output_dir={tmp_path / 'straight'}"], root=FinetuneRunConfig), ClassifyTask
    )
    straight.train()
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_teacher_partitioned_with_zero3_gives_the_same_losses(tmp_path, teacher):
    """teacher.zero3: each of 2 ranks holds half the teacher's weights, all-gathered per module in its forward;
    the losses are those of the replicated teacher (same ranks, same batches) within fp32 tolerance."""
    args = [*common(teacher, 3), "train.save_interval=3", "dist.deepspeed_config=zero2", "data.batch_size=8"]
    launch(2, tmp_path / "replicated", *args)
    out = launch(2, tmp_path / "sharded", *args, "teacher.zero3=true")
    m = re.search(r"teacher: ZeRO-3 over 2 ranks, (\d+) of (\d+) parameters on this rank", out)
    assert m, out[-3000:]
    local, full = int(m[1]), int(m[2])
    assert abs(local - full / 2) <= 64, (local, full)  # half, up to alignment padding
    rep, sh = (
        read_metrics(tmp_path / "replicated" / "metrics.jsonl"),
        read_metrics(tmp_path / "sharded" / "metrics.jsonl"),
    )
    assert [r["step"] for r in sh] == [1, 2, 3]
    for a, b in zip(sh, rep):
        for k in ("loss", "rec", "dir", "gen"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), (a["step"], k)
    rel = max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(sh, rep) for k in ("loss", "rec", "dir", "gen"))
    print(f"\nteacher ZeRO-3 on 2 ranks: {local} of {full} teacher parameters per rank; max relative loss difference "
          f"vs the replicated teacher {rel:.1e} over 3 steps")  # fmt: skip


def test_teacher_zero3_needs_deepspeed(tmp_path, teacher):
    with pytest.raises(ValueError, match="teacher.zero3=true"):
        Trainer(tiny(tmp_path, *common(teacher, 1), "teacher.zero3=true"), pretrain_task)


def test_end_of_run_evaluation_on_2_ranks(tmp_path, teacher):
    """train.eval_probe under DeepSpeed ZeRO-2: rank 0 evaluates the sharded checkpoint directory (consolidated) while
    the other rank waits; one table, one eval row, both ranks exit cleanly."""
    out = launch(2, tmp_path, *common(teacher, 4), "train.save_interval=4", "dist.deepspeed_config=zero2",
                 "train.eval_probe=true", "probe.train_size=64", "probe.test_size=32", "probe.epochs=2")  # fmt: skip
    assert out.count("end-of-run evaluation at step 4") == 1
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/probe_student_top1" in r] == [4]
    assert (tmp_path / "checkpoint-4").is_dir() and (tmp_path / "recon-4.png").exists()

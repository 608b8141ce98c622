"""DeepSpeed ZeRO on 2 CPU ranks (gloo) through the real entry point (`torchrun` / `deepspeed` + train.py).

A 2-rank run with micro-batch 8 sees exactly the samples (and masks) of a 1-process run with batch 16: rank r
reads perm[r::2] of the same epoch permutation, and every sample is seeded by its global index. So the two must
give the same losses and weights up to fp32 summation order.
"""

import json
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

from test_train import TINY, read_metrics, tiny  # noqa: E402

from amd_fast.checkpoint import list_ds_checkpoints  # noqa: E402
from amd_fast.config import ConfigError, DistConfig  # noqa: E402
from amd_fast.engine import consolidate, deepspeed_config, uses_deepspeed  # noqa: E402
from amd_fast.export import export_student  # noqa: E402
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
    return str(Trainer(cfg).train())


def common(teacher, steps):
    return [f"teacher.checkpoint={teacher}", f"train.steps={steps}", "train.log_interval=1", "optim.clip_grad=0.5"]


@pytest.fixture(scope="module")
def single(teacher, tmp_path_factory):
    """The 1-process reference: batch 16 = 2 ranks x micro-batch 8."""
    out = tmp_path_factory.mktemp("single")
    trainer = Trainer(tiny(out, *common(teacher, 6), "train.save_interval=6", "data.batch_size=16"))
    trainer.train()
    return read_metrics(out / "metrics.jsonl"), trainer.model.state_dict()


@pytest.mark.parametrize(
    "stage,micro,accum,launcher", [(2, 8, 1, "torchrun"), (3, 4, 2, "deepspeed")], ids=["zero2", "zero3-accum2"]
)
def test_zero_on_2_ranks_matches_one_process(tmp_path, teacher, single, stage, micro, accum, launcher):
    """Global batch 16 both ways: 2 ranks x micro-batch 8, or 2 ranks x 4 x accumulation 2 (the same samples)."""
    launch(2, tmp_path, *common(teacher, 6), "train.save_interval=6", f"dist.deepspeed_config=zero{stage}",
           f"data.batch_size={micro}", f"optim.accum_steps={accum}", launcher=launcher)  # fmt: skip
    ref_log, ref_model = single
    log = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in log] == [r["step"] for r in ref_log] == list(range(1, 7))
    for a, b in zip(log, ref_log):
        for k in ("loss", "rec", "dir", "gen"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), (a["step"], k)
    rel = max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(log, ref_log) for k in ("loss", "rec", "dir", "gen"))
    print(f"\nZeRO-{stage}, 2 ranks vs 1 process: max relative loss difference {rel:.1e} over 6 steps; "
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
        print(f"ZeRO-{stage} rank {s['rank']}: moments {s['moments_local']} of {2 * full}, "
              f"params {s['params_local']} of {full}")  # fmt: skip
        assert abs(s["moments_local"] - full) <= 64  # exp_avg + exp_avg_sq of half the parameters
        assert s["params_local"] == (pytest.approx(full / 2, abs=64) if stage == 3 else full)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_2_ranks_in_bf16_tracks_one_process(tmp_path, teacher, stage):
    """bf16 autocast on 2 ZeRO ranks (the DeepSpeed engine under torch.autocast, fp32 master weights): the losses
    of one bf16 process at the same global batch within 1.5% (tests/test_precision.py says why that bound), and
    the consolidated weights close to it. The two differ by bf16 rounding of per-rank vs whole-batch GEMMs."""
    bf16 = [*common(teacher, 4), "train.save_interval=4", "train.autocast=bfloat16"]
    launch(2, tmp_path / "ds", *bf16, f"dist.deepspeed_config=zero{stage}", "data.batch_size=8")
    one = Trainer(tiny(tmp_path / "one", *bf16, "data.batch_size=16"))
    one.train()
    log, ref = read_metrics(tmp_path / "ds" / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in log] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for a, b in zip(log, ref):
        for k in ("loss", "rec", "dir", "gen"):
            assert a[k] == pytest.approx(b[k], rel=1.5e-2), (a["step"], k, a[k], b[k])
    state = consolidate(tmp_path / "ds" / "checkpoint-4")
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(state["model"][k], v, rtol=0, atol=0.05 * max(1.0, v.abs().max().item()), msg=k)


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
                       "train.resume=auto"))  # fmt: skip
    assert type(one.engine).__name__ == "LocalEngine" and one.step == 5
    one.train()
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(v, a["model"][k], rtol=1e-4, atol=1e-6, msg=k)
    diff = max((v - a["model"][k]).abs().max().item() for k, v in one.model.state_dict().items())
    print(f"\nsaved on 2 ranks, resumed on 1: max |weight difference| at step 10 vs uninterrupted 2 ranks {diff:.1e}")

    # the exported single file reads back through the official-layout loader
    from amd_fast.models.checkpoint_io import load_pretrain

    path = export_student(tmp_path / "a" / "checkpoint-10", tmp_path / "student.pt")
    fresh = Trainer(tiny(tmp_path / "d", *common(teacher, 1)), with_data=False)
    load_pretrain(fresh.model, str(path))
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, a["model"][k]), k


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
    one = Trainer(tiny(tmp_path / "one", *args, "data.batch_size=16"))
    one.train()
    (tmp_path / "two").mkdir()
    shutil.copy(tmp_path / "one" / "checkpoint-2.pt", tmp_path / "two" / "checkpoint-2.pt")
    out = launch(2, tmp_path / "two", *args, "dist.deepspeed_config=zero3", "train.resume=auto")
    assert "onto 2 ranks (resharded) at step 2" in out
    two = consolidate(tmp_path / "two" / "checkpoint-4")
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)


NONFINITE_WORKER = """
import sys
import torch
from test_train import TINY
from amd_fast.config import load_config
from amd_fast.engine import dist_env
from amd_fast.trainer import Trainer

rank, world, _ = dist_env()
cfg = load_config(None, TINY + [f"train.output_dir={sys.argv[1]}", "objective.name=mae", "train.steps=5",
                                "train.save_interval=100", "dist.deepspeed_config=zero2", "optim.clip_grad=0.5"])
trainer = Trainer(cfg, torch.device("cpu"), rank, world)
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
    single = Trainer(cfg)
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
                                  root=FinetuneRunConfig))  # fmt: skip
    assert resumed.step == 4
    resumed.train()
    straight = Trainer(
        load_config(base[1], [*six, f"train.output_dir={tmp_path / 'straight'}"], root=FinetuneRunConfig)
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
        Trainer(tiny(tmp_path, *common(teacher, 1), "teacher.zero3=true"))


def test_end_of_run_evaluation_on_2_ranks(tmp_path, teacher):
    """train.eval_probe under DeepSpeed ZeRO-2: rank 0 evaluates the sharded checkpoint directory (consolidated) while
    the other rank waits; one table, one eval row, both ranks exit cleanly."""
    out = launch(2, tmp_path, *common(teacher, 4), "train.save_interval=4", "dist.deepspeed_config=zero2",
                 "train.eval_probe=true", "probe.train_size=64", "probe.test_size=32", "probe.epochs=2")  # fmt: skip
    assert out.count("end-of-run evaluation at step 4") == 1
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/probe_student_top1" in r] == [4]
    assert (tmp_path / "checkpoint-4").is_dir() and (tmp_path / "recon-4.png").exists()

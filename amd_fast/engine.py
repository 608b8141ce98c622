"""The training engine: the one module that imports `deepspeed` and `torch.distributed` for training.

Two engines, one interface, chosen once in `build_engine` and logged:

- `LocalEngine`: one plain process. PyTorch's fused AdamW, `clip_grad_norm_`, a skipped step on a non-finite
  loss or gradient, atomic single-file checkpoints (the trainer's path before DeepSpeed, bit for bit).
- `DeepSpeedEngine`: `deepspeed.initialize` over the *student only* (the frozen teacher is not an nn.Module
  and stays outside, replicated on every rank). DeepSpeed owns gradient reduction, ZeRO sharding, mixed
  precision and (sharded) checkpoints. Micro-batch, accumulation and clipping come from the amd_fast config.

Launch (each rank gets RANK / WORLD_SIZE / LOCAL_RANK from the launcher):

    deepspeed --num_gpus 8 amd_fast/train.py --config ...                   # GPUs (nccl)
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 amd_fast/train.py ... # CPU ranks (gloo)
    torchrun --nproc_per_node 8 amd_fast/train.py --config ...

A DeepSpeed checkpoint is a directory `<output_dir>/checkpoint-<step>/` (DeepSpeed's files, one RNG file per
rank, and `meta.json` written last, with every file's size and SHA-256: a directory without it is incomplete and never
resumed from). On the same number of ranks it resumes through `load_checkpoint`; on another number (one plain process
included) it is first consolidated: fp32 master weights and Adam moments of every parameter gathered from the shards
(`checkpoint.consolidate`, which needs no process group: export, fine-tuning and probing read it there too).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from amd_fast import checkpoint as ckpt
from amd_fast.config import ConfigError, DistConfig

log = logging.getLogger(__name__)

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def uses_deepspeed(dist_cfg: DistConfig, world_size: int) -> bool:
    if dist_cfg.engine == "local" and world_size > 1:
        raise ConfigError(f"dist.engine=local but the launcher started {world_size} ranks; use dist.engine=auto")
    return dist_cfg.engine == "deepspeed" or (dist_cfg.engine == "auto" and world_size > 1)


# ---------------------------------------------------------------------------------------------
# one plain process


class LocalEngine:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, accum_steps: int, clip_grad: float,
                 grad_scaler: torch.amp.GradScaler | None = None, model_io: ModelIO | None = None):  # fmt: skip
        """grad_scaler: fp16 autocast's dynamic loss scaling (PyTorch AMP; apex's amp in the references)."""
        self.model, self.optimizer = model, optimizer
        self.accum_steps, self.clip_grad = accum_steps, clip_grad
        self.scaler = grad_scaler
        self.io = model_io or ModelIO.plain(model)
        self.rank, self.world_size = 0, 1

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:  # lr_scale: layer-wise decay in fine-tuning (1 in pre-training)
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def forward(self, objective, batch):
        return objective(batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accum_steps
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, total_loss: torch.Tensor) -> bool:
        """Clip, then step unless the loss or the gradient norm is not finite. Returns whether it stepped.

        With fp16 loss scaling, gradients that overflowed at the current scale are not a failure of the run: the
        scaler skips that step and halves the scale (logged), as PyTorch AMP does; only a non-finite loss (or a
        non-finite clipped norm) counts as a non-finite step."""
        check = total_loss
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad, foreach=True)
            if self.scaler is None:
                check = check + norm
        # Host sync, once per optimizer step: the step must be skipped when the loss or the gradients are
        # not finite. (Free on CPU; one sync per step on CUDA, as the references' loss.item().)
        finite = bool(torch.isfinite(check))
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            if finite:
                self.scaler.step(self.optimizer)  # skipped by the scaler when the gradients overflowed
            self.scaler.update()
            if self.scaler.get_scale() < scale:
                log.info("fp16 loss scale: gradients overflowed at %g, step skipped, scale now %g", scale,
                         self.scaler.get_scale())  # fmt: skip
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def save(self, out_dir: Path, step: int, client_state: dict, keep: int, run_id: str) -> Path:
        """One file `checkpoint-<step>.pt`: the client state plus the weights, AdamW's state, the RNG states and
        the fp16 loss scaler's (a resume continues its scale); its record written after it."""
        scaler = {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}
        state = {**client_state, "model": self.io.state(), "optimizer": self.optimizer.state_dict(),
                 "rng": ckpt.rng_state(), "engine": scaler}  # fmt: skip
        return ckpt.save_checkpoint(state, out_dir, step, run_id, keep)

    def load(self, path: Path, verified: bool = False) -> dict:
        """A checkpoint of either kind (a DeepSpeed directory is consolidated first), verified against its record
        unless the caller just did; returns it (step, config, ...)."""
        state = ckpt.read_checkpoint(path, verified)
        self.model.load_state_dict(self.io.own(state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state.get("engine", {}):
            self.scaler.load_state_dict(state["engine"]["scaler"])
        if state.get("rng") is not None:
            ckpt.set_rng_state(state["rng"])
        return state

    def reduce_metrics(self, sums: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        # .item() here only: one host sync per log interval
        return {k: float(v) / n for k, v in sums.items()} if n else {}

    def peak_memory_max(self, local_bytes: int) -> int:
        return local_bytes

    def mean_over_ranks(self, x: torch.Tensor) -> float:
        return float(x)  # host sync

    def close(self) -> None:
        pass

    def shard_sizes(self) -> dict:
        """Elements held: every parameter and its Adam moments (one process holds them all)."""
        n = sum(p.numel() for p in self.model.parameters())
        moments = sum(v.numel() for s in self.optimizer.state.values() for k, v in s.items() if k.startswith("exp_avg"))
        return {"rank": 0, "world_size": 1, "zero_stage": None, "params_local": n, "moments_local": moments,
                "params_full": n}  # fmt: skip

    def barrier(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# DeepSpeed


def resolve_ds_config(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix != ".json":
        p = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not p.is_file():
        names = ", ".join(sorted(q.stem for q in DS_CONFIG_DIR.glob("*.json")))
        raise ConfigError(f"dist.deepspeed_config={name_or_path!r}: no file {p}; names in configs/deepspeed/: {names}")
    return p


def deepspeed_config(
    name_or_path: str, *, micro_batch: int, accum_steps: int, world_size: int, clip_grad: float
) -> dict:
    """The DeepSpeed JSON with its batch / accumulation / clipping keys taken from the amd_fast config.

    A key the JSON sets (anything but "auto") must agree with amd_fast's value: one source of truth for the
    global batch (micro-batch x accumulation x ranks), from which the learning rate is scaled."""
    path = resolve_ds_config(name_or_path)
    ds = json.loads(path.read_text())
    ours = {
        "train_micro_batch_size_per_gpu": (micro_batch, "data.batch_size"),
        "gradient_accumulation_steps": (accum_steps, "optim.accum_steps"),
        "train_batch_size": (micro_batch * accum_steps * world_size, "the global batch (data.batch_size x "
                             f"optim.accum_steps x {world_size} ranks)"),
        "gradient_clipping": (clip_grad, "optim.clip_grad"),
    }  # fmt: skip
    for key, (value, where) in ours.items():
        theirs = ds.get(key, "auto")
        if theirs != "auto" and theirs != value:
            raise ConfigError(f"{path.name}: {key}={theirs} disagrees with {where}={value}; remove the key or "
                              "set both to the same value")  # fmt: skip
        ds[key] = value
    return ds


class _StudentStep(nn.Module):
    """The module DeepSpeed wraps: the student, whose forward is one objective evaluation.

    The objective calls the student's sub-modules and reads some parameters directly (mask tokens, the fused
    qkv weight); running all of it inside one engine forward lets ZeRO-3 gather those as external parameters."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student  # its keys in a saved state are "student.<name>": `ckpt.consolidate` strips it

    def forward(self, batch, objective):
        return objective(batch)


def _skip_cpu_shm_build() -> None:
    # DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce on Linux CPUs (~40 s on 2 cores, more under
    # load) that only its inference all-reduce uses; training collectives go through gloo either way. Marking
    # it unavailable (DeepSpeed keeps this dict for exactly such edits) makes the first launch start at once.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class ModelIO:
    """How a task's weights go into a checkpoint (`state`) and come back (`own`: a saved state dict, in the
    saved layout, to the model's own names)."""

    def __init__(self, state, own):
        self.state, self.own = state, own

    @classmethod
    def plain(cls, model: nn.Module) -> ModelIO:
        return cls(model.state_dict, lambda sd: sd)


def make_engine(dist_cfg: DistConfig, model: nn.Module, optimizer, device: torch.device, world_size: int, *,
                micro_batch: int, accum_steps: int, clip_grad: float, autocast: torch.dtype | None = None,
                model_state=None, own_model_state=None):  # fmt: skip
    """DeepSpeed when the launch or `dist.engine` asks for it, else one plain process; same interface.
    autocast: the dtype training runs its forward in (fp16 needs loss scaling). model_state / own_model_state: the
    task's layout of its weights in a checkpoint (`ModelIO`; default: the model's own state dict)."""
    io = ModelIO(model_state, own_model_state) if model_state is not None else ModelIO.plain(model)
    if uses_deepspeed(dist_cfg, world_size):
        if autocast == torch.float16:
            raise ConfigError(
                "train.autocast=float16 needs loss scaling, which a DeepSpeed run takes from its JSON: "
                "use train.autocast=bfloat16, or train.autocast=off with an fp16 DeepSpeed config"
            )
        return DeepSpeedEngine(dist_cfg, model, optimizer, device, micro_batch=micro_batch, accum_steps=accum_steps,
                               clip_grad=clip_grad, model_io=io)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type) if autocast == torch.float16 else None
    return LocalEngine(model, optimizer, accum_steps=accum_steps, clip_grad=clip_grad, grad_scaler=scaler,
                       model_io=io)  # fmt: skip


def partition_teacher(module: nn.Module, dtype: torch.dtype, backend: str = "auto") -> nn.Module:
    """A frozen module as a ZeRO-3 inference engine (DeepSpeed's ZeRO-Inference: no optimizer): every rank keeps
    1/world of each weight and a forward all-gathers a module's weights when it runs, then frees them. Costs one
    all-gather of the teacher per step; saves (world - 1) / world of its memory on every rank."""
    import deepspeed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend=backend if backend != "auto" else _default_backend())
    cfg = {
        "train_micro_batch_size_per_gpu": 1,  # required by the config parser; nothing is trained
        "steps_per_print": 1_000_000_000,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False},
    }
    if dtype == torch.bfloat16:
        cfg["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        cfg["fp16"] = {"enabled": True}
    engine = deepspeed.initialize(model=module, config=cfg)[0]
    engine.eval()
    params = list(module.parameters())
    local = sum(p.ds_tensor.numel() for p in params)
    full = sum(p.ds_numel for p in params)
    log.info("teacher: ZeRO-3 over %d ranks, %d of %d parameters on this rank", dist_size(), local, full)
    return engine


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def dist_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


class DeepSpeedEngine:
    def __init__(
        self,
        dist_cfg: DistConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        *,
        micro_batch: int,
        accum_steps: int,
        clip_grad: float,
        model_io: ModelIO | None = None,
    ):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed picks its accelerator
        import deepspeed
        import torch.distributed as dist

        self.dist = dist
        if device.type == "cpu":
            _skip_cpu_shm_build()
        backend = dist_cfg.backend if dist_cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        deepspeed.init_distributed(dist_backend=backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.config = deepspeed_config(
            dist_cfg.deepspeed_config, micro_batch=micro_batch, accum_steps=accum_steps,
            world_size=self.world_size, clip_grad=clip_grad,
        )  # fmt: skip
        self.zero_stage = self.config.get("zero_optimization", {}).get("stage", 0)
        self.model = model
        self.io = model_io or ModelIO.plain(model)
        # Parameter names in the optimizer's order, taken before ZeRO-3 replaces the parameters by empty shards.
        names = {id(p): n for n, p in model.named_parameters()}
        self.group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        # The client optimizer is PyTorch's fused AdamW: DeepSpeed's own Adam would JIT-build fused_adam / cpu_adam.
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=_StudentStep(model), optimizer=optimizer, config=self.config
        )
        # DeepSpeed reads its checkpoint files with weights_only=False; this engine's loads go through ours
        self.engine.checkpoint_engine.load = ckpt.load_ds_file
        self.accum_steps = accum_steps
        self._micro = 0
        log.info(
            "engine: DeepSpeed %s, ZeRO stage %d, %d ranks (%s), config %s",
            deepspeed.__version__, self.zero_stage, self.world_size, backend, dist_cfg.deepspeed_config,
        )  # fmt: skip

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:  # the ZeRO optimizer forwards these to the wrapped AdamW's
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def forward(self, objective, batch):
        return self.engine(batch, objective)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself
        self._micro += 1
        if self._micro < self.accum_steps:
            self.engine.step()  # not at the accumulation boundary: DeepSpeed only counts the micro-step

    def step(self, total_loss: torch.Tensor) -> bool:
        """The boundary step: reduce (ZeRO 0/1), clip, step. ZeRO 1-3 skip a step whose gradient norm is not
        finite (agreed across ranks); returns whether the step was applied."""
        self._micro = 0
        skipped = self.engine.skipped_steps
        self.engine.step()
        return self.engine.skipped_steps == skipped

    def reduce_metrics(self, sums: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        """Mean over the window and over ranks: one all-reduce per log interval."""
        if not n:
            return {}
        keys = sorted(sums)
        v = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32).to(self.engine.device) for k in keys])
        self.dist.all_reduce(v)
        v = (v / (n * self.world_size)).tolist()  # .tolist(): the host sync of this log interval
        return dict(zip(keys, v))

    def mean_over_ranks(self, x: torch.Tensor) -> float:
        """One scalar's mean over the ranks (a small all-reduce; the host sync is the caller's reason to ask)."""
        v = x.detach().float().reshape(1).to(self.engine.device, copy=True)  # all_reduce works in place
        self.dist.all_reduce(v)
        return float(v) / self.world_size

    def peak_memory_max(self, local_bytes: int) -> int:
        t = torch.tensor([local_bytes], dtype=torch.int64, device=self.engine.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        """End of the process: every rank leaves together and the process group is torn down (left to interpreter
        exit, gloo's threads can abort a rank that has finished: "terminate called without an active exception")."""
        if self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()

    # checkpoints -----------------------------------------------------------------------------

    def save(self, out_dir: Path, step: int, client_state: dict, keep: int, run_id: str = "") -> Path:
        """Every rank writes its shard; rank 0 writes meta.json last (the completeness marker, with every file's
        size and SHA-256, checked wherever the directory is read), then prunes this run's older checkpoints."""
        tag = f"checkpoint-{step}"
        path = out_dir / tag
        client_state = {**client_state, "param_group_names": self.group_names}  # for `ckpt.consolidate`
        self.engine.save_checkpoint(str(out_dir), tag=tag, client_state=client_state, save_latest=False)
        ckpt.save_atomic(ckpt.rng_state(), path / f"rng-rank{self.rank}.pt")
        (path / f"shard-rank{self.rank}.json").write_text(json.dumps(self.shard_sizes()))  # what this rank holds
        self.barrier()
        if self.rank == 0:
            ckpt.write_ds_meta(path, step=step, world_size=self.world_size, zero_stage=self.zero_stage, run_id=run_id)
            ckpt.prune(out_dir, keep, run_id, step)
        self.barrier()
        return path

    def load(self, path: Path, verified: bool = False) -> dict:
        """A DeepSpeed checkpoint saved on this many ranks resumes as saved (sharded weights, optimizer, this rank's
        RNG); any other checkpoint (another rank count, or one process) is read whole (`read_checkpoint`) and
        resharded into this run's shards. Returns the client state (step, config, ...)."""
        path = Path(path)
        if ckpt.is_ds_checkpoint(path) and ckpt.read_meta(path)["world_size"] == self.world_size:
            why = None if verified else ckpt.verify_ds_checkpoint(path)
            if why is not None:
                raise ckpt.CheckpointError(f"{path}: {why}")
            _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
            rng = path / f"rng-rank{self.rank}.pt"
            if rng.exists():  # checked with the directory above
                ckpt.set_rng_state(ckpt.load_file(rng))
            return client
        state = ckpt.read_checkpoint(path, verified)
        self.load_full({**state, "model": self.io.own(state["model"])})
        log.info("%s: resharded onto %d ranks", path, self.world_size)
        return state

    def load_full(self, state: dict) -> None:
        """Weights and Adam moments from a one-process (or consolidated) checkpoint, into this run's shards."""
        opt_state = state["optimizer"]["state"]
        if self.zero_stage == 0:  # the client AdamW holds whole parameters: load as one process does
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            step = next(iter(opt_state.values()))["step"] if opt_state else None
            if step is not None:
                # ZeRO creates AdamW's state for its flat fp32 partitions at the first step; create it now
                opt, base = self.optimizer, _base(self.optimizer)
                flats = (
                    opt.single_partition_of_fp32_groups if self.zero_stage <= 2 else opt.fp32_partitioned_groups_flat
                )
                for hp in flats:
                    base.state[hp] = {
                        "step": torch.as_tensor(step, dtype=torch.float32).clone(),
                        "exp_avg": torch.zeros_like(hp),
                        "exp_avg_sq": torch.zeros_like(hp),
                    }
                if self.zero_stage <= 2:
                    opt._lazy_init_hp_params_optimizer_state()  # links each parameter to its slice of that state
            # the module's weights (what forward reads) and, below, the fp32 master copies (what the step updates)
            if self.zero_stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0):
                    if self.rank == 0:
                        self.model.load_state_dict(state["model"])
            else:
                self.model.load_state_dict(state["model"])
            named = dict(self.model.named_parameters())
            for i, name in enumerate(n for group in self.group_names for n in group):
                safe_set_full_fp32_param(named[name], state["model"][name].to(torch.float32))
                for key in ("exp_avg", "exp_avg_sq"):
                    if i in opt_state:
                        safe_set_full_optimizer_state(named[name], opt_state[i][key].to(torch.float32), key)
            for s in _base(self.optimizer).state.values():
                if step is not None and "step" in s:
                    s["step"] = (
                        torch.as_tensor(step, dtype=torch.float32).clone() if torch.is_tensor(s["step"]) else int(step)
                    )
        if state.get("rng") is not None:
            ckpt.set_rng_state(state["rng"])

    def shard_sizes(self) -> dict:
        """Elements held on this rank: parameters, and Adam moments (exp_avg + exp_avg_sq)."""
        params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.model.parameters())
        moments = sum(
            v.numel() for s in _base(self.optimizer).state.values() for k, v in s.items() if k.startswith("exp_avg")
        )
        full = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        return {"rank": self.rank, "world_size": self.world_size, "zero_stage": self.zero_stage,
                "params_local": params, "moments_local": moments, "params_full": full}  # fmt: skip


def _base(optimizer):
    """The client AdamW inside a ZeRO optimizer (ZeRO-0 uses the client optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)

"""Training checkpoints and output folders: written atomically, verified, found again by `--resume auto`.

A checkpoint is one `torch.save` dict: `model` (the PretrainModel state, which is also the VideoMAE /
AMD pre-training layout, so official loaders read it), `optimizer`, `step`, `rng`, `config`, `meta`.
It is written to a temporary file in the same directory, flushed and fsync'ed, then renamed over the
final name: a crash leaves either the previous complete checkpoint or the new one, never half a file.
Then its record `checkpoint-N.pt.json` is written the same way (size, SHA-256, the run's id): a checkpoint
without it, or whose bytes no longer match it, is not resumed from (`verify_file`).

Every checkpoint amd_fast reads goes through `read_checkpoint` (resume, teacher.checkpoint, model.init, finetune.init,
probe.init, export, visualize): a file with a record is checked against it first (a mismatch is an error naming the
file); a file without one (an official VideoMAE / MAE file) is read as it is; a DeepSpeed directory is checked against
its meta.json and consolidated.

An output folder belongs to one run (`run.json`: its id), its teacher's folder (`teacher/`) included. A run that finds
another run's checkpoints or metrics there stops at start unless told to resume (`--resume auto`) or to move the old
run aside (`--overwrite`, the only way to start over); a resume that finds checkpoints but none it can use stops too,
naming each and why (`resume_point`). Keep-N cleanup deletes only checkpoints whose record names this run, up to the
step being saved.

A DeepSpeed checkpoint is a directory written by amd_fast/engine.py, its meta.json (every file's size and SHA-256)
written last; it is read here too, whole (`consolidate`: DeepSpeed's zero_to_fp32 merges the shards, no process group
needed). DeepSpeed is imported inside the functions that read its files: importing this module never imports it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from amd_fast.models.checkpoint_io import CheckpointError, torch_load

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
_DIR_NAME = re.compile(r"^checkpoint-(\d+)$")
_ASIDE_NAME = re.compile(r"^checkpoint-(\d+)(?:\.pt)?\.unhealthy$")  # `set_aside_unhealthy`
META = "meta.json"  # a DeepSpeed checkpoint directory's completeness marker (written last)
TEACHER_DIR = "teacher"  # train.py pre-trains a missing teacher in <output_dir>/teacher: part of the run


TMP_MARK = ".tmp-"  # temporary files are `.<name>.tmp-<pid>`: never matched as checkpoints, removed at start


def _write_atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # make the rename itself durable
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_atomic(obj, path: str | Path) -> Path:
    return _write_atomic(Path(path), lambda f: torch.save(obj, f))


def write_json_atomic(obj, path: str | Path) -> Path:
    return _write_atomic(Path(path), lambda f: f.write(json.dumps(obj, indent=1).encode()))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_record(path: Path, **fields) -> None:
    """`<file>.json`: `fields`, the file's size and SHA-256. Written after the file (the completeness marker); every
    read checks the file against it (`read_checkpoint`)."""
    write_json_atomic({**fields, "size": path.stat().st_size, "sha256": _sha256(path)}, record_path(path))


def save_checkpoint(state: dict, out_dir: Path, step: int, run_id: str, keep: int) -> Path:
    """A one-process checkpoint: the file, then its record (written last: the completeness marker), then keep-N."""
    path = save_atomic(state, Path(out_dir) / f"checkpoint-{step}.pt")
    write_record(path, step=step, run_id=run_id)
    prune(out_dir, keep, run_id, step)
    return path


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(record_path(Path(path)).read_text())
    except (OSError, ValueError):
        return None


def verify_file(path: Path) -> str | None:
    """Why a one-process checkpoint cannot be resumed from, or None when its bytes match its record."""
    path = Path(path)
    rec = read_record(path)
    if rec is None:
        return f"no record {record_path(path).name} (written after the checkpoint: the write did not finish)"
    size = path.stat().st_size
    if size != rec.get("size"):
        return f"size {size} bytes, the record says {rec.get('size')} (cut short or overwritten)"
    if _sha256(path) != rec.get("sha256"):
        return "its SHA-256 does not match the record (damaged)"
    return None


def load_file(path: str | Path) -> dict:
    """A file of tensors and plain containers, unchecked (`checkpoint_io.torch_load`: weights_only). A checkpoint is
    read with `read_checkpoint`, which checks it first."""
    return torch_load(path)


def rng_state() -> dict:
    """RNG states in types `torch.load(weights_only=True)` accepts (tensors, ints, floats, tuples)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """One-process checkpoint files (temporary files never match the name), oldest first; unverified."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def _run_of(path: Path) -> str | None:
    """The run id a checkpoint of either kind was written by (its record or meta.json), None if it has none."""
    try:
        rec = read_meta(path) if is_ds_checkpoint(path) else read_record(path)
    except (OSError, ValueError):
        rec = None
    return (rec or {}).get("run_id")


def prune(directory: str | Path, keep: int, run_id: str, step: int) -> None:
    """Keep the newest `keep` checkpoints (either kind) that run `run_id` wrote, up to `step` (the one just saved).
    Never another run's or an unrecorded one, nor one past `step`: a damaged one `--resume auto` passed over, or the
    rest of a run resumed from further back (the run writes those steps again)."""
    found = sorted(list_checkpoints(directory) + list_ds_checkpoints(directory))
    ours = [p for s, p in found if s <= step and _run_of(p) == run_id]
    for p in ours[:-keep] if keep > 0 else []:
        if is_ds_checkpoint(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
            record_path(p).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# DeepSpeed checkpoint directories (written by amd_fast/engine.py), and reading either kind


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())


def list_ds_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete DeepSpeed checkpoint directories (meta.json present), oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _DIR_NAME.match(p.name)) and (p / META).exists()]
    return sorted(found)


def write_ds_meta(path: Path, **fields) -> None:
    """A DeepSpeed checkpoint directory's meta.json: `fields`, and every file's size and SHA-256. Written last, once
    every rank has written its files (the completeness marker)."""
    files = {f.name: f for f in sorted(Path(path).iterdir()) if f.is_file() and f.name != META}
    sizes = {name: f.stat().st_size for name, f in files.items()}
    write_json_atomic({**fields, "files": sizes, "sha256": {name: _sha256(f) for name, f in files.items()}},
                      Path(path) / META)  # fmt: skip


def verify_ds_checkpoint(path: Path) -> str | None:
    """Why a DeepSpeed checkpoint directory cannot be resumed from, or None when its files match meta.json (sizes;
    SHA-256 too where meta.json has them)."""
    path = Path(path)
    if not (path / META).exists():
        return f"no {META} (written last: the save did not finish)"
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return f"unreadable {META} ({e})"
    for name, size in (meta.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {META} says {size} (cut short or overwritten)"
    for name, digest in (meta.get("sha256") or {}).items():
        if _sha256(path / name) != digest:
            return f"{name}: its SHA-256 does not match {META} (damaged)"
    return None


def verify(path: Path) -> str | None:
    """Why a checkpoint of either kind cannot be resumed from, or None when it matches its record / meta.json."""
    return verify_ds_checkpoint(path) if is_ds_checkpoint(path) else verify_file(path)


def find_resume(directory: str | Path) -> Path | None:
    """The newest checkpoint of either kind that verifies: `checkpoint-N.pt` (one process; its record's size and
    SHA-256) or `checkpoint-N/` (DeepSpeed; meta.json's file sizes and SHA-256). A damaged one is named, with why, and
    the next older one is tried."""
    found = sorted(list_checkpoints(directory) + list_ds_checkpoints(directory), reverse=True)
    for _, path in found:
        why = verify(path)
        if why is None:
            return path
        log.warning("not resuming from %s: %s; trying an older checkpoint", path, why)
    return None


def _every_checkpoint(directory: Path) -> list[tuple[Path, str, bool]]:
    """Every checkpoint in `directory`, newest first: (path, why it cannot be resumed from, whether its save finished:
    its record / meta.json written, or set aside as unhealthy). Called when none verifies."""
    found = []
    for p in directory.iterdir() if directory.is_dir() else ():
        if m := _ASIDE_NAME.match(p.name):
            found.append((int(m.group(1)), p, "set aside as unhealthy (written after the run's trouble began)", True))
        elif (m := _NAME.match(p.name)) or ((m := _DIR_NAME.match(p.name)) and p.is_dir()):
            marker = p / META if is_ds_checkpoint(p) else record_path(p)
            found.append((int(m.group(1)), p, verify(p), marker.exists()))
    return [(p, why, done) for _, p, why, done in sorted(found, key=lambda f: (f[0], f[1].name), reverse=True)]


def resume_point(directory: str | Path) -> Path | None:
    """Where `--resume auto` continues: the newest checkpoint that verifies (`find_resume`), or None (a fresh start)
    when the folder holds none of a previous run's. The newest one without its record or meta.json does not count: the
    save was killed before its completeness marker, and the run writes that step again. A folder whose checkpoints
    are all unusable is an error listing each and why: a fresh start there would overwrite them and drop the run's
    metric rows."""
    path = find_resume(directory)
    if path is not None:
        return path
    found = _every_checkpoint(Path(directory))
    if found and not found[0][2]:
        found = found[1:]
    if found:
        listed = "; ".join(f"{p.name}: {why}" for p, why, _ in found)
        raise CheckpointError(
            f"{directory} holds a previous run but none of its checkpoints can be resumed from: {listed}. To start "
            "over pass --overwrite (the old run is moved aside, not deleted), or choose another train.output_dir."
        )
    return None


def is_ds_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir()


def ds_safe_globals() -> list:
    """DeepSpeed's data-holder classes found in its checkpoint files (a loss scaler's numbers, the ZeRO stage enum,
    a fragment's address): allow-listed so that its files load with weights_only=True like every other."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_ds_file(path, map_location="cpu"):
    """One file of a DeepSpeed checkpoint, read as every checkpoint is (weights_only), its data classes allowed."""
    return torch_load(path, map_location, tuple(ds_safe_globals()))


_PREFIX = "student."  # the key prefix of the module DeepSpeed wraps (engine.py's _StudentStep)


def consolidate(path: str | Path) -> dict:
    """A DeepSpeed checkpoint directory -> the one-process checkpoint dict (`model`, `optimizer` in
    torch.optim.AdamW's layout, `step`, `rng` of rank 0, `config`, `meta`), in fp32, on the CPU.

    The weights are the fp32 master copies; the Adam moments are merged from the ZeRO shards by the same code
    that merges the weights (DeepSpeed's zero_to_fp32), so a checkpoint saved on any number of ranks loads on
    any other."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, SINGLE_PARTITION_OF_FP32_GROUPS
    from deepspeed.utils import zero_to_fp32 as z

    path = Path(path)
    meta = read_meta(path)
    # rank 0's module file holds the client state (ZeRO-3 names it zero_pp_rank_0_mp_rank_00_model_states.pt)
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if meta["zero_stage"] == 3 else "mp_rank_00_model_states.pt"
    top_file = path / name
    top = load_ds_file(top_file)
    optim_files = sorted(glob.glob(str(path / "*zero_pp_rank_*_optim_states.pt")), key=z.natural_keys)
    if meta["zero_stage"] == 0 or not optim_files:
        # no ZeRO: DeepSpeed saved the whole module and the client optimizer's own state dict
        model = {k.removeprefix(_PREFIX): v.float() for k, v in top["module"].items()}
        optimizer = top["optimizer"]
    else:
        model_files = z.get_model_state_files(str(path))
        for f in model_files:  # DeepSpeed's parser below unpickles them: each must first pass a weights_only read
            load_ds_file(f)
        zero_model_states = z.parse_model_states(model_files)
        shards = [load_ds_file(f)[OPTIMIZER_STATE_DICT] for f in optim_files]
        stage, world = shards[0]["zero_stage"], len(shards)
        base = [s["base_optimizer_state"] if stage <= 2 else s["optimizer_state_dict"] for s in shards]

        def merged(flat_groups):
            if stage <= 2:
                sd = z._get_fp32_state_dict_from_zero2_checkpoint(
                    world, flat_groups, zero_model_states, False, shards[0].get("param_alignment_paddings")
                )
            else:
                sd = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, zero_model_states, False)
            return {k.removeprefix(_PREFIX): v for k, v in z.to_torch_tensor(sd).items()}

        key = SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else FP32_FLAT_GROUPS
        model = merged([s[key] for s in shards])
        moments = {}
        for m in ("exp_avg", "exp_avg_sq"):
            moments[m] = merged([[b["state"][g][m] for g in range(len(b["param_groups"]))] for b in base])
        step = next(iter(base[0]["state"].values()))["step"]
        # torch.optim.AdamW's layout: parameters numbered in the order of `param_group_names` (the engine's save)
        state, groups, i = {}, [], 0
        for g, names in zip(base[0]["param_groups"], top["param_group_names"]):
            ids = []
            for name in names:
                state[i] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(),
                            "exp_avg": moments["exp_avg"][name], "exp_avg_sq": moments["exp_avg_sq"][name]}  # fmt: skip
                ids.append(i)
                i += 1
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        optimizer = {"state": state, "param_groups": groups}
    rng_file = path / "rng-rank0.pt"
    return {
        "model": model,
        "optimizer": optimizer,
        "step": top["step"],
        "nonfinite_total": top.get("nonfinite_total", 0),
        "health": top.get("health", {}),
        "rng": load_file(rng_file) if rng_file.exists() else None,
        "config": top["config"],
        "meta": {**top.get("meta", {}), "consolidated_from": str(path), "saved_world_size": meta["world_size"]},
    }


def read_checkpoint(path: str | Path, verified: bool = False) -> dict:
    """The one reader of checkpoints: a file or a DeepSpeed directory -> its dict. A file with a record
    (`<file>.json`) is checked against it first (size, SHA-256); a file without one (an official VideoMAE / MAE file)
    is read as it is; a DeepSpeed directory is checked against its meta.json, then consolidated into the one-process
    layout (`model`, `optimizer`, `step`, `rng`, `config`, `meta`). Errors name the file and why. The weights loaders
    (checkpoint_io.load_encoder / load_pretrain, classifier.load_classifier) take the dict. verified: `find_resume`
    has just checked it (the SHA-256 of a large file is not worth computing twice)."""
    path = Path(path)
    if not verified:
        why = verify(path)
        if why is not None and (is_ds_checkpoint(path) or read_record(path) is not None):
            raise CheckpointError(f"{path}: {why}")
    if is_ds_checkpoint(path):
        return consolidate(path)
    return load_file(path)


# ---------------------------------------------------------------------------------------------
# output folders

RUN_FILE = "run.json"


def _run_artifacts(out_dir: Path, nested: tuple[str, ...]) -> list[str]:
    """What marks a folder as used by a run: checkpoints (either kind), metrics, evaluation results; and those of the
    `nested` folders (a run's earlier stage: its teacher)."""
    if not out_dir.is_dir():
        return []
    names = []
    for p in sorted(out_dir.iterdir()):
        if _NAME.match(p.name) or _DIR_NAME.match(p.name) or p.name in ("metrics.jsonl", "eval.json"):
            names.append(p.name)
        elif p.name in nested:
            names += [f"{p.name}/{n}" for n in _run_artifacts(p, ())]
    return names


def prepare_output_dir(
    out_dir: str | Path, resume: str, overwrite: bool, nested: tuple[str, ...] = (TEACHER_DIR,)
) -> None:
    """At start, before anything is written (rank 0 only). A folder holding another run's checkpoints or metrics
    (its teacher's folder included: `nested`) is only reused when told: resume, or overwrite (the old run is moved
    aside to `<dir>.old-<time>`, never deleted). Temporary files left by a killed write are removed."""
    out_dir = Path(out_dir)
    used = _run_artifacts(out_dir, nested)
    if used and overwrite:
        aside = out_dir.with_name(f"{out_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(out_dir, aside)
        log.warning("--overwrite: the previous run in %s was moved to %s", out_dir, aside)
    elif used and not resume:
        shown = ", ".join(used[:4]) + (f" and {len(used) - 4} more" if len(used) > 4 else "")
        raise CheckpointError(
            f"{out_dir} holds a previous run ({shown}). To continue it pass --resume auto; to start over pass "
            "--overwrite (the old run is moved aside, not deleted); or choose another train.output_dir."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in out_dir.rglob(f"*{TMP_MARK}*"):
        if p.is_file():
            log.info("removing %s (a write interrupted by a crash)", p)
            p.unlink(missing_ok=True)


def run_id(out_dir: str | Path) -> str:
    """This folder's run id (run.json), made on a fresh start; a resumed run keeps it."""
    path = Path(out_dir) / RUN_FILE
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        rid = uuid.uuid4().hex[:12]
        write_json_atomic({"run_id": rid, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, path)
        return rid


def set_aside_unhealthy(paths: list[Path]) -> None:
    """Checkpoints written from a run that then went unhealthy: renamed `<name>.unhealthy` (kept for inspection,
    never resumed from)."""
    for p in paths:
        os.replace(p, p.with_name(p.name + ".unhealthy"))
        if record_path(p).exists():
            os.replace(record_path(p), record_path(p).with_name(record_path(p).name + ".unhealthy"))
        log.warning("set aside %s as %s.unhealthy: written after the run's trouble began", p, p.name)


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop the metric rows past `step` (logged after the checkpoint a run resumes from): each step once."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a line cut short by a kill
    _write_atomic(path, lambda f: f.write("".join(x + "\n" for x in keep).encode()))

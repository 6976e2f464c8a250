"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimiser, scheduler, data position, RNG.

Layout under a run's folder:
    run.json                      the model, training and data configs the folder belongs to
    checkpoints/step_00000100/    one DCP checkpoint (a .distcp file a rank, .metadata) + meta.json
DCP stores every tensor with its global shape, so a checkpoint written by N ranks (sharded DTensors)
or by one process (plain tensors) loads into M ranks: each reads the slices of its shards. A
checkpoint is written to a hidden .tmp folder and renamed when complete (meta.json is written last),
so a run killed while saving leaves the previous checkpoint the newest.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .config import RESUMABLE_CHANGES
from .distributed import Runtime, barrier

RUN_FILE = "run.json"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"step_(\d{8})")


def run_record(model_config, train_config, data) -> dict:
    return {"model": model_config.to_dict(), "train": train_config.to_dict(), "data": data.describe()}


def check_compatible(saved: dict, current: dict, where: Path) -> None:
    """ValueError naming what differs between a saved run record and the current one."""
    diffs = []
    for part in ("model", "data"):
        a, b = saved.get(part, {}), current[part]
        diffs += [f"{part}.{k}: saved {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    a, b = saved.get("train", {}), current["train"]
    diffs += [f"train.{k}: saved {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
              if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)]
    if diffs:
        raise ValueError(f"{where} belongs to another run configuration; choose another output folder. "
                         f"Differences: {'; '.join(diffs)}")


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint under out/checkpoints, or None."""
    found = [p for p in (out / "checkpoints").glob("step_*") if _STEP_DIR.fullmatch(p.name) and (p / META_FILE).is_file()]
    return max(found, key=lambda p: p.name, default=None)


def read_meta(path: Path) -> dict:
    return json.loads((path / META_FILE).read_text())


def _state(model, optimizer, scheduler, step: int, runtime: Runtime) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    rng = {"cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(runtime.device)
    # Every rank draws the same random numbers (same seed, same calls), so rank 0's RNG stands for all
    return {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "step": step, "rng": rng}


def save(out: Path, model, optimizer, scheduler, step: int, runtime: Runtime, record: dict, keep: int) -> Path:
    """Writes step `step`'s checkpoint (every rank calls this) and prunes all but the `keep` newest."""
    root = out / "checkpoints"
    final, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    if runtime.main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save cut short earlier
    barrier(runtime)
    with _single_process_quiet():
        dcp.save(_state(model, optimizer, scheduler, step, runtime), checkpoint_id=str(tmp))
    barrier(runtime)
    if runtime.main:
        meta = {**record, "step": step, "world_size": runtime.world_size, "rng": sorted(_state_rng_keys(runtime))}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        if final.exists():  # a checkpoint of this step from a run that was resumed from an earlier one
            shutil.rmtree(final)
        tmp.rename(final)
        done = sorted(p for p in root.glob("step_*") if _STEP_DIR.fullmatch(p.name))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(runtime)
    return final


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes a single process when there is no process group: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _state_rng_keys(runtime: Runtime) -> list[str]:
    return ["cpu", "cuda"] if runtime.device.type == "cuda" else ["cpu"]


def load(path: Path, model, optimizer, scheduler, runtime: Runtime) -> int:
    """Loads a checkpoint into the (sharded) model, optimiser and scheduler, sets the RNG, returns
    its step. The caller has checked read_meta(path) against the current run."""
    meta = read_meta(path)
    state = _state(model, optimizer, scheduler, 0, runtime)
    saved_rng = set(meta.get("rng", ["cpu"]))
    state["rng"] = {k: v for k, v in state["rng"].items() if k in saved_rng}  # a CPU run's checkpoint on CUDA
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], runtime.device)
    return int(state["step"])

"""Checkpoints: engine state, data position, RNG, MLflow run id; atomic; keep the last K.

Layout of one checkpoint folder `step_000020/`:
    engine/            the engine's own files (DeepSpeed shards, or ddp_state.pt)
    rng/rank_<r>.pt    each rank's RNG state
    meta.json          step, data positions per dp rank, MLflow run id, launch id

Every rank writes into `step_000020.tmp/`; after a barrier rank 0 writes
meta.json last and renames the folder. A crash at any point leaves either the
previous checkpoints untouched or a `.tmp` folder that readers ignore.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "meta.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str) -> Optional[str]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"'{path}' is not a longctx checkpoint (no meta.json)")
    with open(meta_path) as f:
        return json.load(f)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(root: str, step: int, engine, meta: dict, *, rank: int, keep: int) -> str:
    """Collective: every rank calls it. Returns the final folder."""
    final = os.path.join(root, step_dir_name(step))
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(os.path.join(tmp, "engine"))
        os.makedirs(os.path.join(tmp, "rng"))
    _barrier()
    engine.save(os.path.join(tmp, "engine"))
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{rank}.pt"))
    _barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "step": step}, f, indent=2)
        if os.path.exists(final):  # the same step saved again (e.g. a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str, engine, *, rank: int) -> dict:
    """Collective: restores engine and this rank's RNG; returns meta."""
    meta = read_meta(path)
    engine.load(os.path.join(path, "engine"))
    rng_file = os.path.join(path, "rng", f"rank_{rank}.pt")
    if os.path.isfile(rng_file):  # absent when resuming on a different world size
        # Python's RNG state is a tuple of ints: weights_only loading accepts it.
        set_rng_state(torch.load(rng_file, weights_only=True))
    return meta

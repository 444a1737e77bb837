"""Process-group set-up that does not depend on who launched us (Ray, a test, one process)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group() -> None:
    """A world of one, so code written for torch.distributed (and DeepSpeed) runs unchanged."""
    if dist.is_initialized():
        return
    # Set, not defaulted: values inherited from a parent (another run's process group, a
    # shell) would point this world of one at a port that is already taken.
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    for key in ("RANK", "LOCAL_RANK"):  # DeepSpeed reads these
        os.environ[key] = "0"
    os.environ["WORLD_SIZE"] = "1"
    dist.init_process_group("gloo", rank=0, world_size=1)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, by rank; `[obj]` in a world of one (with or without a process
    group). Under NCCL torch serialises through a tensor on the current CUDA device, which
    `pick_device` has set."""
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (the same device rule as `all_gather_object`)."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def pick_device(requested: str) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible to this worker")
    local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(local)
    return torch.device("cuda", local)

"""Run a function in N gloo processes on this machine and collect what each returns."""

from __future__ import annotations

import datetime
import io
import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, fn, args, queue, threads):
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
        try:
            out = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes survive this process; shared tensors would not
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_gloo(fn, world: int, *args, threads: int = 1) -> list:
    """`fn(rank, world, *args)` in `world` processes; returns their results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, queue, threads)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        while len(results) + len(errors) < world:
            rank, status, payload = queue.get(timeout=900)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
                break
    finally:
        for p in procs:
            if errors:
                p.terminate()
            p.join(timeout=30)
    if errors:
        raise RuntimeError("benchmark worker failed:\n" + "\n".join(f"[rank {r}]\n{t}" for r, t in errors.items()))
    return [results[r] for r in range(world)]

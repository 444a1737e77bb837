"""Run a test body in N gloo processes on this machine.

    results = run_distributed(body, world_size, *args, timeout=120)

`body(rank, world_size, *args)` runs in each child after
`dist.init_process_group("gloo")`; its return value (picklable) comes back in
`results[rank]`. If any rank raises, the parent raises an AssertionError that
contains every failing rank's traceback, and kills the ranks still running
(they would otherwise hang in a collective until gloo's own timeout).

`body` must be importable by the children (a module-level function), because
the children are started with the "spawn" method: forking a parent that has
already used torch's thread pools can deadlock.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (small race, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, fn, args, results, timeout):
    # One thread per process: the tests run several ranks on a couple of cores.
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # Gloo picks its interface from the hostname, which may not resolve in a
    # container; loopback always works for single-machine runs.
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Serialise to bytes: tensors put on a queue as-is are shared through
        # file descriptors that vanish when this process exits.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put(("ok", rank, buf.getvalue()))
    except BaseException:  # report everything, including KeyboardInterrupt/SystemExit
        results.put(("error", rank, traceback.format_exc()))


def run_distributed(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; return per-rank results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, world_size, port, fn, args, results, timeout),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    done: dict[int, object] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    first_error_at = None
    try:
        while len(done) + len(errors) < world_size:
            now = time.monotonic()
            if now > deadline:
                break
            # After the first failure give the other ranks a moment to report
            # their own error, then stop: they are probably stuck in a collective.
            if first_error_at is not None and now - first_error_at > 3.0:
                break
            try:
                status, rank, payload = results.get(timeout=0.2)
            except queue.Empty:
                # A child that died without reporting (segfault, OOM kill).
                for rank, p in enumerate(procs):
                    if (
                        rank not in done
                        and rank not in errors
                        and p.exitcode not in (None, 0)
                    ):
                        errors[rank] = f"process exited with code {p.exitcode} without reporting"
                        first_error_at = first_error_at or time.monotonic()
                continue
            if status == "ok":
                done[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
                first_error_at = first_error_at or time.monotonic()
    finally:
        for p in procs:
            if p.is_alive() and (errors or len(done) < world_size):
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        results.close()

    if errors:
        parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
        raise AssertionError(
            f"{len(errors)} of {world_size} ranks failed in {getattr(fn, '__name__', fn)}:\n"
            + "\n".join(parts)
        )
    if len(done) < world_size:
        missing = sorted(set(range(world_size)) - set(done))
        raise AssertionError(
            f"timed out after {timeout:.0f}s waiting for ranks {missing} in "
            f"{getattr(fn, '__name__', fn)}"
        )
    return [done[r] for r in range(world_size)]

"""Run a function in N processes on this machine and collect what each returns.

`run_gloo`: N gloo processes (the cp and kernel benchmarks). `launch`: a fresh process
group per call, gloo on CPU (ranks forked from a preloaded fork server) or NCCL with one GPU
per rank, where an out-of-memory rank is a result rather than a failure (`bench train`)."""

from __future__ import annotations

import datetime
import io
import os
import queue as queue_mod
import time
import traceback

import torch
import torch.multiprocessing as mp

from longctx.trainer.distributed import free_port


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
    port = free_port()
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


def _rank_main(rank, world, port, backend, threads, fn, args, results):
    """Entry of a spawned rank: env for the Trainer and DeepSpeed, the process group, fn."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import datetime
        import warnings

        import torch.distributed as dist

        # torch's and DeepSpeed's deprecation notices, once per rank and configuration, drown the table
        warnings.filterwarnings("ignore", category=FutureWarning)

        if backend == "nccl":
            torch.cuda.set_device(rank)
        else:
            os.environ["DS_ACCELERATOR"] = "cpu"
            torch.set_num_threads(threads)
            if os.path.exists("/sys/class/net/lo"):
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
        out = fn(rank, world, *args)
        results.put((rank, "ok", out))  # first: tearing down may wait for ranks the parent is about to end
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


MMAP_THRESHOLD = 65536  # bytes: glibc hands freed tensors back, so a CPU rank's peak is live memory


def _context(device: str, engine: str, preload: list[str]):
    """A fork server on CPU that imported `preload` once, before any rank exists: every rank
    then starts as a fork of a process that has imported but never run anything (no thread
    pool, no process group, no tensor), i.e. a fresh process, in a fraction of a second.
    On CUDA plain spawn (a module that asks CUDA anything at import
    would leave the server's children unable to use it, and seconds do not matter there)."""
    import multiprocessing

    if device == "cuda" or "forkserver" not in multiprocessing.get_all_start_methods():
        return torch.multiprocessing.get_context("spawn")
    ctx = torch.multiprocessing.get_context("forkserver")
    # DeepSpeed picks its accelerator on import: only preloaded where that is the CPU's
    ctx.set_forkserver_preload(list(preload) + (["deepspeed"] if device == "cpu" and engine == "deepspeed" else []))
    return ctx


def launch(fn, world: int, *args, device: str = "cpu", threads: int = 1, timeout: float = 900.0,
           engine: str = "ddp", preload: tuple = ("torch",)) -> dict:
    """`fn(rank, world, *args)` in `world` fresh processes (a new process group).

    Returns {"status": "ok" | "oom" | "error" | "timeout", "ranks": [...], "message": str}. A rank
    that reports an OOM, raises or dies ends the others (they would wait in a collective)."""
    ctx = _context(device, engine, preload)
    results = ctx.Queue()
    port = free_port()
    backend = "nccl" if device == "cuda" else "gloo"
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":  # read at process start: by the fork server the first time it starts
        env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, backend, threads, fn, args, results),
                             daemon=False) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    done, status, message, trace = {}, "ok", "", None
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world:
            if time.monotonic() > deadline:
                status, message = "timeout", f"no result after {timeout:.0f} s"
                break
            try:
                rank, kind, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    r, code = dead[0]
                    killed = code is not None and code < 0 and -code == 9
                    status = "oom" if killed else "error"
                    message = (f"rank {r} was killed (signal 9: out of memory?)" if killed
                               else f"rank {r} exited with code {code} without a result")
                    break
                continue
            if kind == "error":
                status, message, trace = "error", f"rank {rank}: " + payload.strip().splitlines()[-1][:300], payload
                break
            done[rank] = payload
            if payload.get("oom"):
                status, message = "oom", f"rank {rank}: {payload.get('error', 'out of memory')}"
                break
    finally:
        for p in procs:  # every result is in (or it failed): nothing left to wait for
            p.terminate()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        results.close()
    out = {"status": status, "ranks": [done[r] for r in sorted(done)], "message": message}
    if trace:
        out["traceback"] = trace
    return out

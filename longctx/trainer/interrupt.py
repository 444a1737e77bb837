"""Stopping a run without losing work: a signal on the driver becomes a checkpoint.

The first SIGINT or SIGTERM (Ctrl-C, a preemption notice, `kill`) asks the workers
to stop after the step they are in. Every step the ranks agree on it with one max
all-reduce of a 0/1 flag, so all of them leave the loop after the same step, write
a checkpoint there and return normally; the driver then marks the MLflow run KILLED
and prints the command that resumes it. A second signal stops at once.

Where the flag lives:
- one process (`launcher=local`): in this process (`LOCAL`);
- Ray: on the run's named `RunChannel` actor, which the driver creates; rank 0 reads it
  once a step, which costs one actor call (about a millisecond).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

LOCAL = threading.Event()  # launcher=local: set by the driver's signal handler


def channel_name(launch_id: str) -> str:
    return f"longctx-run-{launch_id}"


def create_channel(launch_id: str):
    """Driver, after ray.init: the run's `RunChannel` actor (named, so workers find it)."""
    import ray

    @ray.remote(num_cpus=0)
    class RunChannel:
        """The driver's stop request, and rank 0's summary of the run (Ray Train keeps
        reported metrics only with checkpoints, so the summary travels here)."""

        def __init__(self):
            self.stop, self.result = False, None

        def request_stop(self) -> None:
            self.stop = True

        def stop_requested(self) -> bool:
            return self.stop

        def report(self, result: dict) -> None:
            self.result = result

        def get_result(self):
            return self.result

    return RunChannel.options(name=channel_name(launch_id)).remote()


def find_channel(launch_id: str):
    """Worker: the run's channel, or None when not launched by `longctx train` under Ray."""
    if os.environ.get("LONGCTX_UNDER_RAY") != "1":
        return None
    import ray

    try:
        return ray.get_actor(channel_name(launch_id))
    except ValueError:
        return None


class SignalStop:
    """Driver side, a context manager: the first SIGINT/SIGTERM requests a clean stop, the
    second raises KeyboardInterrupt. Under Ray, `use_ray(channel)` passes requests on."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, launch_id: str, announce):
        self.launch_id, self.announce = launch_id, announce
        self.signum: Optional[int] = None
        self.actor = None
        self._previous: dict = {}

    def use_ray(self, channel) -> None:
        """After `ray.init`, which installs its own SIGTERM handler (`sys.exit`): ours again."""
        self._install()
        self.actor = channel
        if self.requested:  # a signal came before Ray was up
            self.actor.request_stop.remote()

    def __enter__(self) -> "SignalStop":
        LOCAL.clear()
        self._install()
        return self

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.signal(sig, self._handle)
                self._previous.setdefault(sig, previous)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        LOCAL.set()
        # A Ray call inside a signal handler could re-enter Ray's own locks: a thread makes it.
        if self.actor is not None:
            threading.Thread(target=self.actor.request_stop.remote, daemon=True).start()
        self.announce(f"{signal.Signals(signum).name}: stopping after the current step and writing a "
                      f"checkpoint (press Ctrl-C again to stop at once, without one)")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        LOCAL.clear()


class WorkerStop:
    """Worker side: `requested(mesh)` is collective (every rank calls it after every step)
    and true on all ranks once the driver asked for a stop."""

    def __init__(self, launch_id: str):
        self.actor = find_channel(launch_id)

    def _local_flag(self, mesh) -> bool:
        if self.actor is not None:
            if not mesh.is_logging_rank:
                return False
            import ray

            return bool(ray.get(self.actor.stop_requested.remote()))
        return LOCAL.is_set()

    def requested(self, mesh) -> bool:
        return mesh.all_reduce([float(self._local_flag(mesh))], group="world", op="max")[0] > 0
